"""Finished runs on disk, so an interrupted comparison resumes where it stopped.

Each finished (table, mode, seed) run is written as it ends: `<table>__<mode>__seed<k>.npz` (its per-user test
ranks; for a run a score ensemble combines, also its `ranking.Scoring`), then `<table>__<mode>__seed<k>.json` (the
rest of its RunResult), each through a temporary file and a rename, so a run is either complete on disk or absent.
`fingerprint.json` holds the settings every run shares (the EvalConfig, cold items included, and the dataset's
digest); a folder made with other settings is refused rather than mixed. Each run's JSON also holds the digest of
its table file: a run of a file that has changed since is run again, and tables or seeds added to a finished
comparison run alone, beside the finished runs they are compared with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path
from urllib.parse import quote

import numpy as np

from reaemb_trl.atomic import write_atomic
from reaemb_trl.evaluation.config import RunResult, TableSpec
from reaemb_trl.evaluation.ranking import Scoring

FINGERPRINT_FILE = "fingerprint.json"
SOURCE_DIGEST = "source_digest"  # a run's JSON: the digest of the table file it was made from


def file_digest(path: str | Path) -> str:
    """sha256 of a table file's content: its safetensors header with the keys in sorted order (the writer orders
    the metadata at random, so the same table written twice differs in bytes), then the tensor bytes, read in 1 MiB
    blocks (tables can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        try:
            header = json.loads(handle.read(size))
        except ValueError:  # not a safetensors file: its bytes as they are
            handle.seek(0)
        else:
            digest.update(json.dumps(header, sort_keys=True).encode())
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_digest(dataset) -> str:
    """sha256 of a RecDataset's catalogue and sequences, in order (what the split is made from)."""
    text = json.dumps([dataset.items, dataset.sequences], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RunStore:
    """The runs folder of one comparison; `fingerprint` (JSON-able) describes its settings."""

    def __init__(self, folder: str | Path, fingerprint: dict):
        self.folder = Path(folder)
        wanted = json.loads(json.dumps(fingerprint))  # as it reads back from disk (tuples -> lists)
        stored = self.folder / FINGERPRINT_FILE
        if stored.is_file():
            try:
                found = json.loads(stored.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                found = None
            if found != wanted:
                differ = sorted(k for k in set(wanted) | set(found or {}) if (found or {}).get(k) != wanted.get(k))
                raise ValueError(f"{self.folder} holds finished runs made with other settings (differing: "
                                 f"{', '.join(differ)}); pass another --output, or delete {self.folder} to start over")
            return
        if self.folder.is_dir() and any(self.folder.iterdir()):
            raise ValueError(f"{self.folder} is not empty and has no {FINGERPRINT_FILE}; pass another --output, or "
                             f"delete {self.folder}")
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(wanted, indent=2, sort_keys=True) + "\n"
        write_atomic(stored, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _paths(self, spec: TableSpec, seed: int) -> tuple[Path, Path]:
        """(the run's JSON, its ranks .npz)."""
        name = quote(spec.name, safe="@_-.+")  # a TableSpec name may hold any character; a file name may not
        base = f"{name}__{spec.mode}__seed{seed}"
        return self.folder / f"{base}.json", self.folder / f"{base}.npz"

    def load(self, spec: TableSpec, seed: int, source_digest: str, scoring: bool = False) -> RunResult | None:
        """The finished run of (spec, seed) made from the table whose digest is `source_digest`, or None when it has
        not finished, was made from other table rows, or (with `scoring`) did not keep its scoring."""
        meta, ranks = self._paths(spec, seed)
        if not (meta.is_file() and ranks.is_file()):
            return None
        values = json.loads(meta.read_text(encoding="utf-8"))
        if values.pop(SOURCE_DIGEST, None) != source_digest:
            return None
        with np.load(ranks) as stored:
            values["test_ranks"] = [int(r) for r in stored["test_ranks"]]
            if scoring:
                if not all(f"scoring_{f.name}" in stored for f in fields(Scoring)):
                    return None
                values["scoring"] = Scoring(**{f.name: stored[f"scoring_{f.name}"] for f in fields(Scoring)})
        return RunResult(**values)

    def save(self, spec: TableSpec, seed: int, result: RunResult, source_digest: str) -> Path:
        """Write one finished run of the table whose digest is `source_digest`: ranks (and scoring) first, then
        the JSON that marks it complete."""
        meta, ranks_file = self._paths(spec, seed)
        values = {f.name: getattr(result, f.name) for f in fields(RunResult) if f.name not in ("test_ranks", "scoring")}
        values[SOURCE_DIGEST] = source_digest
        arrays = {"test_ranks": np.asarray(result.test_ranks, dtype=np.int64)}
        if result.scoring is not None:
            arrays.update({f"scoring_{f.name}": getattr(result.scoring, f.name) for f in fields(Scoring)})

        def write_ranks(tmp: Path) -> None:
            with open(tmp, "wb") as handle:  # a handle: np.savez would append .npz to a path
                np.savez_compressed(handle, **arrays)

        write_atomic(ranks_file, write_ranks)
        text = json.dumps(values, indent=1) + "\n"  # NaN (MostPop's validation score) reads back as NaN
        write_atomic(meta, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return meta
