"""New items into an existing table (`reaemb encode`, `encode_new_items`): only the missing items are encoded, with
the model that made the table (checked by fingerprint and prompt format) and through its stored PCA."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import ASSETS, save_tiny_backbone, tiny_embedder
from reaemb_trl.cli import app
from reaemb_trl.data.canonical import read_items
from reaemb_trl.embedder import ThoughtEmbedder
from reaemb_trl.export import encode_new_items, export_table
from reaemb_trl.export_inputs import ExportError
from reaemb_trl.item_table import read_table, write_table

OLD = 40  # the table is exported for the first 40 of the 48 catalogue items


@pytest.fixture
def exported(tmp_path):
    """A checkpoint, the catalogue, and a PCA table of the checkpoint over the first OLD items."""
    embedder = tiny_embedder(lora=True)
    embedder.save_pretrained(tmp_path / "ckpt")
    items = read_items(ASSETS / "tiny_catalog")
    table = export_table(embedder, items[:OLD], tmp_path / "table.safetensors", source=str(tmp_path / "ckpt"),
                         pca=6, dtype="float32", progress=False)  # fmt: skip
    return embedder, items, table


def _write_items(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def _expected_rows(embedder, items, table, ids):
    """Export the union, then apply the table's stored mean and projection to the new ids."""
    union = {i["item_id"]: row for i, row in zip(items, embedder.encode([i["attributes"] for i in items]))}
    return table.project(torch.stack([union[i] for i in ids]))


