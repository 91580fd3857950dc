"""The README.md pushed with a checkpoint: what the model is, three-line usage, the training configuration (from
`training_config.json`), the evaluation table when one exists, and the ReaEmb citation.

The configuration is read from `training_config.json` only. `training_args.bin` (the Trainer's pickle of the same
arguments) is never loaded: unpickling a folder someone sent you runs their code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ARXIV_ID = "2606.16703"
PAPER_TITLE = (
    "Harmonizing Semantic and Collaborative in LLMs: Reasoning-based Embedding Generator for Sequential Recommendation"
)
CITATION = f"""@article{{liu2026reaemb,
  title   = {{{PAPER_TITLE}}},
  author  = {{Liu and Huang and Wang and Yang and Zhu}},
  journal = {{arXiv preprint arXiv:{ARXIV_ID}}},
  year    = {{2026}},
  url     = {{https://arxiv.org/abs/{ARXIV_ID}}}
}}"""
RESULTS_FILES = ("results.md", "eval/results.md", "evaluation/results.md")

# Fields shown in the card's configuration table when present (LRCL and CRRL); the full config follows below it.
CARD_FIELDS = (
    "model_name_or_path", "lrcl_checkpoint", "quantization", "model_dtype", "pooling", "use_lora", "lora_r",
    "lora_alpha", "lora_dropout", "lora_target_modules", "train_lora", "view_drop_ratio", "loss_type",
    "init_temperature", "normalize_embeddings", "gather_negatives", "num_generations", "candidate_num", "pos_num",
    "noise_scale", "reward_funcs", "beta", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs", "bf16",
    "gradient_checkpointing", "seed",
)  # fmt: skip


class ModelCardError(ValueError):
    """A file the card is made from is missing or malformed; the message names it and what to do."""


def training_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The run's training arguments from the folder's `training_config.json`, tokens redacted; None when the
    folder has none."""
    from reaemb_trl.checkpointing import TRAINING_CONFIG_FILE

    path = Path(folder) / TRAINING_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{path} is not readable JSON ({exc}): delete it or save the checkpoint again") from None
    if not isinstance(config, dict):
        raise ModelCardError(f"{path} holds a JSON {type(config).__name__}, not an object of training arguments")
    return {k: ("<redacted>" if k.endswith("token") and v else v) for k, v in config.items()}


def find_results(folder: str | os.PathLike, results: str | os.PathLike | None = None) -> str | None:
    """The evaluation table for the card: the Markdown file `results` (ModelCardError when it is not a file),
    else a `results.md` inside the checkpoint folder (or its eval/ or evaluation/ subfolder), else next to it."""
    if results is not None:
        results = Path(results)
        if not results.is_file():
            problem = "is not a file" if results.exists() else "does not exist"
            raise ModelCardError(
                f"{results} {problem}: pass a Markdown results file as --results (`reaemb evaluate` writes "
                "results.md) or leave it out"
            )
        return results.read_text().strip()
    folder = Path(folder).resolve()
    for name in RESULTS_FILES:
        for base in (folder, folder.parent):
            if (base / name).is_file():
                return (base / name).read_text().strip()
    return None


def _markdown_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value).replace("|", "\\|")


def model_card(folder: str | os.PathLike, repo_id: str, results: str | os.PathLike | None = None) -> str:
    """The README.md written for an embedding generator: what it is, three-line usage, the training configuration,
    the evaluation table when one exists, and the ReaEmb citation."""
    from reaemb_trl.checkpointing import TRAINING_CONFIG_FILE, read_config

    folder = Path(folder)
    config = read_config(folder)
    table = find_results(folder, results)  # first: a missing results file fails before any other work
    backbone = config.get("backbone")
    backbone_text = (
        "stored in this repository (`backbone/`)" if config.get("backbone_in_folder") else f"`{backbone}`"
    )
    train = training_config(folder)
    stage = None if train is None else ("CRRL (after LRCL)" if "num_generations" in train else "LRCL")
    hub_backbone = backbone and not config.get("backbone_in_folder") and not Path(str(backbone)).is_absolute()

    front = ["---", "library_name: reaemb-trl", "pipeline_tag: feature-extraction", "tags:"]
    front += [f"- {t}" for t in ("reaemb", "recommendation", "sequential-recommendation", "item-embeddings", "peft")]
    if hub_backbone and "/" in str(backbone):
        front += [f"base_model: {backbone}"]
    front += ["---", ""]

    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        "An **item-embedding generator** for sequential recommendation, trained with "
        "reaemb-trl following ReaEmb "
        f"([arXiv {ARXIV_ID}](https://arxiv.org/abs/{ARXIV_ID})). Item text (attributes such as title, "
        "categories, brand) goes in, a dense vector comes out. A latent *thought* module reads the LLM's hidden "
        "states and writes a thought vector into the prompt; the LLM (with a LoRA adapter) then pools its last "
        "layer into the item embedding. Use the vectors as a frozen item table of a sequential recommender "
        "(SASRec, GRU4Rec, BERT4Rec).",
        "",
        f"- Backbone: {backbone_text}",
        f"- Training stage: {stage or 'unknown'}",
        f"- Embedding dimension: {config.get('hidden_size')} ({config.get('pooling')} pooling)",
        f"- LoRA adapter: {'yes' if config.get('adapter') else 'no'}",
        "",
        "## Usage",
        "",
        "```python",
        "from reaemb_trl import ThoughtEmbedder",
        f'embedder = ThoughtEmbedder.from_pretrained("{repo_id}")',
        'vectors = embedder.encode([[("title", "Toy Story"), ("genres", "Animation Comedy")]])  # (1, d) float32',
        "```",
        "",
        "Each item is a list of `(key, value)` attributes (or a mapping). The prompt format used in training is "
        "stored in `prompt_format.json` and applied by `encode`; an item's vector does not depend on its batch "
        "mates. `from_pretrained` accepts a Hub id or a local folder (download one with "
        "`huggingface_hub.snapshot_download`).",
        "",
        "## Training configuration",
        "",
    ]
    if train is None:
        lines += [f"Not recorded: the checkpoint folder had no `{TRAINING_CONFIG_FILE}`.", ""]
    else:
        lines += ["| argument | value |", "|---|---|"]
        lines += [f"| `{k}` | {_markdown_value(train[k])} |" for k in CARD_FIELDS if k in train]
        full = {k: v for k, v in sorted(train.items()) if not k.startswith("_") and v is not None}
        lines += ["", "<details><summary>Full training arguments</summary>", "", "```json",
                  json.dumps(full, indent=2, default=str), "```", "", "</details>", ""]  # fmt: skip
    if table:
        lines += ["## Evaluation", "", table, ""]
    lines += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(front + lines)
