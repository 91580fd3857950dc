import json

import pytest

from reaemb_trl.data import (
    DataFormatError,
    RecDataset,
    kcore,
    load_interactions,
    load_items,
    make_item,
    remap_ids,
    render_stats_table,
    write_dataset,
)


def _items(n):
    return [make_item(str(i), [("title", f"Item {i}"), ("year", "1995")]) for i in range(n)]


def _write_items(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder


def test_roundtrip(tmp_path):
    items = _items(3)
    seqs = {"u1": ["0", "1", "2"], "u2": ["2", "0"]}
    write_dataset(tmp_path / "ds", items, seqs, "test", timestamps={"u1": [1.0, 2.0, 3.0], "u2": [None, None]})
    ds = load_items(tmp_path / "ds")
    assert ds.column_names == ["item_id", "attributes"]
    assert ds[0] == {"item_id": "0", "attributes": [{"key": "title", "value": "Item 0"}, {"key": "year", "value": "1995"}]}
    assert load_interactions(tmp_path / "ds") == seqs
    assert "u1,0,1\n" in (tmp_path / "ds" / "interactions.csv").read_text()
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["source_format"] == "test" and meta["stats"]["interactions"] == 5
    loaded = RecDataset.load(tmp_path / "ds")
    assert loaded.sequences == seqs and loaded.source_format == "test"


@pytest.mark.parametrize(
    "lines, line_no, words",
    [
        ([b'{"item_id": "a", "attributes": [{"key": "t", "value": "x"}]}', b'{"item_id": "b", '], 2, "broken JSON"),
        ([b'{"attributes": [{"key": "t", "value": "x"}]}'], 1, "missing item_id"),
        ([b'{"item_id": "a", "attributes": [{"key": "t", "value": "x"}]}'] * 2, 2, "duplicate"),
        ([b'{"item_id": "a", "attributes": []}'], 1, "no attributes"),
        ([b'{"item_id": "a", "attributes": [{"key": "t", "value": "  "}]}'], 1, "no text"),
        ([b'{"item_id": "a", "attributes": [{"key": "t", "value": "caf\xe9"}]}'], 1, "UTF-8"),
        ([b'{"item_id": 3, "attributes": [{"key": "t", "value": "x"}]}'], 1, "not a string"),
    ],
)
def test_load_items_errors_name_file_and_line(tmp_path, lines, line_no, words):
    folder = _write_items(tmp_path / "d", lines)
    with pytest.raises(DataFormatError) as err:
        load_items(folder)
    msg = str(err.value)
    assert "items.jsonl" in msg and f"line {line_no}" in msg and words.lower() in msg.lower()
    assert err.value.line == line_no and isinstance(err.value, ValueError)


def test_interactions_errors(tmp_path):
    write_dataset(tmp_path / "ds", _items(2), {"u": ["0", "1"]}, "test")
    csv = tmp_path / "ds" / "interactions.csv"
    csv.write_text("user_id,item_id,timestamp\nu,0,1\nu,9,2\n")
    with pytest.raises(DataFormatError, match=r"interactions.csv, line 3: unknown item id '9'"):
        load_interactions(tmp_path / "ds")
    csv.write_text("user_id,item_id,timestamp\nu,0,1\nv,1,1\nu,1,3\n")
    with pytest.raises(DataFormatError, match=r"line 4: rows of user 'u' are not contiguous"):
        load_interactions(tmp_path / "ds")
    csv.write_text("user_id,item_id,timestamp\nu,0,5\nu,1,3\n")
    with pytest.raises(DataFormatError, match="line 3: timestamp 3 goes back"):
        load_interactions(tmp_path / "ds")
    csv.write_text("user,item\nu,0\n")
    with pytest.raises(DataFormatError, match="line 1: header"):
        load_interactions(tmp_path / "ds")


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import reaemb_trl.data.canonical as canonical

    target = tmp_path / "out"
    write_dataset(target, _items(5), {"u": ["0", "1"]}, "zeroth")
    write_dataset(target, _items(2), {"u": ["0", "1"]}, "first")  # a successful overwrite replaces it
    assert len(load_items(target)) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(canonical, "compute_stats", boom)  # fails after the data files are written
    with pytest.raises(RuntimeError):
        write_dataset(target, _items(3), {"u": ["0", "1", "2"]}, "second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # old version intact
    with pytest.raises(RuntimeError):
        write_dataset(tmp_path / "new", _items(2), {"u": ["0", "1"]}, "x")
    assert not (tmp_path / "new").exists()


def test_write_validates_and_refuses_foreign_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown item"):
        write_dataset(tmp_path / "a", _items(2), {"u": ["0", "7"]}, "x")
    with pytest.raises(ValueError, match="no text"):
        write_dataset(tmp_path / "a", [make_item("0", [("title", "")])], {"u": ["0"]}, "x")
    assert not (tmp_path / "a").exists()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "home", _items(1), {"u": ["0"]}, "x")
    assert (tmp_path / "home" / "precious.txt").exists()


def test_stats_and_table():
    items = _items(4)
    seqs = {"a": ["0"] * 12, "b": ["0", "1"], "c": ["0", "2", "1"]}
    stats = RecDataset(items, seqs).stats(tail_user_threshold=10, tail_item_threshold=2)
    assert (stats.users, stats.items, stats.interactions) == (3, 4, 17)
    assert stats.sparsity == pytest.approx(1 - 17 / 12)
    assert stats.mean_sequence_length == pytest.approx(17 / 3)
    assert stats.tail_user_share == pytest.approx(2 / 3)
    assert stats.tail_item_share == pytest.approx(2 / 4)  # items 2 (1 user) and 3 (none)
    table = render_stats_table(stats)
    assert "tail items (< 2 users)" in table and "66.67%" in table


def test_kcore_iterative():
    # k=2: item "x" has 1 interaction -> removed; then user "c" drops to 1 -> removed; then item "z" falls to 1.
    seqs = {"a": ["y", "w", "y"], "b": ["y", "z", "w"], "c": ["x", "z"]}
    items = [make_item(i, [("t", i)]) for i in "wxyz"]
    out = kcore(RecDataset(items, seqs, timestamps={"a": [1, 2, 3], "b": [1, 2, 3], "c": [1, 2]}), 2)
    assert out.sequences == {"a": ["y", "w", "y"], "b": ["y", "w"]}
    assert out.timestamps == {"a": [1, 2, 3], "b": [1, 3]}
    assert [it["item_id"] for it in out.items] == ["w", "y"]


def test_remap_ids():
    ds = RecDataset([make_item("m9", [("t", "a")]), make_item("m3", [("t", "b")])], {"alice": ["m3", "m9"]})
    new, maps = remap_ids(ds)
    assert new.item_ids == ["0", "1"] and new.sequences == {"0": ["1", "0"]}
    assert maps["items"] == {"0": "m9", "1": "m3"} and maps["users"] == {"0": "alice"}