def test_appends_exactly_the_missing_items_through_the_stored_projection(tmp_path, exported):
    embedder, items, path = exported
    before = read_table(path)
    new_items = items[OLD:][::-1] + items[:3]  # some new (in a new order), some already in the table
    out, added = encode_new_items(tmp_path / "ckpt", new_items, path, tmp_path / "grown.safetensors", progress=False)
    assert added == [i["item_id"] for i in items[OLD:][::-1]]
    grown = read_table(out)
    assert grown.item_ids == before.item_ids + added
    assert torch.equal(grown.aligned(before.item_ids), before.embeddings)  # old rows untouched
    expected = _expected_rows(embedder, items, before, added)
    torch.testing.assert_close(grown.aligned(added), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(grown.pca_components, before.pca_components) and torch.equal(grown.pca_mean, before.pca_mean)
    assert grown.metadata == before.metadata
    # the same through a live embedder, written over the input table itself
    encode_new_items(embedder, items, path, path, progress=False)
    assert torch.equal(read_table(path).aligned(grown.item_ids), grown.embeddings)


def test_a_table_that_has_every_item_is_left_equal(tmp_path, exported):
    _, items, path = exported
    content = path.read_bytes()
    _, added = encode_new_items(tmp_path / "ckpt", items[:OLD], path, path)
    assert added == [] and path.read_bytes() == content  # not even rewritten
    copy, _ = encode_new_items(tmp_path / "ckpt", items[5:10], path, tmp_path / "copy.safetensors")
    before, after = read_table(path), read_table(copy)
    assert after.item_ids == before.item_ids and torch.equal(after.embeddings, before.embeddings)
    assert after.metadata == before.metadata and torch.equal(after.pca_components, before.pca_components)


def test_another_checkpoint_or_prompt_format_is_refused_naming_both(tmp_path, exported):
    _, items, path = exported
    other = tiny_embedder(lora=True, seed=1)
    other.save_pretrained(tmp_path / "other")
    recorded = read_table(path).metadata["fingerprint"]
    with pytest.raises(ExportError) as error:
        encode_new_items(tmp_path / "other", items, path, tmp_path / "out.safetensors")
    message = str(error.value)
    assert recorded in message and str(tmp_path / "other") in message and str(tmp_path / "ckpt") in message
    assert message.count("sha256:") == 2 and not (tmp_path / "out.safetensors").exists()
    other.formatter.max_value_chars = 20
    with pytest.raises(ExportError, match=r"prompt format \{max_value_chars: 100\} but the given embedder uses "
                                          r"\{max_value_chars: 20\}"):  # fmt: skip
        encode_new_items(other, items, path, tmp_path / "out.safetensors")
    legacy = write_table(tmp_path / "legacy.safetensors", torch.zeros(1, 32), ["x"], {"source": "old"})
    with pytest.raises(ExportError, match="records no model fingerprint"):
        encode_new_items(tmp_path / "ckpt", items, legacy, legacy)


def test_reaemb_encode_cli_adds_new_items_in_place(tmp_path, exported):
    embedder, items, path = exported
    new_file = _write_items(tmp_path / "new.jsonl", items[OLD:])
    args = ["encode", "--checkpoint", str(tmp_path / "ckpt"), "--items", str(new_file), "--table", str(path),
            "--output", str(path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"added {len(items) - OLD} new items to {path}" in result.output
    table = read_table(path)
    assert table.item_ids == [i["item_id"] for i in items]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "already holds all 8 items" in again.output


def test_reaemb_encode_cli_extends_a_bare_backbone_table(tmp_path):
    backbone = save_tiny_backbone(tmp_path / "backbone")
    items = read_items(ASSETS / "tiny_catalog")
    raw = ThoughtEmbedder.from_backbone(str(backbone))
    path = export_table(raw, items[:OLD], tmp_path / "raw.safetensors", source=str(backbone), without_thought=True,
                        dtype="float32", progress=False)  # fmt: skip
    result = CliRunner().invoke(app, ["encode", "--backbone", str(backbone), "--items", str(ASSETS / "tiny_catalog"),
                                      "--table", str(path), "--output", str(tmp_path / "out.safetensors")])  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = raw.encode([i["attributes"] for i in items[OLD:]], method="no_thought")
    torch.testing.assert_close(read_table(tmp_path / "out.safetensors").aligned([i["item_id"] for i in items[OLD:]]),
                               expected, atol=1e-5, rtol=1e-5)  # fmt: skip
    wrong = CliRunner().invoke(app, ["encode", "--backbone", "smollm2", "--items", str(ASSETS / "tiny_catalog"),
                                     "--table", str(path), "--output", str(path)])  # fmt: skip
    _assert_clean_failure(wrong, f"{path} was made by {backbone}")


def _assert_clean_failure(result, *messages):
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not an unhandled exception
    assert "Traceback" not in result.output and result.output.startswith("error: ")
    assert len(result.output.strip().splitlines()) == 1, result.output
    for message in messages:
        assert message in result.output, result.output


def test_reaemb_encode_cli_failures_are_one_clear_line(tmp_path, exported):
    _, items, path = exported
    new_file = _write_items(tmp_path / "new.jsonl", items[OLD:])
    runner = CliRunner()

    def encode(checkpoint, table, items_arg=str(new_file), *extra):
        return runner.invoke(app, ["encode", "--checkpoint", str(checkpoint), "--items", items_arg, "--table",
                                   str(table), "--output", str(tmp_path / "out.safetensors"), *extra])  # fmt: skip

    _assert_clean_failure(encode(tmp_path / "ckpt", tmp_path / "missing.safetensors"),
                          f"{tmp_path / 'missing.safetensors'}: file not found", "reaemb export")  # fmt: skip
    _assert_clean_failure(encode(tmp_path / "no-ckpt", path), f"{tmp_path / 'no-ckpt'} does not exist")
    _assert_clean_failure(encode(tmp_path, path), f"{tmp_path} is not a reaemb-trl checkpoint (no reaemb_config.json)")
    _assert_clean_failure(encode(tmp_path / "ckpt", path, str(tmp_path / "nope.jsonl")), "nope.jsonl")
    other = tiny_embedder(lora=True, seed=1)
    other.save_pretrained(tmp_path / "other")
    _assert_clean_failure(encode(tmp_path / "other", path), str(tmp_path / "other"), "fingerprint sha256:")
    for size in ("0", "-1"):
        _assert_clean_failure(encode(tmp_path / "ckpt", path, str(new_file), "--batch-size", size),
                              f"--batch-size must be at least 1 (items per forward pass), got {size}")  # fmt: skip
    assert not (tmp_path / "out.safetensors").exists()
