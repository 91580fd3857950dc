"""The downstream yardstick's protocol: losses, history rule, every transition, table modes, normalisation,
MostPop, non-finite handling and the paired tests."""

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reaemb_trl.data import RecDataset, make_item
from reaemb_trl.evaluation import EvalConfig, full_ranks, holm, leave_one_out, train_and_evaluate, wilcoxon_signed_rank
from reaemb_trl.evaluation.models import build_model
from reaemb_trl.evaluation.losses import (
    draw_negatives, first_seen, first_seen_at, full_softmax_loss, proposal_log_q, sampled_softmax_loss,
)
from reaemb_trl.evaluation.ranking import RankingEvaluator
from reaemb_trl.evaluation.training import TrainingBatches, training_loss, training_targets
from reaemb_trl.evaluation.significance import default_pairs, paired_tests
from reaemb_trl.evaluation.split import training_windows
from reaemb_trl.evaluation.tables import AdapterTable, HybridTable, IDTable, build_table, normalize_table


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster; subprocess comparisons use the same kernels


def hand_split():
    items = [make_item(f"i{k}", [("title", f"item {k}")]) for k in range(1, 10)]
    sequences = {"u1": ["i1", "i2", "i3", "i4", "i5", "i6", "i7"], "u2": ["i5", "i3", "i8", "i9"],
                 "u3": ["i2", "i9", "i1"]}
    return leave_one_out(RecDataset(items, sequences))


# ---- ranks and metrics -------------------------------------------------------------------------------------------
def test_nan_and_inf_scores_rank_last():
    scores = torch.tensor([[0.0, float("nan"), 0.5, 0.2, float("inf")],
                           [0.0, 0.1, 0.5, float("nan"), 0.2],
                           [0.0, 0.3, float("-inf"), 0.2, 0.1]])
    ranks = full_ranks(scores, torch.tensor([2, 3, 2]))
    # row 0: NaN and +inf items do not outrank the target; row 1 and 2: a non-finite target ranks last (all 5 cols)
    assert ranks.tolist() == [1, 5, 5]


# ---- every transition, once per epoch ----------------------------------------------------------------------------
@pytest.mark.parametrize("model, width", [("sasrec", 3), ("bert4rec", 3)])
def test_every_transition_is_a_target_once_per_epoch(model, width):
    split = hand_split()
    cfg = EvalConfig(model=model, max_len=width, batch_size=2, mask_prob=1.0)
    batches = TrainingBatches(split, cfg)
    gen = torch.Generator().manual_seed(0)
    net = build_model(model, IDTable(split.num_items, 8), split.num_items, 8, width, 1, 2)
    seen = Counter()
    for batch in batches.epoch(np.random.default_rng(0)):
        _, targets, limit = training_targets(net, batch, cfg, gen)
        window, users, starts, ends = batch
        for b, t in (targets != 0).nonzero().tolist():
            absolute = int(starts[b]) + t + (0 if model == "bert4rec" else 1)
            seen[(tuple(users[b][users[b] != 0].tolist()), absolute)] += 1
            assert int(targets[b, t]) == int(users[b][absolute])
    expected = Counter()
    for seq in split.train:
        first = 0 if model == "bert4rec" else 1  # every item is masked once (mask_prob 1) / every transition
        for p in range(first, len(seq)):
            expected[(tuple(seq), p)] += 1
    assert seen == expected
    assert batches.num_targets == sum(expected.values())


def test_windows_cover_long_sequences_with_one_item_overlap():
    windows = training_windows([list(range(1, 12))], width=4)
    assert [(w.start, w.end) for w in windows] == [(7, 11), (4, 8), (1, 5), (0, 2)]


