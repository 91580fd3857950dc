"""The README's Python snippets run as written (against a tiny checkpoint where they name the quickstart's)."""

import re
from pathlib import Path

import torch

from conftest import tiny_embedder

README = Path(__file__).resolve().parent.parent / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_snippets_this_file_runs():
    snippets = python_snippets()
    assert any("def margin_reward" in s for s in snippets)
    assert any("ThoughtEmbedder.from_pretrained" in s for s in snippets)


def test_reward_snippet_follows_the_reward_contract():
    (snippet,) = [s for s in python_snippets() if "def margin_reward" in s]
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    similarities = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.8, 0.3]])
    positive_mask = torch.tensor([[True, False, False], [True, False, False]])
    rewards = namespace["margin_reward"](similarities=similarities, positive_mask=positive_mask, item_ids=["a", "b"])
    assert len(rewards) == 2 and rewards[0] > 0.5 > rewards[1]


def test_api_snippet_runs_as_written(tmp_path, monkeypatch):
    (snippet,) = [s for s in python_snippets() if "ThoughtEmbedder.from_pretrained" in s]
    path = re.search(r'from_pretrained\("([^"]+)"\)', snippet).group(1)
    monkeypatch.chdir(tmp_path)
    tiny_embedder(lora=True).save_pretrained(tmp_path / path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    vectors = namespace["vectors"]
    assert vectors.shape == (1, 32) and torch.isfinite(vectors).all()
