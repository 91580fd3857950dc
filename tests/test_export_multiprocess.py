"""Multi-process export: items are sharded as whole batches of the 1-process order, so 2 processes write the same
table as 1; each process writes an atomic part tagged with the job's fingerprint, and a rerun reuses the finished
parts whose fingerprint matches and recomputes the others.

The parts, the merge and the reuse are checked in this process; one launched run (two processes) checks them all
together end to end, from a killed run's parts to the PCA table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ASSETS, single_threaded, tiny_embedder
from reaemb_trl.data.canonical import read_items
from reaemb_trl.export import (
    encode_part,
    export_table,
    merge_parts,
    part_path,
    parts_dir,
    shard_rows,
    table_encoder,
    table_export_job,
)
from reaemb_trl.item_table import new_table, read_table

REPO = Path(__file__).resolve().parents[1]
CATALOG = ASSETS / "tiny_catalog"
BATCH = 8  # 48 items: 6 batches, 3 per process
SENTINEL = 7.0  # no encoder gives this vector: rows that hold it were not recomputed


def _write_part(embedder, items, output: Path, rank: int, batch_size: int = BATCH) -> Path:
    """Process `rank`'s part of a 2-process `reaemb export --dtype float32` (reused when a finished one exists)."""
    job = table_export_job(embedder, items, without_thought=False, batch_size=batch_size, dtype=None, world_size=2)
    encode = table_encoder(embedder, without_thought=False, batch_size=batch_size, dtype=None)
    return encode_part(embedder, items, encode, output=output, job=job, rank=rank, progress=False)


def _part(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def _overwrite_rows(path: Path, value: float, export_job: str | None = None) -> list[str]:
    """Replace a part's vectors by `value` (and optionally its job fingerprint); returns its item ids."""
    tensors, metadata = _part(path)
    metadata = {**metadata, **({"export_job": export_job} if export_job else {})}
    save_file({k: torch.full_like(v, value) for k, v in tensors.items()}, str(path), metadata=metadata)
    return json.loads(metadata["item_ids"])


def test_shards_are_whole_batches_of_the_one_process_order_dealt_round_robin():
    lengths = [5, 1, 4, 1, 3, 2, 9, 0, 2]  # one-process order (stable): 7, 1, 3, 5, 8, 4, 2, 0, 6
    assert shard_rows(lengths, 2, 2) == [[7, 1, 8, 4, 6], [3, 5, 2, 0]]
    assert shard_rows(lengths, 2, 1) == [[7, 1, 3, 5, 8, 4, 2, 0, 6]]
    assert shard_rows(lengths[:3], 4, 3) == [[1, 2, 0], [], []]  # fewer batches than processes
    with pytest.raises(ValueError):
        shard_rows(lengths, 0, 2)


def test_parts_of_two_processes_merge_into_the_one_process_table(tmp_path):
    embedder = tiny_embedder(lora=True)
    items = read_items(CATALOG)
    output = tmp_path / "t.safetensors"
    # rank 1 first: the merge must not depend on the order the parts were finished in
    for rank in (1, 0):
        single_threaded(lambda: _write_part(embedder, items, output, rank))
    job = table_export_job(embedder, items, without_thought=False, batch_size=BATCH, dtype=None, world_size=2)
    merged = merge_parts(output, items, job)["table"]
    single = single_threaded(lambda: embedder.encode([i["attributes"] for i in items], batch_size=BATCH))
    assert torch.equal(merged, single)  # the same batches: the same bits
    shares = [json.loads(_part(part_path(output, rank, 2))[1]["item_ids"]) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 24 and not set(shares[0]) & set(shares[1])  # none encoded twice


def test_a_finished_part_is_reused_and_a_stale_or_damaged_one_recomputed(tmp_path):
    embedder = tiny_embedder()
    items = read_items(CATALOG)
    output = tmp_path / "t.safetensors"
    path = _write_part(embedder, items, output, rank=0)
    _overwrite_rows(path, SENTINEL)
    _write_part(embedder, items, output, rank=0)  # same job: kept as it is
    assert (_part(path)[0]["embeddings.table"] == SENTINEL).all()
    _write_part(embedder, items, output, rank=0, batch_size=4)  # another job: another fingerprint
    assert not (_part(path)[0]["embeddings.table"] == SENTINEL).any()
    _overwrite_rows(path, SENTINEL, export_job="sha256:stale")
    _write_part(embedder, items, output, rank=0, batch_size=4)
    assert not (_part(path)[0]["embeddings.table"] == SENTINEL).any()
    path.write_bytes(b"killed mid-copy")  # not something we write, but never trusted
    _write_part(embedder, items, output, rank=0, batch_size=4)
    assert _part(path)[0]["embeddings.table"].shape == (24, 32)
    # a 1-process export writes no parts and clears ones left behind
    export_table(embedder, items, output, source="t", batch_size=BATCH, dtype="float32", progress=False)
    assert not parts_dir(output).exists() and read_table(output).item_ids == [i["item_id"] for i in items]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_reaemb_export_with_two_processes_resumes_a_killed_run_and_writes_the_one_process_table(tmp_path):
    """`--num-processes 2` runs `accelerate launch -m reaemb_trl.cli export`, the documented direct launch, so this
    one run covers both. A killed run left two parts: rank 0's finished (kept) and rank 1's from another job
    (recomputed); the table is PCA-reduced, fitted on the merged rows."""
    embedder = tiny_embedder(lora=True)
    embedder.save_pretrained(tmp_path / "ckpt")
    items = read_items(CATALOG)
    output = tmp_path / "t.safetensors"
    kept = _overwrite_rows(_write_part(embedder, items, output, rank=0), SENTINEL)
    stale = _overwrite_rows(_write_part(embedder, items, output, rank=1), SENTINEL, "sha256:stale")
    proc = _run([sys.executable, "-m", "reaemb_trl.cli", "export", "--data", str(CATALOG), "--checkpoint",
                 str(tmp_path / "ckpt"), "--output", str(output), "--batch-size", str(BATCH), "--dtype", "float32",
                 "--num-processes", "2", "--pca", "4"])  # fmt: skip
    assert f"reusing the finished part {part_path(output, 0, 2)}" in proc.stderr
    assert f"wrote {len(items)} item embeddings" in proc.stdout and proc.stdout.count("wrote") == 1
    ids = [i["item_id"] for i in items]
    # What one process computes, with the kept part's rows as that part holds them: the same bits, PCA included.
    raw = single_threaded(lambda: embedder.encode([i["attributes"] for i in items], batch_size=BATCH))
    rows = {item_id: row for row, item_id in enumerate(ids)}
    raw[[rows[i] for i in kept]] = SENTINEL
    expected = single_threaded(lambda: new_table(raw, ids, {}, pca=4))
    table = read_table(output)
    assert table.item_ids == ids and table.metadata["pca"] == 4  # catalogue order
    assert torch.equal(table.pca_mean, expected.pca_mean) and torch.equal(table.embeddings, expected.embeddings)
    # ... so the stale part's rows were recomputed (its sentinel rows are not in `raw`) and the kept ones reused
    assert len(kept) == len(stale) == 24 and not set(kept) & set(stale)
    assert table.metadata["fingerprint"] == read_table(
        export_table(embedder, items, tmp_path / "one.safetensors", source="t", dtype="float32", progress=False)
    ).metadata["fingerprint"]
    assert not parts_dir(output).exists()  # merged, then removed
