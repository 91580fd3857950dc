"""Ranking one split part (validation or test) under the protocol and the history rule: the model's user states
against every item (or the sampled negatives), and MostPop's popularity order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reaemb_trl.evaluation.config import EvalConfig
from reaemb_trl.evaluation.metrics import full_ranks, sample_negatives, sampled_ranks
from reaemb_trl.evaluation.split import SplitData


def pad_right(seqs, max_len: int | None = None, device="cpu"):
    """(B, L) long tensor of the last `max_len` items of each sequence (all when None), right-padded with 0."""
    import torch

    if max_len is not None:
        seqs = [s[-max_len:] for s in seqs]
    width = max(1, max(len(s) for s in seqs))
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out.to(device)


def user_states(model, model_name: str, histories, max_len: int, device="cpu"):
    """One vector per history: the state at the last real item (BERT4Rec: at an appended [MASK])."""
    import torch

    if model_name == "bert4rec":
        histories = [list(h[-(max_len - 1):]) + [model.mask_index] for h in histories]
    batch = pad_right(histories, max_len, device)
    states = model(batch)
    last = (batch != 0).sum(1) - 1
    return states[torch.arange(len(histories), device=batch.device), last]


@dataclass
class Scoring:
    """What a trained model's scores are made of: per user of the validation and test parts (in split order) the
    state it scores items with, and the item vectors (N + 1, h; row 0 = padding). A user's scores are
    `state @ items.T`, so this is users x h + items x h floats where the scores would be users x items."""

    valid_states: np.ndarray
    test_states: np.ndarray
    items: np.ndarray


class RankingEvaluator:
    """Ranks the targets of one split part (validation or test) under the protocol and the history rule.

    Inputs and history masks are built once; sampled-protocol negatives are drawn once, from `negative_seed`, so
    every epoch and every table sees the same candidates."""

    def __init__(self, split: SplitData, part, config: EvalConfig, history: str, negative_seed: int = 0):
        import torch

        self.config, self.part = config, part
        self.chunks = []
        rng = np.random.default_rng(negative_seed)
        for start in range(0, len(part), config.eval_batch_size):
            chunk = part[start:start + config.eval_batch_size]
            targets = torch.tensor([t for _, _, t in chunk], dtype=torch.long)
            histories = [h for _, h, _ in chunk]
            extra = None
            if config.protocol == "sampled":
                extra = torch.tensor([sample_negatives(rng, split.num_items, split.full[u], config.num_negatives)
                                      for u, _, _ in chunk], dtype=torch.long)
            elif history == "exclude":  # the whole history, not only the model's last max_len items
                extra = pad_right(histories)
            self.chunks.append((histories, targets, extra))

    def ranks_from_scores(self, score_chunks) -> np.ndarray:
        """Ranks given one (B, N + 1) score tensor per chunk (column 0 = padding)."""
        import torch

        out = []
        for (_, targets, extra), scores in zip(self.chunks, score_chunks):
            targets = targets.to(scores.device)
            if self.config.protocol == "sampled":
                out.append(sampled_ranks(scores, targets, extra.to(scores.device)).cpu())
                continue
            exclude = None
            if extra is not None:
                exclude = torch.zeros_like(scores, dtype=torch.bool)
                exclude.scatter_(1, extra.to(scores.device), True)
                exclude[:, 0] = False  # padding of the history tensor; column 0 is masked anyway
            out.append(full_ranks(scores, targets, exclude).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)

    def states(self, model):
        """(one (B, h) tensor of user states per chunk, the item vectors (N + 1, h)), in eval mode."""
        import torch

        cfg = self.config
        was_training = model.training
        model.eval()
        with torch.no_grad():
            items = model.table.all_items().detach()  # the ID table's parameter itself: no graph from here on
            states = [user_states(model, cfg.model, histories, cfg.max_len, cfg.device)
                      for histories, _, _ in self.chunks]
        model.train(was_training)
        return states, items

    def chunk_scores(self, states, items):
        """The (B, N + 1) scores of each chunk, one at a time: `states` (all users of the part, in order) x items."""
        import torch

        device = self.config.device
        states, items = torch.as_tensor(states, device=device), torch.as_tensor(items, device=device)
        size = self.config.eval_batch_size
        return (states[start:start + size] @ items.T for start in range(0, len(states), size))

    def ranks(self, model) -> np.ndarray:
        states, items = self.states(model)
        return self.ranks_from_scores(chunk @ items.T for chunk in states)

    @classmethod
    def for_part(cls, split: SplitData, part: str, config: EvalConfig, history: str, seed: int) -> "RankingEvaluator":
        """The evaluator of the "valid" or "test" part of a run with `seed`: every run of that seed (and the
        ensembles made of them) draws the same sampled-protocol negatives."""
        offset = {"valid": 1, "test": 2}[part]
        return cls(split, getattr(split, part), config, history, negative_seed=seed + offset)

    def popularity_ranks(self, counts) -> np.ndarray:
        """MostPop: every user gets the catalogue ordered by training interactions."""
        import torch

        scores = torch.as_tensor(counts, dtype=torch.float32).unsqueeze(0)
        return self.ranks_from_scores(scores.expand(len(targets), -1) for _, targets, _ in self.chunks)
