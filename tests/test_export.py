"""Export: the table file round-trips with ids and metadata, no vector depends on its batch mates, and the CLI's
expected failures are one clear line."""

import json

import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import ASSETS, save_tiny_backbone, tiny_embedder
from reaemb_trl.cli import app
from reaemb_trl.data.canonical import read_items
from reaemb_trl.export import export_table, export_thought_variants
from reaemb_trl.item_table import checkpoint_fingerprint, read_table


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
    assert meta["dtype"] == "float32" and meta["fingerprint"].startswith("sha256:") and meta["source"] == "test"
    torch.testing.assert_close(_metadata(one)[1]["embeddings"], tensors["embeddings"], atol=1e-5, rtol=1e-5)
    # the evaluation reads rows by id, in any order
    shuffled_ids = [i["item_id"] for i in items][::-1]
    torch.testing.assert_close(read_table(many).aligned(shuffled_ids), tensors["embeddings"].flip(0))


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
    assert _metadata(out)[0]["fingerprint"] == checkpoint_fingerprint(tmp_path / "ckpt")

    backbone = save_tiny_backbone(tmp_path / "backbone")
    out = tmp_path / "raw.safetensors"
    result = runner.invoke(app, ["export", "--data", data, "--backbone", str(backbone), "--output", str(out)])
    assert result.exit_code == 0, result.output
    meta, tensors = _metadata(out)
    assert json.loads(meta["thought"]) is False and tensors["embeddings"].shape == (48, 32)
    assert torch.isfinite(tensors["embeddings"]).all()

    bad = runner.invoke(app, ["export", "--data", data, "--output", str(out)])
    assert bad.exit_code != 0 and "exactly one of --checkpoint" in bad.output


def _assert_clean_failure(result, *messages):
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not an unhandled exception
    last_line = result.output.strip().splitlines()[-1]  # after the model's loading bar, if a model was loaded
    assert "Traceback" not in result.output and last_line.startswith("error: ")
    for message in messages:
        assert message in last_line, result.output


def test_export_cli_failures_are_one_clear_line(tmp_path):
    runner = CliRunner()
    data, out = str(ASSETS / "tiny_catalog"), str(tmp_path / "t.safetensors")

    def export(*args):
        return runner.invoke(app, ["export", "--output", out, *args])

    missing = tmp_path / "missing"
    _assert_clean_failure(
        export("--data", data, "--checkpoint", str(missing)), f"{missing} does not exist", "--backbone"
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    _assert_clean_failure(
        export("--data", data, "--checkpoint", str(foreign)),
        f"{foreign} is not a reaemb-trl checkpoint (no reaemb_config.json)", "accelerate launch recipes/lrcl.py",
    )  # fmt: skip
    tiny_embedder().save_pretrained(tmp_path / "ckpt")
    checkpoint = str(tmp_path / "ckpt")
    folder_output = runner.invoke(app, ["export", "--output", str(foreign), "--data", data, "--checkpoint", checkpoint])
    _assert_clean_failure(folder_output, f"{foreign} is a folder: --output takes the path of a .safetensors file")
    _assert_clean_failure(
        export("--data", str(foreign), "--checkpoint", checkpoint),
        f"{foreign} is not a canonical dataset folder (no items.jsonl)", "reaemb data convert",
    )  # fmt: skip
    _assert_clean_failure(export("--data", str(tmp_path / "nope"), "--checkpoint", checkpoint),
                          f"{tmp_path / 'nope'}' is neither ml-100k nor an existing folder")  # fmt: skip
    (foreign / "items.jsonl").write_text('{"item_id": "a", "attributes": []}\n')
    _assert_clean_failure(export("--data", str(foreign), "--checkpoint", checkpoint), "items.jsonl, line 1")
    for size in ("0", "-1"):
        result = export("--data", data, "--checkpoint", checkpoint, "--batch-size", size)
        _assert_clean_failure(result, f"--batch-size must be at least 1 (items per forward pass), got {size}")
        assert len(result.output.strip().splitlines()) == 1 and "Loading weights" not in result.output
    _assert_clean_failure(export("--data", data, "--checkpoint", checkpoint, "--dtype", "fp8"),
                          "--dtype must be auto, float32, bfloat16 or float16, got 'fp8'")  # fmt: skip
    bad_pooling = export("--data", data, "--backbone", "smollm2", "--pooling", "max")
    assert bad_pooling.exit_code != 0 and "--pooling must be one of mean" in bad_pooling.output
    # --pca is checked against the items and the model's width before any model is loaded
    for pca, limit in (("49", "= 32"), ("33", "= 32")):
        result = export("--data", data, "--checkpoint", checkpoint, "--pca", pca)
        _assert_clean_failure(result, f"--pca {pca} must be between 1 and", limit)
        assert "Loading weights" not in result.output
    assert not (tmp_path / "t.safetensors").exists()


def test_thought_variants_share_the_llm_and_each_records_its_own_fingerprint(tmp_path):
    import copy

    embedder = tiny_embedder(lora=True)
    embedder.save_pretrained(tmp_path / "crrl")
    other = copy.deepcopy(embedder.thought_module)
    with torch.no_grad():
        other.q_proj.weight.mul_(1.5)
    items = read_items(ASSETS / "tiny_catalog")
    paths = export_thought_variants(embedder, items, {
        "crrl": (tmp_path / "crrl.safetensors", embedder.thought_module, str(tmp_path / "crrl")),
        "other": (tmp_path / "other.safetensors", other, "other"),
    }, batch_size=8, pca=4, dtype="float32", progress=False)  # fmt: skip
    crrl, changed = read_table(paths["crrl"]), read_table(paths["other"])
    assert crrl.metadata["fingerprint"] == checkpoint_fingerprint(tmp_path / "crrl")
    assert changed.metadata["fingerprint"] != crrl.metadata["fingerprint"] and changed.metadata["source"] == "other"
    alone = read_table(export_table(embedder, items, tmp_path / "alone.safetensors", source="x", batch_size=8,
                                    pca=4, dtype="float32", progress=False))  # fmt: skip
    torch.testing.assert_close(crrl.embeddings.abs(), alone.embeddings.abs(), atol=1e-4, rtol=1e-4)  # PCA signs
    assert not torch.allclose(changed.pca_mean, crrl.pca_mean)
