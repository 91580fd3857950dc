"""`reaemb push`: upload a checkpoint and its model card to the Hugging Face Hub.

The token never appears on the command line (where `ps` shows it to every user of the machine): it comes from
$HF_TOKEN, the login cached by `hf auth login`, or a hidden prompt when the command runs in a terminal.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from reaemb_trl.cli.errors import fail
from reaemb_trl.hub import DEFAULT_COMMIT_MESSAGE


def push_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder written by LRCL or CRRL (has reaemb_config.json)."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repository, e.g. user/reaemb-smollm2-ml100k."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private (if it does not exist)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created when missing)."),
    results: Optional[Path] = typer.Option(None, "--results", help="Markdown evaluation table for the model card."),
    commit_message: str = typer.Option(DEFAULT_COMMIT_MESSAGE, "--commit-message"),
) -> None:
    """Upload a checkpoint (adapter, thought module, prompt format, tokenizer, config) plus a model card.

    The token comes from $HF_TOKEN, else the login cached by `hf auth login`, else a hidden prompt."""
    from reaemb_trl.hub import PushError, checkpoint_problem, push_checkpoint
    from reaemb_trl.model_card import ModelCardError, model_card

    problem = checkpoint_problem(checkpoint)
    if problem:
        fail(problem)
    try:
        model_card(checkpoint, repo_id, results)  # its files are checked before the token is asked for
        info = push_checkpoint(
            checkpoint, repo_id, private=private, revision=revision, token=hub_token(), commit_message=commit_message,
            results=results,
        )  # fmt: skip
    except (PushError, ModelCardError) as exc:
        fail(exc)
    typer.echo(f"pushed {checkpoint} to {getattr(info, 'commit_url', None) or repo_id}")


def hub_token() -> str:
    """$HF_TOKEN or the cached login, else a hidden prompt in a terminal; without any, a one-line error."""
    from huggingface_hub import get_token

    token = get_token()
    if token:
        return token
    if not stdin_is_terminal():
        fail("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return typer.prompt("Hugging Face token (write access; input hidden)", hide_input=True).strip()


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()
