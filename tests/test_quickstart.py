"""A tiny quickstart (tiny backbone, 48-item catalogue) writes every artifact, with and without cold items, and a
re-run skips every stage; a table of the warm items plus the cold ones added as `reaemb encode` adds them equals a
one-pass export; the packaged settings load; precision follows the recipes' rule and is recorded; the time estimate's
arithmetic."""

import json
from pathlib import Path

import pytest

import reaemb_trl
from conftest import ASSETS, save_tiny_backbone, tiny_embedder
from reaemb_trl.quickstart import SETTINGS_FILE, QuickstartSettings, run_quickstart


def tiny_settings(output, cold_items=0.0):
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
        ensemble=True,
        reference=True,
        cold_items=cold_items,
    )


def test_refactor_check_settings_load():
    """benchmarks/quickstart_mini.yaml (the before/after check of a refactor) stays a valid quickstart settings file."""
    from reaemb_trl.crrl_config import CRRLConfig
    from reaemb_trl.evaluation import EvalConfig

    settings = QuickstartSettings.from_yaml(Path(__file__).parents[1] / "benchmarks" / "quickstart_mini.yaml")
    assert settings.hybrid and not settings.ensemble and settings.cold_items == 0.0 and settings.eval_seeds == 1
    CRRLConfig(output_dir="x", use_cpu=True, **settings.crrl)  # save_steps fits the rollout boundaries
    EvalConfig(**settings.evaluation)


def test_shipped_settings_load():
    # package data, so a wheel holds it too (tests/test_wheel.py installs one)
    assert Path(str(SETTINGS_FILE)).is_relative_to(Path(reaemb_trl.__file__).parent)
    settings = QuickstartSettings.from_yaml(output="elsewhere")
    assert str(settings.output) == "elsewhere" and settings.backbone == "smollm2" and settings.eval_seeds >= 3
    assert settings.hybrid and settings.ensemble and settings.reference and settings.cold_items == 0.1  # measured
    from reaemb_trl.crrl_config import CRRLConfig
    from reaemb_trl.evaluation import EvalConfig
    from reaemb_trl.lrcl_config import LRCLConfig

    # every field the file sets exists in the config it belongs to
    LRCLConfig(output_dir="x", use_cpu=True, **settings.lrcl)
    CRRLConfig(output_dir="x", use_cpu=True, **settings.crrl)
    EvalConfig(**settings.evaluation)


@pytest.mark.parametrize("fast", [False, True])
def test_precision_follows_the_recipes_rule(fast, monkeypatch):
    import reaemb_trl.hardware

    monkeypatch.setattr(reaemb_trl.hardware, "fast_bf16_available", lambda device, flags=None: fast)
    assert QuickstartSettings(output=Path("x")).precision()[0] is fast  # bf16: auto, the default
    assert QuickstartSettings(output=Path("x"), bf16=not fast).precision()[0] is (not fast)


def test_bad_settings_file_is_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from reaemb_trl.cli import app

    bad = tmp_path / "q.yaml"
    bad.write_text("seeds: 3\n")
    for path in (bad, tmp_path / "missing.yaml"):
        result = CliRunner().invoke(app, ["quickstart", "--settings", str(path)])
        assert result.exit_code == 1 and result.output.startswith(f"error: {path}"), result.output
        assert result.output.count("\n") == 1


