"""One CRRL step on the tiny fixture for tests/test_crrl_distributed.py: called in the test's own process (1 process x
8 rows), and run as each process of `accelerate launch --multi_gpu --num_processes 2 tests/crrl_step_driver.py 4 OUT`
(2 x 4 rows). Run as a script, Python puts tests/ on sys.path, so the fixtures import as they do in the tests."""

from __future__ import annotations

import os
import sys

import torch


def crrl_step(per_device: int, out: str) -> dict | None:
    """Train one step; on the main process, what the comparison needs (gathered over processes)."""
    from accelerate.utils import gather_object

    from conftest import tiny_embedder
    from reaemb_trl.crrl_config import CRRLConfig
    from reaemb_trl.crrl_trainer import CRRLTrainer
    from test_crrl_trainer import candidates, dataset

    args = CRRLConfig(
        output_dir=out + "/run", per_device_train_batch_size=per_device, num_generations=4, candidate_num=4,
        max_steps=1, use_cpu=True, save_strategy="no", noise_scale=0.5, learning_rate=0.1, optim="sgd",
        num_iterations=1, reward_funcs=["softmax", "rank"], similarity="cosine", reward_temperature=0.05,
        disable_tqdm=True, report_to="none", seed=3, logging_steps=1,
    )  # fmt: skip
    trainer = CRRLTrainer(tiny_embedder(seed=0), args, train_dataset=dataset(), candidates=candidates())
    trainer.train()
    gen = trainer._last_generation
    items = gather_object(gen["item_ids"])
    actions = trainer.accelerator.gather(gen["actions"].contiguous())
    result = None
    if trainer.accelerator.is_main_process:
        result = dict(world=trainer.accelerator.num_processes, items=items, actions=actions.cpu(),
                      advantages=gen["advantages"].cpu(), rewards=gen["rewards_per_func"].cpu(),
                      thought_module={k: v.detach().cpu().clone()
                                      for k, v in trainer.embedder.thought_module.state_dict().items()})  # fmt: skip
    trainer.accelerator.wait_for_everyone()
    return result


if __name__ == "__main__":
    per_device, out = int(sys.argv[1]), sys.argv[2]
    result = crrl_step(per_device, out)
    if result is not None:
        torch.save(result, out + "/result.pt")
    # The result is written. Leave without the process group's C++ teardown: on a loaded 2-core machine it can abort
    # one rank after the work is done ("terminate called without an active exception"), which is not what this
    # test is about.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
