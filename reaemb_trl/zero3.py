"""DeepSpeed ZeRO-3 helpers for trainers that run extra LLM passes outside the engine's forward (CRRL rollouts)."""

from __future__ import annotations

from contextlib import contextmanager


def is_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


@contextmanager
def gathered_for_rollout(engine, accelerator, gather: bool = True):
    """Full weights on every rank for the duration of a rollout, with ZeRO-3's per-module hooks removed.

    ZeRO-3 all-gathers each layer's shard inside that layer's forward, a collective every rank must join. CRRL
    rollouts deduplicate prefixes per process, so ranks make different numbers of LLM calls and those all-gathers
    would pair up wrongly (gloo aborts, NCCL hangs). Gathering once, as TRL does for generation, makes the rollout
    collective-free. No-op without ZeRO-3."""
    if not is_zero3(accelerator):
        yield
        return
    if not gather:
        if accelerator.num_processes > 1:
            raise ValueError(
                "ds3_gather_for_generation=False is not supported by CRRL with several processes under ZeRO-3: "
                "ranks run different numbers of LLM passes per rollout, which deadlocks ZeRO-3's per-layer all-gathers"
            )
        yield
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(list(engine.parameters())):
        remove_hooks(engine)
        try:
            yield
        finally:
            add_hooks(engine)
