"""A text reference table users can build in seconds on a CPU: the mean of the backbone's *input* token embeddings
of each item's text (no transformer pass), mapped to a few dimensions by a linear map trained on co-occurrence.

    table = build_reference_table("smollm2", "data/", exclude_items=cold, output="tables/reference.safetensors")

It answers "how much collaborative signal can a linear read of the item text carry?", the bar a trained thought
should clear (docs/ablations.md). The pieces:

- `bag_of_token_embeddings`: rows of `model.get_input_embeddings()` averaged over the item text's tokens (no
  special tokens). The text is the item's own text in the prompt format (`item_texts`: `key is value; ...`,
  values cleaned and cut as in the prompt), without the template around it.
- `cooccurrence_positives`: (anchor, positive, weight) pairs from the training prefixes only (each user's last
  `holdout` items are validation/test targets), by `candidates.CooccurrenceCandidates`; an excluded item (a cold
  item, a held-out item of the yardstick) is never on either side.
- `fit_linear_map`: a (D, dim) map W trained with InfoNCE: each anchor against its positive (drawn by weight)
  and `negatives` items drawn uniformly from the training items only, cosine similarity over a temperature.
  The features are first centred and scaled by statistics of the training rows only (`training_statistics`), so
  nothing of an excluded item enters W: its rows, interactions and presence among the negatives do not.
- `projection_table`: `((features - mean_train) / scale_train) @ W` for every item, excluded ones included (their
  text is known, only their interactions are not).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from reaemb_trl.export_inputs import ExportError

METHOD = "cooccurrence_projection"
FEATURES = "mean of the backbone's input token embeddings of the item text (no transformer pass)"
# Fit defaults, chosen on MovieLens-100k among a few settings by the frozen CRRL yardstick's held-out items (the
# strict reference of experiments/crrl_headroom.py; docs/ablations.md); a fit takes seconds on one CPU core.
POSITIVES_PER_ITEM = 5
NEGATIVES = 31
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 0.0
BATCH_SIZE = 256
TEMPERATURE = 0.1


# ---- features ----------------------------------------------------------------------------------------------------
def item_texts(attributes: Sequence[Any], formatter=None) -> list[str]:
    """Each item's own text as the prompt format renders it (`key is value; ...`), without the template."""
    from reaemb_trl.prompt import ItemPromptFormatter, normalise_attributes

    formatter = formatter or ItemPromptFormatter()
    return [formatter.render_attributes(normalise_attributes(attrs)) for attrs in attributes]


