"""CRRL reward functions (docs/method.md, "CRRL"), following TRL's reward contract.

A reward function is called once per generation batch with keyword arguments only and returns one
`float | None` per row (a row = one noisy copy of one item). The arguments are the fields of `RewardInputs` below
plus every column of the training dataset (e.g. `attributes`), one value per row; always accept `**kwargs`: more
arguments may be added.

- `None` means "cannot score this row" and is handled like TRL does (NaN, ignored by the nan-aware group statistics;
  a row no function can score gets advantage 0).
- A non-finite value (inf, nan) is an error: CRRLTrainer raises a ValueError naming the function and the count
  (one inf would otherwise turn every advantage of the batch into 0, the other rewards' signal included). Return
  None for rows you cannot score.

Reward functions are given as callables or names: a built-in short name (`rank`, `multi_positive_rank`, `softmax`,
`log_softmax`, `collaborative_agreement`, see `REWARD_REGISTRY`) or a dotted path `package.module:function` /
`package.module.function`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from reaemb_trl.similarity import similarity_matrix

RewardFunc = Callable[..., list]


# ---- the contract ------------------------------------------------------------------------------------------------
@dataclass
class RewardInputs:
    """What `CRRLTrainer` passes to every reward function about one generation batch: R rows, N candidates per row,
    embeddings of size d. Tensors are on the trainer's device."""

    item_ids: list[str]  # (R,) the item of each row
    copy_index: list[int]  # (R,) 0..G-1 within the item's group; 0 is the noise-free anchor (`anchor_copy`)
    candidate_ids: list[list[str]]  # (R, N) the candidates of each row's item, positives first
    positive_mask: torch.Tensor  # bool (R, N): which candidates are positives
    positive_weights: torch.Tensor  # float (R, N): score_b / sum of the positives' scores, 0 on negatives
    item_embeddings: torch.Tensor  # float (R, d): e_g, the embedding generated with the noisy action z_g
    candidate_embeddings: torch.Tensor  # float (R, N, d): e_b, each candidate with its noise-free thought
    similarities: torch.Tensor  # float (R, N): s(e_g, e_b) under `similarity`
    similarity: str  # the kind, one of reaemb_trl.similarity.SIMILARITIES
    actions: torch.Tensor  # float (R, d): z_g, the noisy latent actions
    reward_temperature: float  # the config's temperature for smooth rewards
    collaborative_table: CollaborativeTable | None  # loaded from `CRRLConfig.collaborative_table`
    trainer_state: Any  # transformers.TrainerState
    log_extra: Callable[[str, list], None]  # TRL's; CRRL logs no completions table, so the values are dropped
    log_metric: Callable[[str, float], None]  # TRL's: a scalar averaged into the logged metrics

    def keywords(self, rows: Sequence[dict]) -> dict[str, Any]:
        """The reward functions' keyword arguments: each dataset column of `rows` as a list (R,), then these
        fields (a field wins over a column of the same name). Nothing is copied."""
        names = [f.name for f in fields(self)]
        kwargs = {key: [row[key] for row in rows] for key in rows[0] if key not in names}
        kwargs.update((name, getattr(self, name)) for name in names)
        return kwargs


# ---- helpers -----------------------------------------------------------------------------------------------------
def _as_tensor(value, dtype=torch.float32) -> torch.Tensor:
    return value.detach().to(dtype).cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=dtype)


def positive_ranks(similarities: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """0-based rank of every candidate among the N candidates of its row, by descending similarity.

    Ties: a negative with a similarity *equal* to a positive's ranks above it (pessimistic, so a constant embedding
    earns the lowest rank, not the best); ties between two positives do not push either down.
    rank_b = #{c != b : s_c > s_b} + #{negatives c : s_c == s_b}."""
    s = _as_tensor(similarities)
    mask = _as_tensor(positive_mask, torch.bool)
    greater = (s.unsqueeze(1) > s.unsqueeze(2)).sum(-1)  # [r, b] = #{c : s_c > s_b}
    tie_neg = ((s.unsqueeze(1) == s.unsqueeze(2)) & ~mask.unsqueeze(1)).sum(-1)  # [r, b] = #{negatives c: s_c == s_b}
    tie_neg = tie_neg - (~mask).long()  # a negative b does not tie with itself
    return greater + tie_neg


def _weights(positive_mask, positive_weights) -> torch.Tensor:
    mask = _as_tensor(positive_mask, torch.bool)
    if positive_weights is None:
        weights = mask.float()
    else:
        weights = _as_tensor(positive_weights) * mask
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp(min=1e-12), weights)


def _to_list(values: torch.Tensor, valid: torch.Tensor) -> list[float | None]:
    return [float(v) if ok else None for v, ok in zip(values.tolist(), valid.tolist())]


