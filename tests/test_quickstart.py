"""A tiny quickstart (tiny backbone, 48-item catalogue) writes every artifact, and a re-run skips every stage."""

import json

from conftest import ASSETS
from reaemb_trl.quickstart import QuickstartSettings, run_quickstart


def test_tiny_quickstart_writes_every_artifact_and_resumes(tmp_path, capsys):
    settings = QuickstartSettings(
        output=tmp_path / "qs",
        backbone=str(ASSETS / "tiny-llama"),
        dataset=str(ASSETS / "tiny_catalog"),
        max_prompt_length=192,
        lrcl_steps=4,
        lrcl_batch=8,
        crrl_steps=2,
        crrl_items_per_step=2,
        crrl_generations=4,
        export_batch=16,
        export_pca=8,
        eval_seeds=1,
        eval_max_epochs=2,
        eval_patience=2,
        bf16=False,
    )
    results = run_quickstart(settings)
    out = settings.output
    assert set(results["tables"]) == {"id", "raw", "lrcl", "crrl"}
    for group in ("all", "tail_item", "head_item", "tail_user", "head_user"):
        assert group in results["tables"]["crrl"]["groups"]
    expected = [
        "quickstart_settings.json", "summary.json",
        "data/items.jsonl", "data/interactions.csv",
        "lrcl/reaemb_config.json", "lrcl/thought_module.safetensors", "lrcl/adapter/adapter_model.safetensors",
        "lrcl/prompt_format.json", "crrl/reaemb_config.json", "crrl/thought_module.safetensors",
        "tables/raw.safetensors", "tables/lrcl.safetensors", "tables/crrl.safetensors",
        "eval/results.json", "eval/results.md", "eval/ndcg10.png",
    ] + [f".stages/{s}.json" for s in ("data", "lrcl", "crrl", "export", "evaluate")]
    missing = [p for p in expected if not (out / p).is_file()]
    assert not missing, missing
    assert any((out / "lrcl" / "runs").rglob("events.out.tfevents.*")), "LRCL logs to tensorboard"
    from safetensors import safe_open

    with safe_open(str(out / "tables" / "crrl.safetensors"), "pt") as table:
        assert table.get_tensor("embeddings").shape == (48, 8) and table.metadata()["pca"] == "8"
    lrcl_stage = json.loads((out / ".stages" / "lrcl.json").read_text())
    assert lrcl_stage["first_loss"] is not None and lrcl_stage["seconds"] >= 0

    before = {p: (out / p).stat().st_mtime_ns for p in expected if p.startswith(("tables", "eval", "lrcl"))}
    capsys.readouterr()
    again = run_quickstart(settings)
    assert again == results
    log = capsys.readouterr().err
    assert all(f"{s}: already done" in log for s in ("data", "lrcl", "crrl", "export", "evaluate"))
    assert before == {p: (out / p).stat().st_mtime_ns for p in before}
