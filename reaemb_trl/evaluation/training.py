"""Train one downstream model on one item table with early stopping and score the test split.

Every epoch covers every training transition of every user exactly once (consecutive windows over the whole
training sequence, see `split.training_windows`); the loss (`losses`) and the ranking apply the same history
rule. The best validation epoch's weights are tested; per-user test ranks are kept for paired tests.
"""

from __future__ import annotations

import copy
import random
import time

import numpy as np

from reaemb_trl.evaluation.config import MOSTPOP, EvalConfig, RunResult, TableSpec
from reaemb_trl.evaluation.metrics import metrics_from_ranks
from reaemb_trl.evaluation.ranking import RankingEvaluator, Scoring, pad_right
from reaemb_trl.evaluation.split import SplitData, group_masks, training_windows


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainingBatches:
    """Every training window once per epoch, in batches of similar length (less padding), seeded order."""

    def __init__(self, split: SplitData, config: EvalConfig):
        cloze = config.model == "bert4rec"
        width, min_length = (config.max_len, 1) if cloze else (config.max_len + 1, 2)
        self.split, self.cloze = split, cloze
        self.windows = training_windows(split.train, width, min_length)
        if not self.windows:
            raise ValueError(f"no training sequence has {min_length}+ items; the dataset is too short to train on")
        self.lengths = np.array([w.end - w.start for w in self.windows])
        self.batch_size = config.batch_size

    @property
    def num_targets(self) -> int:
        """Targets per epoch: every item after the first of each training sequence (cloze: every item)."""
        return int((self.lengths - (0 if self.cloze else 1)).sum())

    def epoch(self, rng: np.random.Generator, device="cpu"):
        """Yields (window (B, W), user sequences (B, S), window starts (B,), window ends (B,))."""
        import torch

        order = rng.permutation(len(self.windows))
        bucket = 50 * self.batch_size
        batches = []
        for start in range(0, len(order), bucket):
            chunk = order[start:start + bucket]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        for b in rng.permutation(len(batches)):
            windows = [self.windows[i] for i in batches[b]]
            train = self.split.train
            yield (pad_right([train[w.user][w.start:w.end] for w in windows], device=device),
                   pad_right([train[w.user] for w in windows], device=device),
                   torch.tensor([w.start for w in windows], device=device),
                   torch.tensor([w.end for w in windows], device=device))


def training_targets(model, batch, cfg: EvalConfig, gen):
    """What one batch of windows trains on: (model inputs (B, L), targets (B, L) with 0 where nothing is
    predicted, history limit (B, L)). A target's history is every item of its user's training sequence at an
    absolute position below its limit: the positions before it (next item), or everything up to the window's end
    (cloze, where the whole window is visible context)."""
    import torch

    from reaemb_trl.evaluation.models import bert_cloze

    window, _, starts, ends = batch
    if cfg.model == "bert4rec":
        inputs, labels = bert_cloze(window, model.mask_index, cfg.mask_prob, gen)
        return inputs, labels.clamp(min=0), ends.unsqueeze(1).expand_as(window)
    positions = torch.arange(1, window.shape[1], device=window.device)  # absolute: start + 1, start + 2, ...
    return window[:, :-1], window[:, 1:], starts.unsqueeze(1) + positions


def training_loss(model, batch, cfg: EvalConfig, num_items: int, exclude: bool, log_q, gen, unseen=None):
    """The loss of one batch of windows (next-item transitions, or cloze positions for BERT4Rec). `unseen`: the
    (N + 1,) mask of cold items, no candidate of any objective (`log_q` already never draws them)."""
    from reaemb_trl.evaluation.losses import (
        bce_loss, draw_negatives, first_seen, first_seen_at, full_softmax_loss, sampled_softmax_loss,
    )

    users = batch[1]
    inputs, targets, limit = training_targets(model, batch, cfg, gen)
    limit = limit.masked_fill(targets == 0, 0)  # positions without a target exclude nothing (no all -inf rows)
    states = model(inputs)
    if cfg.loss == "bce":
        seen = None if unseen is None else (~unseen).nonzero().flatten()[1:]  # [1:]: padding
        return bce_loss(states, model.table, targets, users, num_items, gen, seen)
    if num_items <= cfg.sampled_softmax_above:
        picked = targets != 0
        history = (first_seen(users, num_items), picked.nonzero()[:, 0], limit[picked]) if exclude else None
        return full_softmax_loss(states[picked], model.table.all_items(), targets[picked], history,
                                 unseen=None if unseen is None else unseen.to(states.device))
    negatives, draws = draw_negatives(log_q, cfg.num_sampled, gen)
    negatives = negatives.to(states.device)
    excluded = first_seen_at(users, negatives).unsqueeze(1) < limit.unsqueeze(2) if exclude else None
    return sampled_softmax_loss(states, model.table, targets, negatives, log_q.to(states.device), draws, excluded)