# ---- built-ins ---------------------------------------------------------------------------------------------------
def rank_reward(similarities, positive_mask, **kwargs) -> list[float | None]:
    """The paper's reward: R = 1 / log2(rho + 2), rho = 0-based rank of the positive among the N candidates
    (ties counted against the positive, see `positive_ranks`). With several positives, the first one (the most
    co-occurring) is scored. Rows without a positive get None."""
    mask = _as_tensor(positive_mask, torch.bool)
    ranks = positive_ranks(similarities, mask).float()
    first = mask.float().argmax(-1)
    rho = ranks.gather(1, first.unsqueeze(1)).squeeze(1)
    return _to_list(1.0 / torch.log2(rho + 2.0), mask.any(-1))


def multi_positive_rank_reward(similarities, positive_mask, positive_weights=None, **kwargs) -> list[float | None]:
    """R = sum_b w_b / log2(rank_b + 2) over the positives b, w_b = count_b / sum of the positives' counts
    (uniform when no weights are given). Equals `rank_reward` with one positive. Rows without a positive: None."""
    mask = _as_tensor(positive_mask, torch.bool)
    ranks = positive_ranks(similarities, mask).float()
    weights = _weights(mask, positive_weights)
    reward = (weights / torch.log2(ranks + 2.0)).sum(-1)
    return _to_list(reward, mask.any(-1))


def softmax_reward(similarities, positive_mask, positive_weights=None, reward_temperature: float = 1.0, **kwargs):
    """Smooth reward: sum_b w_b * softmax(s / T)_b over the positives b (T = `reward_temperature`). Moves with
    every small change of the embedding, unlike a rank; with dot similarity pick T on the scale of the dot products."""
    if reward_temperature <= 0:
        raise ValueError(f"reward_temperature must be > 0, got {reward_temperature}")
    mask = _as_tensor(positive_mask, torch.bool)
    probs = (_as_tensor(similarities).double() / reward_temperature).softmax(-1).float()
    reward = (_weights(mask, positive_weights) * probs).sum(-1)
    return _to_list(reward, mask.any(-1))


def log_softmax_reward(similarities, positive_mask, positive_weights=None, reward_temperature: float = 1.0,
                       **kwargs):
    """Log-likelihood reward: sum_b w_b * log softmax(s / T)_b over the positives b - the contrastive loss of the
    item against its candidates, negated. Unlike a rank (piecewise constant) or a probability (flat where the
    positive is far behind or far ahead), it moves with every change of the embedding and never saturates.
    Rows without a positive: None."""
    if reward_temperature <= 0:
        raise ValueError(f"reward_temperature must be > 0, got {reward_temperature}")
    mask = _as_tensor(positive_mask, torch.bool)
    log_probs = (_as_tensor(similarities).double() / reward_temperature).log_softmax(-1)
    reward = (_weights(mask, positive_weights).double() * log_probs.masked_fill(~mask, 0.0)).sum(-1).float()
    return _to_list(reward, mask.any(-1))


class CollaborativeTable:
    """A collaborative item-embedding table (e.g. a trained SASRec's item vectors) stored as safetensors: tensor
    `embeddings` (I, k) and metadata `item_ids` (a JSON list of I ids)."""

    def __init__(self, item_ids: Sequence[str], embeddings: torch.Tensor):
        if len(item_ids) != embeddings.shape[0]:
            raise ValueError(f"{len(item_ids)} item ids for {embeddings.shape[0]} embedding rows")
        self.item_ids = [str(i) for i in item_ids]
        self.embeddings = embeddings.float()
        self._index = {item: i for i, item in enumerate(self.item_ids)}

    @classmethod
    def load(cls, path: str | Path) -> "CollaborativeTable":
        """Any item-table file (reaemb_trl.item_table); a missing or malformed file is a ValueError naming it."""
        from reaemb_trl.item_table import read_table

        table = read_table(path)
        return cls(table.item_ids, table.embeddings)

    def save(self, path: str | Path) -> None:
        """Write atomically as an item-table file."""
        from reaemb_trl.item_table import write_table

        write_table(path, self.embeddings, self.item_ids, {"source": "collaborative"})

    def rows(self, item_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, found) for ids; missing ids get index 0 and found False."""
        idx = [self._index.get(str(i), -1) for i in item_ids]
        found = torch.tensor([i >= 0 for i in idx], dtype=torch.bool)
        return torch.tensor([max(i, 0) for i in idx], dtype=torch.long), found


def _pearson(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise Pearson correlation and whether it is defined (both rows vary)."""
    x = x.double() - x.double().mean(-1, keepdim=True)
    y = y.double() - y.double().mean(-1, keepdim=True)
    nx, ny = x.norm(dim=-1), y.norm(dim=-1)
    valid = (nx > 1e-12) & (ny > 1e-12)
    return ((x * y).sum(-1) / (nx * ny).clamp(min=1e-300)).float(), valid


