"""How CRRL compares two embeddings: the one definition the rewards, the trainer, the yardstick and the experiments
read.

- `dot`: e_g . e_b (the paper's).
- `cosine`: the dot product of the unit-length embeddings.
- `centered_cosine`: cosine after subtracting `center` (the catalogue's mean embedding) from both: LLM embeddings
  share one large direction, so every pair sits at cosine ~0.99 otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIMILARITIES = ("dot", "cosine", "centered_cosine")


def similarity_matrix(
    items: torch.Tensor, candidates: torch.Tensor, kind: str = "dot", center: torch.Tensor | None = None
) -> torch.Tensor:
    """s(e_g, e_b) in float32: items (R, d), candidates (R, N, d) -> (R, N). `center` (d,): the mean embedding that
    `centered_cosine` subtracts (required there, ignored otherwise)."""
    if kind not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {kind!r}")
    if kind == "centered_cosine":
        if center is None:
            raise ValueError("centered_cosine needs `center`, the catalogue's mean embedding")
        items, candidates = items - center, candidates - center
    items, candidates = items.float(), candidates.float()
    if kind != "dot":
        items, candidates = F.normalize(items, dim=-1), F.normalize(candidates, dim=-1)
    with torch.autocast(items.device.type, enabled=False):  # bf16 would round large dot products into ties
        return torch.einsum("rd,rnd->rn", items, candidates)