@torch.no_grad()
def bag_of_token_embeddings(model, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """(N, D) float32: the mean of `model.get_input_embeddings()` rows over each text's tokens (no special tokens,
    no transformer pass). A text without tokens gets a zero row."""
    table = model.get_input_embeddings().weight
    out = torch.zeros(len(texts), table.shape[1], dtype=torch.float32)
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(list(texts[start:start + batch_size]), add_special_tokens=False)["input_ids"]
        for row, tokens in enumerate(ids, start=start):
            if tokens:
                out[row] = table[torch.tensor(tokens, device=table.device)].float().mean(0).cpu()
    return out


# ---- training signal ---------------------------------------------------------------------------------------------
def cooccurrence_positives(
    sequences: Mapping[str, Sequence[str]],
    item_ids: Sequence[str],
    exclude: Iterable[str] = (),
    holdout: int = 2,
    positive_score: str = "cosine",
    min_support: int = 2,
    pos_num: int = POSITIVES_PER_ITEM,
) -> list[tuple[int, int, float]]:
    """(anchor row, positive row, weight) over the rows of `item_ids`: each item's top `pos_num` co-occurring items
    of the training prefixes (score `positive_score`, count >= `min_support`; see `CooccurrenceCandidates`),
    weighted score / sum of the anchor's positives' scores. `exclude` items are left out of the counting universe,
    so they are never an anchor or a positive and never displace one."""
    from reaemb_trl.candidates import CooccurrenceCandidates

    excluded = {str(i) for i in exclude}
    universe = [str(i) for i in item_ids if str(i) not in excluded]
    if len(universe) <= pos_num:
        return []
    index = CooccurrenceCandidates.from_sequences(
        sequences, universe, candidate_num=pos_num, pos_num=pos_num, holdout=holdout, positive_score=positive_score,
        min_support=min_support)  # fmt: skip
    row = {str(item): n for n, item in enumerate(item_ids)}
    anchors = index.items_with_positives()
    pairs = []
    for start in range(0, len(anchors), 512):  # co-occurrence rows are computed per chunk, never all at once
        chunk = anchors[start:start + 512]
        for anchor, (positives, scores) in zip(chunk, index.positives(chunk)):
            total = float(sum(scores))
            pairs += [(row[anchor], row[p], float(s) / total) for p, s in zip(positives, scores)]
    return pairs


# ---- the map -----------------------------------------------------------------------------------------------------
def training_statistics(features: torch.Tensor, train_rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), scale ()) of the training rows: the mean row and the root-mean-square of the centred training
    coordinates, so the standardised training features have unit mean square."""
    rows = features[torch.as_tensor(sorted(set(train_rows)), dtype=torch.long)].double()
    mean = rows.mean(0)
    scale = (rows - mean).pow(2).mean().sqrt().clamp_min(1e-12)
    return mean.float(), scale.float()


def fit_linear_map(
    features: torch.Tensor,
    positives: list[tuple[int, int, float]],
    train_items: Sequence[int],
    dim: int = 64,
    steps: int = 300,
    negatives: int = NEGATIVES,
    lr: float = LEARNING_RATE,
    weight_decay: float = WEIGHT_DECAY,
    batch_size: int = BATCH_SIZE,
    temperature: float = TEMPERATURE,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """The (D, dim) map W, trained with InfoNCE on the standardised features (`training_statistics` of the rows
    `train_items`): per step `batch_size` (anchor, positive) pairs drawn by weight (uniform over anchors, the
    positive by its weight), each against `negatives` rows drawn uniformly from `train_items` (a draw equal to the
    anchor or its positive is masked); cosine similarity / `temperature`; AdamW. Only pairs with both rows in
    `train_items` are used (ExportError, a ValueError, when none is left). Deterministic given `seed`."""
    from tqdm.auto import tqdm

    train = torch.as_tensor(sorted({int(i) for i in train_items}), dtype=torch.long)
    allowed = set(train.tolist())
    kept = [(a, p, w) for a, p, w in positives if a in allowed and p in allowed and w > 0]
    if not kept:
        raise ExportError(
            f"no co-occurrence pair among the {len(train)} training items: the map needs users with two or more "
            "training interactions on items that are not excluded"
        )
    if dim < 1 or steps < 1 or negatives < 1 or batch_size < 1 or temperature <= 0:
        raise ValueError(f"dim, steps, negatives and batch_size must be >= 1 and temperature > 0, got {dim}, "
                         f"{steps}, {negatives}, {batch_size}, {temperature}")  # fmt: skip
    mean, scale = training_statistics(features, train.tolist())
    x = (features.float() - mean) / scale
    slot = torch.full((len(features),), -1, dtype=torch.long)  # feature row -> position among the training rows
    slot[train] = torch.arange(len(train))
    anchors, pos = (torch.tensor([pair[k] for pair in kept], dtype=torch.long) for k in (0, 1))
    weights = torch.tensor([pair[2] for pair in kept], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(x.shape[1], dim, generator=generator).div_(x.shape[1] ** 0.5).requires_grad_(True)
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
    target = torch.zeros(batch_size, dtype=torch.long)
    for _ in tqdm(range(steps), desc="co-occurrence map", unit="step", disable=not progress):
        pick = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        a, p = anchors[pick], pos[pick]
        neg = train[torch.randint(len(train), (batch_size, negatives), generator=generator)]
        candidates = torch.cat([p[:, None], neg], 1)
        z = F.normalize(x[train] @ weight, dim=-1)  # the training rows once: cheaper than each draw's rows
        logits = torch.einsum("bd,bnd->bn", z[slot[a]], z[slot[candidates]]) / temperature
        clash = torch.cat([torch.zeros(batch_size, 1, dtype=torch.bool), (neg == a[:, None]) | (neg == p[:, None])], 1)
        loss = F.cross_entropy(logits.masked_fill(clash, float("-inf")), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach()


def projection_table(features: torch.Tensor, weight: torch.Tensor, train_rows: Sequence[int]) -> torch.Tensor:
    """((features - mean_train) / scale_train) @ W for every row: the statistics are those `fit_linear_map` used."""
    mean, scale = training_statistics(features, train_rows)
    return ((features.float() - mean) / scale) @ weight


# ---- the table file ----------------------------------------------------------------------------------------------
def build_reference_table(
    backbone,
    data,
    exclude_items: Iterable[str],
    output: str | os.PathLike,
    *,
    seed: int = 0,
    dim: int = 64,
    steps: int = 300,
    formatter=None,
    progress: bool = True,
) -> Path:
    """Write the reference table of every catalogue item to `output` (atomically, the item-table format) and return
    its path. `backbone`: a short name, hub id or folder, or a loaded `ThoughtEmbedder` (its model, tokenizer and
    prompt format); `data`: a `RecDataset`, a canonical dataset folder or `ml-100k`; `exclude_items`: items whose
    interactions the map must not see (cold items, held-out items); they still get a row. `formatter` overrides the
    prompt format whose item text is read (default: the embedder's, else the default format)."""
    from reaemb_trl.data.canonical import RecDataset
    from reaemb_trl.export_inputs import load_backbone, load_dataset
    from reaemb_trl.item_table import FORMAT, write_table

    began = time.time()
    data = data if isinstance(data, RecDataset) else load_dataset(str(data))
    embedder = load_backbone(str(backbone), "mean", formatter) if isinstance(backbone, (str, os.PathLike)) else backbone
    formatter = formatter or embedder.formatter
    ids = data.item_ids
    excluded = {str(i) for i in exclude_items} & set(ids)
    texts = item_texts([item["attributes"] for item in data.items], formatter)
    features = bag_of_token_embeddings(embedder.model, embedder.tokenizer, texts)
    pairs = cooccurrence_positives(data.sequences, ids, exclude=excluded)
    train_rows = [row for row, item in enumerate(ids) if item not in excluded]
    weight = fit_linear_map(features, pairs, train_rows, dim=dim, steps=steps, seed=seed, progress=progress)
    settings = {
        "features": FEATURES,
        "positives": f"top {POSITIVES_PER_ITEM} by count / sqrt(n_a n_b), count >= 2, training prefixes only",
        "loss": "InfoNCE over cosine, negatives uniform over the training items",
        "dim": dim, "steps": steps, "seed": seed, "negatives": NEGATIVES, "lr": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY, "batch_size": BATCH_SIZE, "temperature": TEMPERATURE,
        "training_pairs": len(pairs), "training_items": len(train_rows), "excluded_items": len(excluded),
    }  # fmt: skip
    metadata = {
        "format": FORMAT,
        "source": METHOD,
        "backbone": embedder.backbone or "",
        "adapter": False,
        "thought": False,
        "pooling": "input_embedding_mean",
        "prompt_format": formatter.to_dict(),
        "dtype": "float32",
        "fingerprint": _fingerprint(settings, formatter.to_dict(), embedder.backbone, weight),
        "projection": {**settings, "seconds": round(time.time() - began, 2)},
        "raw_dimension": dim,
    }
    return write_table(output, projection_table(features, weight, train_rows), ids, metadata)


def _fingerprint(settings: Mapping[str, Any], prompt_format: Mapping[str, Any], backbone: str | None,
                 weight: torch.Tensor) -> str:
    """What made the vectors (settings, prompt format, backbone and the map itself): `reaemb encode` compares it and
    refuses to add rows to this table with a plain backbone."""
    digest = hashlib.sha256(json.dumps([dict(settings), dict(prompt_format), backbone], sort_keys=True).encode())
    digest.update(weight.contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()
