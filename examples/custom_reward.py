"""Your own CRRL reward, end to end: define it, train with it (alone or mixed with the built-ins), load the result.

    python examples/custom_reward.py                    # tiny assets, CPU, ~10 s

A reward is a plain function called with keyword arguments (the fields of `reaemb_trl.rewards.RewardInputs` plus
the dataset's columns) that returns one finite float or None per row (an inf or nan is an error). From YAML or the command line, name it by dotted path instead of passing the
callable, with this folder on PYTHONPATH:

    PYTHONPATH=examples accelerate launch recipes/crrl.py --config recipes/configs/crrl_tiny.yaml \
        --reward_funcs rank custom_reward:margin_reward --reward_weights 1.0 0.5
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from reaemb_trl import ThoughtEmbedder
from reaemb_trl.candidates import CooccurrenceCandidates
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.crrl_trainer import CRRLTrainer
from reaemb_trl.data.canonical import load_interactions, load_items

ROOT = Path(__file__).resolve().parents[1]
TINY_BACKBONE = ROOT / "tests" / "assets" / "tiny-llama"
TINY_DATA = ROOT / "tests" / "assets" / "tiny_catalog"


def margin_reward(similarities, positive_mask, copy_index, log_metric=None, **kwargs) -> list[float | None]:
    """sigmoid(best positive similarity - best negative similarity): smooth, and 0.5 when they tie.
    Rows without a positive (nothing to score) return None; they are ignored like TRL ignores None."""
    mask = positive_mask.bool()
    pos = similarities.masked_fill(~mask, float("-inf")).max(-1).values
    neg = similarities.masked_fill(mask, float("-inf")).max(-1).values
    reward = torch.sigmoid(pos - neg)
    if log_metric is not None:  # shows up in the logs next to the built-in metrics
        anchors = torch.tensor([c == 0 for c in copy_index])
        log_metric("margin/anchor_mean", float((pos - neg)[anchors].mean()))
    return [float(r) if ok else None for r, ok in zip(reward.tolist(), mask.any(-1).tolist())]


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="crrl-custom-reward-"))
    # Stand-in for an LRCL checkpoint: the tiny backbone with a fresh thought module.
    ThoughtEmbedder.from_backbone(str(TINY_BACKBONE)).save_pretrained(out / "lrcl")

    items = load_items(TINY_DATA)
    candidates = CooccurrenceCandidates.from_sequences(load_interactions(TINY_DATA), items["item_id"], candidate_num=4)
    args = CRRLConfig(
        output_dir=str(out / "crrl"),
        lrcl_checkpoint=str(out / "lrcl"),
        per_device_train_batch_size=16,
        num_generations=4,
        candidate_num=4,
        noise_scale=0.3,
        similarity="cosine",
        learning_rate=0.01,
        max_steps=4,
        logging_steps=2,
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        reward_weights=[1.0, 0.5],
    )
    trainer = CRRLTrainer(args=args, train_dataset=items, candidates=candidates, reward_funcs=["rank", margin_reward])
    trainer.train()
    for entry in trainer.state.log_history:
        if "rewards/margin_reward/mean" in entry:
            print(f"step {entry['step']}: margin reward {entry['rewards/margin_reward/mean']:.4f}, "
                  f"rank reward {entry['rewards/rank_reward/mean']:.4f}, anchor margin {entry['margin/anchor_mean']:.4f}")
    trainer.save_model(str(out / "crrl"))
    embedder = ThoughtEmbedder.from_pretrained(out / "crrl")
    vectors = embedder.encode([row["attributes"] for row in items.select(range(3))])
    print(f"saved to {out / 'crrl'}; embeddings of 3 items: {tuple(vectors.shape)}")
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