# ---- history: the same rule in training and ranking --------------------------------------------------------------
def test_history_exclusion_agrees_between_training_and_ranking():
    split = hand_split()
    assert split.resolve_history("auto") == "exclude" and not split.has_repeated_items
    cfg = EvalConfig(model="sasrec", max_len=10, batch_size=8)
    net = build_model("sasrec", IDTable(split.num_items, 8), split.num_items, 8, 10, 1, 2)
    batch = next(TrainingBatches(split, cfg).epoch(np.random.default_rng(0)))
    _, targets, limit = training_targets(net, batch, cfg, torch.Generator().manual_seed(0))
    users = batch[1]
    excluded = first_seen(users, split.num_items).unsqueeze(1) < limit.unsqueeze(2)
    for b, t in (targets != 0).nonzero().tolist():
        seq = users[b][users[b] != 0].tolist()
        history = set(seq[: int(limit[b, t])])
        assert history and int(targets[b, t]) not in history
        assert set(excluded[b, t].nonzero().flatten().tolist()) == history  # items before the target, nothing else
    # ranking the validation target excludes exactly the training sequence (its history) ...
    evaluator = RankingEvaluator(split, split.valid, cfg, "exclude")
    scores = torch.zeros(len(split.valid), split.num_items + 1)
    for row, (u, hist, target) in enumerate(split.valid):
        scores[row, hist] = 10.0  # history items would outrank the target if they stayed candidates
        scores[row, target] = 1.0
    assert evaluator.ranks_from_scores([scores]).tolist() == [1] * len(split.valid)
    keep = RankingEvaluator(split, split.valid, cfg, "keep")
    assert keep.ranks_from_scores([scores]).tolist() == [len(set(h)) + 1 for _, h, _ in split.valid]
    # ... and a dataset that repeats items keeps history under `auto`
    repeated = leave_one_out(RecDataset([make_item(f"i{k}", [("t", "x")]) for k in range(3)],
                                        {"u": ["i0", "i1", "i0", "i2"]}))
    assert repeated.resolve_history("auto") == "keep"


def test_first_seen_at_equals_the_full_table():
    users = torch.tensor([[3, 1, 3, 7, 0, 0], [2, 2, 5, 0, 0, 0]])
    columns = torch.tensor([1, 2, 3, 5, 7, 9])
    assert torch.equal(first_seen_at(users, columns), first_seen(users, 9)[:, columns])


# ---- losses -------------------------------------------------------------------------------------------------------
def test_cross_entropy_equals_a_hand_computation():
    torch.manual_seed(0)
    states, items = torch.randn(3, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    targets = torch.tensor([2, 5, 1])
    # one user per row; row 0 had items 1, 2, 3 before (2 is also its target: it must stay a candidate), row 2 had 4
    users = torch.tensor([[1, 2, 3, 0], [5, 0, 0, 0], [4, 1, 0, 0]])
    first = first_seen(users, 5)
    history = (first, torch.tensor([0, 1, 2]), torch.tensor([3, 0, 1]))
    loss = full_softmax_loss(states, items, targets, history, chunk_rows=2)
    expected = 0.0
    excluded = [{1, 3}, set(), {4}]
    for r in range(3):
        candidates = [c for c in range(1, 6) if c not in excluded[r]]
        logits = torch.stack([states[r] @ items[c] for c in candidates])
        expected += -(logits[candidates.index(int(targets[r]))] - torch.logsumexp(logits, 0))
    assert loss.item() == pytest.approx(expected.item() / 3, rel=1e-12)


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_cross_entropy_gradients_equal_the_full_logit_path(autocast):
    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.float64
    states = torch.randn(37, 8, dtype=dtype, requires_grad=True)
    items = torch.randn(30, 8, dtype=dtype, requires_grad=True)
    targets = torch.randint(1, 30, (37,))
    users = torch.randint(0, 30, (5, 12))
    rows, limit = torch.randint(0, 5, (37,)), torch.randint(0, 13, (37,))
    first = first_seen(users, 29)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = full_softmax_loss(states, items, targets, (first, rows, limit), chunk_rows=8)
    loss.backward()
    got = (loss.detach(), states.grad.clone(), items.grad.clone())
    states.grad, items.grad = None, None
    cast = (lambda x: x.bfloat16().to(dtype)) if autocast else (lambda x: x)
    logits = cast(states) @ cast(items).T
    logits[:, 0] = -torch.inf
    excluded = first[rows] < limit.unsqueeze(1)
    excluded[torch.arange(37), targets] = False
    reference = F.cross_entropy(logits.masked_fill(excluded, -torch.inf), targets)
    reference.backward()
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[0], reference.detach(), **tol)
    torch.testing.assert_close(got[1], states.grad, **tol)
    torch.testing.assert_close(got[2], items.grad, **tol)


