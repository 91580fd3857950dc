"""The score-ensemble reference: id + frozen-table scores, z-scored, the table's weight chosen on the
validation split only, made from the two runs without training again."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from reaemb_trl.data import RecDataset, make_item, write_dataset
from reaemb_trl.evaluation import EvalConfig, TableSpec, compare_tables, leave_one_out, train_and_evaluate
from reaemb_trl.evaluation.ensemble import WEIGHT_GRID, choose_weight, ensemble_ranks
from reaemb_trl.evaluation.ranking import RankingEvaluator, Scoring

N_ITEMS = 12
TINY = dict(model="gru4rec", hidden=8, max_len=6, batch_size=16, max_epochs=2, patience=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster; subprocess comparisons use the same kernels


def _dataset(users=30) -> RecDataset:
    rng = np.random.default_rng(0)
    items = [make_item(f"i{k}", [("title", f"item {k}")]) for k in range(N_ITEMS)]
    seqs = {f"u{u}": [f"i{(s + t) % N_ITEMS}" for t in range(int(rng.integers(4, 9)))]
            for u, s in enumerate(rng.integers(0, N_ITEMS, users))}
    return RecDataset(items, seqs)


def _table(path, seed=0):
    rows = torch.randn(N_ITEMS, 10, generator=torch.Generator().manual_seed(seed))
    save_file({"embeddings": rows}, str(path), metadata={"item_ids": json.dumps([f"i{k}" for k in range(N_ITEMS)])})
    return str(path)


# ---- the weight is chosen on validation only -----------------------------------------------------------------------
def _scores(part, good: bool, rng) -> np.ndarray:
    """Per user of `part`, scores over the catalogue (column 0 = padding) where the target is first (good) or
    last (not good) among random others."""
    out = rng.uniform(0.0, 1.0, (len(part), N_ITEMS + 1)).astype(np.float32)
    for row, (_, _, target) in enumerate(part):
        out[row, target] = 2.0 if good else -1.0
    return out


def _scoring(valid, test) -> Scoring:
    """Scores as a Scoring: the states are the score rows, the items the identity."""
    return Scoring(valid_states=valid, test_states=test, items=np.eye(N_ITEMS + 1, dtype=np.float32))


def _ndcg10_by_hand(id_scores, table_scores, part, weight) -> float:
    """NDCG@10 of the ensemble, computed independently: z-scores over the items, pessimistic ranks."""
    def z(s):
        items = s[:, 1:].astype(np.float64)
        return (s - items.mean(1, keepdims=True)) / items.std(1, ddof=1, keepdims=True)

    combined = id_scores if weight == 0 else table_scores if weight == 1 else (1 - weight) * z(id_scores) + weight * z(
        table_scores)
    gains = []
    for row, (_, _, target) in enumerate(part):
        rank = int((combined[row, 1:] >= combined[row, target]).sum())
        gains.append(1 / np.log2(rank + 1) if rank <= 10 else 0.0)
    return float(np.mean(gains))


def test_the_weight_follows_validation_and_not_test():
    split = leave_one_out(_dataset())
    config = EvalConfig(history="keep")
    valid = RankingEvaluator.for_part(split, "valid", config, "keep", 0)
    test = RankingEvaluator.for_part(split, "test", config, "keep", 0)
    rng = np.random.default_rng(0)
    # validation: the id model is right and the table model wrong; test: the other way round
    id_run = _scoring(_scores(split.valid, True, rng), _scores(split.test, False, rng))
    table_run = _scoring(_scores(split.valid, False, rng), _scores(split.test, True, rng))
    weight, ndcgs = choose_weight(valid, id_run, table_run)
    assert weight == 0.0 and ndcgs[0] == 1.0
    test_best = max(WEIGHT_GRID, key=lambda w: _ndcg10_by_hand(id_run.test_states, table_run.test_states,
                                                                split.test, w))
    assert test_best > 0.5  # the test split would have chosen the table
    ranks = ensemble_ranks(test, "test", id_run, table_run, weight)
    assert (ranks == N_ITEMS).all()  # the id model's test ranks: every target last

    # the same test scores, validation now favouring the table: the weight moves with validation alone
    id_run.valid_states, table_run.valid_states = table_run.valid_states, id_run.valid_states
    weight, ndcgs = choose_weight(valid, id_run, table_run)
    by_hand = [_ndcg10_by_hand(id_run.valid_states, table_run.valid_states, split.valid, w) for w in WEIGHT_GRID]
    np.testing.assert_allclose(ndcgs, by_hand, rtol=0, atol=1e-12)
    assert weight == WEIGHT_GRID[int(np.argmax(by_hand))] and weight > 0.5 and ndcgs[-1] == 1.0
    # and test scores play no part: any other test scores leave the weight where it is
    id_run.test_states = rng.normal(size=id_run.test_states.shape).astype(np.float32)
    assert choose_weight(valid, id_run, table_run)[0] == weight


# ---- the grid's ends are the two models -----------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["full", "sampled"])
def test_weights_0_and_1_reproduce_the_two_models_ranks_exactly(tmp_path, protocol):
    split = leave_one_out(_dataset())
    config = EvalConfig(**TINY, protocol=protocol, num_negatives=3)
    table = TableSpec("llm", _table(tmp_path / "llm.safetensors"))
    id_run = train_and_evaluate(split, "id", config, seed=1, progress=False, keep_scoring=True)
    table_run = train_and_evaluate(split, table, config, seed=1, progress=False, keep_scoring=True)
    plain = train_and_evaluate(split, "id", config, seed=1, progress=False)
    assert plain.scoring is None and plain.test_ranks == id_run.test_ranks  # keeping the scoring changes nothing
    history = split.resolve_history(config.history)
    test = RankingEvaluator.for_part(split, "test", config, history, 1)
    assert ensemble_ranks(test, "test", id_run.scoring, table_run.scoring, 0.0).tolist() == id_run.test_ranks
    assert ensemble_ranks(test, "test", id_run.scoring, table_run.scoring, 1.0).tolist() == table_run.test_ranks
    valid = RankingEvaluator.for_part(split, "valid", config, history, 1)
    ndcgs = choose_weight(valid, id_run.scoring, table_run.scoring)[1]
    assert ndcgs[0] == id_run.best_valid_ndcg10 and ndcgs[-1] == table_run.best_valid_ndcg10


# ---- compare_tables, the run store and the CLI -----------------------------------------------------------------------
def test_ensembles_are_rows_tested_against_id_and_resume_from_the_stored_runs(tmp_path, monkeypatch):
    import reaemb_trl.evaluation.compare as compare
    import reaemb_trl.evaluation.ensemble as ensemble

    dataset, runs = _dataset(), tmp_path / "runs"
    tables = ["mostpop", "id", _table(tmp_path / "raw.safetensors"), _table(tmp_path / "llm.safetensors", 1)]
    config = EvalConfig(**TINY)
    first = compare_tables(dataset, tables, seeds=2, config=config, progress=False, modes=["frozen", "ensemble"],
                           runs_dir=runs)
    assert list(first["tables"]) == ["mostpop", "id", "raw", "id+raw", "llm", "id+llm"]
    entry = first["tables"]["id+llm"]
    assert entry["mode"] == "ensemble" and entry["ensemble_of"] == ["id", "llm"]
    assert len(entry["ensemble_weights"]) == 2 and all(w in WEIGHT_GRID for w in entry["ensemble_weights"])
    pairs = {(row["a"], row["b"]) for row in first["comparisons"] if row["group"] == "all"}
    # every table against id; LLM tables against raw, but not the ensembles (references, tested against id)
    assert pairs == {("mostpop", "id"), ("raw", "id"), ("id+raw", "id"), ("llm", "id"), ("id+llm", "id"),
                     ("llm", "raw")}

    def no_work(*args, **kwargs):
        raise AssertionError("a finished run or ensemble was made again")

    with monkeypatch.context() as patched:
        patched.setattr(compare, "train_and_evaluate", no_work)
        patched.setattr(ensemble, "ensemble_run", no_work)
        again = compare_tables(dataset, tables, seeds=2, config=config, progress=False, modes=["frozen", "ensemble"],
                               runs_dir=runs)
    assert again["tables"] == first["tables"] and again["comparisons"] == first["comparisons"]

    for path in runs.glob("id+llm__ensemble__seed1.*"):  # an ensemble lost after its runs finished
        path.unlink()
    with monkeypatch.context() as patched:
        patched.setattr(compare, "train_and_evaluate", no_work)
        remade = compare_tables(dataset, tables, seeds=2, config=config, progress=False, modes=["frozen", "ensemble"],
                                runs_dir=runs)
    untimed = lambda results: {name: {k: v for k, v in t.items() if k != "seconds"}  # noqa: E731
                               for name, t in results["tables"].items()}
    assert untimed(remade) == untimed(first)


def test_an_ensemble_needs_id_and_the_frozen_run_of_its_file(tmp_path):
    dataset, path = _dataset(), _table(tmp_path / "llm.safetensors")
    with pytest.raises(ValueError, match=r"'id\+llm'.*add id to the tables"):
        compare_tables(dataset, [path], modes=["frozen", "ensemble"], progress=False)
    with pytest.raises(ValueError, match=r"add .*llm.safetensors \(frozen mode\)"):
        compare_tables(dataset, ["id", path], modes=["hybrid", "ensemble"], progress=False)
    with pytest.raises(ValueError, match="a score ensemble combines id with a table file"):
        compare_tables(dataset, ["id", TableSpec("x", "mostpop", "ensemble")], progress=False)


def test_cli_ensemble(tmp_path):
    from reaemb_trl.cli import app

    dataset = _dataset()
    write_dataset(tmp_path / "data", dataset.items, dataset.sequences, "toy")
    table = _table(tmp_path / "llm.safetensors")
    args = ["evaluate", "--data", str(tmp_path / "data"), "--model", "gru4rec", "--max-epochs", "1", "--hidden", "8",
            "--max-len", "6", "--ensemble"]
    result = CliRunner().invoke(app, [*args, "--tables", "id", table, "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved["tables"]) == ["id", "llm", "id+llm"] and "id+llm: score ensemble of id and llm" in result.output
    bad = CliRunner().invoke(app, [*args, "--tables", "mostpop", table, "--output", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: --ensemble combines the id model") and not (tmp_path / "bad").exists()
