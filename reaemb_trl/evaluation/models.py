"""SASRec, GRU4Rec and BERT4Rec over an item table.

Batches are right-padded: a sequence fills positions 0..len-1 and index 0 pads the rest. With right
padding the causal models never see padding before a real item, and the representation of a user is
read at position len-1. Every model returns (B, L, hidden) states; pad positions are zeroed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reaemb_trl.evaluation.config import MODELS


class _Block(nn.Module):
    """Pre-norm transformer block with an explicit boolean attention mask (True = may attend)."""

    def __init__(self, hidden: int, heads: int, dropout: float, inner_size: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, inner_size), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(inner_size, hidden))
        # Dropout on residual branches only: dropout on the (B, heads, L, L) attention weights costs more
        # than the rest of the forward pass on CPU, for a regularisation the residual dropout already gives.
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        # float32 attention even under bf16 autocast: the CPU kernel is ~3x slower in bf16 at these sizes
        with torch.autocast(x.device.type, enabled=False):
            attn = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed.unsqueeze(1))
        attn = attn.to(q.dtype)
        x = x + self.drop(self.out(attn.transpose(1, 2).reshape(b, length, h)))
        return x + self.drop(self.ff(self.norm2(x)))


class _TransformerEncoder(nn.Module):
    def __init__(self, table: nn.Module, hidden: int, max_len: int, layers: int, heads: int, dropout: float,
                 inner_size: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.table, self.max_len = table, max_len
        self.position = nn.Embedding(max_len, hidden)
        # Same scale as the item embeddings: the default N(0, 1) would drown the item signal in position noise.
        nn.init.normal_(self.position.weight, std=0.02)
        # LayerNorm on item + position: an item table of any offset or scale enters the blocks alike.
        self.input_norm = nn.LayerNorm(hidden)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout, inner_size) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        return self.table(seq)

    def encode(self, seq: torch.Tensor, causal: bool) -> torch.Tensor:
        b, length = seq.shape
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        real = seq != 0
        pos = torch.arange(length, device=seq.device)
        x = self.drop(self.input_norm(self.embed(seq) + self.position(pos)))
        allowed = real.unsqueeze(1).expand(b, length, length)  # key-padding mask
        if causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        # A pad query may have no real key to attend to: let every position see itself so no row is empty
        # (an all-masked softmax is NaN). Pad outputs are zeroed below, and real positions are unaffected.
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=seq.device)
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x) * real.unsqueeze(-1).to(x.dtype)


class SASRec(_TransformerEncoder):
    """Causal self-attention: the state at position t depends only on items 0..t."""

    def __init__(self, table: nn.Module, hidden: int = 128, max_len: int = 200, layers: int = 2, heads: int = 2,
                 dropout: float = 0.2, inner_size: int | None = None):
        # Point-wise feed-forward of width `hidden` by default, as in the SASRec paper.
        super().__init__(table, hidden, max_len, layers, heads, dropout, inner_size or hidden)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.encode(seq, causal=True)


class GRU4Rec(nn.Module):
    """A GRU over the item embeddings. Right padding means pads only follow real items, so the state at
    a real position never depends on padding."""

    def __init__(self, table: nn.Module, hidden: int = 128, max_len: int = 200, layers: int = 1, dropout: float = 0.2):
        super().__init__()
        self.table, self.max_len = table, max_len
        self.drop = nn.Dropout(dropout)
        self.input_norm = nn.LayerNorm(hidden)  # as in the transformers: any table offset or scale enters alike
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.drop(self.input_norm(self.table(seq))))
        return self.proj(out) * (seq != 0).unsqueeze(-1).to(out.dtype)


class BERT4Rec(_TransformerEncoder):
    """Bidirectional transformer with a learned [MASK] token at index N + 1.

    Training (cloze): some positions are replaced by [MASK] and the model predicts the original item there
    (cross-entropy over the catalogue). Inference: [MASK] is appended after the history and its state scores
    the next item.
    """

    def __init__(self, table: nn.Module, num_items: int, hidden: int = 128, max_len: int = 200, layers: int = 2,
                 heads: int = 2, dropout: float = 0.2, inner_size: int | None = None):
        # BERT-style 4x feed-forward by default.
        super().__init__(table, hidden, max_len, layers, heads, dropout, inner_size or 4 * hidden)
        self.mask_index = num_items + 1
        self.mask_embedding = nn.Parameter(torch.randn(hidden) * 0.02)

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        is_mask = seq == self.mask_index
        x = self.table(seq.masked_fill(is_mask, 0))
        return torch.where(is_mask.unsqueeze(-1), self.mask_embedding.to(x.dtype).expand_as(x), x)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.encode(seq, causal=False)


def bert_cloze(seq: torch.Tensor, mask_index: int, mask_prob: float, generator: torch.Generator | None = None):
    """Replace each real position by [MASK] with probability `mask_prob`; a row where none was drawn gets
    its last item masked, so every row contributes to the loss. Returns (inputs, labels): labels hold the
    original item at masked positions and -100 (ignored by cross-entropy) elsewhere. Padding is never masked."""
    real = seq != 0
    draw = torch.rand(seq.shape, generator=generator, device="cpu").to(seq.device) < mask_prob
    masked = draw & real
    # Rows where nothing was drawn: mask their last real item, so every row contributes to the loss.
    lengths = real.sum(1)
    empty = (masked.sum(1) == 0) & (lengths > 0)
    rows = torch.nonzero(empty).flatten()
    masked[rows, lengths[rows] - 1] = True
    inputs = seq.masked_fill(masked, mask_index)
    labels = seq.masked_fill(~masked, -100)
    return inputs, labels


def build_model(name: str, table: nn.Module, num_items: int, hidden: int = 128, max_len: int = 200,
                layers: int = 2, heads: int = 2, dropout: float = 0.2, inner_size: int | None = None) -> nn.Module:
    if name == "sasrec":
        return SASRec(table, hidden, max_len, layers, heads, dropout, inner_size)
    if name == "gru4rec":
        return GRU4Rec(table, hidden, max_len, 1, dropout)
    if name == "bert4rec":
        return BERT4Rec(table, num_items, hidden, max_len, layers, heads, dropout, inner_size)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
