"""Item-table files: one reader/writer for export, evaluation and CRRL's collaborative table; metadata, PCA,
alignment by id, atomic writes, clear errors, and fingerprints of what made a table."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_embedder
from reaemb_trl.item_table import (
    FORMAT,
    ItemTable,
    TableError,
    backbone_fingerprint,
    checkpoint_fingerprint,
    embedder_fingerprint,
    new_table,
    read_table,
    table_metadata,
    write_table,
)
from reaemb_trl.rewards import CollaborativeTable


def test_round_trip_keeps_rows_ids_metadata_and_pca(tmp_path):
    raw = torch.randn(6, 5)
    meta = {"source": "runs/x", "backbone": "smollm2", "adapter": True, "thought": False, "pooling": "mean",
            "prompt_format": {"max_length": 256}, "dtype": "float32", "fingerprint": "sha256:abc"}  # fmt: skip
    path = new_table(raw, list("abcdef"), meta, pca=3).write(tmp_path / "t.safetensors")
    table = read_table(path)
    assert table.item_ids == list("abcdef") and table.path == path
    assert table.metadata == {**meta, "format": FORMAT, "raw_dimension": 5, "pca": 3, "dimension": 3}
    assert table.dimension == 3 and table.raw_dimension == 5
    # the stored projection reproduces the rows from the raw vectors
    torch.testing.assert_close(table.project(raw), table.embeddings, atol=1e-5, rtol=1e-5)
    plain = read_table(new_table(raw, list("abcdef"), meta).write(tmp_path / "plain.safetensors"))
    assert plain.pca_components is None and "pca" not in plain.metadata and torch.equal(plain.embeddings, raw)
    assert torch.equal(plain.project(raw[:2]), raw[:2])  # no PCA: raw vectors as they are


def test_aligned_reorders_by_id_ignores_extra_rows_and_names_missing_ids(tmp_path):
    rows = torch.arange(12, dtype=torch.float).view(4, 3)
    path = write_table(tmp_path / "t.safetensors", rows, ["z", "x", "y", "extra"], {"source": "test"})
    table = read_table(path)
    assert torch.equal(table.aligned(["x", "y", "z"]), rows[[1, 2, 0]])
    with pytest.raises(ValueError, match=r"t\.safetensors: 2 of 3 items have no embedding.*'missing1', 'missing2'"):
        table.aligned(["x", "missing1", "missing2"])


def test_legacy_forms_are_read(tmp_path):
    rows = torch.arange(6, dtype=torch.float).view(3, 2)
    bare = tmp_path / "bare.safetensors"  # what CollaborativeTable.save wrote before: ids as metadata only
    save_file({"embeddings": rows}, str(bare), metadata={"item_ids": json.dumps(["a", "b", "c"])})
    assert read_table(bare).aligned(["c", "a"]).tolist() == [[4.0, 5.0], [0.0, 1.0]]
    integer_ids = tmp_path / "ints.safetensors"  # ids as an integer tensor
    save_file({"embeddings": rows.double(), "item_ids": torch.tensor([7, 8, 9])}, str(integer_ids))
    table = read_table(integer_ids)
    assert table.item_ids == ["7", "8", "9"] and table.embeddings.dtype == torch.float32
    assert torch.equal(table.aligned(["9"]), rows[2:])


@pytest.mark.parametrize(
    "tensors,metadata,message",
    [
        ({"vectors": torch.zeros(2, 2)}, {"item_ids": '["a", "b"]'}, "no tensor named 'embeddings'"),
        ({"embeddings": torch.zeros(2, 2)}, {}, "no item ids"),
        ({"embeddings": torch.zeros(2, 2)}, {"item_ids": "[not json"}, "not a JSON list"),
        ({"embeddings": torch.zeros(3, 2)}, {"item_ids": '["a", "b"]'}, r"embeddings \(3, 2\) do not match 2 item ids"),
        ({"embeddings": torch.zeros(2, 2)}, {"item_ids": '["a", "a"]'}, "occur more than once"),
        ({"embeddings": torch.zeros(2, 2), "pca_mean": torch.zeros(4)}, {"item_ids": '["a", "b"]'}, "needs both"),
    ],
)  # fmt: skip
def test_malformed_tables_name_the_file_and_the_problem(tmp_path, tensors, metadata, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(TableError, match=message) as error:
        read_table(path)
    assert str(path) in str(error.value)


def test_missing_and_damaged_files_are_table_errors(tmp_path):
    with pytest.raises(TableError, match="nope.safetensors: file not found. Export a table"):
        read_table(tmp_path / "nope.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(TableError, match="damaged.safetensors: not a readable safetensors file"):
        read_table(damaged)


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt("received signal SIGTERM")])
def test_writes_are_atomic_and_leave_nothing_behind_on_failure(tmp_path, monkeypatch, failure):
    import safetensors.torch

    path = write_table(tmp_path / "t.safetensors", torch.ones(2, 2), ["a", "b"], {})
    before = path.read_bytes()
    written = []

    def broken_save(tensors, filename, metadata=None):
        written.append(filename)
        open(filename, "wb").write(b"half a file")
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(type(failure)):
        write_table(path, torch.zeros(2, 2), ["a", "b"], {})
    # the project's own temporary file, in the target folder: `.<name>.<random>.tmp`
    assert written[0].parent == tmp_path and written[0].name.startswith(".t.safetensors.") and written[0].suffix == ".tmp"
    assert path.read_bytes() == before  # the old table is intact
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temporary file left


def test_with_new_rows_projects_raw_vectors_and_refuses_wrong_sizes(tmp_path):
    raw = torch.randn(8, 6)
    table = new_table(raw[:6], [str(i) for i in range(6)], {}, pca=2)
    grown = table.with_new_rows(["6", "7"], raw[6:])
    assert grown.item_ids == [str(i) for i in range(8)] and len(table.item_ids) == 6
    expected = (raw[6:] - table.pca_mean) @ table.pca_components.T
    torch.testing.assert_close(grown.aligned(["6", "7"]), expected)
    with pytest.raises(TableError, match="the table expects 6 raw dimensions"):
        table.with_new_rows(["8"], torch.zeros(1, 5))
    with pytest.raises(TableError, match="occur more than once"):
        table.with_new_rows(["0"], raw[:1])


def test_collaborative_table_uses_item_table_files(tmp_path):
    table = CollaborativeTable(["a", "b", "c"], torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    path = tmp_path / "sub" / "collab.safetensors"
    table.save(path)
    assert read_table(path).aligned(["b"]).tolist() == [[0.0, 1.0]]
    loaded = CollaborativeTable.load(path)
    assert loaded.item_ids == ["a", "b", "c"] and torch.equal(loaded.embeddings, table.embeddings)
    with pytest.raises(ValueError, match="missing.safetensors: file not found"):
        CollaborativeTable.load(tmp_path / "missing.safetensors")


def test_checkpoint_fingerprint_equals_the_loaded_embedders_and_tracks_what_changes_vectors(tmp_path):
    from reaemb_trl import ThoughtEmbedder

    embedder = tiny_embedder(lora=True)
    embedder.save_pretrained(tmp_path / "ckpt")
    fingerprint = checkpoint_fingerprint(tmp_path / "ckpt")
    assert fingerprint.startswith("sha256:") and fingerprint == embedder_fingerprint(embedder, embedder.thought_module)
    loaded = ThoughtEmbedder.from_pretrained(tmp_path / "ckpt")
    assert embedder_fingerprint(loaded, loaded.thought_module) == fingerprint
    no_thought = checkpoint_fingerprint(tmp_path / "ckpt", without_thought=True)
    assert no_thought != fingerprint and no_thought == embedder_fingerprint(loaded, None)
    # what changes the vectors changes the fingerprint
    with torch.no_grad():
        loaded.thought_module.q_proj.weight[0, 0] += 1e-3
    assert embedder_fingerprint(loaded, loaded.thought_module) != fingerprint
    other = tiny_embedder(lora=True, seed=1)
    assert embedder_fingerprint(other, other.thought_module) != fingerprint
    embedder.formatter.max_value_chars = 50
    assert embedder_fingerprint(embedder, embedder.thought_module) != fingerprint


def test_thought_keys_enter_the_fingerprint_though_no_tensor_changes(tmp_path):
    from reaemb_trl.embedder import ThoughtEmbedder

    from conftest import tiny_causal_lm, tiny_tokenizer

    def embedder(keys):
        torch.manual_seed(0)
        return ThoughtEmbedder(tiny_causal_lm("llama", seed=0), tiny_tokenizer(), thought_keys=keys)

    every, own = embedder("all"), embedder("item")
    assert all(torch.equal(a, b) for a, b in zip(every.thought_module.state_dict().values(),
                                                 own.thought_module.state_dict().values()))
    fingerprint = embedder_fingerprint(own, own.thought_module)
    assert fingerprint != embedder_fingerprint(every, every.thought_module)
    own.save_pretrained(tmp_path / "ckpt")
    assert checkpoint_fingerprint(tmp_path / "ckpt") == fingerprint
    # without the thought, the keys change nothing
    assert checkpoint_fingerprint(tmp_path / "ckpt", without_thought=True) == embedder_fingerprint(every, None)


def test_bare_backbone_fingerprint_is_name_pooling_and_prompt_format():
    embedder = tiny_embedder()
    embedder.backbone = "smollm2"
    meta = table_metadata(embedder, "smollm2", without_thought=True)
    expected = backbone_fingerprint("smollm2", "mean", embedder.formatter.to_dict())
    assert meta["fingerprint"] == expected and meta["thought"] is False and meta["adapter"] is False
    assert expected != backbone_fingerprint("smollm2", "last", embedder.formatter.to_dict())
    assert expected != backbone_fingerprint("other", "mean", embedder.formatter.to_dict())


def test_item_table_validates_what_it_is_given():
    with pytest.raises(TableError, match=r"embeddings \(2,\) do not match"):
        ItemTable(torch.zeros(2), ["a", "b"])
    with pytest.raises(TableError, match="do not fit 2-dimensional rows"):
        ItemTable(torch.zeros(1, 2), ["a"], {}, torch.zeros(3, 4), torch.zeros(4))
