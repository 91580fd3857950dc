"""Push a reaemb-trl checkpoint (an item-embedding generator) to the Hugging Face Hub, with a model card.

    from reaemb_trl.hub import push_checkpoint
    push_checkpoint("outputs/lrcl", "me/reaemb-smollm2-ml100k", private=True)

    reaemb push outputs/lrcl --repo-id me/reaemb-smollm2-ml100k --private --revision v1

What goes up: everything `ThoughtEmbedder.from_pretrained` needs (adapter/, thought_module.safetensors,
prompt_format.json, tokenizer files, reaemb_config.json, backbone/ when the backbone is stored in the folder, the
LRCL temperature) plus a generated README.md. What never goes up: intermediate `checkpoint-*` folders, optimizer /
scheduler / RNG states, DeepSpeed shards, `training_args.bin` (a pickle), TensorBoard runs.

The trainers' own Hub machinery (`Trainer.init_hf_repo` creates the repo over the network when the Trainer is built;
`_push_from_checkpoint` pushes every checkpoint) is replaced by `HubPushMixin`: with `push_to_hub: true` nothing
touches the network until the end of the run, when the recipes' `finish()` calls `push_checkpoint` once.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer

DEFAULT_COMMIT_MESSAGE = "Upload ReaEmb item-embedding generator"
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

# Top-level entries of a checkpoint folder that are never uploaded (training state, not the model).
EXCLUDED_DIRS = ("checkpoint-*", "global_step*", "runs", "wandb", ".*", "__pycache__")
EXCLUDED_FILES = (
    "training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state*.pth",
    "trainer_state.json", "latest", "zero_to_fp32.py", "zero_to_torch.py", "events.out.tfevents*", "README.md",
    "*.lock", ".*",
)  # fmt: skip
RESULTS_FILES = ("results.md", "eval/results.md", "evaluation/results.md")
TRAINING_CONFIG_FILES = ("training_config.json",)

# Fields shown in the card's configuration table when present (LRCL and CRRL); the full config follows below it.
CARD_FIELDS = (
    "model_name_or_path", "lrcl_checkpoint", "quantization", "model_dtype", "pooling", "use_lora", "lora_r",
    "lora_alpha", "lora_dropout", "lora_target_modules", "train_lora", "view_drop_ratio", "loss_type",
    "init_temperature", "normalize_embeddings", "gather_negatives", "num_generations", "candidate_num", "pos_num",
    "noise_scale", "reward_funcs", "beta", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs", "bf16",
    "gradient_checkpointing", "seed",
)  # fmt: skip


def _excluded(path: Path) -> bool:
    patterns = EXCLUDED_DIRS if path.is_dir() else EXCLUDED_FILES
    return any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns)


def upload_files(folder: str | os.PathLike) -> list[str]:
    """The files of a checkpoint folder that `push_checkpoint` uploads (relative POSIX paths, sorted)."""
    folder = Path(folder)
    files: list[str] = []

    def walk(directory: Path) -> None:
        for entry in sorted(directory.iterdir()):
            if entry.is_symlink() or _excluded(entry):
                continue
            if entry.is_dir():
                walk(entry)
            else:
                files.append(entry.relative_to(folder).as_posix())

    walk(folder)
    return files


def training_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The run's training arguments as a plain dict: `training_config.json` if the folder has one, else
    `training_args.bin` (the Trainer's pickle of the arguments; only read from folders you trust, as any pickle).
    Tokens are redacted."""
    folder = Path(folder)
    for name in TRAINING_CONFIG_FILES:
        if (folder / name).exists():
            config = json.loads((folder / name).read_text())
            break
    else:
        if not (folder / "training_args.bin").exists():
            return None
        import torch

        args = torch.load(folder / "training_args.bin", weights_only=False)
        config = args.to_dict() if hasattr(args, "to_dict") else dict(vars(args))
    return {k: ("<redacted>" if k.endswith("token") and v else v) for k, v in config.items()}


def find_results(folder: str | os.PathLike, results: str | os.PathLike | None = None) -> str | None:
    """The evaluation table for the card: `results` (a Markdown file or the Markdown text itself), else a
    `results.md` inside the checkpoint folder (or its eval/ or evaluation/ subfolder), else next to it."""
    if results is not None:
        candidate = Path(results) if len(str(results)) < 4096 else None
        if candidate is not None and candidate.is_file():
            return candidate.read_text().strip()
        return str(results).strip()
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
    from reaemb_trl.embedder import CONFIG_FILE

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
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
    ]
    if train is not None:
        lines += ["## Training configuration", "", "| argument | value |", "|---|---|"]
        lines += [f"| `{k}` | {_markdown_value(train[k])} |" for k in CARD_FIELDS if k in train]
        full = {k: v for k, v in sorted(train.items()) if not k.startswith("_") and v is not None}
        lines += ["", "<details><summary>Full training arguments</summary>", "", "```json",
                  json.dumps(full, indent=2, default=str), "```", "", "</details>", ""]  # fmt: skip
    table = find_results(folder, results)
    if table:
        lines += ["## Evaluation", "", table, ""]
    lines += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(front + lines)


