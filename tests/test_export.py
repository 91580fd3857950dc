"""Export: the table file round-trips with ids and metadata, and no vector depends on its batch mates."""

import json

import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import ASSETS, save_tiny_backbone, tiny_embedder
from reaemb_trl.cli import app
from reaemb_trl.data.canonical import read_items
from reaemb_trl.evaluation.tables import load_embedding_file
from reaemb_trl.export import export_table


def _metadata(path):
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}


def test_table_round_trip_metadata_and_batch_invariance(tmp_path):
    embedder = tiny_embedder(lora=True)
    items = read_items(ASSETS / "tiny_catalog")[:20]
    one = export_table(embedder, items, tmp_path / "b1.safetensors", source="test", batch_size=1, dtype="float32")
    many = export_table(embedder, items, tmp_path / "b7.safetensors", source="test", batch_size=7, dtype="float32")
    meta, tensors = _metadata(many)
    assert json.loads(meta["item_ids"]) == [i["item_id"] for i in items]
    assert meta["dimension"] == "32" and meta["pooling"] == "mean" and json.loads(meta["adapter"]) is True
    assert json.loads(meta["prompt_format"]) == embedder.formatter.to_dict()
    torch.testing.assert_close(_metadata(one)[1]["embeddings"], tensors["embeddings"], atol=1e-5, rtol=1e-5)
    # the evaluation reads rows by id, in any order
    shuffled_ids = [i["item_id"] for i in items][::-1]
    torch.testing.assert_close(load_embedding_file(many, shuffled_ids), tensors["embeddings"].flip(0))


def test_sorted_fast_export_equals_unsorted_literal_path(tmp_path):
    embedder = tiny_embedder()
    attributes = [i["attributes"] for i in read_items(ASSETS / "tiny_catalog")]
    fast = embedder.encode(attributes, batch_size=8, sort_by_length=True)
    literal = embedder.encode(attributes, batch_size=8, sort_by_length=False, method="literal")
    torch.testing.assert_close(fast, literal, atol=1e-5, rtol=1e-5)


def test_pca_projection_is_stored_and_reproduces_the_table(tmp_path):
    embedder = tiny_embedder()
    items = read_items(ASSETS / "tiny_catalog")
    full = export_table(embedder, items, tmp_path / "full.safetensors", source="t", dtype="float32")
    reduced = export_table(embedder, items, tmp_path / "pca.safetensors", source="t", pca=4, dtype="float32")
    meta, tensors = _metadata(reduced)
    assert tensors["embeddings"].shape == (len(items), 4) and meta["pca"] == "4"
    raw = _metadata(full)[1]["embeddings"]
    projected = (raw - tensors["pca_mean"]) @ tensors["pca_components"].T
    torch.testing.assert_close(projected, tensors["embeddings"], atol=1e-5, rtol=1e-5)
    gram = tensors["pca_components"] @ tensors["pca_components"].T
    torch.testing.assert_close(gram, torch.eye(4), atol=1e-5, rtol=1e-5)


def test_export_cli_from_checkpoint_and_bare_backbone(tmp_path):
    embedder = tiny_embedder(lora=True)
    embedder.save_pretrained(tmp_path / "ckpt")
    runner = CliRunner()
    data = str(ASSETS / "tiny_catalog")
    out = tmp_path / "ckpt.safetensors"
    result = runner.invoke(app, ["export", "--data", data, "--checkpoint", str(tmp_path / "ckpt"), "--output", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    expected = embedder.encode([i["attributes"] for i in read_items(data)])
    torch.testing.assert_close(_metadata(out)[1]["embeddings"], expected, atol=1e-5, rtol=1e-5)

    backbone = save_tiny_backbone(tmp_path / "backbone")
    out = tmp_path / "raw.safetensors"
    result = runner.invoke(app, ["export", "--data", data, "--backbone", str(backbone), "--output", str(out)])
    assert result.exit_code == 0, result.output
    meta, tensors = _metadata(out)
    assert json.loads(meta["thought"]) is False and tensors["embeddings"].shape == (48, 32)
    assert torch.isfinite(tensors["embeddings"]).all()

    bad = runner.invoke(app, ["export", "--data", data, "--output", str(out)])
    assert bad.exit_code != 0 and "exactly one of --checkpoint" in bad.output
