"""Push a reaemb-trl checkpoint (an item-embedding generator) to the Hugging Face Hub, with a model card.

    from reaemb_trl.hub import push_checkpoint
    push_checkpoint("outputs/lrcl", "me/reaemb-smollm2-ml100k", private=True)

    reaemb push outputs/lrcl --repo-id me/reaemb-smollm2-ml100k --private --revision v1   # reaemb_trl.cli.push

What goes up: everything `ThoughtEmbedder.from_pretrained` needs (adapter/, thought_module.safetensors,
prompt_format.json, tokenizer files, reaemb_config.json, backbone/ when the backbone is stored in the folder, the
LRCL temperature) plus a generated README.md. What never goes up: intermediate `checkpoint-*` folders, optimizer /
scheduler / RNG states, DeepSpeed shards, `training_args.bin` (a pickle), TensorBoard runs. The model card
is written by `reaemb_trl.model_card`.

The trainers' own Hub machinery (`Trainer.init_hf_repo` creates the repo over the network when the Trainer is built;
`_push_from_checkpoint` pushes every checkpoint) is replaced by `HubPushMixin`: with `push_to_hub: true` nothing
touches the network until the end of the run, when the recipes' `finish()` calls `push_checkpoint` once.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_COMMIT_MESSAGE = "Upload ReaEmb item-embedding generator"

# Top-level entries of a checkpoint folder that are never uploaded (training state, not the model).
EXCLUDED_DIRS = ("checkpoint-*", "global_step*", "runs", "wandb", ".*", "__pycache__")
EXCLUDED_FILES = (
    "training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state*.pth",
    "trainer_state.json", "latest", "zero_to_fp32.py", "zero_to_torch.py", "events.out.tfevents*", "README.md",
    "*.lock", ".*",
)  # fmt: skip


class PushError(RuntimeError):
    """The Hub refused or could not be reached (bad repo id, no network, no rights); the message says what to do."""


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


def stage_upload(
    folder: str | os.PathLike, staging: str | os.PathLike, repo_id: str, results: str | os.PathLike | None = None
) -> list[str]:
    """Put exactly what would be uploaded (the checkpoint files + README.md) into `staging`; returns the file list."""
    from reaemb_trl.checkpointing import CONFIG_FILE
    from reaemb_trl.model_card import model_card

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
    from reaemb_trl.checkpointing import CONFIG_FILE

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
    login cached by `hf auth login`). Returns the `CommitInfo` of the upload. A refused or failed upload is a
    PushError; a missing `results` file or a malformed `training_config.json` is a ModelCardError raised before
    anything touches the network."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, HTTPError

    if not repo_id:
        raise ValueError("push_checkpoint needs a repo_id such as 'user/reaemb-model'")
    problem = checkpoint_problem(folder)
    if problem:  # before anything touches the network
        raise FileNotFoundError(problem)
    token = token or os.environ.get("HF_TOKEN") or None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="reaemb-push-") as staging:
        stage_upload(folder, staging, repo_id, results)
        try:
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
        # HTTPError: the HTTP library's base (refusals and connection failures); OSError: offline mode and sockets
        except (HTTPError, HFValidationError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PushError(
                f"cannot push to {repo_id!r} ({reason}): check the repo id (user/name), the network, and the token "
                "($HF_TOKEN or `hf auth login`, with write access)"
            ) from exc


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
