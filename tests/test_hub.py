"""Pushing checkpoints to the Hub, offline: HfApi's network methods are intercepted and record what would be sent."""

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
    torch.save(args, folder / "training_args.bin")
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


def test_explicit_token_wins_and_public_default(checkpoint, tmp_path, monkeypatch):
    from reaemb_trl.hub import push_checkpoint

    folder, _ = checkpoint
    hub = FakeHub(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    push_checkpoint(folder, "me/reaemb-tiny", token="hf_given", results="| x | 1 |\n|---|---|\n| a | 0.5 |")
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


def test_push_command_cli(checkpoint, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from reaemb_trl.hub import push_command

    folder, _ = checkpoint
    hub = FakeHub(monkeypatch, tmp_path)
    app = typer.Typer()
    app.command("push")(push_command)
    app.command("noop")(lambda: None)  # two commands: `push` stays a subcommand, as under `reaemb`
    result = CliRunner().invoke(
        app, ["push", str(folder), "--repo-id", "me/cli", "--private", "--revision", "dev", "--token", "hf_cli"]
    )
    assert result.exit_code == 0, result.output
    (repo,) = hub.named("create_repo")
    assert repo["repo_id"] == "me/cli" and repo["private"] is True and repo["token"] == "hf_cli"
    assert hub.named("create_branch")[0]["branch"] == "dev"
    assert hub.named("upload_folder")[0]["revision"] == "dev"


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
