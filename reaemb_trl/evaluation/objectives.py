"""Training objectives of the downstream models, and the history rule they share with the ranking.

- `ce` (default): softmax cross-entropy of the target against the whole catalogue (padding column masked). Past
  `sampled_softmax_above` items, a sampled softmax with logQ correction: K negatives shared by the batch, drawn
  with replacement from a proposal Q, every logit (target included) lowered by log(K Q(item)), negatives equal to
  the target masked. With every item drawn once it is exactly the full softmax.
- `bce`: the papers' objective, binary cross-entropy on the target and one negative drawn uniformly from items
  outside the user's training sequence.

History rule `exclude`: when predicting the item at absolute position p of a user's training sequence, the items at
positions < p are not candidates (the target itself always is) - the same rule the ranking applies to the
validation and test histories.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "bce")
PROPOSALS = ("uniform", "popularity")
NEVER = torch.iinfo(torch.long).max // 2  # first-seen position of items a user never had


def first_seen(user_seq: torch.Tensor, num_items: int) -> torch.Tensor:
    """(B, N + 1): the first absolute position at which each item occurs in each row of `user_seq` (B, S),
    right-padded with 0; NEVER where it does not occur. Column 0 (padding) is NEVER."""
    batch, length = user_seq.shape
    positions = torch.arange(length, device=user_seq.device).expand(batch, length)
    positions = torch.where(user_seq != 0, positions, NEVER)
    out = torch.full((batch, num_items + 1), NEVER, dtype=torch.long, device=user_seq.device)
    out.scatter_reduce_(1, user_seq, positions, reduce="amin")
    out[:, 0] = NEVER
    return out


def first_seen_at(user_seq: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(B, K): `first_seen(user_seq)[:, columns]` without building the (B, N + 1) table (for huge catalogues)."""
    batch, length = user_seq.shape
    positions = torch.arange(length, device=user_seq.device).expand(batch, length)
    beyond = int(max(user_seq.max(), columns.max())) + 1  # sorts padding after every item
    keys = torch.where(user_seq != 0, user_seq, beyond)
    # Sort by (item, position): the first entry of an item in the sorted row is its first occurrence.
    order = torch.argsort(keys * (length + 1) + positions, dim=1)
    sorted_items, sorted_pos = keys.gather(1, order), positions.gather(1, order)
    query = columns.expand(batch, -1).contiguous()
    slot = torch.searchsorted(sorted_items, query).clamp(max=length - 1)
    hit = sorted_items.gather(1, slot) == query
    return torch.where(hit, sorted_pos.gather(1, slot), NEVER)


def proposal_log_q(counts: torch.Tensor, kind: str) -> torch.Tensor:
    """log Q(item) over items 1..N (index 0 = padding, -inf): uniform, or popularity^0.75 (with +1 smoothing)."""
    if kind not in PROPOSALS:
        raise ValueError(f"sampled-softmax proposal must be one of {PROPOSALS}, got {kind!r}")
    weights = torch.ones_like(counts, dtype=torch.float64) if kind == "uniform" else (counts.double() + 1) ** 0.75
    weights[0] = 0.0
    return (weights / weights.sum()).log()


def full_softmax_loss(states: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                      excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE over the positions whose target is not 0 (padding). states (..., h); items (N + 1, h) with row 0 =
    padding; targets (...); excluded (..., N + 1) bool: candidates removed at that position. The target itself
    always stays a candidate (`excluded` is cleared there, in place)."""
    logits = states @ items.T
    logits[..., 0] = -torch.inf
    if excluded is not None:
        excluded.scatter_(-1, targets.unsqueeze(-1), False)
        logits = logits.masked_fill(excluded, -torch.inf)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=0)


def sampled_softmax_loss(states: torch.Tensor, table, targets: torch.Tensor, negatives: torch.Tensor,
                         log_q: torch.Tensor, num_draws: int | None = None,
                         excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax with logQ correction, mean over positions whose target is not 0. states (..., h);
    targets (...); negatives (K,) shared by all positions; log_q (N + 1,) the proposal; `num_draws` the K of the
    expected-count correction log(K Q) (None: the negatives are the whole catalogue, each once, and no correction
    applies); excluded (..., K) bool: negatives removed at a position (its history)."""
    if num_draws is None:
        shift_pos = shift_neg = 0.0
    else:
        correction = torch.log(torch.tensor(float(num_draws), dtype=torch.float64))
        shift_pos = (log_q[targets.clamp(min=1)] + correction).to(states.dtype)  # padding positions: any finite
        shift_neg = (log_q[negatives] + correction).to(states.dtype)
    positive = (states * table(targets)).sum(-1) - shift_pos
    negative = states @ table(negatives).T - shift_neg
    hit = negatives == targets.unsqueeze(-1)  # a drawn negative equal to the target is no negative
    if excluded is not None:
        hit = hit | excluded
    negative = negative.masked_fill(hit, -torch.inf)
    logits = torch.cat([positive.unsqueeze(-1), negative], dim=-1)
    valid = targets != 0
    return -(logits.log_softmax(-1)[..., 0][valid]).mean()


def draw_negatives(log_q: torch.Tensor, count: int, generator: torch.Generator) -> tuple[torch.Tensor, int | None]:
    """K negatives from Q with replacement, or every item once when `count` >= N (then the loss is exact)."""
    num_items = len(log_q) - 1
    if count >= num_items:
        return torch.arange(1, num_items + 1), None
    return torch.multinomial(log_q.exp().float(), count, replacement=True, generator=generator), count


def bce_loss(states: torch.Tensor, table, targets: torch.Tensor, user_seq: torch.Tensor, num_items: int,
             generator: torch.Generator) -> torch.Tensor:
    """BCE on (target, one negative) at every position whose target is not 0; states (B, L, h), targets (B, L).
    The negative is uniform over items outside the row's user sequence `user_seq` (B, S) (redrawn up to 3 times on
    a clash, as the papers do)."""
    negatives = torch.randint(1, num_items + 1, targets.shape, generator=generator).to(targets.device)
    for _ in range(3):
        clash = (user_seq.unsqueeze(1) == negatives.unsqueeze(-1)).any(-1)
        if not clash.any():
            break
        redraw = torch.randint(1, num_items + 1, targets.shape, generator=generator).to(targets.device)
        negatives = torch.where(clash, redraw, negatives)
    valid = targets != 0
    pos = (states * table(targets)).sum(-1)[valid]
    neg = (states * table(negatives)).sum(-1)[valid]
    return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
            + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))
