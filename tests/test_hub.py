"""Pushing checkpoints to the Hub, offline: HfApi's network methods are intercepted and record what would be sent."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, ITEMS, tiny_embedder


class FakeHub:
    """Stands in for HfApi.create_repo / create_branch / upload_folder; keeps a copy of every uploaded folder."""

    def __init__(self, monkeypatch, root: Path):
        from huggingface_hub import HfApi

        self.calls: list[tuple[str, dict]] = []
        self.root = root
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def create_branch(api, repo_id, **kwargs):
            hub.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(api, **kwargs):
            copy = hub.root / f"upload-{len(hub.calls)}"
            shutil.copytree(kwargs["folder_path"], copy)
            files = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())
            hub.calls.append(("upload_folder", {**kwargs, "files": files, "copy": copy}))
            return type("CommitInfo", (), {"commit_url": f"https://hf.co/{kwargs['repo_id']}/commit/0"})()

        for name in ("create_repo", "create_branch", "upload_folder"):
            monkeypatch.setattr(HfApi, name, locals()[name])
        for name in ("upload_file", "create_commit", "whoami"):  # anything else would be a real network call
            monkeypatch.setattr(HfApi, name, lambda *a, _n=name, **k: pytest.fail(f"unexpected HfApi.{_n}"))

    def named(self, name: str) -> list[dict]:
        return [kwargs for call, kwargs in self.calls if call == name]


class PickleTrap:
    """Unpickled, it creates `marker`: a stand-in for the code a foreign `training_args.bin` could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def checkpoint(tmp_path):
    """A finished LRCL output folder: the embedding checkpoint plus training leftovers that must not be uploaded."""
    from reaemb_trl import LRCLConfig

    embedder = tiny_embedder(lora=True)
    with torch.no_grad():  # make the adapter non-trivial
        for name, param in embedder.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    folder = tmp_path / "lrcl"
    embedder.save_pretrained(folder)
    args = LRCLConfig(output_dir=str(folder), use_cpu=True, hub_token="hf_secret", lora_r=4, max_steps=12)
    (folder / "training_config.json").write_text(json.dumps(args.to_dict()))  # as every checkpoint save writes it
    torch.save(PickleTrap(tmp_path / "unpickled"), folder / "training_args.bin")
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "optimizer.pt").write_bytes(b"x")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out.tfevents.1").write_bytes(b"x")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        (folder / name).write_text("{}")
    (folder / "results.md").write_text("| table | NDCG@10 |\n|---|---|\n| LRCL | 0.0421 |\n")
    return folder, embedder.encode(ITEMS)


