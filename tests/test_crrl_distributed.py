"""Advantages (and the update) do not depend on the number of processes: 1 process x 8 rows == 2 processes x 4 rows.

`accelerate launch --cpu --num_processes 2` silently runs one process, so two CPU processes are launched with
`--multi_gpu` (gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent

SCRIPT = textwrap.dedent(
    '''
    import os
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    from accelerate.utils import gather_object
    from datasets import Dataset
    from conftest import tiny_embedder
    from test_crrl_trainer import CATALOGUE, candidates, dataset
    from reaemb_trl.crrl_config import CRRLConfig
    from reaemb_trl.crrl_trainer import CRRLTrainer

    per_device, out = int(sys.argv[1]), sys.argv[2]
    args = CRRLConfig(
        output_dir=out + "/run", per_device_train_batch_size=per_device, num_generations=4, candidate_num=4,
        max_steps=1, use_cpu=True, save_strategy="no", noise_scale=0.5, learning_rate=0.1, optim="sgd",
        num_iterations=1, reward_funcs=["softmax", "rank"], similarity="cosine", reward_temperature=0.05,
        disable_tqdm=True, report_to="none", seed=3, logging_steps=1,
    )
    trainer = CRRLTrainer(tiny_embedder(seed=0), args, train_dataset=dataset(), candidates=candidates())
    trainer.train()
    gen = trainer._last_generation
    items = gather_object(gen["item_ids"])
    actions = trainer.accelerator.gather(gen["actions"].contiguous())
    if trainer.accelerator.is_main_process:
        torch.save(
            dict(world=trainer.accelerator.num_processes, items=items, actions=actions.cpu(),
                 advantages=gen["advantages"].cpu(), rewards=gen["rewards_per_func"].cpu(),
                 thought_module={{k: v.detach().cpu().clone()
                                 for k, v in trainer.embedder.thought_module.state_dict().items()}}),
            out + "/result.pt",
        )
    trainer.accelerator.wait_for_everyone()
    # The result is written. Leave without the process group's C++ teardown: on a loaded 2-core machine it can abort
    # one rank after the work is done ("terminate called without an active exception"), which is not what this
    # test is about.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    '''
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], tmp: Path) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "result.pt", weights_only=False)


def test_same_advantages_and_update_for_one_and_two_processes(tmp_path):
    script = tmp_path / "crrl_ddp.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_dir.mkdir(), two_dir.mkdir()
    one = _run([sys.executable, str(script), "8", str(one_dir)], one_dir)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    two = _run(launcher + [str(script), "4", str(two_dir)], two_dir)
    assert (one["world"], two["world"]) == (1, 2)
    assert one["items"] == two["items"]  # the same global batch, groups in the same order
    torch.testing.assert_close(one["actions"], two["actions"])  # the same noise
    torch.testing.assert_close(one["rewards"], two["rewards"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one["advantages"], two["advantages"], atol=1e-5, rtol=1e-4)
    assert one["advantages"].abs().sum() > 0
    for name, value in one["thought_module"].items():
        torch.testing.assert_close(value, two["thought_module"][name], atol=1e-6, rtol=1e-5, msg=name)
