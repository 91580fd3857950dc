"""The CRRL yardstick: how well an item table agrees with collaborative signal, on items CRRL did not train on.

Its definition is frozen: no training option (candidate count, positive score, similarity, seeds) changes it, so
numbers from different runs and settings compare.

- Held-out items: a seeded share of the items (`held_out_items`; CRRL's `eval_item_fraction`) that CRRL never
  trains on.
- Anchor reward: each held-out item with a positive is scored against N = 10 candidates: its top-1 co-occurring item
  (training interactions only: each user's last two items are left out) and 9 never-co-occurring items drawn once
  with seed 0. The positive is taken two ways, reported separately: by raw count (the paper's) and by the
  popularity-normalised cosine score count / sqrt(n_a n_b) with a minimum support of 2. The reward is the paper's
  rank reward 1 / log2(rank + 2) of the noise-free embedding, under three similarities: dot, cosine, and centred
  cosine (cosine after subtracting the table's mean row). A random ranking scores about 0.454.
- Validation pairs: for every user with 3+ items, does the embedding of the user's last training item (seq[-3])
  rank the validation item (seq[-2]) above 99 items the user never had (drawn once with seed 0)? Same rank reward
  over 100 candidates (random: about 0.19). The validation and test items never enter CRRL's training signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from reaemb_trl.candidates import CooccurrenceCandidates, stable_hash
from reaemb_trl.rewards import rank_reward
from reaemb_trl.similarity import SIMILARITIES, similarity_matrix

YARDSTICK_CANDIDATES = 10
YARDSTICK_PAIR_NEGATIVES = 99
YARDSTICK_SEED = 0


def held_out_items(item_ids: Sequence[str], fraction: float, seed: int = 0) -> list[str]:
    """A seeded share of the items, chosen by a stable hash of (seed, item id): the same items whatever the
    catalogue order, the process count or the training seed."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval_item_fraction must be in [0, 1), got {fraction}")
    threshold = int(fraction * 10_000)
    return [str(i) for i in item_ids if stable_hash(f"{seed}|heldout|{i}") % 10_000 < threshold]


@dataclass
class AnchorTask:
    item_ids: list[str]
    candidate_ids: list[list[str]]
    positive_weights: np.ndarray


@dataclass
class PairTask:
    anchor_ids: list[str]
    candidate_ids: list[list[str]]  # the positive first, then the negatives


class CRRLYardstick:
    """The frozen yardstick over `items` (the held-out items) and every user's validation pair."""

    def __init__(self, sequences: Mapping[str, Sequence[str]], catalogue_ids: Sequence[str], items: Sequence[str],
                 holdout: int = 2):
        catalogue_ids = [str(i) for i in catalogue_ids]
        self.anchor_tasks: dict[str, AnchorTask] = {}
        for name, score, support in (("count", "count", 1), ("normalized", "cosine", 2)):
            index = CooccurrenceCandidates.from_sequences(
                sequences, catalogue_ids, candidate_num=YARDSTICK_CANDIDATES, pos_num=1, holdout=holdout,
                seed=YARDSTICK_SEED, positive_score=score, min_support=support)
            scorable = set(index.items_with_positives())
            chosen = [i for i in map(str, items) if i in scorable]
            ids, weights = index.candidates(chosen, epoch=0) if chosen else ([], np.zeros((0, YARDSTICK_CANDIDATES)))
            self.anchor_tasks[name] = AnchorTask(chosen, ids, weights)
        self.pairs = self._validation_pairs(sequences, catalogue_ids)

    @staticmethod
    def _validation_pairs(sequences, catalogue_ids) -> PairTask:
        anchors, candidates = [], []
        pool = np.asarray(catalogue_ids)
        for user, seq in sequences.items():
            seq = [str(i) for i in seq]
            if len(seq) < 3 or len(pool) - len(set(seq)) < YARDSTICK_PAIR_NEGATIVES:
                continue
            rng = np.random.default_rng([YARDSTICK_SEED, stable_hash(f"pair|{user}")])
            seen, negatives = set(seq), []
            while len(negatives) < YARDSTICK_PAIR_NEGATIVES:
                for item in pool[rng.integers(0, len(pool), size=2 * YARDSTICK_PAIR_NEGATIVES)].tolist():
                    if item not in seen:
                        seen.add(item)
                        negatives.append(item)
                        if len(negatives) == YARDSTICK_PAIR_NEGATIVES:
                            break
            anchors.append(seq[-3])
            candidates.append([seq[-2]] + negatives)
        return PairTask(anchors, candidates)

    def score(self, table: torch.Tensor, table_ids: Sequence[str], center: torch.Tensor | None = None) -> dict:
        """Mean rank rewards of a table (rows = `table_ids`; `center` the mean row used by centred cosine,
        default the table's own mean). Keys: `anchor_<positive>_<similarity>` and `pairs_<similarity>`."""
        table, row, center = _prepared(table, table_ids, center)
        out = {}
        for name, task in self.anchor_tasks.items():
            if not task.item_ids:
                continue
            weights = torch.as_tensor(task.positive_weights)
            for kind in SIMILARITIES:
                out[f"anchor_{name}_{kind}"] = _mean_rank_reward(
                    table, row, task.item_ids, task.candidate_ids, weights, kind, center)
        if self.pairs.anchor_ids:
            weights = torch.zeros(len(self.pairs.anchor_ids), YARDSTICK_PAIR_NEGATIVES + 1)
            weights[:, 0] = 1.0
            for kind in SIMILARITIES:
                out[f"pairs_{kind}"] = _mean_rank_reward(
                    table, row, self.pairs.anchor_ids, self.pairs.candidate_ids, weights, kind, center)
        out["anchor_items"] = float(len(self.anchor_tasks["count"].item_ids))
        out["pair_users"] = float(len(self.pairs.anchor_ids))
        return out

    def anchor_rewards(self, table: torch.Tensor, table_ids: Sequence[str], positive: str = "normalized",
                       similarity: str = "centered_cosine", center: torch.Tensor | None = None) -> dict[str, float]:
        """Per item: the anchor rank reward behind `score`'s `anchor_<positive>_<similarity>` (for paired tests)."""
        if positive not in self.anchor_tasks:
            raise ValueError(f"positive must be one of {list(self.anchor_tasks)}, got {positive!r}")
        task = self.anchor_tasks[positive]
        table, row, center = _prepared(table, table_ids, center)
        values = _rank_rewards(table, row, task.item_ids, task.candidate_ids, torch.as_tensor(task.positive_weights),
                               similarity, center)
        return {item: float(v) for item, v in zip(task.item_ids, values) if v is not None}


def _prepared(table: torch.Tensor, table_ids: Sequence[str], center: torch.Tensor | None):
    """(fp32 table, item id -> row, centre: `center` or the table's mean row), what every score reads."""
    table = table.float()
    row = {str(item): n for n, item in enumerate(table_ids)}
    return table, row, table.mean(0) if center is None else center.float()


def _rank_rewards(table, row, item_ids, candidate_ids, weights, kind, center) -> list[float | None]:
    items = table[torch.tensor([row[i] for i in item_ids])]
    cands = table[torch.tensor([[row[c] for c in r] for r in candidate_ids])]
    return rank_reward(similarities=similarity_matrix(items, cands, kind, center), positive_mask=weights > 0)


def _mean_rank_reward(table, row, item_ids, candidate_ids, weights, kind, center) -> float:
    scored = [v for v in _rank_rewards(table, row, item_ids, candidate_ids, weights, kind, center) if v is not None]
    return float(sum(scored) / len(scored))