@pytest.mark.parametrize("cold_share", [0.0, 0.25])
def test_tiny_quickstart_writes_every_artifact_and_resumes(tmp_path, capsys, cold_share):
    from reaemb_trl.data import RecDataset, cold_item_ids

    settings = tiny_settings(tmp_path / "qs", cold_items=cold_share)
    results = run_quickstart(settings)
    out = settings.output
    data = RecDataset.load(out / "data")
    cold = set(cold_item_ids(data.item_ids, cold_share))
    assert len(cold) == (12 if cold_share else 0)
    names = {"mostpop", "id", "raw", "lrcl", "crrl", "raw@hybrid", "lrcl@hybrid", "crrl@hybrid", "id+raw",
             "id+lrcl", "id+crrl", "reference"}
    assert set(results["tables"]) == names
    groups = {"all", "tail_item", "head_item", "tail_user", "head_user"} | ({"cold_item"} if cold else set())
    for name in names:
        assert set(results["tables"][name]["groups"]) == groups, name
    if cold:  # the users whose test target is a cold item (the evaluation draws the same items)
        users = sum(seq[-1] in cold for seq in data.sequences.values() if len(seq) >= 3)
        assert results["tables"]["crrl"]["groups"]["cold_item"]["size"] == users > 0
    pairs = {(r["a"], r["b"], r["group"]) for r in results["comparisons"]}
    tested = {group for group, entry in results["tables"]["id"]["groups"].items() if entry["size"]}
    assert {"all"} | ({"cold_item"} if cold else set()) <= tested == {group for _, _, group in pairs}
    for group in tested:  # every table against ids (hybrids included), the LLM tables against raw, stage by stage
        assert {("crrl", "raw", group), ("lrcl", "raw", group), ("crrl", "lrcl", group),
                ("crrl@hybrid", "lrcl@hybrid", group), ("crrl", "reference", group)} <= pairs
        assert {(name, "id", group) for name in names - {"id"}} <= pairs
        assert {(f"{name}@hybrid", f"id+{name}", group) for name in ("raw", "lrcl", "crrl")} <= pairs
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
    # exactly these tables, and no export parts or temporary files left beside them
    assert sorted(p.name for p in (out / "tables").iterdir()) == ["crrl.safetensors", "lrcl.safetensors",
                                                                   "raw.safetensors", "reference.safetensors"]
    assert any((out / "lrcl" / "runs").rglob("events.out.tfevents.*")), "LRCL logs to tensorboard"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == {"bf16": False, "why": "precision: fp32 (bf16: false)"}
    from safetensors import safe_open

    with safe_open(str(out / "tables" / "crrl.safetensors"), "pt") as table:
        assert table.get_tensor("embeddings").shape == (48, 8) and table.metadata()["pca"] == "8"
    # the LRCL and CRRL tables come from CRRL's yardstick encodings: each must be the table of its own checkpoint
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.item_table import embedder_fingerprint, read_table

    warm_ids = [i for i in data.item_ids if i not in cold]
    for name in ("lrcl", "crrl", "raw"):
        table = read_table(out / "tables" / f"{name}.safetensors")
        # every item, the warm ones first (their PCA is fitted on them), then the cold ones as `reaemb encode` adds
        # them: the checkpoint's encoding through the table's stored projection
        assert sorted(table.item_ids[:len(warm_ids)]) == sorted(warm_ids), name
        assert sorted(table.item_ids) == sorted(data.item_ids), name
        if name == "raw":
            continue
        checkpoint = ThoughtEmbedder.from_pretrained(out / name)
        assert table.metadata["fingerprint"] == embedder_fingerprint(checkpoint, checkpoint.thought_module), name
        assert table.metadata["source"] == str(out / name)
        if cold:
            by_id = {item["item_id"]: item["attributes"] for item in data.items}
            cold_ids = table.item_ids[len(warm_ids):]
            encoded = table.project(checkpoint.encode([by_id[i] for i in cold_ids]))
            assert (table.aligned(cold_ids) - encoded).abs().max() <= 1e-4 * table.embeddings.std(), name
    stages = {s: json.loads((out / ".stages" / f"{s}.json").read_text()) for s in ("lrcl", "crrl", "export")}
    assert stages["lrcl"]["first_loss"] is not None and stages["lrcl"]["seconds"] >= 0
    assert stages["lrcl"]["items"] == 48 and stages["lrcl"]["cold_items_read"] == len(cold)  # text only
    assert stages["crrl"]["cold_items"] == stages["export"]["cold_items"] == len(cold)
    crrl_stage = stages["crrl"]
    assert "start_anchor_count_dot" in crrl_stage["yardstick_start"]
    assert "end_anchor_count_dot" in crrl_stage["yardstick_end"]
    assert crrl_stage["trained_items"] < len(warm_ids)  # the held-out (and cold) items never train
    # 2 steps x 8 rows / 4 copies = 4 rows of items, each rollout serving num_iterations (2) steps: 2 distinct items
    assert crrl_stage["rollout_items"] == 2
    # one writer per table: the export stage writes the raw table; the CRRL stage the two trained ones, from its
    # yardstick encodings, which match an export of each checkpoint (the writer when there is no yardstick)
    assert stages["export"]["tables"] == [str(out / "tables" / f"{name}.safetensors") for name in ("raw", "reference")]
    # the text reference: a row for every item; its map never saw the cold items' or CRRL's held-out items'
    # interactions
    from reaemb_trl.quickstart import crrl_held_out_items

    reference = read_table(out / "tables" / "reference.safetensors")
    held_out = crrl_held_out_items(settings, data)
    assert sorted(reference.item_ids) == sorted(data.item_ids) and held_out and not held_out & cold
    assert reference.metadata["projection"]["excluded_items"] == len(cold | held_out)
    from reaemb_trl.quickstart import _export_checkpoint_tables

    (out / "exported").mkdir()
    _export_checkpoint_tables(settings, [item for item in data.items if item["item_id"] not in cold], out / "exported")
    for name in ("lrcl", "crrl"):
        exported, written = (read_table(out / folder / f"{name}.safetensors") for folder in ("exported", "tables"))
        assert exported.item_ids == warm_ids and sorted(written.item_ids[:len(warm_ids)]) == sorted(warm_ids)
        assert exported.metadata["fingerprint"] == written.metadata["fingerprint"]
        # each file fits its own PCA on the warm items (component signs may differ): compare the warm items' inner
        # products
        grams = [t.aligned(warm_ids).float() @ t.aligned(warm_ids).float().T for t in (exported, written)]
        assert (grams[0] - grams[1]).abs().max() <= 1e-3 * grams[1].abs().max(), name

    before = {p: (out / p).stat().st_mtime_ns for p in expected if p.startswith(("tables", "eval", "lrcl"))}
    capsys.readouterr()
    again = run_quickstart(settings)
    assert again == json.loads((out / "eval" / "results.json").read_text())
    log = capsys.readouterr().err
    assert all(f"{s}: already done" in log for s in ("data", "lrcl", "crrl", "export", "evaluate"))
    assert before == {p: (out / p).stat().st_mtime_ns for p in before}


