"""What the recipes share: dataset arguments and the end-of-run steps (save, optional push, close processes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataArguments:
    """Where the items (and, for CRRL, the interactions) come from."""

    dataset: str = field(
        default="ml-100k",
        metadata={"help": "A canonical dataset folder (items.jsonl + interactions.csv) or `ml-100k` (embedded)."},
    )
    max_items: int | None = field(default=None, metadata={"help": "Use only the first N items (quick runs)."})


def load_recipe_items(data_args: DataArguments):
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.data.canonical import load_items

    items = load_items(resolve_dataset(data_args.dataset))
    if data_args.max_items is not None:
        items = items.select(range(min(data_args.max_items, len(items))))
    return items


def build_crrl_trainer(data_args: DataArguments, config):
    """CRRL on a dataset: co-occurrence candidates from the training interactions, items that have a positive."""
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.candidates import CooccurrenceCandidates
    from reaemb_trl.crrl_trainer import CRRLTrainer
    from reaemb_trl.data.canonical import load_interactions

    if config.lrcl_checkpoint is None and config.model_name_or_path is None:
        raise ValueError("set lrcl_checkpoint (the LRCL output folder) or model_name_or_path in the CRRL config")
    items = load_recipe_items(data_args)
    sequences = load_interactions(resolve_dataset(data_args.dataset))
    candidates = CooccurrenceCandidates.from_sequences(
        sequences,
        items["item_id"],
        candidate_num=config.candidate_num,
        pos_num=config.pos_num,
        holdout=config.holdout,
        seed=config.negative_seed,
    )
    scorable = set(candidates.items_with_positives())
    train_items = items.filter(lambda row: row["item_id"] in scorable)
    return CRRLTrainer(args=config, train_dataset=train_items, candidates=candidates, catalogue=items)


def finish(trainer, output_dir: str) -> None:
    """Save the final checkpoint, push it when asked, and end the process group cleanly.

    `_internal_call=True` keeps Trainer.save_model from running Trainer.push_to_hub itself: the one push is ours."""
    trainer.save_model(output_dir, _internal_call=True)
    if trainer.args.push_to_hub and trainer.accelerator.is_main_process:
        from reaemb_trl.hub import default_repo_id, push_checkpoint

        args = trainer.args
        push_checkpoint(output_dir, repo_id=default_repo_id(args), private=args.hub_private_repo,
                        revision=args.hub_revision, token=args.hub_token)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
