"""Trainers built from a dataset: what the recipes, the quickstart and the experiments share.

    data_args, config = TrlParser((DataArguments, CRRLConfig)).parse_args_and_config()
    trainer = build_crrl_trainer(data_args, config)
    trainer.train()
    finish_training(trainer, config.output_dir)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DataArguments:
    """Where the items (and, for CRRL, the interactions) come from."""

    dataset: str = field(
        default="ml-100k",
        metadata={"help": "A canonical dataset folder (items.jsonl + interactions.csv) or `ml-100k` (embedded)."},
    )
    max_items: int | None = field(default=None, metadata={"help": "Use only the first N items (quick runs)."})


@dataclass
class LoadedDataset:
    """A canonical dataset read once: the item rows, the same as a `datasets.Dataset` (`items`), and the user
    sequences."""

    folder: Path
    rows: list[dict]
    items: object
    sequences: dict[str, list[str]] | None = None

    def rec_dataset(self):
        """The `RecDataset` the downstream evaluation reads."""
        from reaemb_trl.data.canonical import RecDataset

        if self.sequences is None:
            raise ValueError("this dataset was loaded without its interactions (with_sequences=False)")
        return RecDataset(self.rows, self.sequences)

    @classmethod
    def load(cls, data_args: DataArguments, with_sequences: bool = False) -> "LoadedDataset":
        from datasets import Dataset

        from reaemb_trl.assets import resolve_dataset
        from reaemb_trl.data.canonical import items_features, load_interactions, read_items

        folder = resolve_dataset(data_args.dataset)
        rows = read_items(folder)
        sequences = load_interactions(folder, item_ids=[r["item_id"] for r in rows]) if with_sequences else None
        if data_args.max_items is not None:
            rows = rows[: data_args.max_items]
        return cls(folder, rows, Dataset.from_list(rows, features=items_features()), sequences)


def build_lrcl_trainer(data_args: DataArguments, config, data: LoadedDataset | None = None):
    """LRCL over every item of the dataset."""
    from reaemb_trl.lrcl_trainer import LRCLTrainer

    data = data or LoadedDataset.load(data_args)
    return LRCLTrainer(args=config, train_dataset=data.items)


def build_crrl_trainer(data_args: DataArguments, config, data: LoadedDataset | None = None):
    """CRRL on a dataset: co-occurrence candidates from the training interactions (each user's last `holdout`
    items left out); the items that have a positive train, except a seeded `eval_item_fraction` of all items, which
    are held out and scored by the frozen yardstick (reaemb_trl.crrl_yardstick) in the evaluation loop."""
    from reaemb_trl.candidates import CooccurrenceCandidates
    from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items
    from reaemb_trl.crrl_trainer import CRRLTrainer

    if config.lrcl_checkpoint is None and config.model_name_or_path is None:
        raise ValueError("set lrcl_checkpoint (the LRCL output folder) or model_name_or_path in the CRRL config")
    data = data if data is not None and data.sequences is not None else LoadedDataset.load(data_args, True)
    item_ids = list(data.items["item_id"])
    candidates = CooccurrenceCandidates.from_sequences(
        data.sequences, item_ids, candidate_num=config.candidate_num, pos_num=config.pos_num,
        holdout=config.holdout, seed=config.negative_seed, positive_score=config.positive_score,
        min_support=config.min_support, negative_sampling=config.negative_sampling,
    )
    held = set(held_out_items(item_ids, config.eval_item_fraction, config.eval_item_seed))
    scorable = set(candidates.items_with_positives()) - held
    train_items = data.items.filter(lambda row: row["item_id"] in scorable)
    eval_items = data.items.filter(lambda row: row["item_id"] in held) if held else None
    yardstick = CRRLYardstick(data.sequences, item_ids, sorted(held), config.holdout) if held else None
    return CRRLTrainer(args=config, train_dataset=train_items, eval_dataset=eval_items, candidates=candidates,
                       catalogue=data.items, yardstick=yardstick)


def finish_training(trainer, output_dir: str) -> None:
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
