"""A tiny quickstart (tiny backbone, 48-item catalogue) writes every artifact, and a re-run skips every stage."""

import json

from conftest import ASSETS
from reaemb_trl.quickstart import SETTINGS_FILE, QuickstartSettings, run_quickstart


def tiny_settings(output):
    return QuickstartSettings(
        output=output,
        backbone=str(ASSETS / "tiny-llama"),
        dataset=str(ASSETS / "tiny_catalog"),
        bf16=False,
        lrcl=dict(max_steps=4, per_device_train_batch_size=8, max_item_tokens=192, lora_r=4, lora_alpha=8,
                  lora_dropout=0.0, logging_steps=2, save_steps=2),
        crrl=dict(max_steps=2, per_device_train_batch_size=8, num_generations=4, candidate_num=4, noise_scale=0.3,
                  noise_scale_mode="relative", eval_item_fraction=0.25, reference_refresh_steps=1,
                  similarity="centered_cosine", logging_steps=1, save_steps=2),
        export_batch=16,
        export_pca=8,
        evaluation=dict(hidden=16, max_len=16, batch_size=32, max_epochs=2, patience=2),
        eval_seeds=1,
        eval_workers=1,
        hybrid=True,
    )


def test_shipped_settings_load():
    settings = QuickstartSettings.from_yaml(SETTINGS_FILE, output="elsewhere")
    assert str(settings.output) == "elsewhere" and settings.backbone == "smollm2" and settings.eval_seeds >= 3
    from reaemb_trl.crrl_config import CRRLConfig
    from reaemb_trl.evaluation import EvalConfig
    from reaemb_trl.lrcl_config import LRCLConfig

    # every field the file sets exists in the config it belongs to
    LRCLConfig(output_dir="x", use_cpu=True, **settings.lrcl)
    CRRLConfig(output_dir="x", use_cpu=True, **settings.crrl)
    EvalConfig(**settings.evaluation)


def test_tiny_quickstart_writes_every_artifact_and_resumes(tmp_path, capsys):
    settings = tiny_settings(tmp_path / "qs")
    results = run_quickstart(settings)
    out = settings.output
    names = {"mostpop", "id", "raw", "lrcl", "crrl", "raw@hybrid", "lrcl@hybrid", "crrl@hybrid"}
    assert set(results["tables"]) == names
    for group in ("all", "tail_item", "head_item", "tail_user", "head_user"):
        assert group in results["tables"]["crrl"]["groups"]
    pairs = {(r["a"], r["b"]) for r in results["comparisons"] if r["group"] == "all"}
    assert {("lrcl", "raw"), ("crrl", "lrcl"), ("crrl@hybrid", "lrcl@hybrid"), ("crrl", "id")} <= pairs
    expected = [
        "quickstart_settings.json", "summary.json",
        "data/items.jsonl", "data/interactions.csv",
        "lrcl/reaemb_config.json", "lrcl/thought_module.safetensors", "lrcl/adapter/adapter_model.safetensors",
        "lrcl/prompt_format.json", "crrl/reaemb_config.json", "crrl/thought_module.safetensors",
        "tables/raw.safetensors", "tables/lrcl.safetensors", "tables/crrl.safetensors",
        "eval/results.json", "eval/results.md", "eval/ndcg10.png", "eval/test_ranks.npz",
    ] + [f".stages/{s}.json" for s in ("data", "lrcl", "crrl", "export", "evaluate")]
    missing = [p for p in expected if not (out / p).is_file()]
    assert not missing, missing
    assert any((out / "lrcl" / "runs").rglob("events.out.tfevents.*")), "LRCL logs to tensorboard"
    from safetensors import safe_open

    with safe_open(str(out / "tables" / "crrl.safetensors"), "pt") as table:
        assert table.get_tensor("embeddings").shape == (48, 8) and table.metadata()["pca"] == "8"
    # the LRCL and CRRL tables come from CRRL's yardstick encodings: each must be the table of its own checkpoint
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.item_table import embedder_fingerprint, read_table

    for name in ("lrcl", "crrl"):
        checkpoint = ThoughtEmbedder.from_pretrained(out / name)
        meta = read_table(out / "tables" / f"{name}.safetensors").metadata
        assert meta["fingerprint"] == embedder_fingerprint(checkpoint, checkpoint.thought_module), name
        assert meta["source"] == str(out / name)
    lrcl_stage = json.loads((out / ".stages" / "lrcl.json").read_text())
    assert lrcl_stage["first_loss"] is not None and lrcl_stage["seconds"] >= 0
    crrl_stage = json.loads((out / ".stages" / "crrl.json").read_text())
    assert "start_anchor_count_dot" in crrl_stage["yardstick_start"] and "end_anchor_count_dot" in crrl_stage["yardstick_end"]
    assert crrl_stage["trained_items"] < 48  # the held-out items never train

    before = {p: (out / p).stat().st_mtime_ns for p in expected if p.startswith(("tables", "eval", "lrcl"))}
    capsys.readouterr()
    again = run_quickstart(settings)
    assert again == json.loads((out / "eval" / "results.json").read_text())
    log = capsys.readouterr().err
    assert all(f"{s}: already done" in log for s in ("data", "lrcl", "crrl", "export", "evaluate"))
    assert before == {p: (out / p).stat().st_mtime_ns for p in before}
