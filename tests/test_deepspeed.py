"""LRCL and CRRL under DeepSpeed ZeRO-2 and ZeRO-3 on CPU (DeepSpeed's CPU accelerator, `DS_ACCELERATOR=cpu`).

Each case launches a small driver under `accelerate launch` with a shipped config
(`accelerate_configs/deepspeed_zero*.yaml`, one and two processes) or a DeepSpeed JSON config that really
partitions every parameter. The LRCL driver trains the tiny backbone for a few steps; the CRRL driver runs
`recipes/crrl.py` itself from a tiny LRCL checkpoint. Both record what the *trained, live* model gives (embeddings
of the test items, with ZeRO-3 partitions gathered) and how the parameters are held, then save the final
checkpoint through the recipes' `finish_training()`. The test then checks that the saved folder loads with
`ThoughtEmbedder.from_pretrained` into the same embeddings.

What runs: LRCL under deepspeed_zero3.yaml and deepspeed_zero3_offload.yaml (one process) and the partitioning config
(two); CRRL under the same two (one process), deepspeed_zero2.yaml and the partitioning config (two); both recipes
under deepspeed_zero2.yaml with one process in tests/test_gpu_check.py. The partitioning config runs with two
processes only (with one it is the same path in a world of one). The launches start together when the first test
needs one and share the machine's cores (a one-process launch leaves a core idle), so on two cores two one-process
launches run side by side.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ITEMS

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)

DRIVER = textwrap.dedent(
    """
    import contextlib, json, sys
    import torch
    from conftest import ITEMS
    from reaemb_trl import LRCLConfig, LRCLTrainer
    from reaemb_trl.data.canonical import load_items
    from reaemb_trl.builders import finish_training as finish
    def offload(engine):
        # (optimizer state offloaded, parameters offloaded, the optimizer ZeRO wraps: DeepSpeedCPUAdam when offloaded)
        inner = getattr(engine.optimizer, "optimizer", None)
        devices = [getattr(c, "device", None) for c in (engine.zero_offload_optimizer(), engine.zero_offload_param())]
        return [str(getattr(d, "value", d) or "none") for d in devices] + [type(inner).__name__]

    out = sys.argv[1]
    args = LRCLConfig(
        output_dir=out, model_name_or_path="tests/assets/tiny-llama", max_steps=4, per_device_train_batch_size=8,
        learning_rate=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_item_tokens=192, logging_steps=1,
        save_strategy="no", seed=0, report_to="none", disable_tqdm=True, use_cpu=True,
    )
    trainer = LRCLTrainer(args=args, train_dataset=load_items("tests/assets/tiny_catalog"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    engine = trainer.model_wrapped
    stage = engine.zero_optimization_stage()
    model = trainer.model
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # How parameters are held between steps: under ZeRO-3 every one is a partition with an empty local tensor.
    held = {n: [p.numel(), int(getattr(p, "ds_numel", p.numel())), hasattr(p, "ds_id")] for n, p in trainable}
    if stage == 3:
        import deepspeed
        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    else:
        gather = contextlib.nullcontext()
    with gather:
        after = {n: p.detach().clone() for n, p in trainable}
    # ZeRO-3's module hooks gather each layer's weights for its forward (and release them afterwards)
    vectors = trainer.embedder.encode(ITEMS)
    changed = [n for n in after if not torch.equal(after[n].reshape(-1), before[n].reshape(-1))]
    if trainer.accelerator.is_main_process:
        torch.save({"vectors": vectors, "trainable": after}, out + "/live.pt")
        report = {"stage": stage, "optimizer": type(engine.optimizer).__name__, "held": held, "changed": changed,
                  "offload": offload(engine),
                  "n_trainable": len(trainable), "world": trainer.accelerator.num_processes,
                  "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
        json.dump(report, open(out + "/report.json", "w"))
    finish(trainer, out)
    """
)


# ZeRO-3 keeps parameters below `stage3_param_persistence_threshold` whole on every rank; every tensor of the tiny
# model is that small, so this DeepSpeed JSON config (accelerate --deepspeed_config_file) sets it to 0 to make every
# parameter a real partition with an empty local tensor, as big models have.
ZERO3_NO_PERSISTENCE = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
}  # fmt: skip


# What runs (see the module doc for why these): (config, ZeRO stage, processes)
LRCL_CASES = [("deepspeed_zero3.yaml", 3, 1), ("deepspeed_zero3_offload.yaml", 3, 1), ("zero3_no_persistence", 3, 2)]
CRRL_CASES = [("deepspeed_zero3.yaml", 3, 1), ("deepspeed_zero3_offload.yaml", 3, 1), ("deepspeed_zero2.yaml", 2, 2),
              ("zero3_no_persistence", 3, 2)]  # fmt: skip
UNEVEN_CASE = ("zero3_no_persistence", 2)


def _command(config: str, processes: int, script: Path, args: tuple[str, ...]) -> list[str]:
    if config.endswith(".yaml"):  # a shipped accelerate config
        topology = ["--config_file", str(REPO / "accelerate_configs" / config)]
    else:  # a DeepSpeed JSON config through accelerate's DeepSpeed plugin
        ds_config = script.parent / "ds_config.json"
        ds_config.write_text(json.dumps(ZERO3_NO_PERSISTENCE))
        topology = ["--use_deepspeed", "--deepspeed_config_file", str(ds_config)]
    return [sys.executable, "-m", "accelerate.commands.launch", *topology, "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", "0",
            str(script), *args]  # fmt: skip


class Launches:
    """Launches that run side by side, each holding as many of the machine's cores (at most 4) as it has processes,
    and are killed, launcher and workers together, when the module ends."""

    def __init__(self):
        self.cores = max(1, min(4, os.cpu_count() or 1))
        self.free, self.stopped, self.running = self.cores, False, []
        self.turn = threading.Condition()
        self.pool = ThreadPoolExecutor(max_workers=8)
        self.runs: dict[tuple, tuple[Path, Future]] = {}

    def start(self, key: tuple, command: list[str], out: Path, processes: int, timeout: float) -> None:
        self.runs[key] = (out, self.pool.submit(self._run, command, min(processes, self.cores), timeout))

    def _run(self, command: list[str], cores: int, timeout: float) -> subprocess.CompletedProcess:
        with self.turn:
            self.turn.wait_for(lambda: self.stopped or self.free >= cores)
            if self.stopped:
                raise RuntimeError("the test module ended before this launch started")
            self.free -= cores
            # tests/ on the path for the drivers' `from conftest import ITEMS`
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}  # fmt: skip
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)  # fmt: skip
            self.running.append(proc)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            with self.turn:
                self.free += cores
                self.turn.notify_all()
        return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)

    def output(self, *key) -> Path:
        """The output folder of the launch `key`, once it has ended well."""
        out, future = self.runs[key]
        proc = future.result()
        if proc.returncode != 0 and "ninja" in proc.stderr.lower() and "not found" in proc.stderr.lower():
            pytest.skip("DeepSpeed's CPU accelerator compiles its ops on first use: needs ninja + a C++ compiler")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        return out

    def stop(self) -> None:
        with self.turn:
            self.stopped = True
            self.turn.notify_all()
            for proc in self.running:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        self.pool.shutdown(wait=True, cancel_futures=True)


def _check_offload(config: str, report: dict) -> None:
    """The offload config keeps optimizer state and parameters in CPU RAM and steps with DeepSpeed's CPUAdam."""
    if "offload" in config:
        assert report["offload"] == ["cpu", "cpu", "DeepSpeedCPUAdam"], report["offload"]
    else:
        assert report["offload"][:2] == ["none", "none"], report["offload"]


@pytest.mark.parametrize("config,stage,processes", LRCL_CASES)
def test_lrcl_under_deepspeed_zero_saves_a_checkpoint_that_exports_the_same_embeddings(
    launches, config, stage, processes
):
    from safetensors.torch import load_file

    from reaemb_trl import ThoughtEmbedder

    out = launches.output("lrcl", config, processes)
    report = json.loads((out / "report.json").read_text())
    assert report["stage"] == stage and report["world"] == processes
    assert report["optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")
    assert all(torch.isfinite(torch.tensor(report["losses"]))) and len(report["losses"]) == 4
    _check_offload(config, report)
    # every trainable tensor (LoRA A/B, thought module, tau) was updated through DeepSpeed's optimizer
    assert len(report["changed"]) == report["n_trainable"], report["changed"]
    names = list(report["held"])
    assert any("lora_A" in n for n in names) and any("embedder.thought_module." in n for n in names)
    if stage == 3:  # every parameter (LoRA, thought module, tau) is a ZeRO-3 parameter
        assert all(is_zero3 and full > 0 for _, full, is_zero3 in report["held"].values()), report["held"]
    else:
        assert all(local == full > 0 and not is_zero3 for local, full, is_zero3 in report["held"].values())
    if config == "zero3_no_persistence":  # ... and a real partition: the local tensor is empty between steps
        assert all(local == 0 for local, _, _ in report["held"].values()), report["held"]

    live = torch.load(out / "live.pt")
    saved_thought = load_file(out / "thought_module.safetensors")
    for key, value in saved_thought.items():
        torch.testing.assert_close(value, live["trainable"][f"embedder.thought_module.{key}"].reshape(value.shape))
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_live = {n: v for n, v in live["trainable"].items() if "lora_" in n}
    lora_saved = {k: v for k, v in adapter.items() if "lora_" in k}
    assert len(lora_saved) == len(lora_live) > 0
    assert all(v.numel() > 0 and torch.isfinite(v).all() for v in adapter.values())
    # the embedding table is never resized (the tokenizer fits the tiny backbone's 512 rows)
    assert all(v.shape[0] == 512 for k, v in adapter.items() if "embed_tokens" in k or "lm_head" in k)

    exported = ThoughtEmbedder.from_pretrained(out).encode(ITEMS)
    assert torch.isfinite(exported).all()
    torch.testing.assert_close(exported, live["vectors"], rtol=1e-4, atol=1e-5)


# ---- CRRL: recipes/crrl.py itself under accelerate launch ------------------------------------------------------------
# The driver runs the recipe unchanged; it only wraps the recipe's `finish_training()` to record the live model first.
CRRL_DRIVER = textwrap.dedent(
    """
    import contextlib, json, runpy, sys
    import torch
    from conftest import ITEMS
    import reaemb_trl.builders as builders

    real_finish = builders.finish_training

    def offload(engine):
        # (optimizer state offloaded, parameters offloaded, the optimizer ZeRO wraps: DeepSpeedCPUAdam when offloaded)
        inner = getattr(engine.optimizer, "optimizer", None)
        devices = [getattr(c, "device", None) for c in (engine.zero_offload_optimizer(), engine.zero_offload_param())]
        return [str(getattr(d, "value", d) or "none") for d in devices] + [type(inner).__name__]

    def recording_finish(trainer, output_dir):
        engine, model = trainer.model_wrapped, trainer.model
        stage = engine.zero_optimization_stage()
        params = dict(model.named_parameters())
        held = {n: [p.numel(), int(getattr(p, "ds_numel", p.numel())), hasattr(p, "ds_id"), p.requires_grad]
                for n, p in params.items()}
        if stage == 3:
            import deepspeed
            gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
        else:
            gather = contextlib.nullcontext()
        with gather:
            live = {n: p.detach().clone() for n, p in params.items()}
        vectors = trainer.embedder.encode(ITEMS)  # through ZeRO-3's module hooks, on every rank
        if trainer.accelerator.is_main_process:
            torch.save({"vectors": vectors, "params": live}, output_dir + "/live.pt")
            report = {"stage": stage, "optimizer": type(engine.optimizer).__name__, "held": held,
                      "world": trainer.accelerator.num_processes, "offload": offload(engine),
                      "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
            json.dump(report, open(output_dir + "/report.json", "w"))
        real_finish(trainer, output_dir)

    builders.finish_training = recording_finish
    sys.argv = ["recipes/crrl.py", *sys.argv[1:]]
    runpy.run_path("recipes/crrl.py", run_name="__main__")
    """
)


@pytest.fixture(scope="module")
def lrcl_checkpoint(tmp_path_factory) -> Path:
    """A tiny LRCL checkpoint with a non-zero LoRA adapter, so that a frozen adapter that moved would show."""
    from peft import LoraConfig

    from reaemb_trl import ThoughtEmbedder

    torch.manual_seed(0)
    embedder = ThoughtEmbedder.from_backbone(
        str(REPO / "tests" / "assets" / "tiny-llama"),
        lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, param in embedder.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("lrcl") / "checkpoint"
    embedder.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def launches(request, tmp_path_factory, lrcl_checkpoint):
    """Starts, at once, the launch of every test of this module that the session runs (`-k` runs fewer)."""
    kinds = {test_lrcl_under_deepspeed_zero_saves_a_checkpoint_that_exports_the_same_embeddings: "lrcl",
             test_crrl_recipe_under_deepspeed_zero_trains_only_the_thought_module_and_saves_a_loadable_folder: "crrl",
             test_crrl_zero3_rollout_with_different_llm_call_counts_per_rank: "uneven"}  # fmt: skip
    runs = Launches()
    for item in request.session.items:
        kind = kinds.get(getattr(item, "function", None))
        if kind is None:
            continue
        params = getattr(item, "callspec", None)
        config, processes = (params.params["config"], params.params["processes"]) if params else UNEVEN_CASE
        out = tmp_path_factory.mktemp(f"{kind}-{config}-{processes}") / "run"
        out.mkdir()
        driver, args = {"lrcl": (DRIVER, (str(out),)),
                        "crrl": (CRRL_DRIVER, _crrl_args(lrcl_checkpoint, out, processes)),
                        "uneven": (UNEVEN_DRIVER, (str(lrcl_checkpoint), str(out)))}[kind]  # fmt: skip
        script = out.parent / "driver.py"
        script.write_text(driver)
        # The offload config compiles DeepSpeed's CPUAdam op on first use (minutes on 2 cores); later runs reuse it.
        timeout = 900 if "offload" in config else 600
        runs.start((kind, config, processes), _command(config, processes, script, args), out, processes, timeout)
    yield runs
    runs.stop()


def _crrl_args(lrcl: Path, out: Path, processes: int) -> tuple[str, ...]:
    # 4 items x 4 copies per step in all: the global batch (and so the items trained on) is the same for 1 and 2
    # processes. 4 steps = 2 rollouts x 2 policy iterations.
    return ("--config", "recipes/configs/crrl_tiny.yaml", "--lrcl_checkpoint", str(lrcl), "--output_dir", str(out),
            "--max_steps", "4", "--per_device_train_batch_size", str(16 // processes), "--save_strategy", "no",
            "--disable_tqdm", "true")  # fmt: skip


@pytest.mark.parametrize("config,stage,processes", CRRL_CASES)
def test_crrl_recipe_under_deepspeed_zero_trains_only_the_thought_module_and_saves_a_loadable_folder(
    launches, lrcl_checkpoint, config, stage, processes
):
    from safetensors.torch import load_file

    from reaemb_trl import ThoughtEmbedder

    out = launches.output("crrl", config, processes)
    report = json.loads((out / "report.json").read_text())
    assert report["stage"] == stage and report["world"] == processes
    assert report["optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")
    _check_offload(config, report)
    assert len(report["losses"]) == 2 and all(torch.isfinite(torch.tensor(report["losses"])))
    if stage == 3:  # every parameter, frozen LLM included, is a ZeRO-3 parameter
        assert all(is_zero3 and full > 0 for _, full, is_zero3, _ in report["held"].values()), report["held"]
    if config == "zero3_no_persistence":  # ... and a real partition: the local tensor is empty between steps
        assert all(local == 0 for local, _, _, _ in report["held"].values()), report["held"]

    # Only the thought module trains; every one of its tensors moved, and nothing else did (LoRA, base weights).
    trainable = {n for n, (_, _, _, grad) in report["held"].items() if grad}
    assert trainable and all(n.startswith("embedder.thought_module.") for n in trainable), trainable
    start = {f"embedder.{n}": p for n, p in ThoughtEmbedder.from_pretrained(lrcl_checkpoint).named_parameters()}
    live = torch.load(out / "live.pt")
    assert set(live["params"]) == set(start)
    assert any("lora_B" in n for n in start)
    for name, value in live["params"].items():
        same = torch.equal(value.reshape(-1), start[name].reshape(-1))
        assert same != (name in trainable), f"{name}: {'unchanged' if same else 'changed'}"

    saved = load_file(out / "thought_module.safetensors")
    assert {f"embedder.thought_module.{k}" for k in saved} == trainable
    for key, value in saved.items():
        torch.testing.assert_close(value, live["params"][f"embedder.thought_module.{key}"].reshape(value.shape))
    exported = ThoughtEmbedder.from_pretrained(out).encode(ITEMS)
    assert torch.isfinite(exported).all()
    torch.testing.assert_close(exported, live["vectors"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(exported, ThoughtEmbedder.from_pretrained(lrcl_checkpoint).encode(ITEMS))


UNEVEN_DRIVER = textwrap.dedent(
    """
    import json, sys
    from datasets import Dataset
    from reaemb_trl.crrl_config import CRRLConfig
    from reaemb_trl.crrl_trainer import CRRLTrainer
    from reaemb_trl.data.canonical import load_items

    lrcl, out = sys.argv[1], sys.argv[2]
    items = load_items("tests/assets/tiny_catalog")
    ids, attrs = items["item_id"], dict(zip(items["item_id"], items["attributes"]))
    # Rank 0 gets items 0 and 1, which share all their candidates; rank 1 gets items 2 and 3 with distinct ones.
    # The fast rollout deduplicates prefixes per process, so the ranks run different numbers of LLM calls.
    rows = [(ids[0], ids[10:14]), (ids[1], ids[10:14]), (ids[2], ids[20:24]), (ids[3], ids[30:34])]
    data = Dataset.from_list([{"item_id": i, "attributes": attrs[i], "candidate_ids": list(c),
                               "positive_weights": [1.0, 0.0, 0.0, 0.0]} for i, c in rows])
    args = CRRLConfig(output_dir=out, per_device_train_batch_size=8, num_generations=4, candidate_num=4,
                      noise_scale=0.3, max_steps=2, save_strategy="no", report_to="none", disable_tqdm=True,
                      embed_batch_size=2, shuffle_dataset=False, use_cpu=True, logging_steps=1)
    trainer = CRRLTrainer(lrcl, args, train_dataset=data, catalogue=items)
    trainer.train()
    gen = trainer._last_generation
    unique = len(set(gen["item_ids"]) | {c for row in gen["candidate_ids"] for c in row})
    json.dump({"unique": unique, "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]},
              open(f"{out}/rank{trainer.accelerator.process_index}.json", "w"))
    trainer.accelerator.end_training()
    """
)


def test_crrl_zero3_rollout_with_different_llm_call_counts_per_rank(launches):
    """ZeRO-3 all-gathers a layer's shard inside its forward; ranks that run different numbers of LLM calls in a
    rollout would pair those collectives up wrongly (gloo aborts, NCCL hangs) unless the rollout gathers once."""
    out = launches.output("uneven", *UNEVEN_CASE)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 6 vs 10 prefixes in chunks of 2: 3 vs 5 prefix passes
    assert ranks[0]["unique"] != ranks[1]["unique"], ranks
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 2