def stage_upload(
    folder: str | os.PathLike, staging: str | os.PathLike, repo_id: str, results: str | os.PathLike | None = None
) -> list[str]:
    """Put exactly what would be uploaded (the checkpoint files + README.md) into `staging`; returns the file list."""
    from reaemb_trl.embedder import CONFIG_FILE

    folder, staging = Path(folder), Path(staging)
    if not (folder / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{folder} is not a reaemb-trl checkpoint: {CONFIG_FILE} is missing")
    files = upload_files(folder)
    for name in files:
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(folder / name, target)  # no copy of large weights where the filesystem allows
        except OSError:
            shutil.copy2(folder / name, target)
    (staging / "README.md").write_text(model_card(folder, repo_id, results))
    return sorted(files + ["README.md"])


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What keeps `folder` from being pushed (one line naming it and what to do), or None."""
    from reaemb_trl.embedder import CONFIG_FILE

    folder = Path(folder)
    runs = "the output_dir of an LRCL or CRRL run (`accelerate launch recipes/lrcl.py --config ...`)"
    if not folder.exists():
        return f"{folder} does not exist: pass {runs}"
    if not folder.is_dir():
        return f"{folder} is not a folder: pass {runs}"
    if not (folder / CONFIG_FILE).is_file():
        return f"{folder} is not a reaemb-trl checkpoint (no {CONFIG_FILE}): pass {runs}"
    return None


def push_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    results: str | os.PathLike | None = None,
):
    """Upload a checkpoint folder written by LRCL / CRRL (or `ThoughtEmbedder.save_pretrained`) to `repo_id`.

    Creates the repo if needed (`private`: make it private when created; None = the account's default), and the
    branch `revision` if given and missing. `token` defaults to the `HF_TOKEN` environment variable (then to the
    login cached by `hf auth login`). Returns the `CommitInfo` of the upload."""
    from huggingface_hub import HfApi

    if not repo_id:
        raise ValueError("push_checkpoint needs a repo_id such as 'user/reaemb-model'")
    problem = checkpoint_problem(folder)
    if problem:  # before anything touches the network
        raise FileNotFoundError(problem)
    token = token or os.environ.get("HF_TOKEN") or None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="reaemb-push-") as staging:
        stage_upload(folder, staging, repo_id, results)
        repo_url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        repo_id = getattr(repo_url, "repo_id", None) or repo_id
        if revision:
            api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            commit_message=commit_message,
            token=token,
            repo_type="model",
            revision=revision,
        )


def default_repo_id(args) -> str:
    """`hub_model_id`, else the output folder's name (what Trainer does)."""
    return args.hub_model_id or Path(args.output_dir).absolute().name


class HubPushMixin:
    """For Trainer subclasses: no network at init or at every save; `push_to_hub()` pushes the final checkpoint
    folder (args.output_dir) with `push_checkpoint`. `hub_strategy` has no effect: only the final model is pushed,
    by the recipes' `finish()` or an explicit `trainer.push_to_hub()`."""

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        self.hub_model_id = default_repo_id(self.args)
        self.push_in_progress = None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        return None

    def push_to_hub(self, commit_message: str | None = None, blocking: bool = True, token: str | None = None,
                    revision: str | None = None, **kwargs):  # fmt: skip
        if not self.is_world_process_zero():
            return None
        return push_checkpoint(
            self.args.output_dir,
            repo_id=default_repo_id(self.args),
            private=self.args.hub_private_repo,
            revision=revision or self.args.hub_revision,
            token=token or self.args.hub_token,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        )


def push_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder written by LRCL or CRRL (has reaemb_config.json)."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repository, e.g. user/reaemb-smollm2-ml100k."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private (if it does not exist)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created when missing)."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token; default: $HF_TOKEN or the cached login."),
    results: Optional[Path] = typer.Option(None, "--results", help="Markdown evaluation table for the model card."),
    commit_message: str = typer.Option(DEFAULT_COMMIT_MESSAGE, "--commit-message"),
) -> None:
    """Upload a checkpoint (adapter, thought module, prompt format, tokenizer, config) plus a model card."""
    problem = checkpoint_problem(checkpoint)
    if problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(1)
    if results is not None and not results.is_file():
        typer.echo(f"error: {results} does not exist: pass a Markdown results file (`reaemb evaluate` writes "
                   "results.md) or leave out --results", err=True)
        raise typer.Exit(1)
    info = push_checkpoint(
        checkpoint, repo_id, private=private, revision=revision, token=token, commit_message=commit_message,
        results=results,
    )  # fmt: skip
    typer.echo(f"pushed {checkpoint} to {getattr(info, 'commit_url', None) or repo_id}")
