"""The LLM side of a CRRL rollout: item prompts, the embeddings of the noisy copies and of their candidates, and the
noise-free catalogue table (reference candidates, the centre of centred cosine, the yardstick).

Two ways to the same numbers (tests/test_crrl_trainer.py checks they agree): `fast` encodes each unique item's
prefix once and runs only the 2-token suffix per copy on its cached keys/values; `literal`, the reference oracle,
runs full passes per copy and per candidate slot, nothing shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from reaemb_trl.candidates import CooccurrenceCandidates, stable_hash
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.crrl_policy import action_scale, swapped_thought_module, thought_spread
from reaemb_trl.embedder import PrefixStates, ThoughtEmbedder
from reaemb_trl.prefix_store import PrefixStore, cat_prefix_states
from reaemb_trl.prompt import normalise_attributes


def _catalogue_from(source) -> dict[str, Any]:
    """item id -> attributes, from a mapping, a `datasets.Dataset` / list of rows with `item_id` and `attributes`."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return {str(k): v for k, v in source.items()}
    ids, attrs = (source["item_id"], source["attributes"]) if hasattr(source, "column_names") else (
        [r["item_id"] for r in source], [r["attributes"] for r in source])
    return {str(i): a for i, a in zip(ids, attrs)}


def build_catalogue(train_dataset, eval_dataset, extra) -> dict[str, Any]:
    """item id -> attributes of every item that can be a candidate: the train dataset's, those of the eval
    dataset(s) that have `attributes`, then `extra` (a mapping or rows)."""
    catalogue = _catalogue_from(train_dataset)
    if isinstance(eval_dataset, Mapping) and not hasattr(eval_dataset, "column_names"):
        for ds in eval_dataset.values():
            catalogue.update(_catalogue_from(ds) if "attributes" in getattr(ds, "column_names", []) else {})
    elif eval_dataset is not None and "attributes" in getattr(eval_dataset, "column_names", []):
        catalogue.update(_catalogue_from(eval_dataset))
    catalogue.update(_catalogue_from(extra))
    return catalogue


def row_candidates(rows: list[dict], index: CooccurrenceCandidates | None, epoch: int
                   ) -> tuple[list[list[str]], torch.Tensor]:
    """(candidate ids (R, N), positive weights (R, N)) of each row: its `candidate_ids` / `positive_weights`
    columns when the dataset has them, else `index`'s candidates of the row's item for `epoch`."""
    if "candidate_ids" in rows[0]:
        ids = [[str(c) for c in x["candidate_ids"]] for x in rows]
        if "positive_weights" not in rows[0]:
            raise KeyError("rows with `candidate_ids` also need `positive_weights` (> 0 marks a positive)")
        weights = torch.tensor([list(map(float, x["positive_weights"])) for x in rows], dtype=torch.float32)
        return ids, weights
    item_ids = [str(x["item_id"]) for x in rows]
    unique = list(dict.fromkeys(item_ids))
    cand, weights = index.candidates(unique, epoch=epoch)
    where = {item: i for i, item in enumerate(unique)}
    picked = [where[i] for i in item_ids]
    return [list(cand[r]) for r in picked], torch.as_tensor(weights[picked], dtype=torch.float32)


@dataclass
class CatalogueReference:
    """The catalogue table under the thought module of optimizer step `step`: the candidates' embeddings when
    `reference_refresh_steps` > 0, and the centre of centred cosine."""

    step: int
    ids: list[str]
    table: torch.Tensor  # (I, D) float32
    row: dict[str, int] = field(init=False)
    center: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.row = {i: n for n, i in enumerate(self.ids)}
        self.center = self.table.mean(0)

    def candidate_embeddings(self, candidate_ids: list[list[str]], device) -> torch.Tensor:
        """(R, N, D): the table's rows of each row's candidates."""
        index = torch.tensor([[self.row[c] for c in row] for row in candidate_ids], device=self.table.device)
        return self.table[index].to(device)


@dataclass
class RolloutEmbeddings:
    """One rollout's LLM outputs for R rows with N candidates each."""

    mu: torch.Tensor  # (R, d) the policy mean mu_theta(x)
    sigma: torch.Tensor  # (R,) the action scale, or (R, d) per coordinate (noise_scale_mode=spread)
    actions: torch.Tensor  # (R, d) z = mu + sigma * eps
    item_embeddings: torch.Tensor  # (R, D) e_g, generated with z
    candidate_embeddings: torch.Tensor  # (R, N, D) e_b, noise-free
    ref_mu: torch.Tensor | None  # (R, d) the starting thought module's mean (for the KL term), None without one
    prefix_index: torch.Tensor | None = None  # fast: row -> row of `prefix_states`
    prefix_states: tuple | None = None  # fast: (hidden, mask, item-span mask or None) of the unique items


