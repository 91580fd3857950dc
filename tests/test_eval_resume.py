"""`reaemb evaluate` keeps what it finished: every argument is checked before the first run, each
finished run is on disk as it ends and a rerun resumes from it (same settings only), the report files are written
as one set, and a one-seed table says n/a instead of a zero std."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import wait_for_file

from reaemb_trl.data import make_item, write_dataset
from reaemb_trl.evaluation import EvalConfig, compare_tables, render_markdown, write_report

REPO = Path(__file__).resolve().parents[1]
N_ITEMS = 20
TINY = ["--model", "gru4rec", "--max-epochs", "2", "--patience", "2", "--hidden", "16", "--max-len", "8",
        "--batch-size", "16"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster; subprocess comparisons use the same kernels


def _dataset(folder: Path, users: int = 40) -> Path:
    rng = random.Random(0)
    items = [make_item(f"i{k}", [("title", f"item {k}")]) for k in range(N_ITEMS)]
    seqs = {}
    for u in range(users):
        start = rng.randrange(N_ITEMS)
        seqs[f"u{u}"] = [f"i{(start + t) % N_ITEMS}" for t in range(rng.randint(4, 9))]
    write_dataset(folder, items, seqs, "toy")
    return folder


def _table(path: Path, rows: torch.Tensor, ids=None) -> Path:
    ids = ids if ids is not None else [f"i{k}" for k in range(len(rows))]
    save_file({"embeddings": rows}, str(path), metadata={"item_ids": json.dumps(ids)})
    return path


def _evaluate(*args: str):
    from reaemb_trl.cli import app

    return CliRunner().invoke(app, ["evaluate", *args])


def _no_training(monkeypatch):
    """Any run that starts fails the test: the checks must come before the first run."""
    import reaemb_trl.evaluation.compare as compare

    def trained(*args, **kwargs):
        raise AssertionError("a run started before every argument was checked")

    monkeypatch.setattr(compare, "train_and_evaluate", trained)


def _one_error_line(result, *fragments: str) -> None:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------- every argument before the first run ----------

def test_unknown_compare_name_bad_seeds_and_bad_tables_fail_before_any_run(tmp_path, monkeypatch):
    data = _dataset(tmp_path / "data")
    _no_training(monkeypatch)
    out = tmp_path / "out"
    _one_error_line(_evaluate("--data", str(data), "--tables", "mostpop", "id", "--compare", "id:idd",
                              "--output", str(out), *TINY), "'idd'", "id:idd")
    _one_error_line(_evaluate("--data", str(data), "--tables", "id", "--seeds", "0", "--output", str(out)),
                    "--seeds must be >= 1")
    rows = torch.randn(N_ITEMS, 8)
    rows[3, 1] = float("nan")
    nan_table = _table(tmp_path / "nan.safetensors", rows)
    _one_error_line(_evaluate("--data", str(data), "--tables", "id", str(nan_table), "--output", str(out)),
                    str(nan_table), "NaN or inf", "'i3'")
    partial = _table(tmp_path / "partial.safetensors", torch.randn(N_ITEMS - 1, 8))
    _one_error_line(_evaluate("--data", str(data), "--tables", "id", str(partial), "--output", str(out)),
                    str(partial), "1 of 20 items have no embedding")
    assert not out.exists()
    with pytest.raises(ValueError, match="seeds must be a count >= 1"):
        compare_tables(data, ["id"], seeds=[], progress=False)


# ---------- finished runs on disk, resume, fingerprint ----------

def test_a_rerun_resumes_from_the_finished_runs_grows_and_refuses_other_settings(tmp_path, monkeypatch):
    data = _dataset(tmp_path / "data")
    table = _table(tmp_path / "llm.safetensors", torch.randn(N_ITEMS, 8))
    config = EvalConfig(model="gru4rec", hidden=16, max_len=8, batch_size=16, max_epochs=2, patience=2)
    runs = tmp_path / "runs"
    tables = ["mostpop", "id", str(table)]
    first = compare_tables(data, tables, seeds=[3], config=config, progress=False, runs_dir=runs)
    assert sorted(p.name for p in runs.iterdir()) == [
        "fingerprint.json", "id__frozen__seed3.json", "id__frozen__seed3.npz", "llm__frozen__seed3.json",
        "llm__frozen__seed3.npz", "mostpop__frozen__seed3.json", "mostpop__frozen__seed3.npz"]  # fmt: skip
    with monkeypatch.context() as patched:
        _no_training(patched)
        again = compare_tables(data, tables, seeds=[3], config=config, progress=False, runs_dir=runs)
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)
    with pytest.raises(ValueError, match=r"other settings \(differing: config\).*another --output.*delete"):
        compare_tables(data, tables, seeds=[3], config=EvalConfig(**{**config.as_dict(), "lr": 1}), progress=False,
                       runs_dir=runs)  # fmt: skip
    # added seeds and tables run alone; a table file whose rows changed runs again; the finished runs are kept
    other = _table(tmp_path / "other.safetensors", torch.randn(N_ITEMS, 8))
    _table(table, torch.randn(N_ITEMS, 8))  # same name, other rows
    import reaemb_trl.evaluation.compare as compare

    ran = []
    real = compare.train_and_evaluate

    def counted(split, spec, *args, **kwargs):
        ran.append((spec.name, args[1] if len(args) > 1 else kwargs.get("seed")))
        return real(split, spec, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(compare, "train_and_evaluate", counted)
        grown = compare_tables(data, [*tables, str(other)], seeds=[3, 4], config=config, progress=False,
                               runs_dir=runs)
    assert sorted(ran) == [("id", 4), ("llm", 3), ("llm", 4), ("other", 3), ("other", 4)]
    assert grown["tables"]["id"]["test_ranks"][0] == first["tables"]["id"]["test_ranks"][0]
    out = tmp_path / "cli"
    assert _evaluate("--data", str(data), "--tables", "mostpop", "--output", str(out)).exit_code == 0
    _one_error_line(_evaluate("--data", str(data), "--tables", "mostpop", "--tail-user", "3", "--output", str(out)),
                    f"{out / 'runs'} holds finished runs made with other settings", "another --output")


BLOCK_THIRD_RUN = """
import sys, time
from pathlib import Path
import reaemb_trl.evaluation.compare as compare

