"""Rebuild the committed tiny assets (run by hand: `python tests/assets/make_tiny_assets.py`).

- tests/assets/tiny-llama: a 2-layer Llama (hidden 32) with random weights and the tiny tokenizer, ~100 KB,
  the backbone of the tiny recipe configs and CPU end-to-end tests;
- tests/assets/tiny_catalog: a synthetic canonical dataset (items.jsonl + interactions.csv) whose users stay
  within one genre, so collaborative structure exists and can be learned.
"""

import csv
import json
import random
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).parent
GENRES = ["Comedy", "Drama", "Horror", "Animation"]
WORDS = ["red", "quick", "golden", "lazy", "small", "brown", "wooden", "dragon", "story", "fox", "dog", "kettle"]


def make_backbone() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    out = HERE / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(HERE / "tiny_tokenizer").save_pretrained(out)


def make_catalog(num_items: int = 48, num_users: int = 80, seed: int = 0) -> None:
    rng = random.Random(seed)
    out = HERE / "tiny_catalog"
    out.mkdir(exist_ok=True)
    items = []
    for i in range(num_items):
        genre = GENRES[i % len(GENRES)]
        title = " ".join(rng.sample(WORDS, 2)).title()
        attributes = [
            {"key": "title", "value": f"{title} {i}"},
            {"key": "year", "value": str(1980 + (i * 7) % 40)},
            {"key": "genres", "value": genre},
        ]
        items.append({"item_id": str(i), "attributes": attributes})
    with open(out / "items.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    with open(out / "interactions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp"])
        for u in range(num_users):
            genre = u % len(GENRES)
            pool = [i for i in range(num_items) if i % len(GENRES) == genre]
            length = rng.randint(5, 9)
            for t, item in enumerate(rng.sample(pool, length)):
                writer.writerow([f"u{u}", str(item), str(1000 * u + t)])
    (out / "meta.json").write_text(json.dumps({"source_format": "synthetic", "stats": {}}, indent=2) + "\n")


if __name__ == "__main__":
    make_backbone()
    make_catalog()
    print("tiny assets written under", HERE)