SPREAD_ITEMS = 4096  # items whose mu sets the spread of `noise_scale_mode=spread` (a sample on large catalogues)


class RolloutEncoder:
    """Every LLM pass of CRRL, over the items of `catalogue` (id -> attributes). With the LLM frozen on the fast
    path, item prefixes are kept in a `PrefixStore` of `prefix_cache_gb` across rollouts."""

    def __init__(self, embedder: ThoughtEmbedder, catalogue: dict[str, Any], args: CRRLConfig):
        self.embedder = embedder
        self.catalogue = catalogue
        self.args = args
        frozen_llm = not args.train_lora and args.forward_method == "fast"
        self.prefix_store = PrefixStore(args.prefix_cache_gb * 2**30) if frozen_llm and args.prefix_cache_gb > 0 else None
        self._prefix_ids: dict[str, list[int]] = {}

    def prefix_ids(self, item_id: str) -> list[int]:
        ids = self._prefix_ids.get(item_id)
        if ids is None:
            if item_id not in self.catalogue:
                raise KeyError(f"item {item_id!r} has no attributes: add it to `catalogue` (or the train dataset)")
            attrs = normalise_attributes(self.catalogue[item_id])
            ids = self._prefix_ids[item_id] = self.embedder.formatter.prefix_ids(attrs, self.embedder.tokenizer)
        return ids

    def _actions(self, mu: torch.Tensor, eps: torch.Tensor, spread: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = action_scale(mu, self.args.noise_scale, self.args.noise_scale_mode, spread)
        return sigma, mu + (sigma if sigma.dim() == 2 else sigma.unsqueeze(1)) * eps.to(mu.device)

    @torch.no_grad()
    def thought_spread(self, item_ids: list[str]) -> torch.Tensor:
        """Each coordinate's standard deviation of mu (noise-free, current thought module) over `item_ids` (at
        most SPREAD_ITEMS of them, the first by a stable hash of the id): what `noise_scale_mode=spread` scales
        exploration by. With the prefix store this runs only the thought module."""
        items = sorted(dict.fromkeys(item_ids), key=lambda i: stable_hash(f"spread|{i}"))[:SPREAD_ITEMS]
        chunk = self.args.embed_batch_size
        mu = [self.embedder.thought_vector(self.encode_prefixes(items[s : s + chunk])).float()
              for s in range(0, len(items), chunk)]
        return thought_spread(torch.cat(mu))

    @torch.no_grad()
    def catalogue_table(self) -> tuple[list[str], torch.Tensor]:
        """Noise-free embeddings of every catalogue item under the current thought module (float32)."""
        ids = list(self.catalogue)
        if self.prefix_store is None:
            return ids, self.embedder.encode([self.catalogue[i] for i in ids], batch_size=self.args.embed_batch_size)
        # the frozen LLM's prefixes come from the store: only the thought module and the suffix run
        chunk, emb, parts = self.args.embed_batch_size, self.embedder, []
        by_length = sorted(ids, key=lambda i: len(self.prefix_ids(i)))
        for start in range(0, len(by_length), chunk):
            prefix = self.encode_prefixes(by_length[start : start + chunk])
            parts.append(emb.embed_from_thought(prefix, emb.thought_vector(prefix)).float())
        order = {item: n for n, item in enumerate(by_length)}
        return ids, torch.cat(parts)[torch.tensor([order[i] for i in ids], device=parts[0].device)]

    @torch.no_grad()
    def encode_prefixes(self, item_ids: list[str]) -> PrefixStates:
        """Prefix states of `item_ids` (in order): from the store when the LLM is frozen, else encoded now."""
        emb, chunk, store = self.embedder, self.args.embed_batch_size, self.prefix_store
        if store is not None and not store.full:
            missing = [i for i in dict.fromkeys(item_ids) if i not in store.rows]
            for s in range(0, len(missing), chunk):
                part = missing[s : s + chunk]
                store.add(part, emb.encode_prefix([self.prefix_ids(i) for i in part]))
        if store is not None and all(i in store.rows for i in item_ids):
            return store.assemble(item_ids)
        return cat_prefix_states([emb.encode_prefix([self.prefix_ids(i) for i in item_ids[s : s + chunk]])
                                  for s in range(0, len(item_ids), chunk)])

    @torch.no_grad()
    def embed_fast(self, item_ids, candidate_ids, eps, reference: CatalogueReference | None,
                   ref_module: nn.Module | None, spread: torch.Tensor | None = None) -> RolloutEmbeddings:
        """One prefix pass per unique item (and candidate, unless `reference` gives the candidates' embeddings),
        then the suffix per row. mu comes from the returned prefix states, as the policy loss will compute it."""
        emb, chunk = self.embedder, self.args.embed_batch_size
        item_unique = list(dict.fromkeys(item_ids))
        cand_unique = [] if reference is not None else [c for c in dict.fromkeys(c for r in candidate_ids for c in r)
                                                        if c not in set(item_unique)]
        prefix = self.encode_prefixes(item_unique + cand_unique)
        where = {item: i for i, item in enumerate(item_unique + cand_unique)}
        item_rows = torch.arange(len(item_unique), device=prefix.hidden.device)
        hidden, mask = prefix.hidden[item_rows].detach(), prefix.mask[item_rows]
        spans = None if prefix.pool_mask is None else prefix.pool_mask[item_rows]  # the item's own tokens
        local = {item: i for i, item in enumerate(item_unique)}
        prefix_index = torch.tensor([local[i] for i in item_ids], device=hidden.device)
        rows = (hidden[prefix_index], mask[prefix_index], None if spans is None else spans[prefix_index])
        mu = emb.thought_module(*rows).float()
        sigma, z = self._actions(mu, eps, spread)
        item_emb = torch.cat(
            [emb.embed_from_thought(prefix.select(prefix_index[s : s + chunk]), z[s : s + chunk])
             for s in range(0, len(prefix_index), chunk)]
        ).float()
        if reference is not None:
            cand_emb = reference.candidate_embeddings(candidate_ids, item_emb.device)
        else:
            cand_unique = list(dict.fromkeys(c for row in candidate_ids for c in row))
            cand_rows = torch.tensor([where[c] for c in cand_unique], device=hidden.device)
            mu_cand = emb.thought_vector(prefix.select(cand_rows)).float()
            cand_emb = torch.cat(
                [emb.embed_from_thought(prefix.select(cand_rows[s : s + chunk]), mu_cand[s : s + chunk])
                 for s in range(0, len(cand_rows), chunk)]
            ).float()
            cand_where = {c: i for i, c in enumerate(cand_unique)}
            cand_emb = cand_emb[torch.tensor([[cand_where[c] for c in row] for row in candidate_ids],
                                             device=cand_emb.device)]
        ref_mu = None
        if ref_module is not None:
            ref_mu = ref_module(*rows).float()
        return RolloutEmbeddings(mu, sigma, z, item_emb, cand_emb, ref_mu, prefix_index, (hidden, mask, spans))

    @torch.no_grad()
    def embed_literal(self, item_ids, candidate_ids, eps, reference: CatalogueReference | None,
                      ref_module: nn.Module | None, spread: torch.Tensor | None = None) -> RolloutEmbeddings:
        """Reference oracle: full passes per copy and per candidate slot, nothing shared."""
        emb, chunk = self.embedder, self.args.embed_batch_size
        ids = [self.prefix_ids(i) for i in item_ids]
        mu = torch.cat([emb.literal_thought_vector(ids[s : s + chunk]) for s in range(0, len(ids), chunk)]).float()
        sigma, z = self._actions(mu, eps, spread)
        item_emb = torch.cat(
            [emb.literal_embed_with_thought(ids[s : s + chunk], z[s : s + chunk]) for s in range(0, len(ids), chunk)]
        ).float()
        if reference is not None:
            cand_emb = reference.candidate_embeddings(candidate_ids, item_emb.device)
        else:
            flat = [self.prefix_ids(c) for row in candidate_ids for c in row]
            cand = []
            for s in range(0, len(flat), chunk):
                part = flat[s : s + chunk]
                cand.append(emb.literal_embed_with_thought(part, emb.literal_thought_vector(part)))
            cand_emb = torch.cat(cand).float().view(len(item_ids), len(candidate_ids[0]), -1)
        ref_mu = None
        if ref_module is not None:
            with swapped_thought_module(emb, ref_module):
                ref_mu = torch.cat(
                    [emb.literal_thought_vector(ids[s : s + chunk]) for s in range(0, len(ids), chunk)]).float()
        return RolloutEmbeddings(mu, sigma, z, item_emb, cand_emb, ref_mu)