ready, real, calls = Path(sys.argv[1]), compare.train_and_evaluate, []

def third_run_blocks(*args, **kwargs):  # holds the third run until the test's SIGTERM arrives
    calls.append(args)
    if len(calls) == 3:
        ready.write_text("third run started")
        while True:
            time.sleep(0.05)
    return real(*args, **kwargs)

compare.train_and_evaluate = third_run_blocks
from reaemb_trl.cli import app
app(sys.argv[2:], prog_name="reaemb")
"""


def _results(folder: Path) -> dict:
    """results.json without what a rerun may change: timings and the commit."""
    results = json.loads((folder / "results.json").read_text())
    results.pop("wall_seconds")
    results["provenance"].pop("commit")
    for table in results["tables"].values():
        table.pop("seconds")
    return results


def test_sigterm_after_the_second_run_then_rerun_trains_only_the_rest_and_matches_an_uninterrupted_run(tmp_path):
    data = _dataset(tmp_path / "data")
    args = ["evaluate", "--data", str(data), "--tables", "mostpop", "id", "--seeds", "2", *TINY]
    out, ready = tmp_path / "out", tmp_path / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as this process: the same numbers
    proc = subprocess.Popen([sys.executable, "-c", BLOCK_THIRD_RUN, str(ready), *args, "--output", str(out)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for_file(ready, proc, 300, "the third run never started")
        finished = sorted((out / "runs").glob("*__seed*.json"))
        assert [p.name for p in finished] == ["id__frozen__seed0.json", "mostpop__frozen__seed0.json"]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and not (out / "results.json").exists(), stderr[-3000:]
    assert not [p for p in (out / "runs").iterdir() if p.name.endswith(".tmp")]
    stamps = {p.name: p.stat().st_mtime_ns for p in finished}

    rerun = _evaluate(*args[1:], "--output", str(out))
    assert rerun.exit_code == 0, rerun.output
    assert "resuming: 2 of 3 runs already finished" in rerun.stderr
    assert {p.name: p.stat().st_mtime_ns for p in finished} == stamps  # the finished runs did not train again
    assert (out / "runs" / "id__frozen__seed1.json").is_file()

    whole = _evaluate(*args[1:], "--output", str(tmp_path / "whole"))
    assert whole.exit_code == 0 and "resuming" not in whole.stderr, whole.output
    assert _results(out) == _results(tmp_path / "whole")


# ---------- the report as one set ----------

def test_an_interrupted_report_leaves_the_previous_set_whole(tmp_path, monkeypatch):
    import reaemb_trl.evaluation.report as report

    data = _dataset(tmp_path / "data")
    results = compare_tables(data, ["mostpop"], seeds=1, progress=False)
    out = tmp_path / "out"
    write_report(results, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"results.json", "results.md", "ndcg10.png", "test_ranks.npz"}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as SIGTERM would, while the plot is drawn

    monkeypatch.setattr(report, "plot_ndcg10", interrupted)
    changed = {**results, "model": "another model"}
    with pytest.raises(KeyboardInterrupt):
        write_report(changed, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either


def test_one_seed_tables_print_n_a_instead_of_a_zero_std(tmp_path):
    data = _dataset(tmp_path / "data")
    markdown = render_markdown(compare_tables(data, ["mostpop"], seeds=1, progress=False))
    assert "| mostpop | all | 40 | " in markdown and "± n/a" in markdown and "± 0.0000" not in markdown, markdown


def test_a_table_written_again_with_the_same_content_keeps_its_digest(tmp_path):
    from reaemb_trl.evaluation.run_store import file_digest
    from reaemb_trl.item_table import write_table

    rows = torch.randn(5, 4)
    metadata = {f"key{k}": k for k in range(12)}  # the writer orders metadata keys at random
    digests = {file_digest(write_table(tmp_path / f"t{n}.safetensors", rows, list("abcde"), metadata))
               for n in range(4)}
    assert len(digests) == 1
    rows[2, 1] += 1e-3
    assert file_digest(write_table(tmp_path / "changed.safetensors", rows, list("abcde"), metadata)) not in digests
