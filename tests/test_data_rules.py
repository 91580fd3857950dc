"""Readers behave as docs/data.md says, fail with the file and line, stay linear, and leave nothing behind when
stopped (dedupe rules, id characters, numeric checks, line numbers, progress, SIGTERM)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import wait_for_file

from reaemb_trl.data import DataFormatError, RecDataset, convert, make_item, read_dataset, write_dataset

REPO = Path(__file__).resolve().parents[1]


def _w(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _lines(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _app():
    from reaemb_trl.cli import app

    return app


# ---------- lcrec: line numbers recorded while parsing ----------

def _lcrec(folder: Path, items: dict, users: dict) -> Path:
    _w(folder / "Big.item.json", json.dumps(items, indent=4))
    return _w(folder / "Big.inter.json", json.dumps(users, indent=4))


def _key_line(path: Path, key: str) -> int:
    return next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith(f'"{key}"'))


def test_lcrec_errors_name_the_line_of_a_record_deep_in_the_file(tmp_path):
    items = {str(i): {"title": f"item {i}", "brand": "b"} for i in range(3000)}
    users = {f"u{u}": [u % 3000, (u * 7) % 3000] for u in range(4000)}
    users["u3500"] = [1, 99999]  # unknown item: the error names the line of the user's key
    inter = _lcrec(tmp_path, items, users)
    with pytest.raises(DataFormatError, match=rf"Big.inter.json, line {_key_line(inter, 'u3500')}: unknown item id "
                                              r"'99999'"):
        read_dataset("lcrec", tmp_path)
    users["u3500"] = [1, 2]
    items["2900"] = "not an object"
    _lcrec(tmp_path, items, users)
    line = _key_line(tmp_path / "Big.item.json", "2900")
    with pytest.raises(DataFormatError, match=rf"Big.item.json, line {line}: item '2900' is not an object"):
        read_dataset("lcrec", tmp_path)
    # one line for the whole document: every record is on line 1, and a key written with escapes is found too
    _w(tmp_path / "Big.item.json", json.dumps({"0": {"title": "a"}, "\u00e9": {"title": "b"}}))
    _w(tmp_path / "Big.inter.json", '{"\\u00e9t\\u00e9": [0],\n"v": [0, "\u00e9"],\n\n"w": [7]}')
    with pytest.raises(DataFormatError, match=r"Big.inter.json, line 4: unknown item id '7'"):
        read_dataset("lcrec", tmp_path)


def test_lcrec_id_that_the_canonical_folder_cannot_hold_is_an_error_naming_file_and_id(tmp_path):
    _lcrec(tmp_path / "in", {"0": {"title": "a"}, "1": {"title": "b"}}, {"ok": [0, 1], "bad\nuser": [1, 0]})
    with pytest.raises(DataFormatError, match=r"Big.inter.json, line 6: user id 'bad\\nuser' contains a line break"):
        convert("lcrec", tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _lcrec(tmp_path / "in", {"0": {"title": "a"}, "x\ry": {"title": "b"}}, {"ok": [0, "x\ry"]})
    with pytest.raises(DataFormatError, match=r"Big.item.json, line 5: item id 'x\\ry' contains a line break"):
        convert("lcrec", tmp_path / "in", tmp_path / "out")
    with pytest.raises(ValueError, match=r"user id 'a\\nb' contains a line break"):  # the writer refuses it too
        write_dataset(tmp_path / "w", [make_item("i", [("title", "t")])], {"a\nb": ["i"]}, "test")


def test_lcrec_non_integer_key_among_integer_keys_names_file_and_key(tmp_path):
    _lcrec(tmp_path, {"0": {"title": "a"}, "1": {"title": "b"}, "\u00b2": {"title": "c"}}, {"u": [0, 1]})
    with pytest.raises(DataFormatError, match=r"Big.item.json, line 8: item key '\u00b2' is not an integer"):
        read_dataset("lcrec", tmp_path)


# ---------- Yelp: docs/data.md's dedupe rules ----------

def test_yelp_drops_exact_duplicate_reviews_and_repeated_businesses(tmp_path):
    business = {"business_id": "b1", "name": "Cafe", "categories": "Coffee", "city": "Reno", "stars": 4.5}
    _w(tmp_path / "yelp_academic_dataset_business.json",
       _lines(business, {"business_id": "b2", "name": "Bar", "city": "Reno"}, {**business, "name": "Cafe again"}))
    review = {"user_id": "u", "business_id": "b1", "date": "2019-01-02 10:00:00"}
    _w(tmp_path / "yelp_academic_dataset_review.json",
       _lines(review, {"user_id": "u", "business_id": "b2", "date": "2019-01-03 10:00:00"}, review,
              {"user_id": "v", "business_id": "b1", "date": "2019-01-02 10:00:00"},
              {"user_id": "v", "business_id": "b1", "date": "2019-02-02 10:00:00"}))  # a later visit: kept
    ds = read_dataset("yelp", tmp_path)
    assert ds.sequences == {"u": ["b1", "b2"], "v": ["b1", "b1"]}
    names = {it["item_id"]: it["attributes"][0]["value"] for it in ds.items}
    assert names == {"b1": "Cafe", "b2": "Bar"}  # the first record of b1 wins


# ---------- numeric checks ----------

def test_nan_timestamps_are_rejected_with_file_and_line(tmp_path):
    _w(tmp_path / "x.item", "item_id:token\ttitle:token_seq\n1\tHeat\n")
    _w(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\na\t1\t5\na\t1\tnan\n")
    with pytest.raises(DataFormatError, match=r"x.inter, line 3: timestamp 'nan' is not a finite number"):
        read_dataset("recbole", tmp_path)
    write_dataset(tmp_path / "ds", [make_item("1", [("title", "t")])], {"a": ["1", "1"]}, "test")
    (tmp_path / "ds" / "interactions.csv").write_text("user_id,item_id,timestamp\na,1,5\na,1,inf\n")
    with pytest.raises(DataFormatError, match=r"interactions.csv, line 3: timestamp 'inf' is not a finite number"):
        RecDataset.load(tmp_path / "ds")


def test_convert_rejects_a_negative_kcore(tmp_path):
    _w(tmp_path / "in" / "x.item", "item_id:token\ttitle:token_seq\n1\tHeat\n")
    _w(tmp_path / "in" / "x.inter", "user_id:token\titem_id:token\na\t1\n")
    result = CliRunner().invoke(_app(), ["data", "convert", "--format", "recbole", "--input", str(tmp_path / "in"),
                                         "--output", str(tmp_path / "out"), "--kcore", "-3"])
    assert result.exit_code == 1 and "error: --kcore must be >= 0" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


# ---------- progress ----------

def test_data_convert_shows_a_progress_bar_on_stderr(tmp_path, monkeypatch):
    import reaemb_trl.data.readers as readers

    monkeypatch.setattr(readers, "PROGRESS_DELAY_S", 0.0)  # the real delay hides the bar of quick conversions
    _w(tmp_path / "in" / "x.item", "item_id:token\ttitle:token_seq\n1\tHeat\n2\tRonin\n")
    _w(tmp_path / "in" / "x.inter", "user_id:token\titem_id:token\n" + "a\t1\na\t2\nb\t2\n")
    result = CliRunner().invoke(_app(), ["data", "convert", "--format", "recbole", "--input", str(tmp_path / "in"),
                                         "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert re.search(r"reading recbole: 3(\.00)? interactions", result.stderr), result.stderr


# ---------- SIGTERM mid-write ----------

BLOCKING_CONVERT = """
import sys, time
from pathlib import Path
import reaemb_trl.data.canonical as canonical

ready = Path(sys.argv[1])

def blocked(*args, **kwargs):  # a write step that waits (for the test's SIGTERM) inside write_dataset
    ready.write_text("writing")
    while True:
        time.sleep(0.05)

canonical.compute_stats = blocked
from reaemb_trl.cli import app
app(sys.argv[2:], prog_name="reaemb")
"""


def test_sigterm_during_data_convert_leaves_no_temporary_folder(tmp_path):
    _w(tmp_path / "in" / "x.item", "item_id:token\ttitle:token_seq\n1\tHeat\n")
    _w(tmp_path / "in" / "x.inter", "user_id:token\titem_id:token\na\t1\n")
    out = tmp_path / "work" / "ds"
    ready = tmp_path / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_CONVERT, str(ready), "data", "convert", "--format",
                             "recbole", "--input", str(tmp_path / "in"), "--output", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(ready, proc, 120, "convert never reached the write")
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(".ds.tmp-")]  # mid-write, as intended
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert list(out.parent.iterdir()) == [], (list(out.parent.iterdir()), stderr[-2000:])
