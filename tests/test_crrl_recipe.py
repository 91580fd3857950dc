"""The CRRL recipe and the custom-reward example run end to end on the tiny assets."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_runs_on_tiny_config(tmp_path, monkeypatch):
    from reaemb_trl.embedder import ThoughtEmbedder

    lrcl = tmp_path / "lrcl"
    ThoughtEmbedder.from_backbone(str(ROOT / "tests/assets/tiny-llama")).save_pretrained(lrcl)
    out = tmp_path / "crrl"
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [
        "crrl.py", "--config", "recipes/configs/crrl_tiny.yaml", "--lrcl_checkpoint", str(lrcl),
        "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no", "--disable_tqdm", "true",
    ])
    runpy.run_path(str(ROOT / "recipes/crrl.py"), run_name="__main__")
    loaded = ThoughtEmbedder.from_pretrained(out)
    assert loaded.encode([[("title", "Toy Story")]]).shape == (1, 32)
    start = ThoughtEmbedder.from_pretrained(lrcl)
    assert any(not torch.equal(a, b) for a, b in zip(loaded.thought_module.state_dict().values(), start.thought_module.state_dict().values()))


def test_recipe_scores_the_held_out_yardstick_in_its_evaluation_loop(tmp_path, monkeypatch, capsys):
    """What crrl_smollm2_ml100k.yaml does: held-out items plus eval_strategy steps -> the yardstick is logged."""
    from reaemb_trl.embedder import ThoughtEmbedder

    lrcl = tmp_path / "lrcl"
    ThoughtEmbedder.from_backbone(str(ROOT / "tests/assets/tiny-llama")).save_pretrained(lrcl)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [
        "crrl.py", "--config", "recipes/configs/crrl_tiny.yaml", "--lrcl_checkpoint", str(lrcl),
        "--output_dir", str(tmp_path / "crrl"), "--max_steps", "2", "--save_strategy", "no", "--disable_tqdm",
        "true", "--eval_item_fraction", "0.25", "--eval_strategy", "steps", "--eval_steps", "1", "--report_to", "none",
    ])
    runpy.run_path(str(ROOT / "recipes/crrl.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.count("eval_anchor_normalized_centered_cosine") >= 2, printed[-2000:]


def test_custom_reward_example(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["custom_reward.py"])
    runpy.run_path(str(ROOT / "examples/custom_reward.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "margin reward" in printed and "embeddings of 3 items: (3, 32)" in printed