def test_sampled_softmax_is_exact_with_every_item_and_converges_as_the_sample_grows():
    torch.manual_seed(0)
    n, h = 400, 16
    table = torch.nn.Embedding(n + 1, h).double()
    states = torch.randn(64, h, dtype=torch.float64)
    targets = torch.randint(1, n + 1, (64,))
    full = full_softmax_loss(states, table.weight, targets)
    log_q = proposal_log_q(torch.arange(n + 1), "uniform")
    gen = torch.Generator().manual_seed(0)
    every, draws = draw_negatives(log_q, n, gen)
    assert draws is None
    exact = sampled_softmax_loss(states, table, targets, every, log_q, draws)
    assert exact.item() == pytest.approx(full.item(), rel=1e-12)
    gaps = []
    for k in (8, 64, 2048):
        estimates = []
        for _ in range(20):
            negatives, draws = draw_negatives(log_q, k, gen)
            estimates.append(sampled_softmax_loss(states, table, targets, negatives, log_q, draws).item())
        gaps.append(abs(np.mean(estimates) - full.item()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.02 * full.item()


def test_sampled_softmax_respects_the_history_rule():
    torch.manual_seed(0)
    table = torch.nn.Embedding(7, 4).double()
    states = torch.randn(2, 4, dtype=torch.float64)
    targets = torch.tensor([1, 2])
    negatives = torch.arange(1, 7)
    excluded = torch.zeros(2, 6, dtype=torch.bool)
    excluded[0, [2, 3]] = True  # items 3 and 4 are history of row 0
    log_q = proposal_log_q(torch.arange(7), "uniform")
    got = sampled_softmax_loss(states, table, targets, negatives, log_q, None, excluded)
    history = (first_seen(torch.tensor([[3, 4], [0, 0]]), 6), torch.tensor([0, 1]), torch.tensor([2, 0]))
    assert got.item() == pytest.approx(full_softmax_loss(states, table.weight, targets, history).item(), rel=1e-12)


# ---- tables -------------------------------------------------------------------------------------------------------
def test_normalised_input_ignores_a_shared_offset():
    torch.manual_seed(0)
    # float64 tables, so T + c is itself exact: the test is about the normalisation, not float32 input rounding
    table = torch.randn(50, 32, dtype=torch.float64) * 3
    shifted = table + torch.randn(32, dtype=torch.float64) * 100  # an LLM table's large common direction
    for kind in ("center_scale", "whiten"):
        torch.testing.assert_close(normalize_table(shifted, kind), normalize_table(table, kind), atol=1e-6, rtol=0)
    normalized = normalize_table(table)
    assert normalized.mean(0).abs().max() < 1e-6 and normalized.norm(dim=1).mean().item() == pytest.approx(1.0)


def _train_steps(split, spec, mode, steps=3):
    cfg = EvalConfig(model="sasrec", max_len=6, batch_size=4, hidden=8, table_mode=mode)
    torch.manual_seed(0)
    table = build_table(spec, split.item_ids, 8, 16, mode)
    net = build_model("sasrec", table, split.num_items, 8, 6, 1, 2, 0.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.05)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    log_q = proposal_log_q(torch.tensor(split.train_interaction_counts()), "uniform")
    for _, batch in zip(range(steps), TrainingBatches(split, cfg).epoch(rng)):
        loss = training_loss(net, batch, cfg, split.num_items, True, log_q, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.state_dict()
    return {k: not torch.equal(before[k], after[k]) for k in before}, net


def test_each_table_mode_trains_exactly_what_it_should(tmp_path):
    from safetensors.torch import save_file
    import json

    split = hand_split()
    llm = torch.randn(split.num_items, 24) + 5.0
    path = tmp_path / "llm.safetensors"
    save_file({"embeddings": llm}, str(path), metadata={"item_ids": json.dumps(split.item_ids)})

    changed, net = _train_steps(split, str(path), "frozen")
    assert isinstance(net.table, AdapterTable) and not changed["table.frozen"]
    assert changed["table.adapter.0.weight"] and changed["blocks.0.qkv.weight"]

    changed, net = _train_steps(split, str(path), "init")
    assert isinstance(net.table, IDTable) and changed["table.embedding.weight"]
    init = build_table(str(path), split.item_ids, 8, mode="init").embedding.weight.detach()
    reference = IDTable(split.num_items, 8).embedding.weight.detach()
    # the PCA initialisation has the ID initialisation's scale and is not random
    assert init[1:].norm(dim=1).mean().item() == pytest.approx(reference[1:].norm(dim=1).mean().item(), rel=0.3)
    assert torch.equal(init, build_table(str(path), split.item_ids, 8, mode="init").embedding.weight.detach())

    changed, net = _train_steps(split, str(path), "hybrid")
    assert isinstance(net.table, HybridTable) and not changed["table.llm.frozen"]
    assert changed["table.ids.embedding.weight"] and changed["table.llm.adapter.0.weight"]


def test_non_finite_loss_stops_the_run_naming_epoch_and_table(tmp_path):
    from safetensors.torch import save_file
    import json

    split = hand_split()
    bad = torch.full((split.num_items, 4), float("nan"))
    path = tmp_path / "broken.safetensors"
    save_file({"embeddings": bad}, str(path), metadata={"item_ids": json.dumps(split.item_ids)})
    with pytest.raises(FloatingPointError, match=r"epoch 1 .*broken"):
        train_and_evaluate(split, str(path), EvalConfig(max_len=6, hidden=8, max_epochs=2), progress=False)


def test_mostpop_ranks_by_training_popularity_under_the_history_rule():
    split = hand_split()
    counts = split.train_interaction_counts()
    assert counts[5] == 2 and counts[3] == 2  # items 3 and 5 are the most popular in training
    excluded = train_and_evaluate(split, "mostpop", EvalConfig(history="exclude"), progress=False)
    kept = train_and_evaluate(split, "mostpop", EvalConfig(history="keep"), progress=False)
    # u1's test target i7 is unpopular (count 0): with history excluded only unseen items 8, 9 (>= 0) tie with it
    assert excluded.test_ranks[0] < kept.test_ranks[0]
    assert len(excluded.test_ranks) == len(split.test)


# ---- significance --------------------------------------------------------------------------------------------------
def test_wilcoxon_and_holm_on_a_hand_example():
    x = [0.5, 0.3, 0.0, 0.9, 0.2, 0.4, 0.0]
    y = [0.1, 0.3, 0.1, 0.2, 0.0, 0.1, 0.0]
    # differences 0.4, 0, -0.1, 0.7, 0.2, 0.3, 0 -> nonzero ranks of |d|: 0.1->1, 0.2->2, 0.3->3, 0.4->4, 0.7->5
    # W+ = 4 + 5 + 2 + 3 = 14, W- = 1; statistic = min = 1; exact two-sided p for n = 5: P(W <= 1) * 2 = 4 / 32
    statistic, p, nonzero = wilcoxon_signed_rank(x, y)
    assert (statistic, nonzero) == (1.0, 5) and p == pytest.approx(4 / 32)
    assert wilcoxon_signed_rank([1, 2], [1, 2])[1] == 1.0
    # Holm: sorted p (0.01, 0.02, 0.04) x (3, 2, 1) = (0.03, 0.04, 0.04), monotone, in the input order
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_default_pairs_and_paired_tests():
    names = ["mostpop", "id", "raw", "lrcl", "crrl"]
    pairs = default_pairs(names, ["crrl:lrcl", "lrcl:raw"])
    assert pairs == [("mostpop", "id"), ("raw", "id"), ("lrcl", "id"), ("crrl", "id"), ("lrcl", "raw"),
                     ("crrl", "raw"), ("crrl", "lrcl")]
    with pytest.raises(ValueError, match="not among"):
        default_pairs(names, ["crrl:nope"])
    rng = np.random.default_rng(0)
    base = rng.random(300)
    per_user = {"a": base + 0.2, "b": base}
    rows = paired_tests(per_user, [("a", "b")], {"all": np.ones(300, bool), "few": np.arange(300) < 3})
    assert rows[0]["significant"] and rows[0]["diff"] == pytest.approx(0.2)
    assert not rows[1]["significant"] and rows[1]["users"] == 3
