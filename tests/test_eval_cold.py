"""The cold-item protocol: a seeded share of the catalogue leaves every training signal of the
downstream model, and the users whose target is a cold item form a reported group."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from reaemb_trl.data import RecDataset, cold_item_ids, make_item, without_items, write_dataset
from reaemb_trl.evaluation import EvalConfig, compare_tables, group_masks, leave_one_out, render_markdown
from reaemb_trl.evaluation.losses import bce_loss, draw_negatives, full_softmax_loss, proposal_log_q
from reaemb_trl.evaluation.training import TrainingBatches, train_and_evaluate

COLD = {"i3", "i7"}
SEQUENCES = {
    "u1": ["i1", "i2", "i3", "i4", "i5", "i6", "i7"],  # test target i7 is cold; i3 leaves the training part
    "u2": ["i5", "i3", "i8", "i9"],  # i3 leaves the training part; targets i8, i9 stay
    "u3": ["i2", "i9", "i3"],  # test target cold
    "u4": ["i7", "i3", "i1", "i2"],  # training part all cold: becomes a training-only user [i1, i2]
    "u5": ["i1", "i7"],  # too short to evaluate: trains on [i1]
    "u6": ["i4", "i6", "i8", "i3", "i1"],  # validation target cold, test target not
    "u7": ["i6", "i7", "i8", "i3", "i5"],  # validation target cold (i3), training part loses i7
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster; subprocess comparisons use the same kernels


def _dataset(sequences=SEQUENCES, n_items=9) -> RecDataset:
    return RecDataset([make_item(f"i{k}", [("title", f"item {k}")]) for k in range(1, n_items + 1)], sequences)


# ---- choosing and removing cold items -----------------------------------------------------------------------------
def test_cold_item_ids_are_a_seeded_share_independent_of_the_catalogue_order():
    ids = [f"item{k}" for k in range(200)]
    chosen = cold_item_ids(ids, 0.1, seed=0)
    assert len(chosen) == 20 and chosen == [i for i in ids if i in set(chosen)]  # catalogue order
    assert cold_item_ids(ids, 0.1, seed=0) == chosen
    assert set(cold_item_ids(list(reversed(ids)), 0.1, seed=0)) == set(chosen)
    assert set(cold_item_ids(ids, 0.1, seed=1)) != set(chosen)
    assert cold_item_ids(ids, 0.0) == [] and len(cold_item_ids(ids, 0.0125)) == 3  # 2.5 rounds up
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        cold_item_ids(ids, 1.0)


def test_without_items_keeps_the_held_out_targets_and_leaves_no_cold_item_in_a_training_part():
    kept = without_items(SEQUENCES, COLD)
    assert kept == {
        "u1": ["i1", "i2", "i4", "i5", "i6", "i7"], "u2": ["i5", "i8", "i9"], "u3": ["i2", "i9", "i3"],
        "u4": ["i1", "i2"], "u5": ["i1"], "u6": ["i4", "i6", "i8", "i3", "i1"], "u7": ["i6", "i8", "i3", "i5"],
    }
    for seq in kept.values():  # the leave-one-out rule: the last two are held out from 3 items on
        training = seq[:-2] if len(seq) >= 3 else seq
        assert not COLD & set(training)
    assert without_items(SEQUENCES, set()) == SEQUENCES


# ---- the split and the training batches ---------------------------------------------------------------------------
def test_cold_items_never_reach_training_sequences_windows_or_validation_histories():
    split = leave_one_out(_dataset(), COLD)
    cold = {split.item_ids.index(i) + 1 for i in COLD}
    assert set(split.cold) == cold
    assert all(not cold & set(seq) for seq in split.train)
    assert all(not cold & set(history) for _, history, _ in split.valid)
    counts = split.train_interaction_counts()
    assert all(counts[i] == 0 for i in cold)  # MostPop's score of a cold item
    for model, width in (("sasrec", 3), ("bert4rec", 3)):
        config = EvalConfig(model=model, max_len=width, batch_size=2)
        for window, users, _, _ in TrainingBatches(split, config).epoch(np.random.default_rng(0)):
            assert not cold & set(window.flatten().tolist()) and not cold & set(users.flatten().tolist())
    # every evaluated user keeps both held-out targets, cold or not
    evaluated = {split.users[u]: split.item_ids[t - 1] for u, _, t in split.test}
    assert evaluated == {"u1": "i7", "u2": "i9", "u3": "i3", "u6": "i1", "u7": "i5"}
    assert {split.users[u]: split.item_ids[t - 1] for u, _, t in split.valid}["u7"] == "i3"


def test_the_cold_group_is_the_users_whose_target_is_cold():
    split = leave_one_out(_dataset(), COLD)
    masks = group_masks(split, split.test, 10, 1)
    cold_users = {split.users[u] for (u, _, _), cold in zip(split.test, masks["cold_item"]) if cold}
    assert cold_users == {"u1", "u3"}  # by hand: the test targets i7 and i3
    assert (masks["tail_item"] | ~masks["cold_item"]).all()  # popularity 0: every cold target is a tail item
    valid = group_masks(split, split.valid, 10, 1)
    assert {split.users[u] for (u, _, _), c in zip(split.valid, valid["cold_item"]) if c} == {"u6", "u7"}


def test_without_cold_items_the_split_and_groups_are_unchanged():
    plain, zero = leave_one_out(_dataset()), leave_one_out(_dataset(), cold_item_ids([f"i{k}" for k in range(9)], 0))
    assert plain == zero and plain.cold == []
    assert "cold_item" not in group_masks(plain, plain.test, 10, 20)


# ---- no training signal reaches a cold item ------------------------------------------------------------------------
def test_cold_items_are_no_candidate_of_any_training_objective():
    torch.manual_seed(0)
    unseen = torch.zeros(10, dtype=torch.bool)
    unseen[[3, 7]] = True
    states, items = torch.randn(6, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    targets = torch.tensor([1, 2, 4, 5, 6, 9])
    loss = full_softmax_loss(states, items, targets, unseen=unseen)
    loss.backward()
    assert torch.equal(items.grad[unseen], torch.zeros(2, 4)) and items.grad[~unseen][1:].abs().sum() > 0
    logits = (states @ items.T).masked_fill(unseen | (torch.arange(10) == 0), -torch.inf)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))

    log_q = proposal_log_q(torch.arange(10), "popularity", unseen)
    drawn, _ = draw_negatives(log_q, 5000, torch.Generator().manual_seed(0))
    assert not set(drawn.tolist()) & {0, 3, 7}
    every, draws = draw_negatives(log_q, 10_000_000, torch.Generator().manual_seed(0))
    assert draws is None and every.tolist() == [1, 2, 4, 5, 6, 8, 9]

    seen = (~unseen).nonzero().flatten()[1:]
    table = torch.nn.Embedding(10, 4)
    bce_loss(torch.randn(50, 3, 4), table, torch.ones(50, 3, dtype=torch.long), torch.zeros(50, 1, dtype=torch.long),
             9, torch.Generator().manual_seed(0), seen).backward()
    assert torch.equal(table.weight.grad[unseen], torch.zeros(2, 4))


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_the_id_model_ranks_cold_items_from_untrained_rows(loss, monkeypatch):
    import reaemb_trl.evaluation.models as models

    built = {}
    real = models.build_model

    def keep(*args, **kwargs):
        built["model"] = real(*args, **kwargs)
        built["init"] = built["model"].table.embedding.weight.detach().clone()
        return built["model"]

    monkeypatch.setattr(models, "build_model", keep)
    split = leave_one_out(_dataset(), COLD)
    config = EvalConfig(model="sasrec", loss=loss, hidden=8, max_len=4, layers=1, heads=1, batch_size=2,
                        max_epochs=3, patience=3, lr=0.05)
    train_and_evaluate(split, "id", config, progress=False)
    weights, init = built["model"].table.embedding.weight.detach(), built["init"]
    assert torch.equal(weights[split.cold], init[split.cold])
    assert not torch.equal(weights[1:], init[1:])


def test_id_dropout_leaves_out_id_rows_only_in_training_and_zeroes_the_cold_rows():
    from reaemb_trl.evaluation.tables import HybridTable

    torch.manual_seed(0)
    table = HybridTable(torch.randn(9, 12), 9, 8, 16, id_dropout=0.5, unseen=[3, 7])
    ids = table.ids.embedding.weight.detach()
    assert torch.equal(ids[[3, 7]], torch.zeros(2, 8)) and ids[[1, 2, 4]].abs().sum() > 0
    llm = table.llm.all_items().detach()
    table.train()
    left_out = (table.all_items().detach() - llm).abs().sum(1) == 0
    assert 2 < int(left_out[1:].sum()) < 8  # about half of the rows, never all or none
    table.eval()
    torch.testing.assert_close(table.all_items().detach(), ids + llm)
    idx = torch.tensor([[1, 2, 3, 0]])
    torch.testing.assert_close(table(idx).detach(), (ids + llm)[idx] * (idx != 0).unsqueeze(-1))
    plain = HybridTable(torch.randn(9, 12), 9, 8, 16, unseen=[3, 7])  # the plain hybrid keeps its random rows
    assert plain.ids.embedding.weight[[3, 7]].abs().sum() > 0
    with pytest.raises(ValueError, match=r"EvalConfig.id_dropout is a probability in \[0, 1\)"):
        EvalConfig(id_dropout=1.0)


def test_a_hybrid_with_id_dropout_never_trains_the_cold_rows(monkeypatch, tmp_path):
    import reaemb_trl.evaluation.models as models

    built = {}
    real = models.build_model

    def keep(*args, **kwargs):
        built["model"] = real(*args, **kwargs)
        built["init"] = built["model"].table.ids.embedding.weight.detach().clone()
        return built["model"]

    monkeypatch.setattr(models, "build_model", keep)
    split = leave_one_out(_dataset(), COLD)
    from safetensors.torch import save_file

    path = str(tmp_path / "table.safetensors")
    save_file({"embeddings": torch.randn(9, 6)}, path, metadata={"item_ids": json.dumps(split.item_ids)})
    config = EvalConfig(model="sasrec", hidden=8, max_len=4, layers=1, heads=1, batch_size=2, max_epochs=3,
                        patience=3, lr=0.05, table_mode="hybrid", id_dropout=0.3)
    train_and_evaluate(split, path, config, progress=False)
    weights, init = built["model"].table.ids.embedding.weight.detach(), built["init"]
    assert torch.equal(init[split.cold], torch.zeros(len(split.cold), 8))
    assert torch.equal(weights[split.cold], init[split.cold])
    assert not torch.equal(weights[1:], init[1:])


# ---- compare_tables, the report, the run store and the CLI --------------------------------------------------------
def _toy(users=40, n_items=20) -> RecDataset:
    rng = np.random.default_rng(0)
    seqs = {f"u{u}": [f"i{(s + t) % n_items + 1}" for t in range(int(rng.integers(4, 9)))]
            for u, s in enumerate(rng.integers(0, n_items, users))}
    return _dataset(seqs, n_items)


TINY = dict(model="gru4rec", hidden=8, max_len=6, batch_size=16, max_epochs=2, patience=2)


def test_compare_tables_reports_the_cold_group_and_notes_how_cold_items_are_ranked(tmp_path):
    dataset = _toy()
    config = EvalConfig(**TINY, cold_items=0.2, cold_item_seed=3)
    results = compare_tables(dataset, ["mostpop", "id"], seeds=1, config=config, progress=False,
                             runs_dir=tmp_path / "runs")
    cold = cold_item_ids(dataset.item_ids, 0.2, seed=3)
    # evaluated: 3+ items with a training part that is not all cold
    expected = sum(seq[-1] in cold for seq in dataset.sequences.values() if len(seq) >= 3 and set(seq[:-2]) - set(cold))
    assert results["cold_items"]["item_ids"] == cold and results["cold_items"]["count"] == 4
    for table in results["tables"].values():
        assert table["groups"]["cold_item"]["size"] == expected > 0
    assert any(row["group"] == "cold_item" for row in results["comparisons"])
    markdown = render_markdown(results)
    assert "| id | cold items |" in markdown and "untrained, randomly initialised rows" in markdown
    with pytest.raises(ValueError, match=r"other settings \(differing: config\)"):
        compare_tables(dataset, ["mostpop", "id"], seeds=1, config=EvalConfig(**TINY, cold_items=0.2),
                       progress=False, runs_dir=tmp_path / "runs")  # another cold-item seed

    plain = compare_tables(dataset, ["mostpop", "id"], seeds=1, config=EvalConfig(**TINY), progress=False)
    assert "cold_items" not in plain and "cold_item" not in plain["tables"]["id"]["groups"]
    assert "cold" not in render_markdown(plain)


def test_cli_cold_items(tmp_path):
    from reaemb_trl.cli import app

    dataset = _toy()
    write_dataset(tmp_path / "data", dataset.items, dataset.sequences, "toy")
    args = ["evaluate", "--data", str(tmp_path / "data"), "--tables", "mostpop", "--model", "gru4rec"]
    result = CliRunner().invoke(app, [*args, "--cold-items", "0.1", "--cold-item-seed", "2",
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["cold_items"]["item_ids"] == cold_item_ids(dataset.item_ids, 0.1, seed=2)
    assert "cold_item" in saved["tables"]["mostpop"]["groups"]
    bad = CliRunner().invoke(app, [*args, "--cold-items", "1.5", "--output", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and bad.stderr.strip().splitlines() == [
        "error: EvalConfig.cold_items is a share of the catalogue in [0, 1), got 1.5"]
