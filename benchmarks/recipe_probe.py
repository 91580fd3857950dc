"""Run `recipes/lrcl.py` or `recipes/crrl.py` unchanged under `accelerate launch` and record what it trained.

    accelerate launch [--config_file accelerate_configs/...] -m benchmarks.recipe_probe lrcl --config ... [overrides]

`PROBE_DIR` (environment) names the folder for `report.json`. The probe wraps `Trainer.train` (trainable tensors
before, wall time) and the recipes' `finish_training()`: before the recipe saves, it records the losses, how the
parameters are held (ZeRO stage, FSDP2 DTensors), peak GPU memory, the full trainable tensors and, except under
FSDP, the embeddings of a few items from the live model; after the save, the main process reloads the folder with
`ThoughtEmbedder.from_pretrained` and compares tensors and embeddings with the live ones. Used by gpu_check.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROBE_ITEMS = [
    [("title", "Toy Story"), ("year", "1995"), ("genres", "Animation Children's Comedy")],
    [("title", "Golden Dragon"), ("categories", "Restaurants, Chinese"), ("city", "Phoenix"), ("stars", "4.5")],
    [("brand", "Acme"), ("price", "19.99"), ("description", "a small red kettle with a wooden handle")],
    [("title", "The quick brown fox"), ("year", "2001")],
]
state: dict = {}


def _full_trainable(trainer) -> dict[str, torch.Tensor]:
    """Every trainable tensor in full (float32, CPU), whatever holds it: ZeRO-3 partitions are gathered, FSDP2
    shards are assembled by accelerate's full state dict (a collective: every rank calls this)."""
    model = trainer.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainer.is_fsdp_enabled:
        full = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        return {n: full[n].float().cpu() for n in names if n in full}
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad])
    with gather:
        params = dict(model.named_parameters())
        return {n: params[n].detach().float().cpu().clone() for n in names}


def _holding(trainer) -> dict:
    """How parameters are held after training: wrapper, ZeRO stage, FSDP2 DTensors and their placements."""
    from torch.distributed.tensor import DTensor

    params = list(trainer.model_wrapped.parameters())
    dtensors = [p for p in params if isinstance(p, DTensor)]
    out = {"wrapper": type(trainer.model_wrapped).__name__, "parameters": len(params), "dtensors": len(dtensors),
           "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1]}  # fmt: skip
    if dtensors:
        out["placements"] = sorted({str(p.placements) for p in dtensors})
        out["mesh_size"] = dtensors[0].device_mesh.size()
        out["local_over_full_numel"] = sum(p.to_local().numel() for p in dtensors) / sum(p.numel() for p in dtensors)
    if trainer.is_deepspeed_enabled:
        out["zero_stage"] = trainer.model_wrapped.zero_optimization_stage()
        out["optimizer"] = type(trainer.model_wrapped.optimizer).__name__
    return out


def _wrap_train(real_train):
    def train(self, *args, **kwargs):
        params = self.model.named_parameters()
        state["before"] = {n: p.detach().float().cpu().clone() for n, p in params if p.requires_grad}
        start = time.perf_counter()
        result = real_train(self, *args, **kwargs)
        state["train_seconds"] = time.perf_counter() - start
        return result

    return train


def _wrap_finish(real_finish, recipe: str, probe_dir: Path):
    def finish(trainer, output_dir):
        accelerator = trainer.accelerator
        live = _full_trainable(trainer)
        vectors = None if trainer.is_fsdp_enabled else trainer.embedder.encode(PROBE_ITEMS).float().cpu()
        cuda = torch.cuda.is_available() and accelerator.device.type == "cuda"
        history = trainer.state.log_history
        # ZeRO-3 partitions parameters before training starts: those have no full "before" to compare with
        before = state["before"]
        comparable = [n for n, v in live.items() if n in before and before[n].shape == v.shape]
        key = "train_steps_per_second"
        report = {
            "recipe": recipe, "world": accelerator.num_processes, "holding": _holding(trainer),
            "steps": trainer.state.global_step, "losses": [h["loss"] for h in history if "loss" in h],
            "train_seconds": state.get("train_seconds"),
            "train_steps_per_second": next((h[key] for h in history if key in h), None),
            "trainable": len(live),
            "compared_with_start": len(comparable),
            "changed": sum(not torch.equal(live[n], before[n]) for n in comparable),
            "unchanged": [n for n in comparable if torch.equal(live[n], before[n])][:10],
            "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "max_memory_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        }  # fmt: skip
        real_finish(trainer, output_dir)  # saves, then ends the process group
        if accelerator.is_main_process:
            report.update(_reload_check(output_dir, live, vectors, accelerator.device))
            (probe_dir / "report.json").write_text(json.dumps(report, indent=2))

    return finish


def _reload_check(folder, live: dict, vectors, device) -> dict:
    """Reload the saved folder as a user would and compare it with the live model."""
    from reaemb_trl import ThoughtEmbedder

    loaded = ThoughtEmbedder.from_pretrained(folder, device=device)
    saved = {f"embedder.{n}": p.detach().float().cpu() for n, p in loaded.named_parameters()}
    # Trainable names as the trainer sees them (`embedder.model.base_model...lora_A.default.weight`); the reloaded
    # PeftModel uses the same names. LRCL's temperature is not part of the embedder.
    compared = [n for n in live if n in saved]
    tensor_diff = max(((live[n] - saved[n]).abs().max().item() for n in compared), default=None)
    out = {"reload_tensors_compared": len(compared), "reload_max_abs_tensor_diff": tensor_diff}
    reloaded = loaded.encode(PROBE_ITEMS).float().cpu()
    out["reload_embeddings_finite"] = bool(torch.isfinite(reloaded).all())
    if vectors is not None:
        out["reload_max_abs_embedding_diff"] = (reloaded - vectors).abs().max().item()
        out["embedding_max_abs"] = vectors.abs().max().item()
    return out


def main() -> None:
    recipe = sys.argv[1]
    if recipe not in ("lrcl", "crrl"):
        raise SystemExit("usage: accelerate launch ... -m benchmarks.recipe_probe lrcl|crrl [recipe arguments]")
    probe_dir = Path(os.environ.get("PROBE_DIR", "."))
    probe_dir.mkdir(parents=True, exist_ok=True)
    from transformers import Trainer

    import reaemb_trl.builders as builders

    Trainer.train = _wrap_train(Trainer.train)
    builders.finish_training = _wrap_finish(builders.finish_training, recipe, probe_dir)
    sys.argv = [f"recipes/{recipe}.py", *sys.argv[2:]]
    runpy.run_path(str(REPO / "recipes" / f"{recipe}.py"), run_name="__main__")


if __name__ == "__main__":
    main()
