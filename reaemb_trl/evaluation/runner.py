"""Train one downstream model on one item table with early stopping, score the test split, and compare tables.

Every epoch covers every training transition of every user exactly once (consecutive windows over the whole
training sequence, see `split.training_windows`); the loss (`objectives`) and the ranking apply the same history
rule. The best validation epoch's weights are tested; per-user test ranks are kept for paired tests.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from reaemb_trl.evaluation.metrics import DEFAULT_KS, full_ranks, metrics_from_ranks, sample_negatives, sampled_ranks
from reaemb_trl.evaluation.objectives import LOSSES, PROPOSALS
from reaemb_trl.evaluation.split import HISTORY_RULES, SplitData, training_windows

GROUPS = ("all", "tail_user", "head_user", "tail_item", "head_item")
MOSTPOP = "mostpop"


@dataclass
class EvalConfig:
    """The downstream protocol. Defaults: CE-trained models, history excluded where items do not repeat."""

    model: str = "sasrec"  # sasrec, gru4rec or bert4rec
    loss: str = "ce"  # ce (softmax over the catalogue) or bce (the papers': one sampled negative)
    history: str = "auto"  # exclude, keep, or auto (exclude when no sequence repeats an item)
    table_mode: str = "frozen"  # for table files: frozen (+ adapter), init (IDs from its PCA), hybrid (IDs + adapter)
    normalization: str = "center_scale"  # what the adapter reads: center_scale, whiten or none
    hidden: int = 128
    inner_size: int | None = None  # feed-forward width (None: hidden for SASRec, 4 x hidden for BERT4Rec)
    max_len: int = 200
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    adapter_hidden: int = 256
    lr: float = 1e-3
    batch_size: int = 1024  # training windows per update
    max_epochs: int = 200
    patience: int = 20  # validations without a gain in NDCG@10 before stopping
    eval_every: int = 1  # validate every this many epochs
    sampled_softmax_above: int = 100_000  # catalogues larger than this train with a sampled softmax
    num_sampled: int = 8192  # negatives per batch of the sampled softmax
    sampled_proposal: str = "uniform"  # its proposal: uniform or popularity (count^0.75)
    protocol: str = "full"  # full: rank against the whole catalogue; sampled: against 100 negatives
    num_negatives: int = 100
    ks: tuple[int, ...] = DEFAULT_KS
    tail_user_threshold: int = 10  # tail user: test history shorter than this
    tail_item_threshold: int = 20  # tail item: target bought by fewer distinct training users than this
    mask_prob: float = 0.2  # BERT4Rec cloze masking rate
    eval_batch_size: int = 512
    device: str = "cpu"
    dtype: str = "auto"  # training matmuls: auto (bf16 where the hardware runs it fast), float32 or bfloat16

    def __post_init__(self):
        choices = {"model": ("sasrec", "gru4rec", "bert4rec"), "loss": LOSSES, "history": HISTORY_RULES,
                   "table_mode": ("frozen", "init", "hybrid"), "normalization": ("center_scale", "whiten", "none"),
                   "sampled_proposal": PROPOSALS, "protocol": ("full", "sampled"),
                   "dtype": ("auto", "float32", "bfloat16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"EvalConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("max_len", "batch_size", "max_epochs", "patience", "eval_every", "num_sampled"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        self.ks = tuple(self.ks)

    def as_dict(self) -> dict:
        return asdict(self)

    def training_dtype(self):
        """The autocast dtype of training (None: float32). Ranking always runs in float32: bf16 rounding would
        create ties, and ties rank pessimistically."""
        import torch

        from reaemb_trl.provenance import fast_bf16_available

        if self.dtype == "bfloat16" or (self.dtype == "auto" and fast_bf16_available(torch.device(self.device))):
            return torch.bfloat16
        return None


@dataclass
class TableSpec:
    """One row of a comparison: `source` is "id", "mostpop" or a .safetensors table used in `mode`."""

    name: str
    source: str
    mode: str = "frozen"


@dataclass
class RunResult:
    seed: int
    table: str
    best_epoch: int
    epochs_run: int
    best_valid_ndcg10: float
    metrics: dict[str, dict[str, float]]  # group -> metric -> value (test split)
    group_sizes: dict[str, int]
    history: list[float] = field(default_factory=list)  # validation NDCG@10 per validation
    test_ranks: list[int] = field(default_factory=list)  # per test user, in split.test order
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def group_masks(split: SplitData, part, tail_user_threshold: int, tail_item_threshold: int) -> dict[str, np.ndarray]:
    popularity = split.train_popularity()
    lengths = np.array([len(h) for _, h, _ in part])
    pops = np.array([popularity[t] for _, _, t in part])
    tail_user, tail_item = lengths < tail_user_threshold, pops < tail_item_threshold
    return {"all": np.ones(len(part), dtype=bool), "tail_user": tail_user, "head_user": ~tail_user,
            "tail_item": tail_item, "head_item": ~tail_item}


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

    def ranks(self, model) -> np.ndarray:
        import torch

        cfg = self.config
        was_training = model.training
        model.eval()
        with torch.no_grad():
            items = model.table.all_items()
            scores = (user_states(model, cfg.model, histories, cfg.max_len, cfg.device) @ items.T
                      for histories, _, _ in self.chunks)
            ranks = self.ranks_from_scores(scores)
        model.train(was_training)
        return ranks

    def popularity_ranks(self, counts) -> np.ndarray:
        """MostPop: every user gets the catalogue ordered by training interactions."""
        import torch

        scores = torch.as_tensor(counts, dtype=torch.float32).unsqueeze(0)
        return self.ranks_from_scores(scores.expand(len(targets), -1) for _, targets, _ in self.chunks)


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


def _training_loss(model, batch, cfg: EvalConfig, num_items: int, exclude: bool, log_q, gen):
    """The loss of one batch of windows (next-item transitions, or cloze positions for BERT4Rec)."""
    from reaemb_trl.evaluation.objectives import (
        bce_loss, draw_negatives, first_seen, first_seen_at, full_softmax_loss, sampled_softmax_loss,
    )

    users = batch[1]
    inputs, targets, limit = training_targets(model, batch, cfg, gen)
    limit = limit.masked_fill(targets == 0, 0)  # positions without a target exclude nothing (no all -inf rows)
    states = model(inputs)
    if cfg.loss == "bce":
        return bce_loss(states, model.table, targets, users, num_items, gen)
    if num_items <= cfg.sampled_softmax_above:
        picked = targets != 0
        history = (first_seen(users, num_items), picked.nonzero()[:, 0], limit[picked]) if exclude else None
        return full_softmax_loss(states[picked], model.table.all_items(), targets[picked], history)
    negatives, draws = draw_negatives(log_q, cfg.num_sampled, gen)
    negatives = negatives.to(states.device)
    excluded = first_seen_at(users, negatives).unsqueeze(1) < limit.unsqueeze(2) if exclude else None
    return sampled_softmax_loss(states, model.table, targets, negatives, log_q.to(states.device), draws, excluded)


def train_and_evaluate(split: SplitData, table: str | TableSpec, config: EvalConfig, seed: int = 0,
                       progress: bool = True) -> RunResult:
    """Train `config.model` with item table `table` ("id", "mostpop", a .safetensors path, or a TableSpec),
    early-stopping on validation NDCG@10, and return test metrics per group (from the best validation epoch)."""
    import torch
    from tqdm.auto import tqdm

    from reaemb_trl.evaluation.models import build_model
    from reaemb_trl.evaluation.objectives import proposal_log_q
    from reaemb_trl.evaluation.tables import build_table

    if not split.test:
        raise ValueError("no user has 3 or more interactions; nothing to evaluate")
    spec = table if isinstance(table, TableSpec) else TableSpec(str(table), str(table), config.table_mode)
    cfg = config
    history = split.resolve_history(cfg.history)
    began = time.time()
    masks = group_masks(split, split.test, cfg.tail_user_threshold, cfg.tail_item_threshold)
    test_eval = RankingEvaluator(split, split.test, cfg, history, negative_seed=seed + 2)
    if spec.source == MOSTPOP:
        ranks = test_eval.popularity_ranks(split.train_interaction_counts())
        return _result(seed, spec, 0, 0, float("nan"), [], ranks, masks, cfg, began)

    seed_everything(seed)
    item_table = build_table(spec.source, split.item_ids, cfg.hidden, cfg.adapter_hidden, spec.mode,
                             cfg.normalization)
    model = build_model(cfg.model, item_table, split.num_items, cfg.hidden, cfg.max_len, cfg.layers, cfg.heads,
                        cfg.dropout, cfg.inner_size).to(cfg.device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    batches = TrainingBatches(split, cfg)
    log_q = proposal_log_q(torch.tensor(split.train_interaction_counts()), cfg.sampled_proposal)
    valid_eval = RankingEvaluator(split, split.valid, cfg, history, negative_seed=seed + 1)

    best, best_epoch, best_state, bad, val_history, epoch = -1.0, 0, None, 0, [], 0
    bar = tqdm(range(1, cfg.max_epochs + 1), desc=f"{cfg.model}/{spec.name} seed {seed}", disable=not progress,
               leave=False)
    dtype = cfg.training_dtype()
    autocast = torch.autocast(torch.device(cfg.device).type, dtype=dtype, enabled=dtype is not None)
    for epoch in bar:
        model.train()
        for batch in batches.epoch(rng, cfg.device):
            with autocast:
                loss = _training_loss(model, batch, cfg, split.num_items, history == "exclude", log_q, gen)
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
    return _result(seed, spec, best_epoch, epoch, best, val_history, test_eval.ranks(model), masks, cfg, began)


def _result(seed, spec, best_epoch, epochs, best, val_history, ranks, masks, cfg, began) -> RunResult:
    metrics = {g: metrics_from_ranks(ranks[m], cfg.ks) for g, m in masks.items()}
    return RunResult(seed=seed, table=spec.name, best_epoch=best_epoch, epochs_run=epochs, best_valid_ndcg10=best,
                     metrics=metrics, group_sizes={g: int(m.sum()) for g, m in masks.items()},
                     history=val_history, test_ranks=[int(r) for r in ranks], seconds=round(time.time() - began, 2))


def table_specs(tables, modes=None) -> list[TableSpec]:
    """TableSpecs from "id", "mostpop", paths or TableSpecs. Each file runs once per mode in `modes` (default
    frozen); names are the file stem, with `@mode` for the other modes; repeated names get a numeric suffix."""
    modes = list(modes or ["frozen"])
    specs: list[TableSpec] = []
    names: set[str] = set()
    for entry in tables:
        if isinstance(entry, TableSpec):
            candidates = [entry]
        elif entry in ("id", MOSTPOP):
            candidates = [TableSpec(entry, entry)]
        else:
            stem = Path(entry).stem
            candidates = [TableSpec(stem if mode == "frozen" else f"{stem}@{mode}", str(entry), mode) for mode in modes]
        for spec in candidates:
            name, n = spec.name, 2
            while name in names:
                name, n = f"{spec.name}_{n}", n + 1
            names.add(name)
            specs.append(TableSpec(name, spec.source, spec.mode))
    return specs


def _run_job(job) -> RunResult:
    """One (table, seed) run in a worker process with its share of the CPU threads."""
    split, spec, config, seed, threads = job
    import torch

    torch.set_num_threads(threads)
    return train_and_evaluate(split, spec, config, seed, progress=False)


def compare_tables(dataset, tables, seeds=1, config: EvalConfig | None = None, progress: bool = True,
                   compare=(), modes=None, baseline_pairs: bool = True, workers: int = 1) -> dict:
    """Train and test `config.model` once per (table, seed) on the same split, aggregate the results and run the
    paired tests (`significance.default_pairs` - unless `baseline_pairs` is False - plus the `compare` pairs,
    "A:B" or (A, B)).

    dataset: a RecDataset or a canonical folder path. tables: "id", "mostpop", .safetensors paths or TableSpecs
    (files run once per mode in `modes`). seeds: a count (0..n-1) or a list. MostPop is deterministic and runs once.
    `workers` > 1 runs that many (table, seed) jobs at once in worker processes, splitting the CPU threads between
    them (the small matmuls of these models use one core badly; on 2 cores, 2 workers are ~1.7x faster); the
    results do not depend on the schedule. Returns the dict written to results.json (per-user test ranks under each
    table's `test_ranks`)."""
    from tqdm.auto import tqdm

    from reaemb_trl.data.canonical import RecDataset
    from reaemb_trl.evaluation.report import aggregate
    from reaemb_trl.evaluation.split import leave_one_out

    config = config or EvalConfig()
    if not isinstance(dataset, RecDataset):
        dataset = RecDataset.load(dataset)
    split = leave_one_out(dataset)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    specs = table_specs(tables, modes)
    runs: dict[str, list[RunResult]] = {spec.name: [] for spec in specs}
    jobs = [(spec, seed) for spec in specs for seed in (seed_list[:1] if spec.source == MOSTPOP else seed_list)]
    if workers <= 1 or len(jobs) <= 1:
        results = [train_and_evaluate(split, spec, config, seed, progress)
                   for spec, seed in tqdm(jobs, desc="runs", disable=not progress)]
    else:
        import multiprocessing

        import torch

        threads = max(1, torch.get_num_threads() // workers)
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        with context.Pool(workers) as pool:
            pending = pool.imap(_run_job, [(split, spec, config, seed, threads) for spec, seed in jobs])
            results = list(tqdm(pending, total=len(jobs), desc=f"runs ({workers} workers)", disable=not progress))
            pool.close()  # let the workers exit on their own (leaving the block would terminate them)
            pool.join()
    for (spec, _), result in zip(jobs, results):
        runs[spec.name].append(result)
    return aggregate(runs, config, split, specs, compare, baseline_pairs)