@pytest.mark.parametrize("kind", ["checkpoint", "backbone"])
def test_warm_table_plus_encoded_cold_items_equals_one_export(tmp_path, kind):
    """The quickstart writes each table for the warm items and adds the cold ones with export.encode_new_items (what
    `reaemb encode` runs); no vector depends on its batch mates, so without PCA that equals one export of every item,
    up to float32 rounding (the tiny model's rows differ by ~1e-7 of their spread)."""
    from reaemb_trl.data import RecDataset
    from reaemb_trl.embedder import ThoughtEmbedder
    from reaemb_trl.export import export_table
    from reaemb_trl.item_table import read_table
    from reaemb_trl.quickstart import _add_cold_items, _warm_items

    settings = tiny_settings(tmp_path / "qs", cold_items=0.25)
    data = RecDataset.load(ASSETS / "tiny_catalog")
    if kind == "checkpoint":
        embedder = tiny_embedder(lora=True)
        embedder.save_pretrained(tmp_path / "ckpt")
        model, without_thought = str(tmp_path / "ckpt"), False
    else:
        embedder = ThoughtEmbedder.from_backbone(str(save_tiny_backbone(tmp_path / "backbone")))
        model, without_thought = embedder, True
    options = dict(source="t", without_thought=without_thought, batch_size=settings.export_batch, dtype="float32",
                   progress=False)
    grown = export_table(embedder, _warm_items(settings, data), tmp_path / "grown.safetensors", **options)
    assert _add_cold_items(settings, data, grown, model) == 12
    one_pass = read_table(export_table(embedder, data.items, tmp_path / "one.safetensors", **options))
    grown = read_table(grown)
    assert grown.metadata == one_pass.metadata
    rows = grown.aligned(one_pass.item_ids)
    assert (rows - one_pass.embeddings).abs().max() <= 1e-5 * one_pass.embeddings.std()