def collaborative_agreement_reward(
    similarities, item_ids, candidate_ids, collaborative_table: CollaborativeTable | None = None, similarity="dot", **kwargs
) -> list[float | None]:
    """Pearson correlation (in [-1, 1]) between the generated embedding's similarities to the N candidates and the
    collaborative table's similarities between the same items (same `similarity` kind; centred cosine centres on
    the collaborative table's mean row). None when the item or a candidate is missing from the table, or either
    similarity vector is constant."""
    if collaborative_table is None:
        raise ValueError(
            "collaborative_agreement_reward needs a collaborative table: set CRRLConfig.collaborative_table to a "
            "safetensors file with tensor 'embeddings' and metadata 'item_ids'"
        )
    table = collaborative_table
    flat = [c for row in candidate_ids for c in row]
    item_rows, item_found = table.rows(item_ids)
    cand_rows, cand_found = table.rows(flat)
    n = len(candidate_ids[0]) if candidate_ids else 0
    items = table.embeddings[item_rows]
    cands = table.embeddings[cand_rows].view(len(item_ids), n, -1)
    center = table.embeddings.mean(0) if similarity == "centered_cosine" else None
    target = similarity_matrix(items, cands, similarity, center)
    corr, valid = _pearson(_as_tensor(similarities), target)
    valid = valid & item_found & cand_found.view(len(item_ids), n).all(-1)
    return _to_list(corr, valid)


# ---- registry ----------------------------------------------------------------------------------------------------
REWARD_REGISTRY: dict[str, RewardFunc] = {
    "rank": rank_reward,
    "multi_positive_rank": multi_positive_rank_reward,
    "softmax": softmax_reward,
    "log_softmax": log_softmax_reward,
    "collaborative_agreement": collaborative_agreement_reward,
}


def register_reward(name: str, func: RewardFunc | None = None):
    """Register a reward under a short name (usable from YAML/CLI once registered: register it before building the
    CRRLConfig that names it). Works as a decorator too."""

    def wrap(f: RewardFunc) -> RewardFunc:
        REWARD_REGISTRY[name] = f
        return f

    return wrap(func) if func is not None else wrap


def resolve_reward(spec: str | RewardFunc) -> RewardFunc:
    """A callable as is; a registered short name; or `package.module:function` / `package.module.function`."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"a reward function must be a callable or a name, got {spec!r}")
    if spec in REWARD_REGISTRY:
        return REWARD_REGISTRY[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
    elif "." in spec:
        module_name, _, attr = spec.rpartition(".")
    else:
        raise ValueError(f"unknown reward {spec!r}: use a built-in name ({', '.join(REWARD_REGISTRY)}) or a dotted "
                         "path 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} for reward {spec!r}: {exc}") from exc
    func: Any = module
    for part in attr.split("."):
        if not hasattr(func, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (reward {spec!r})")
        func = getattr(func, part)
    if not callable(func):
        raise TypeError(f"reward {spec!r} resolved to {func!r}, which is not callable")
    return func


def resolve_rewards(specs: Sequence[str | RewardFunc] | str | RewardFunc) -> list[RewardFunc]:
    """`resolve_reward` of each spec (one spec or a list)."""
    specs = list(specs) if isinstance(specs, (list, tuple)) else [specs]
    funcs = [resolve_reward(s) for s in specs]
    if any(isinstance(f, torch.nn.Module) for f in funcs):
        raise TypeError("CRRL rewards score embeddings: reward models (nn.Module) are not supported")
    return funcs


def reward_weights(weights: Sequence[float] | None, count: int) -> torch.Tensor:
    """The weight of each of `count` reward functions (all 1 when `weights` is None)."""
    if weights is None:
        return torch.ones(count, dtype=torch.float32)
    if len(weights) != count:
        raise ValueError(f"{len(weights)} reward weights for {count} reward functions")
    return torch.tensor(weights, dtype=torch.float32)


def reward_name(func: RewardFunc) -> str:
    """The name TRL-style metrics use (`rewards/<name>/mean`)."""
    return getattr(func, "__name__", None) or type(func).__name__


__all__ = [
    "REWARD_REGISTRY",
    "CollaborativeTable",
    "RewardInputs",
    "collaborative_agreement_reward",
    "log_softmax_reward",
    "multi_positive_rank_reward",
    "positive_ranks",
    "rank_reward",
    "register_reward",
    "resolve_reward",
    "resolve_rewards",
    "reward_name",
    "reward_weights",
    "softmax_reward",
]
