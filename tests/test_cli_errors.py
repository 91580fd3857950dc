"""Expected failures of every command and recipe end with one `error:` line naming the path and what to run or fix,
a non-zero exit code and no traceback. (`reaemb export` / `reaemb encode`: tests/test_export.py, test_encode.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from conftest import ITEMS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"


def _app():
    from reaemb_trl.cli import app

    return app


def assert_one_line_error(result, *fragments: str, code: int | None = None) -> None:
    """A CliRunner result that failed cleanly: exit code, a handled exit, one `error:` line with `fragments`."""
    assert result.exit_code != 0 and (code is None or result.exit_code == code), (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not an unhandled exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _canonical(folder: Path) -> Path:
    from reaemb_trl.data.canonical import make_item, write_dataset

    items = [make_item(str(i), attrs) for i, attrs in enumerate(ITEMS)]
    write_dataset(folder, items, {"u0": ["0", "1", "2"], "u1": ["3", "4", "5"]}, "test")
    return folder


# ---- reaemb data convert / stats ------------------------------------------------------------------------------------
def test_data_convert_errors(tmp_path):
    runner = CliRunner()
    raw = tmp_path / "raw"
    (raw / "ml").mkdir(parents=True)
    (raw / "ml" / "x.inter").write_text("user_id:token\titem_id:token\na\t1\n")  # a RecBole folder

    def convert(fmt: str, source: Path, output: Path):
        return runner.invoke(_app(), ["data", "convert", "--format", fmt, "--input", str(source), "--output", str(output)])

    assert_one_line_error(convert("bogus", raw / "ml", tmp_path / "o1"), "unknown --format 'bogus'", "movielens", code=2)
    assert_one_line_error(convert("movielens", tmp_path / "nope", tmp_path / "o2"),
                          f"{tmp_path / 'nope'} does not exist", "--input")
    # the wrong format for the folder: says what it looked for and where
    assert_one_line_error(convert("movielens", raw / "ml", tmp_path / "o3"), str(raw / "ml"), "u.data")
    assert_one_line_error(convert("lcrec", raw / "ml", tmp_path / "o4"), str(raw / "ml"), "--format")
    # an output folder that holds something else is never overwritten
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (raw / "ml" / "x.item").write_text("item_id:token\ttitle:token_seq\n1\tToy Story\n")
    assert_one_line_error(convert("recbole", raw / "ml", tmp_path / "taken"), str(tmp_path / "taken"), "--output")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4"))


def test_data_stats_errors(tmp_path):
    runner = CliRunner()

    def stats(folder: Path):
        return runner.invoke(_app(), ["data", "stats", str(folder)])

    assert_one_line_error(stats(tmp_path / "nope"), f"{tmp_path / 'nope'} does not exist", "reaemb data convert")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "u.data").write_text("1\t1\t5\t100\n")
    assert_one_line_error(stats(tmp_path / "raw"), f"{tmp_path / 'raw'} is not a canonical dataset folder",
                          "items.jsonl", "reaemb data convert")
    folder = _canonical(tmp_path / "ok")
    assert stats(folder).exit_code == 0
    (folder / "items.jsonl").write_text('{"item_id": "0", "attributes": [\n')
    assert_one_line_error(stats(folder), "items.jsonl, line 1")


# ---- reaemb push ----------------------------------------------------------------------------------------------------
def test_push_errors_touch_no_network(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted for a folder that cannot be pushed")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    runner = CliRunner()

    def push(folder: Path, *extra: str):
        return runner.invoke(_app(), ["push", str(folder), "--repo-id", "me/x", *extra])

    assert_one_line_error(push(tmp_path / "nope"), f"{tmp_path / 'nope'} does not exist", "recipes/lrcl.py")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "model.safetensors").write_bytes(b"")
    assert_one_line_error(push(tmp_path / "foreign"), f"{tmp_path / 'foreign'} is not a reaemb-trl checkpoint",
                          "reaemb_config.json", "output_dir of an LRCL or CRRL run")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "reaemb_config.json").write_text("{}")
    assert_one_line_error(push(tmp_path / "ckpt", "--results", str(tmp_path / "results.md")),
                          f"{tmp_path / 'results.md'} does not exist", "--results")


# ---- reaemb evaluate ------------------------------------------------------------------------------------------------
def test_evaluate_errors(tmp_path):
    runner = CliRunner()

    def evaluate(data: Path, *tables: str):
        return runner.invoke(_app(), ["evaluate", "--data", str(data), "--tables", *tables, "--output",
                                      str(tmp_path / "eval")])  # fmt: skip

    assert_one_line_error(evaluate(tmp_path / "nope", "id"), f"{tmp_path / 'nope'} is not a canonical dataset folder",
                          "reaemb data convert")
    folder = _canonical(tmp_path / "data")
    missing = tmp_path / "missing.safetensors"
    assert_one_line_error(evaluate(folder, "id", str(missing)), str(missing), "reaemb export")
    assert not (tmp_path / "eval").exists()


# ---- recipes --------------------------------------------------------------------------------------------------------
def run_recipe(recipe: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "recipes" / recipe), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def assert_recipe_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_crrl_recipe_before_the_lrcl_recipe(tmp_path):
    """The shipped tiny CRRL config run where the LRCL recipe has not run: names the LRCL command to run first."""
    proc = run_recipe("crrl.py", REPO, "--config", "recipes/configs/crrl_tiny.yaml",
                      "--lrcl_checkpoint", str(tmp_path / "lrcl-tiny"), "--output_dir", str(tmp_path / "crrl"))
    assert_recipe_error(proc, f"{tmp_path / 'lrcl-tiny'} is not a reaemb-trl checkpoint (no reaemb_config.json)",
                        "accelerate launch recipes/lrcl.py --config LRCL_CONFIG")
    # from an empty working directory, `lrcl_checkpoint: outputs/lrcl-tiny` points at lrcl_tiny.yaml's output_dir
    proc = run_recipe("crrl.py", tmp_path, "--config", str(CONFIGS / "crrl_tiny.yaml"),
                      "--output_dir", str(tmp_path / "crrl"))
    assert_recipe_error(proc, "outputs/lrcl-tiny is not a reaemb-trl checkpoint (no reaemb_config.json)",
                        f"run `accelerate launch {REPO / 'recipes' / 'lrcl.py'} --config "
                        f"{CONFIGS / 'lrcl_tiny.yaml'}` first")
    assert not (tmp_path / "crrl").exists()


def test_lrcl_recipe_with_a_missing_dataset_or_config(tmp_path):
    config = tmp_path / "lrcl.yaml"
    config.write_text((CONFIGS / "lrcl_tiny.yaml").read_text().replace("tests/assets/tiny_catalog",
                                                                      str(tmp_path / "no-data")))
    proc = run_recipe("lrcl.py", REPO, "--config", str(config), "--output_dir", str(tmp_path / "out"))
    assert_recipe_error(proc, f"dataset {tmp_path / 'no-data'} does not exist", "reaemb data convert")
    proc = run_recipe("lrcl.py", REPO, "--config", str(tmp_path / "nope.yaml"))
    assert_recipe_error(proc, f"{tmp_path / 'nope.yaml'} does not exist", "--config recipes/configs/")
    assert not (tmp_path / "out").exists()


def test_each_crrl_config_names_its_lrcl_config():
    """`lrcl_checkpoint` of every shipped CRRL config is the `output_dir` of the LRCL config of the same name, or of
    its base name for a variant (crrl_X_aligned.yaml starts from lrcl_X.yaml)."""
    import yaml

    from reaemb_trl.preflight import lrcl_config_for

    for crrl in sorted(CONFIGS.glob("crrl_*.yaml")):
        checkpoint = yaml.safe_load(crrl.read_text())["lrcl_checkpoint"]
        found = lrcl_config_for(checkpoint, CONFIGS)
        assert found is not None and found.parent == CONFIGS, crrl.name
        assert crrl.stem.replace("crrl_", "lrcl_", 1).startswith(found.stem), (crrl.name, found.name)