def test_push_checkpoint_sends_the_loadable_folder_and_a_model_card(checkpoint, tmp_path, monkeypatch):
    from reaemb_trl import ThoughtEmbedder
    from reaemb_trl.hub import push_checkpoint

    folder, expected = checkpoint
    hub = FakeHub(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    push_checkpoint(folder, "me/reaemb-tiny", private=True, revision="v1", commit_message="first")

    (repo,) = hub.named("create_repo")
    assert repo["repo_id"] == "me/reaemb-tiny" and repo["private"] is True and repo["exist_ok"] is True
    assert repo["token"] == "hf_from_env"
    (branch,) = hub.named("create_branch")
    assert branch["repo_id"] == "me/reaemb-tiny" and branch["branch"] == "v1" and branch["token"] == "hf_from_env"
    (upload,) = hub.named("upload_folder")
    assert upload["repo_id"] == "me/reaemb-tiny" and upload["revision"] == "v1" and upload["token"] == "hf_from_env"
    assert upload["commit_message"] == "first"
    files = set(upload["files"])
    assert {"README.md", "reaemb_config.json", "thought_module.safetensors", "prompt_format.json",
            "tokenizer.json", "tokenizer_config.json", "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json", "backbone/model.safetensors", "results.md"} <= files  # fmt: skip
    leftovers = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
    assert not files & leftovers and not any(f.startswith(("checkpoint-", "runs/")) for f in files), files

    # what would be uploaded loads back into the same embeddings
    uploaded = ThoughtEmbedder.from_pretrained(upload["copy"]).encode(ITEMS)
    torch.testing.assert_close(uploaded, expected, rtol=0, atol=0)

    card = (upload["copy"] / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: feature-extraction" in card
    assert 'ThoughtEmbedder.from_pretrained("me/reaemb-tiny")' in card and ".encode(" in card
    assert "2606.16703" in card and "Liu and Huang and Wang and Yang and Zhu" in card
    assert "| LRCL | 0.0421 |" in card  # the evaluation table
    assert "| `lora_r` | 4 |" in card and "| `max_steps` | 12 |" in card  # the training configuration
    assert "hf_secret" not in card  # tokens are redacted
    assert not (tmp_path / "unpickled").exists()  # training_args.bin was never unpickled


def test_without_training_config_json_the_card_says_not_recorded_and_nothing_is_unpickled(
    checkpoint, tmp_path, monkeypatch
):
    from reaemb_trl.hub import push_checkpoint

    folder, _ = checkpoint
    (folder / "training_config.json").unlink()  # a checkpoint from elsewhere: only the pickle is left
    hub = FakeHub(monkeypatch, tmp_path)
    push_checkpoint(folder, "me/reaemb-tiny")
    card = (hub.named("upload_folder")[0]["copy"] / "README.md").read_text()
    assert not (tmp_path / "unpickled").exists()
    assert "## Training configuration\n\nNot recorded: the checkpoint folder had no `training_config.json`" in card
    assert "Training stage: unknown" in card and "| `lora_r` |" not in card


def test_a_missing_results_file_is_an_error_not_card_text(checkpoint, tmp_path, monkeypatch):
    from reaemb_trl.hub import push_checkpoint
    from reaemb_trl.model_card import ModelCardError

    folder, _ = checkpoint
    hub = FakeHub(monkeypatch, tmp_path)
    typo = tmp_path / "reslts.md"
    with pytest.raises(ModelCardError, match=f"{typo} does not exist: pass a Markdown results file"):
        push_checkpoint(folder, "me/reaemb-tiny", results=typo)
    with pytest.raises(ModelCardError, match="does not exist"):
        push_checkpoint(folder, "me/reaemb-tiny", results="| a | 0.5 |")  # Markdown text is not a file either
    assert hub.calls == []


def test_explicit_token_wins_and_public_default(checkpoint, tmp_path, monkeypatch):
    from reaemb_trl.hub import push_checkpoint

    folder, _ = checkpoint
    hub = FakeHub(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    results = tmp_path / "eval.md"
    results.write_text("| x | 1 |\n|---|---|\n| a | 0.5 |\n")
    push_checkpoint(folder, "me/reaemb-tiny", token="hf_given", results=results)
    (repo,) = hub.named("create_repo")
    assert repo["private"] is False and repo["token"] == "hf_given"
    assert hub.named("create_branch") == []
    (upload,) = hub.named("upload_folder")
    assert upload["revision"] is None and upload["token"] == "hf_given"
    assert "| a | 0.5 |" in (upload["copy"] / "README.md").read_text()


def test_push_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, monkeypatch):
    from reaemb_trl.hub import push_checkpoint

    hub = FakeHub(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match="reaemb_config.json"):
        push_checkpoint(tmp_path, "me/x")
    assert hub.calls == []


def _push_app():
    import typer

    from reaemb_trl.cli.push import push_command

    app = typer.Typer()
    app.command("push")(push_command)
    app.command("noop")(lambda: None)  # two commands: `push` stays a subcommand, as under `reaemb`
    return app


def test_push_command_cli_takes_the_token_from_the_environment(checkpoint, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    folder, _ = checkpoint
    hub = FakeHub(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    result = CliRunner().invoke(_push_app(), ["push", str(folder), "--repo-id", "me/cli", "--private", "--revision", "dev"])
    assert result.exit_code == 0, result.output
    (repo,) = hub.named("create_repo")
    assert repo["repo_id"] == "me/cli" and repo["private"] is True and repo["token"] == "hf_env"
    assert hub.named("create_branch")[0]["branch"] == "dev"
    assert hub.named("upload_folder")[0]["revision"] == "dev"
    # a token on the command line would be visible in `ps`: there is no such option
    result = CliRunner().invoke(_push_app(), ["push", str(folder), "--repo-id", "me/cli", "--token", "hf_cli"])
    assert result.exit_code == 2 and "No such option" in result.output and len(hub.named("create_repo")) == 1


def test_push_command_cli_prompts_for_a_hidden_token_only_in_a_terminal(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub
    from typer.testing import CliRunner

    from reaemb_trl.cli import push

    folder, _ = checkpoint
    hub = FakeHub(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no login cached either
    monkeypatch.setattr(push, "stdin_is_terminal", lambda: True)
    result = CliRunner().invoke(_push_app(), ["push", str(folder), "--repo-id", "me/cli"], input="hf_typed\n")
    assert result.exit_code == 0, result.output
    assert hub.named("create_repo")[0]["token"] == "hf_typed" and "hf_typed" not in result.output  # hidden
    monkeypatch.setattr(push, "stdin_is_terminal", lambda: False)  # a batch job: say what to set, ask nothing
    result = CliRunner().invoke(_push_app(), ["push", str(folder), "--repo-id", "me/cli"], input="hf_typed\n")
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        "error: no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)"
    ]
    assert len(hub.named("create_repo")) == 1


def test_push_offline_or_to_a_bad_repo_id_is_one_error_line(checkpoint, monkeypatch):
    import sys

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError
    from typer.testing import CliRunner

    folder, _ = checkpoint
    monkeypatch.setenv("HF_TOKEN", "hf_env")

    def push(repo_id):
        result = CliRunner().invoke(_push_app(), ["push", str(folder), "--repo-id", repo_id])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output
        (line,) = result.stderr.strip().splitlines()
        return line

    # the repo id is refused by huggingface_hub's own validation, before any request
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: pytest.fail("uploaded to a bad repo id"))
    line = push("not a/valid/repo id")
    assert line.startswith("error: cannot push to 'not a/valid/repo id' (Repo id must be in the form")
    assert "check the repo id (user/name), the network, and the token" in line
    # offline: the HTTP library's connection error (httpx's ConnectError, whatever its package is called)
    connect_error = getattr(sys.modules[HTTPError.__module__], "ConnectError", HTTPError)

    def offline(*args, **kwargs):
        raise connect_error("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    assert push("me/cli").startswith("error: cannot push to 'me/cli' ([Errno -2] Name or service not known)")


def test_lrcl_push_to_hub_touches_the_network_only_once_at_the_end(tmp_path, monkeypatch):
    from reaemb_trl import LRCLConfig, LRCLTrainer, ThoughtEmbedder
    from reaemb_trl.data.canonical import load_items
    from reaemb_trl.builders import finish_training as finish

    hub = FakeHub(monkeypatch, tmp_path)
    out = tmp_path / "run"
    args = LRCLConfig(
        output_dir=str(out), model_name_or_path=str(ASSETS / "tiny-llama"), max_steps=2, save_steps=1,
        per_device_train_batch_size=4, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_item_tokens=192,
        use_cpu=True, disable_tqdm=True, report_to="none", push_to_hub=True, hub_model_id="me/lrcl-tiny",
        hub_private_repo=True, hub_revision="run-1", hub_token="hf_args", hub_strategy="every_save",
    )  # fmt: skip
    trainer = LRCLTrainer(args=args, train_dataset=load_items(ASSETS / "tiny_catalog").select(range(8)))
    assert hub.calls == []  # no repo creation when the Trainer is built
    trainer.train()
    assert hub.calls == []  # ... nor at every checkpoint save
    finish(trainer, str(out))
    assert [name for name, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    repo, branch, upload = (kwargs for _, kwargs in hub.calls)
    assert repo["repo_id"] == "me/lrcl-tiny" and repo["private"] is True and repo["token"] == "hf_args"
    assert branch["branch"] == "run-1" and upload["revision"] == "run-1"
    assert not any(f.startswith("checkpoint-") for f in upload["files"])
    assert "training_args.bin" not in upload["files"] and "lrcl_temperature.safetensors" in upload["files"]
    vectors = ThoughtEmbedder.from_pretrained(upload["copy"]).encode(ITEMS)
    torch.testing.assert_close(vectors, ThoughtEmbedder.from_pretrained(out).encode(ITEMS), rtol=0, atol=0)
