"""Trainers built from a dataset: what the recipes, the quickstart and the experiments share.

    data_args, config = parse_recipe_args(DataArguments, CRRLConfig)
    trainer = build_crrl_trainer(data_args, config)
    trainer.train()
    finish_training(trainer, config.output_dir)

The dataset is a `reaemb_trl.data.RecDataset` (items and user sequences); a caller that already holds one passes it,
so it is read once per run. LRCL needs only the items: without a dataset it reads items.jsonl alone, so a folder
without interactions trains too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reaemb_trl.data.canonical import RecDataset


@dataclass
class DataArguments:
    """Where the items (and, for CRRL, the interactions) come from."""

    dataset: str = field(
        default="ml-100k",
        metadata={"help": "A canonical dataset folder (items.jsonl + interactions.csv) or `ml-100k` (embedded)."},
    )
    max_items: int | None = field(default=None, metadata={"help": "Use only the first N items (quick runs)."})
    cold_items: float = field(
        default=0.0,
        metadata={"help": "Share of the items treated as new (reaemb_trl.data.cold): CRRL and its co-occurrence "
                  "counts never see their interactions, as `reaemb evaluate --cold-items` with the same share and "
                  "seed removes them downstream. LRCL reads only text and trains on every item."},
    )
    cold_item_seed: int = field(default=0, metadata={"help": "Seed of the cold items' draw."})


def items_dataset(items: list[dict], max_items: int | None = None):
    """Canonical items (`RecDataset.items`) as the `datasets.Dataset` the trainers take (columns item_id and
    attributes); only the first `max_items` when set."""
    from datasets import Dataset

    from reaemb_trl.data.canonical import items_features

    return Dataset.from_list(items[:max_items], features=items_features())


def load_dataset(data_args: DataArguments) -> RecDataset:
    """The dataset `data_args.dataset` names (`ml-100k` is fetched and converted once, then cached)."""
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.data.canonical import RecDataset

    return RecDataset.load(resolve_dataset(data_args.dataset))


def build_lrcl_trainer(data_args: DataArguments, config, data: RecDataset | None = None):
    """LRCL over every item of the dataset (the first `max_items` when set)."""
    from reaemb_trl.assets import resolve_dataset
    from reaemb_trl.data.canonical import read_items
    from reaemb_trl.lrcl_trainer import LRCLTrainer

    items = data.items if data is not None else read_items(resolve_dataset(data_args.dataset))
    return LRCLTrainer(args=config, train_dataset=items_dataset(items, data_args.max_items))


def build_crrl_trainer(data_args: DataArguments, config, data: RecDataset | None = None,
                       cold_items: set[str] | None = None):
    """CRRL on a dataset: co-occurrence candidates from the training interactions (each user's last `holdout`
    items left out); the items that have a positive train, except a seeded `eval_item_fraction` of all items, which
    are held out and scored by the frozen yardstick (reaemb_trl.crrl_yardstick) in the evaluation loop.

    `cold_items` (default: data_args' seeded `cold_items` share of the dataset's items) are items added after
    training: CRRL's catalogue, candidates (positives and negatives), co-occurrence counts, training and held-out
    items hold none of them, and the yardstick leaves out the users whose validation item is cold (it scores a
    table of the catalogue only)."""
    from reaemb_trl.candidates import CooccurrenceCandidates
    from reaemb_trl.crrl_yardstick import CRRLYardstick, held_out_items
    from reaemb_trl.crrl_trainer import CRRLTrainer
    from reaemb_trl.data.cold import cold_item_ids, without_items

    if config.lrcl_checkpoint is None and config.model_name_or_path is None:
        raise ValueError("set lrcl_checkpoint (the LRCL output folder) or model_name_or_path in the CRRL config")
    data = data if data is not None else load_dataset(data_args)
    if cold_items is None:
        cold_items = set(cold_item_ids(data.item_ids, data_args.cold_items, data_args.cold_item_seed))
    catalogue = items_dataset([item for item in data.items if item["item_id"] not in cold_items],
                              data_args.max_items)
    item_ids = list(catalogue["item_id"])
    # the validation and test targets stay (the counts leave them out anyway); a cold item never enters the index
    sequences = without_items(data.sequences, cold_items, keep_last=config.holdout)
    candidates = CooccurrenceCandidates.from_sequences(
        sequences, item_ids, candidate_num=config.candidate_num, pos_num=config.pos_num,
        holdout=config.holdout, seed=config.negative_seed, positive_score=config.positive_score,
        min_support=config.min_support, negative_sampling=config.negative_sampling,
    )
    held = set(held_out_items(item_ids, config.eval_item_fraction, config.eval_item_seed))
    scorable = set(candidates.items_with_positives()) - held
    train_items = catalogue.filter(lambda row: row["item_id"] in scorable)
    eval_items = catalogue.filter(lambda row: row["item_id"] in held) if held else None
    yardstick = None
    if held:
        scored_users = {user: seq for user, seq in sequences.items() if len(seq) < 3 or seq[-2] not in cold_items}
        yardstick = CRRLYardstick(scored_users, item_ids, sorted(held), config.holdout)
    return CRRLTrainer(args=config, train_dataset=train_items, eval_dataset=eval_items, candidates=candidates,
                       catalogue=catalogue, yardstick=yardstick)


def finish_training(trainer, output_dir: str) -> None:
    """Save the final checkpoint, push it when asked, and end the process group cleanly.

    `_internal_call=True` keeps Trainer.save_model from running Trainer.push_to_hub itself: the one push is ours.
    A failed push ends in one `error:` line, after every process has left the process group."""
    trainer.save_model(output_dir, _internal_call=True)
    push_error = None
    if trainer.args.push_to_hub and trainer.accelerator.is_main_process:
        from reaemb_trl.hub import PushError, default_repo_id, push_checkpoint
        from reaemb_trl.model_card import ModelCardError

        args = trainer.args
        try:
            push_checkpoint(output_dir, repo_id=default_repo_id(args), private=args.hub_private_repo,
                            revision=args.hub_revision, token=args.hub_token)
        except (PushError, ModelCardError) as exc:
            push_error = exc
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if push_error is not None:
        from reaemb_trl.cli.errors import fail

        fail(f"{push_error} (the checkpoint is saved in {output_dir}; push it later with `reaemb push {output_dir}`)")