def train_and_evaluate(split: SplitData, table: str | TableSpec, config: EvalConfig, seed: int = 0,
                       progress: bool = True, keep_scoring: bool = False) -> RunResult:
    """Train `config.model` with item table `table` ("id", "mostpop", a .safetensors path, or a TableSpec),
    early-stopping on validation NDCG@10, and return test metrics per group (from the best validation epoch).
    `keep_scoring`: the result also holds the best epoch's `ranking.Scoring` (what a score ensemble needs)."""
    import torch
    from tqdm.auto import tqdm

    from reaemb_trl.evaluation.losses import proposal_log_q
    from reaemb_trl.evaluation.models import build_model
    from reaemb_trl.evaluation.tables import build_table

    if not split.test:
        raise ValueError("no user has 3 or more interactions; nothing to evaluate")
    spec = table if isinstance(table, TableSpec) else TableSpec(str(table), str(table), config.table_mode)
    cfg = config
    history = split.resolve_history(cfg.history)
    began = time.time()
    masks = group_masks(split, split.test, cfg.tail_user_threshold, cfg.tail_item_threshold)
    test_eval = RankingEvaluator.for_part(split, "test", cfg, history, seed)
    if spec.source == MOSTPOP:
        ranks = test_eval.popularity_ranks(split.train_interaction_counts())
        return _result(seed, spec, 0, 0, float("nan"), [], ranks, masks, cfg, began)

    seed_everything(seed)
    item_table = build_table(spec.source, split.item_ids, cfg.hidden, cfg.adapter_hidden, spec.mode,
                             cfg.normalization, cfg.id_dropout, split.cold)
    model = build_model(cfg.model, item_table, split.num_items, cfg.hidden, cfg.max_len, cfg.layers, cfg.heads,
                        cfg.dropout, cfg.inner_size).to(cfg.device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    batches = TrainingBatches(split, cfg)
    unseen = None
    if split.cold:  # cold items stand for items added after training: no candidate while training
        unseen = torch.zeros(split.num_items + 1, dtype=torch.bool)
        unseen[split.cold] = True
    log_q = proposal_log_q(torch.tensor(split.train_interaction_counts()), cfg.sampled_proposal, unseen)
    valid_eval = RankingEvaluator.for_part(split, "valid", cfg, history, seed)

    best, best_epoch, best_state, bad, val_history, epoch = -1.0, 0, None, 0, [], 0
    bar = tqdm(range(1, cfg.max_epochs + 1), desc=f"{cfg.model}/{spec.name} seed {seed}", disable=not progress,
               leave=False)
    dtype = cfg.training_dtype()
    autocast = torch.autocast(torch.device(cfg.device).type, dtype=dtype, enabled=dtype is not None)
    for epoch in bar:
        model.train()
        for batch in batches.epoch(rng, cfg.device):
            with autocast:
                loss = training_loss(model, batch, cfg, split.num_items, history == "exclude", log_q, gen, unseen)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite training loss ({loss.item()}) in epoch {epoch} of {cfg.model} with table "
                    f"{spec.name!r} (seed {seed}); lower EvalConfig.lr or check the table for NaN/inf values"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % cfg.eval_every and epoch != cfg.max_epochs:
            continue
        ndcg = metrics_from_ranks(valid_eval.ranks(model), (10,))["NDCG@10"]
        val_history.append(ndcg)
        bar.set_postfix(loss=f"{loss.item():.4f}", val_ndcg10=f"{ndcg:.4f}")
        if ndcg > best:
            best, best_epoch, bad = ndcg, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    test_states, items = test_eval.states(model)
    ranks = test_eval.ranks_from_scores(chunk @ items.T for chunk in test_states)
    result = _result(seed, spec, best_epoch, epoch, best, val_history, ranks, masks, cfg, began)
    if keep_scoring:
        valid_states, _ = valid_eval.states(model)
        result.scoring = Scoring(valid_states=_rows(valid_states), test_states=_rows(test_states),
                                 items=items.float().cpu().numpy())
    return result


def _rows(chunks) -> np.ndarray:
    import torch

    return torch.cat(chunks).float().cpu().numpy() if chunks else np.zeros((0, 0), dtype=np.float32)


def _result(seed, spec, best_epoch, epochs, best, val_history, ranks, masks, cfg, began) -> RunResult:
    metrics = {g: metrics_from_ranks(ranks[m], cfg.ks) for g, m in masks.items()}
    return RunResult(seed=seed, table=spec.name, best_epoch=best_epoch, epochs_run=epochs, best_valid_ndcg10=best,
                     metrics=metrics, group_sizes={g: int(m.sum()) for g, m in masks.items()},
                     history=val_history, test_ranks=[int(r) for r in ranks], seconds=round(time.time() - began, 2))
