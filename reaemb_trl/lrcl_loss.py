"""LRCL contrastive losses (docs/method.md, "LRCL"). Each returns a dict of components; `loss` is the one to
minimise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Row-wise CE with soft targets: -sum_j t_ij log softmax(z_i)_j -> (B,).

    Excluded pairs have logit -inf and target 0; their log-probability is zeroed so neither the value nor the
    gradient sees 0 * -inf."""
    log_probs = logits.log_softmax(-1).masked_fill(targets == 0, 0.0)
    return -(targets * log_probs).sum(-1)


def _same_item_mask(item_ids: list | None, device) -> torch.Tensor | None:
    """True where (i, j), i != j, hold the same item: such pairs must not act as negatives."""
    if item_ids is None:
        return None
    codes = {item: n for n, item in enumerate(dict.fromkeys(item_ids))}
    ids = torch.tensor([codes[i] for i in item_ids], device=device)
    same = ids.unsqueeze(1) == ids.unsqueeze(0)
    same.fill_diagonal_(False)
    return same if same.any() else None


def contrastive_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    temperature: torch.Tensor,
    *,
    kind: str = "soft",
    normalize: bool = False,
    center: bool = False,
    item_ids: list | None = None,
) -> dict[str, torch.Tensor]:
    """Symmetric contrastive loss between view-1 embeddings `x` and view-2 embeddings `y` (B, d).

    kind="soft" (ReaEmb/LLMEmb): Z = X Y^T / tau, T = softmax_rows((X X^T + Y Y^T) / (2 tau)),
    L = 1/2 mean_i [CE(Z_i, T_i) + CE((Z^T)_i, (T^T)_i)].
    kind="infonce": the same with hard targets (the matching view).
    Similarity: the dot product by default (the paper's); `center` first subtracts the mean of all 2B rows (both
    views), removing the direction that all LLM states share; `normalize` then makes it the cosine (use a low
    temperature with it, e.g. 0.05: cosine logits lie in [-1/tau, 1/tau]).
    `item_ids`: rows that hold the same item are never each other's negatives.
    """
    if kind not in ("soft", "infonce"):
        raise ValueError(f"loss kind must be 'soft' or 'infonce', got {kind!r}")
    # Logits of un-normalised LLM states reach the thousands: bf16 would round them by whole units.
    with torch.autocast(x.device.type, enabled=False):
        return _contrastive_loss_fp32(x.float(), y.float(), temperature.float(), kind, normalize, center, item_ids)


def _contrastive_loss_fp32(x, y, temperature, kind, normalize, center, item_ids) -> dict[str, torch.Tensor]:
    if center:
        mean = torch.cat([x, y]).mean(0, keepdim=True)
        x, y = x - mean, y - mean
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    tau = temperature
    logits = x @ y.T / tau
    exclude = _same_item_mask(item_ids, x.device)
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    if kind == "soft":
        similarity = (x @ x.T + y @ y.T) / (2 * tau)
        if exclude is not None:
            similarity = similarity.masked_fill(exclude, float("-inf"))
        targets = similarity.softmax(-1)
    else:
        targets = torch.eye(x.shape[0], device=x.device)
    loss_xy = soft_cross_entropy(logits, targets).mean()
    loss_yx = soft_cross_entropy(logits.T, targets.T).mean()
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == torch.arange(x.shape[0], device=x.device)).float().mean()
        positive_cosine = F.cosine_similarity(x, y, dim=-1).mean()
    return {
        "loss": 0.5 * (loss_xy + loss_yx),
        "loss_x_to_y": loss_xy.detach(),
        "loss_y_to_x": loss_yx.detach(),
        "temperature": tau.detach(),
        "accuracy": accuracy,
        "positive_cosine": positive_cosine,
    }
