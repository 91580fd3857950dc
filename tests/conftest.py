"""Shared fixtures: tiny causal LMs built in-process and the tiny tokenizer in tests/assets (all offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# REAEMB_TEST_THREADS runs the suite with another intra-op thread count (numerics must not depend on it)
torch.set_num_threads(int(os.environ.get("REAEMB_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))

ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER = ASSETS / "tiny_tokenizer"

ITEMS = [
    [("title", "Toy Story"), ("year", "1995"), ("genres", "Animation Children's Comedy")],
    [("title", "Golden Dragon"), ("categories", "Restaurants, Chinese"), ("city", "Phoenix"), ("stars", "4.5")],
    [("brand", "Acme"), ("price", "19.99"), ("description", "a small red kettle with a wooden handle")],
    [("title", "The quick brown fox"), ("year", "2001")],
    [("name", "lazy dog"), ("stars", "3")],
    [("title", "Comedy of 1995"), ("genres", "Comedy"), ("city", "Phoenix")],
]


def single_threaded(function):
    """`function()` with one intra-op thread, as a launched process with OMP_NUM_THREADS=1 runs: CPU kernels can split
    sums differently per thread count, and claims that two runs give the same bits are for the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """The test body with one intra-op thread (see `single_threaded`); a module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wait_for_file(path: Path, proc, timeout: float, what: str) -> None:
    """Poll until the subprocess `proc` creates `path` (its signal that it reached the step a test interrupts);
    fail with its output if it ends first, or with `what` after `timeout` seconds."""
    import time

    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, what
        time.sleep(0.05)


def tiny_causal_lm(family: str = "llama", hidden: int = 32, layers: int = 2, seed: int = 0, vocab: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def save_tiny_backbone(folder: Path, family: str = "llama", **kwargs) -> Path:
    """A tiny backbone folder (weights + tokenizer) that loads like any hub model."""
    tiny_causal_lm(family, **kwargs).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_embedder(family: str = "llama", lora: bool = False, pooling: str = "mean", seed: int = 0, **kwargs):
    from reaemb_trl.embedder import ThoughtEmbedder

    torch.manual_seed(seed)
    embedder = ThoughtEmbedder(tiny_causal_lm(family, seed=seed, **kwargs), tiny_tokenizer(), pooling=pooling)
    if lora:
        from peft import LoraConfig

        embedder.attach_lora(
            LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
    return embedder


@pytest.fixture
def items():
    return [list(i) for i in ITEMS]
