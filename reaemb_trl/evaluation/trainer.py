"""Train one downstream model on one item table with early stopping, then score the test split.

Objectives: SASRec and GRU4Rec predict the next item at every position with binary cross-entropy on the
positive and one negative drawn uniformly from items outside the user's training sequence. BERT4Rec uses
its cloze objective: masked positions predict the original item with cross-entropy over the whole catalogue.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass, field

import numpy as np

from reaemb_trl.evaluation.metrics import DEFAULT_KS, full_ranks, metrics_from_ranks, sample_negatives, sampled_ranks
from reaemb_trl.evaluation.split import SplitData

GROUPS = ("all", "tail_user", "head_user", "tail_item", "head_item")


@dataclass
class EvalConfig:
    model: str = "sasrec"
    hidden: int = 128
    max_len: int = 200
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    adapter_hidden: int = 256
    lr: float = 1e-3
    batch_size: int = 1024
    max_epochs: int = 200
    patience: int = 20
    protocol: str = "full"  # "full": rank against the whole catalogue; "sampled": against 100 negatives
    num_negatives: int = 100
    exclude_history: bool = False  # full protocol: keep the user's history items in the ranking (standard)
    ks: tuple[int, ...] = DEFAULT_KS
    tail_user_threshold: int = 10  # tail user: test history shorter than this
    tail_item_threshold: int = 20  # tail item: target bought by fewer distinct training users than this
    mask_prob: float = 0.2  # BERT4Rec cloze masking rate
    eval_batch_size: int = 512
    device: str = "cpu"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    seed: int
    table: str
    best_epoch: int
    epochs_run: int
    best_valid_ndcg10: float
    metrics: dict[str, dict[str, float]]  # group -> metric -> value (test split)
    group_sizes: dict[str, int]
    history: list[float] = field(default_factory=list)  # validation NDCG@10 per evaluated epoch


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pad_right(seqs, max_len: int, device="cpu"):
    """(B, L) long tensor of the last `max_len` items of each sequence, right-padded with 0."""
    import torch

    seqs = [s[-max_len:] for s in seqs]
    width = max(1, max(len(s) for s in seqs))
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.tensor(s, dtype=torch.long)
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
    """Ranks the targets of one split part (validation or test) under the configured protocol.

    Sampled-protocol negatives are drawn once, from `negative_seed`, so every epoch and every table sees
    the same candidates."""

    def __init__(self, split: SplitData, part, config: EvalConfig, negative_seed: int = 0):
        import torch

        self.split, self.part, self.config = split, part, config
        self.negatives = None
        if config.protocol == "sampled":
            rng = np.random.default_rng(negative_seed)
            self.negatives = torch.tensor([sample_negatives(rng, split.num_items, split.full[u], config.num_negatives)
                                           for u, _, _ in part], dtype=torch.long)
        elif config.protocol != "full":
            raise ValueError(f"unknown protocol {config.protocol!r}; use 'full' or 'sampled'")

    def ranks(self, model) -> np.ndarray:
        import torch

        cfg, out = self.config, []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            items = model.table.all_items()
            for start in range(0, len(self.part), cfg.eval_batch_size):
                chunk = self.part[start:start + cfg.eval_batch_size]
                states = user_states(model, cfg.model, [h for _, h, _ in chunk], cfg.max_len, cfg.device)
                scores = states @ items.T
                targets = torch.tensor([t for _, _, t in chunk], device=scores.device)
                if self.negatives is not None:
                    negs = self.negatives[start:start + len(chunk)].to(scores.device)
                    out.append(sampled_ranks(scores, targets, negs).cpu())
                else:
                    exclude = None
                    if cfg.exclude_history:
                        exclude = torch.zeros_like(scores, dtype=torch.bool)
                        for row, (_, h, _) in enumerate(chunk):
                            exclude[row, torch.tensor(h, dtype=torch.long)] = True
                    out.append(full_ranks(scores, targets, exclude).cpu())
        model.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros(0)


def _next_item_loss(model, batch_seqs, num_items: int, cfg: EvalConfig, gen):
    """BCE on (positive, one sampled negative) at every position of the right-padded batch."""
    import torch
    import torch.nn.functional as F

    full = pad_right(batch_seqs, cfg.max_len + 1, cfg.device)
    inputs, pos = full[:, :-1], full[:, 1:]
    valid = pos != 0
    neg = torch.randint(1, num_items + 1, pos.shape, generator=gen).to(cfg.device)
    for _ in range(3):  # redraw negatives that fall inside the user's own sequence (rare after 3 rounds)
        clash = (neg.unsqueeze(-1) == full.unsqueeze(1)).any(-1)
        if not clash.any():
            break
        neg = torch.where(clash, torch.randint(1, num_items + 1, pos.shape, generator=gen).to(cfg.device), neg)
    states = model(inputs)
    pos_logit = (states * model.table(pos)).sum(-1)[valid]
    neg_logit = (states * model.table(neg)).sum(-1)[valid]
    return (F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
            + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit)))


def _cloze_loss(model, batch_seqs, cfg: EvalConfig, gen):
    import torch
    import torch.nn.functional as F

    from reaemb_trl.evaluation.models import bert_cloze

    seq = pad_right(batch_seqs, cfg.max_len, cfg.device)
    inputs, labels = bert_cloze(seq, model.mask_index, cfg.mask_prob, gen)
    states = model(inputs)
    picked = labels != -100
    logits = states[picked] @ model.table.all_items().T
    logits[:, 0] = -torch.inf  # padding is never an answer
    return F.cross_entropy(logits, labels[picked])


def train_and_evaluate(split: SplitData, table: str, config: EvalConfig, seed: int = 0,
                       progress: bool = True) -> RunResult:
    """Train `config.model` with item table `table` ("id" or a .safetensors path), early-stopping on
    validation NDCG@10, and return test metrics per group (from the best validation epoch)."""
    import torch
    from tqdm.auto import tqdm

    from reaemb_trl.evaluation.models import build_model
    from reaemb_trl.evaluation.tables import build_table

    if not split.test:
        raise ValueError("no user has 3 or more interactions; nothing to evaluate")
    seed_everything(seed)
    cfg = config
    item_table = build_table(table, split.item_ids, cfg.hidden, cfg.adapter_hidden)
    model = build_model(cfg.model, item_table, split.num_items, cfg.hidden, cfg.max_len, cfg.layers, cfg.heads,
                        cfg.dropout).to(cfg.device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    min_len = 1 if cfg.model == "bert4rec" else 2  # next-item training needs an input and a target
    train = [s for s in split.train if len(s) >= min_len]
    if not train:
        raise ValueError(f"no training sequence has {min_len}+ items; the dataset is too short to train on")
    valid_eval = RankingEvaluator(split, split.valid, cfg, negative_seed=seed + 1)
    test_eval = RankingEvaluator(split, split.test, cfg, negative_seed=seed + 2)

    best, best_epoch, best_state, bad, history, epoch = -1.0, 0, None, 0, [], 0
    bar = tqdm(range(1, cfg.max_epochs + 1), desc=f"{cfg.model}/{table} seed {seed}", disable=not progress,
               leave=False)
    for epoch in bar:
        model.train()
        order = rng.permutation(len(train))
        for start in range(0, len(order), cfg.batch_size):
            batch = [train[i] for i in order[start:start + cfg.batch_size]]
            if cfg.model == "bert4rec":
                loss = _cloze_loss(model, batch, cfg, gen)
            else:
                loss = _next_item_loss(model, batch, split.num_items, cfg, gen)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        ndcg = metrics_from_ranks(valid_eval.ranks(model), (10,))["NDCG@10"]
        history.append(ndcg)
        bar.set_postfix(loss=f"{loss.item():.4f}", val_ndcg10=f"{ndcg:.4f}")
        if ndcg > best:
            best, best_epoch, bad = ndcg, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    ranks = test_eval.ranks(model)
    masks = group_masks(split, split.test, cfg.tail_user_threshold, cfg.tail_item_threshold)
    metrics = {g: metrics_from_ranks(ranks[m], cfg.ks) for g, m in masks.items()}
    return RunResult(seed=seed, table=table, best_epoch=best_epoch, epochs_run=epoch, best_valid_ndcg10=best,
                     metrics=metrics, group_sizes={g: int(m.sum()) for g, m in masks.items()}, history=history)


def table_names(tables) -> list[str]:
    """Display names: "id" or the file stem; repeated stems get a numeric suffix."""
    from pathlib import Path

    names: list[str] = []
    for spec in tables:
        base = "id" if spec == "id" else Path(spec).stem
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def compare_tables(dataset, tables, seeds=1, config: EvalConfig | None = None, progress: bool = True) -> dict:
    """Train and test `config.model` once per (table, seed) on the same split and aggregate the results.

    dataset: a RecDataset or a canonical folder path. tables: "id" and/or .safetensors paths.
    seeds: a count (seeds 0..n-1) or an explicit list. Returns the dict written to results.json.
    """
    from tqdm.auto import tqdm

    from reaemb_trl.data.canonical import RecDataset
    from reaemb_trl.evaluation.report import aggregate
    from reaemb_trl.evaluation.split import leave_one_out

    config = config or EvalConfig()
    if not isinstance(dataset, RecDataset):
        dataset = RecDataset.load(dataset)
    split = leave_one_out(dataset)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    names = table_names(tables)
    runs: dict[str, list[RunResult]] = {name: [] for name in names}
    jobs = [(name, spec, seed) for name, spec in zip(names, tables) for seed in seed_list]
    for name, spec, seed in tqdm(jobs, desc="runs", disable=not progress):
        runs[name].append(train_and_evaluate(split, spec, config, seed, progress))
    return aggregate(runs, config, tables=dict(zip(names, tables)))
