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

Cold items (`unseen`, a (N + 1,) bool mask) are no candidates in any objective: they stand for items added after
training, so no gradient reaches their rows (an ID model keeps their random initialisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reaemb_trl.evaluation.config import PROPOSALS


def _position_dtype(length: int) -> torch.dtype:
    return torch.int16 if length < torch.iinfo(torch.int16).max else torch.int32


def first_seen(user_seq: torch.Tensor, num_items: int) -> torch.Tensor:
    """(B, N + 1): the first absolute position at which each item occurs in each row of `user_seq` (B, S),
    right-padded with 0; a value beyond every position where it does not occur (column 0, padding, included).
    int16 when the sequences allow it: the softmax reads this table once per row and chunk."""
    batch, length = user_seq.shape
    dtype = _position_dtype(length)
    never = torch.iinfo(dtype).max
    positions = torch.arange(length, device=user_seq.device, dtype=dtype).expand(batch, length)
    positions = torch.where(user_seq != 0, positions, never)
    out = torch.full((batch, num_items + 1), never, dtype=dtype, device=user_seq.device)
    out.scatter_reduce_(1, user_seq, positions, reduce="amin")
    out[:, 0] = never
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
    dtype = _position_dtype(length)
    return torch.where(hit, sorted_pos.gather(1, slot), torch.iinfo(dtype).max).to(dtype)


def proposal_log_q(counts: torch.Tensor, kind: str, unseen: torch.Tensor | None = None) -> torch.Tensor:
    """log Q(item) over items 1..N (index 0 = padding, -inf): uniform, or popularity^0.75 (with +1 smoothing);
    `unseen` items (cold) are never drawn (-inf)."""
    if kind not in PROPOSALS:
        raise ValueError(f"sampled-softmax proposal must be one of {PROPOSALS}, got {kind!r}")
    weights = torch.ones_like(counts, dtype=torch.float64) if kind == "uniform" else (counts.double() + 1) ** 0.75
    weights[0] = 0.0
    if unseen is not None:
        weights[unseen] = 0.0
    return (weights / weights.sum()).log()


def full_softmax_loss(states: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                      history: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      chunk_rows: int = 1024, unseen: torch.Tensor | None = None) -> torch.Tensor:
    """Mean softmax cross-entropy of `states` (P, h) against every item: `items` (N + 1, h), row 0 = padding (never
    a candidate); `targets` (P,) in 1..N. `history` = (first_seen (B, N + 1), rows (P,), limit (P,)) removes, for
    row r, the items with first_seen[rows[r]] < limit[r] (the user's earlier items; the target always stays).
    `unseen` (N + 1,) bool: items that are no candidate in any row (cold items; never a target).

    Computed in chunks of rows without keeping the (P, N + 1) logits: the forward keeps each row's log-sum-exp, the
    backward recomputes a chunk's logits and turns them into gradients at once. Same numbers as masking a full
    logit matrix and calling F.cross_entropy, with a few cache-sized passes instead of a dozen passes over P x N.
    Under autocast the matmuls run in its dtype; the softmax always in float32."""
    first, rows, limit = history if history is not None else (None, None, None)
    return _FullSoftmaxCE.apply(states, items, targets, first, rows, limit, chunk_rows, unseen)


def _chunk_logits(states, weights, targets, first, rows, limit, dtype, unseen=None) -> torch.Tensor:
    """Logits (at least float32) of one chunk of rows with padding, unseen items and history at -inf."""
    logits = (states.to(dtype) @ weights.T).to(torch.promote_types(dtype, torch.float32))
    logits[:, 0] = -torch.inf
    if unseen is not None:
        logits.masked_fill_(unseen, -torch.inf)
    if first is not None:
        excluded = first[rows] < limit.to(first.dtype).unsqueeze(1)  # same dtype: no (rows x N) int64 copy
        excluded.scatter_(1, targets.unsqueeze(1), False)
        logits.masked_fill_(excluded, -torch.inf)
    return logits


class _FullSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, items, targets, first, rows, limit, chunk_rows, unseen):
        device = states.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.promote_types(states.dtype, items.dtype))
        with torch.autocast(device, enabled=False):
            weights = items.detach().to(dtype)
            lse = torch.empty(len(targets), dtype=torch.promote_types(dtype, torch.float32), device=states.device)
            total = torch.zeros((), dtype=torch.float64, device=states.device)
            for start in range(0, len(targets), chunk_rows):
                span = slice(start, start + chunk_rows)
                part = [x[span] if x is not None else None for x in (targets, rows, limit)]
                logits = _chunk_logits(states.detach()[span], weights, part[0], first, part[1], part[2], dtype,
                                       unseen)
                lse[span] = torch.logsumexp(logits, dim=1)
                total += (lse[span] - logits.gather(1, part[0].unsqueeze(1)).squeeze(1)).double().sum()
        ctx.save_for_backward(states, items, targets, lse, *(x for x in (first, rows, limit) if x is not None))
        ctx.has_history, ctx.dtype, ctx.chunk_rows, ctx.unseen = first is not None, dtype, chunk_rows, unseen
        return (total / max(len(targets), 1)).to(lse.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        states, items, targets, lse, *history = ctx.saved_tensors
        first, rows, limit = history if ctx.has_history else (None, None, None)
        dtype, scale = ctx.dtype, grad_loss.to(lse.dtype) / max(len(targets), 1)
        with torch.autocast(states.device.type, enabled=False):
            weights = items.detach().to(dtype)
            grad_states = torch.empty(states.shape, dtype=lse.dtype, device=states.device)
            grad_items = torch.zeros(items.shape, dtype=lse.dtype, device=items.device)
            for start in range(0, len(targets), ctx.chunk_rows):
                span = slice(start, start + ctx.chunk_rows)
                part = [x[span] if x is not None else None for x in (targets, rows, limit)]
                chunk = states.detach()[span].to(dtype)
                probs = _chunk_logits(chunk, weights, part[0], first, part[1], part[2], dtype, ctx.unseen)
                probs.sub_(lse[span].unsqueeze(1)).exp_()  # in place: each pass over a chunk costs
                probs[torch.arange(len(part[0]), device=probs.device), part[0]] -= 1.0
                probs = probs.mul_(scale).to(dtype)
                grad_states[span] = probs @ weights
                grad_items += probs.T @ chunk
        return grad_states.to(states.dtype), grad_items.to(items.dtype), None, None, None, None, None, None


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
    """K negatives from Q with replacement, or every item Q can draw once when `count` >= their number (then the
    loss is exact)."""
    drawable = torch.isfinite(log_q[1:]).nonzero().flatten() + 1
    if count >= len(drawable):
        return drawable, None
    return torch.multinomial(log_q.exp().float(), count, replacement=True, generator=generator), count


def bce_loss(states: torch.Tensor, table, targets: torch.Tensor, user_seq: torch.Tensor, num_items: int,
             generator: torch.Generator, seen: torch.Tensor | None = None) -> torch.Tensor:
    """BCE on (target, one negative) at every position whose target is not 0; states (B, L, h), targets (B, L).
    The negative is uniform over items outside the row's user sequence `user_seq` (B, S) (redrawn up to 3 times on
    a clash, as the papers do), and within `seen` (the item indices that are candidates; None: all 1..N)."""

    def draw():
        if seen is None:
            return torch.randint(1, num_items + 1, targets.shape, generator=generator).to(targets.device)
        return seen[torch.randint(0, len(seen), targets.shape, generator=generator)].to(targets.device)

    negatives = draw()
    for _ in range(3):
        clash = (user_seq.unsqueeze(1) == negatives.unsqueeze(-1)).any(-1)
        if not clash.any():
            break
        redraw = draw()
        negatives = torch.where(clash, redraw, negatives)
    valid = targets != 0
    pos = (states * table(targets)).sum(-1)[valid]
    neg = (states * table(negatives)).sum(-1)[valid]
    return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
            + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))