def test_cold_items_are_set_once_for_every_stage(tmp_path):
    with pytest.raises(ValueError, match=r"set \['cold_items'\] at the top level"):
        QuickstartSettings(output=tmp_path, evaluation={"cold_items": 0.1})
    with pytest.raises(ValueError, match=r"cold_items is a share of the catalogue in \[0, 1\), got 1.5"):
        QuickstartSettings(output=tmp_path, cold_items=1.5)
    bad = tmp_path / "q.yaml"
    bad.write_text("cold_items: 1.5\n")
    with pytest.raises(ValueError, match=f"^{bad}: cold_items"):
        QuickstartSettings.from_yaml(bad)
    from typer.testing import CliRunner

    from reaemb_trl.cli import app

    result = CliRunner().invoke(app, ["quickstart", "--cold-items", "1.5", "--output", str(tmp_path / "qs")])
    assert result.exit_code == 1 and result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "cold_items is a share of the catalogue in [0, 1), got 1.5" in result.output
    assert not (tmp_path / "qs").exists()  # refused before any stage ran


def test_time_estimate_arithmetic_with_a_fake_clock(capsys):
    from transformers import TrainerControl, TrainerState

    from reaemb_trl.quickstart_time import TimeEstimate, time_left

    # at twice the reference CPU's time, the later stages' 100 reference seconds take 200
    assert time_left(9.0, 10, 100.0, speed=2.0) == (90.0, 290.0)
    ticks = iter([100.0, 109.0, 118.0, 127.0])  # the first step is not timed; then 9 s a step
    # CRRL takes LRCL's speed (1.8 here), not its own steps' (a CRRL step is not the reference's CRRL step)
    estimate = TimeEstimate("crrl", later_seconds=600.0, speed=1.8, clock=lambda: next(ticks))
    state = TrainerState(max_steps=40)
    for step in range(1, 7):
        state.global_step = step
        estimate.on_step_end(None, state, TrainerControl())  # prints after step 4, then never reads the clock
    err = capsys.readouterr().err
    # 9 s x 36 steps left = 324 s; later stages 600 s x 1.8 = 1080 s
    assert err.count("[quickstart]") == 1
    assert "[quickstart] crrl: 9.00 s/step; about 5.4 min left in this stage, 23.4 min in all" in err


def test_later_stages_are_priced_from_the_reference_profile(tmp_path):
    import math

    from reaemb_trl.data import RecDataset
    from reaemb_trl.quickstart import remaining_stage_seconds
    from reaemb_trl.quickstart_time import (REFERENCE_INTERACTIONS, REFERENCE_ITEM_SECONDS, REFERENCE_RUN_SECONDS,
                                            REFERENCE_STEP_SECONDS, planned_crrl_steps)

    settings = tiny_settings(tmp_path, cold_items=0.25)  # 48 items, 12 cold; 548 interactions; crrl max_steps 2
    data = RecDataset.load(ASSETS / "tiny_catalog")
    crrl = 2 * REFERENCE_STEP_SECONDS["crrl"] + 2 * 12 * REFERENCE_ITEM_SECONDS
    export = 48 * REFERENCE_ITEM_SECONDS
    runs = 1 * (1 + 3 + 3 + 1)  # one seed of id, three frozen and three hybrid tables, the reference; one worker
    evaluate = runs * REFERENCE_RUN_SECONDS * 548 / REFERENCE_INTERACTIONS
    assert remaining_stage_seconds(settings, data, "lrcl") == pytest.approx(crrl + export + evaluate)
    assert remaining_stage_seconds(settings, data, "crrl") == pytest.approx(export + evaluate)
    (tmp_path / ".stages").mkdir()
    (tmp_path / ".stages" / "export.json").write_text("{}")  # a finished stage costs nothing
    assert remaining_stage_seconds(settings, data, "crrl") == pytest.approx(evaluate)
    # without max_steps: epochs over the warm items CRRL may train on (eval_item_fraction 0.25), 4 rows each
    settings.crrl = dict(settings.crrl, max_steps=-1, num_train_epochs=2)
    assert planned_crrl_steps(settings, 36) == math.ceil(36 * 0.75 * 4 / 8 * 2)
