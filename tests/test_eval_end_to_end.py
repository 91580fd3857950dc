import json
import random

import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from reaemb_trl.data import RecDataset, make_item, write_dataset
from reaemb_trl.evaluation import EvalConfig, compare_tables, leave_one_out, train_and_evaluate, write_report

N_ITEMS = 30
# Expected NDCG@10 of a random full ranking over 30 items: sum_{r<=10} 1/log2(r+1) / 30 ~= 0.151.
RANDOM_NDCG10 = sum(1 / torch.log2(torch.tensor(r + 1.0)).item() for r in range(1, 11)) / N_ITEMS


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster; subprocess comparisons use the same kernels


def _cyclic_dataset(users=150, seed=0):
    """Item i is always followed by i + 1 (mod n): a perfectly sequential toy world."""
    rng = random.Random(seed)
    items = [make_item(f"i{k}", [("title", f"item {k}")]) for k in range(N_ITEMS)]
    seqs = {}
    for u in range(users):
        start, length = rng.randrange(N_ITEMS), rng.randint(5, 14)
        seqs[f"u{u}"] = [f"i{(start + t) % N_ITEMS}" for t in range(length)]
    return RecDataset(items, seqs)


def _config(model, **kw):
    return EvalConfig(model=model, hidden=32, max_len=16, layers=1, heads=2, dropout=0.1, batch_size=16,
                      max_epochs=kw.pop("max_epochs", 25), patience=8, lr=5e-3, **kw)


@pytest.mark.parametrize("model", ["sasrec", "gru4rec", "bert4rec"])
def test_models_learn_sequential_structure(model):
    split = leave_one_out(_cyclic_dataset())
    result = train_and_evaluate(split, "id", _config(model), seed=0, progress=False)
    ndcg = result.metrics["all"]["NDCG@10"]
    assert ndcg > 3 * RANDOM_NDCG10, (model, ndcg)
    assert result.group_sizes["all"] == 150
    assert result.group_sizes["tail_user"] + result.group_sizes["head_user"] == 150


def test_compare_tables_cli_and_report(tmp_path):
    ds = _cyclic_dataset(users=80)
    write_dataset(tmp_path / "data", ds.items, ds.sequences, "toy")
    # a frozen table in shuffled row order, aligned by the item_ids metadata
    order = list(reversed(ds.item_ids))
    emb = torch.randn(N_ITEMS, 24)
    save_file({"embeddings": emb}, str(tmp_path / "llm.safetensors"), metadata={"item_ids": json.dumps(order)})
    cfg = _config("sasrec", max_epochs=3, protocol="sampled", num_negatives=10)
    results = compare_tables(tmp_path / "data", ["id", str(tmp_path / "llm.safetensors")], seeds=2, config=cfg,
                             progress=False)
    assert set(results["tables"]) == {"id", "llm"}
    entry = results["tables"]["llm"]["groups"]["all"]["NDCG@10"]
    assert len(entry["values"]) == 2 and entry["mean"] == pytest.approx(sum(entry["values"]) / 2)
    paths = write_report(results, tmp_path / "out")
    assert paths["plot"].stat().st_size > 0 and "| llm | tail users |" in paths["markdown"].read_text()
    assert json.loads(paths["json"].read_text())["tables"]["id"]["groups"]["all"]["size"] == 80

    from reaemb_trl.cli.evaluate import evaluate_command

    app = typer.Typer()
    app.command()(evaluate_command)
    res = CliRunner().invoke(app, ["--data", str(tmp_path / "data"), "--model", "gru4rec", "--tables", "id",
                                   str(tmp_path / "llm.safetensors"), "--seeds", "1", "--max-epochs", "2",
                                   "--hidden", "16", "--max-len", "16", "--output", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert set(saved["tables"]) == {"id", "llm"} and saved["model"] == "gru4rec"
    assert (tmp_path / "cli" / "ndcg10.png").exists() and (tmp_path / "cli" / "results.md").exists()


def test_worker_processes_give_the_same_results_as_one_process():
    """The quickstart evaluates with 2 worker processes: the schedule must not change any result."""
    dataset = _cyclic_dataset(users=60)
    config = _config("sasrec", max_epochs=3)
    serial = compare_tables(dataset, ["mostpop", "id"], seeds=2, config=config, progress=False)
    parallel = compare_tables(dataset, ["mostpop", "id"], seeds=2, config=config, progress=False, workers=2)
    for name in ("mostpop", "id"):
        assert serial["tables"][name]["test_ranks"] == parallel["tables"][name]["test_ranks"], name
        assert serial["tables"][name]["groups"] == parallel["tables"][name]["groups"], name
    assert serial["comparisons"] == parallel["comparisons"]
