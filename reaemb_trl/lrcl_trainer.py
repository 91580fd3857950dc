"""LRCLTrainer: stage 1 of ReaEmb, contrastive training of the LLM (LoRA) and the latent thought module
(docs/method.md, "LRCL")."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import set_seed

from reaemb_trl.checkpointing import (
    EmbedderCheckpointMixin,
    load_temperature,
    save_temperature,
    save_wrapped_embedder,
)
from reaemb_trl.decoder_io import base_model_of
from reaemb_trl.embedder import ThoughtEmbedder
from reaemb_trl.hub import HubPushMixin
from reaemb_trl.lrcl_config import LRCLConfig
from reaemb_trl.distributed import gather_objects, gather_with_grad
from reaemb_trl.lrcl_loss import contrastive_loss
from reaemb_trl.prompt import normalise_attributes


def draw_views(attributes: Sequence[tuple[str, str]], drop_ratio: float, rng: np.random.Generator):
    """Two attribute-dropout views: each shuffles the attributes and drops floor(rho * n) of them.

    The second view is redrawn while it equals the first (possible whenever n >= 2: the order differs)."""
    attributes = list(attributes)
    n = len(attributes)
    keep = n - math.floor(drop_ratio * n)

    def view() -> list[tuple[str, str]]:
        return [attributes[i] for i in rng.permutation(n)[:keep]]

    first, second = view(), view()
    for _ in range(1000):
        if n < 2 or second != first or len(set(attributes)) < 2:
            break
        second = view()
    return first, second


def collate_items(rows: list[dict]) -> dict[str, list]:
    """Keep raw item rows: views are drawn afresh in the trainer every time an item is drawn."""
    missing = [col for col in ("item_id", "attributes") if col not in rows[0]]
    if missing:
        raise KeyError(f"item rows need columns 'item_id' and 'attributes'; missing {missing} in {sorted(rows[0])}")
    return {"item_id": [r["item_id"] for r in rows], "attributes": [r["attributes"] for r in rows]}


def lora_config(args: LRCLConfig, model: nn.Module | None = None):
    """The `peft.LoraConfig` that `args` describes; `model` (the backbone) is needed for `lora_layers`."""
    from peft import LoraConfig

    layers = None
    if args.lora_layers is not None:
        if model is None:
            raise ValueError("lora_layers needs the backbone to count its decoder layers")
        total = model.config.get_text_config().num_hidden_layers
        if args.lora_layers > total:
            raise ValueError(f"lora_layers={args.lora_layers} but the backbone has {total} decoder layers")
        layers = list(range(total - args.lora_layers, total))
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules),
        layers_to_transform=layers,
    )


def check_contrastive_batch(args: LRCLConfig, train_dataset) -> None:
    """LRCL's negatives are the other rows of a contrastive batch: with one row the loss and its gradient are 0 and
    training learns nothing (gradient accumulation adds no negatives)."""
    rows, world = args.per_device_train_batch_size, args.world_size
    if args.gather_negatives:
        rows *= world
    if rows < 2:
        more = f", or gather_negatives: true (then the rows of all {world} processes count)" if world > 1 else ""
        raise ValueError(
            f"LRCLConfig.per_device_train_batch_size={args.per_device_train_batch_size} gives {rows} row(s) per "
            "contrastive batch: LRCL needs >= 2 (the other rows are the negatives; with 1 the loss and gradient are 0, "
            f"and gradient accumulation adds no negatives). Set per_device_train_batch_size >= 2{more}"
        )
    if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) < 2:
        raise ValueError(f"train_dataset has {len(train_dataset)} item(s): LRCL needs >= 2 (in-batch negatives)")


def build_embedder(args: LRCLConfig) -> ThoughtEmbedder:
    """The backbone named in `args` with a fresh thought module and (by default) a fresh LoRA adapter."""
    embedder = args.backbone_embedder()
    if args.use_lora:
        embedder.attach_lora(lora_config(args, embedder.model))
    else:
        embedder.model.requires_grad_(False)
    return embedder


class LRCLModel(nn.Module):
    """The embedder plus the learnable temperature; its forward returns the loss components of one batch."""

    def __init__(self, embedder: ThoughtEmbedder, args: LRCLConfig):
        super().__init__()
        self.embedder = embedder
        # Shape (1,), not a 0-dim scalar: DeepSpeed broadcasts and partitions parameters through `p.view(uint8)`,
        # which fails on 0-dim tensors.
        self.temperature = nn.Parameter(
            torch.full((1,), float(args.init_temperature)), requires_grad=args.learn_temperature
        )
        self.args = args
        self.config = embedder.config  # read by Trainer

    def forward(self, prefix_ids_1: list[list[int]], prefix_ids_2: list[list[int]], item_ids: list) -> dict:
        embeddings = self.embedder(list(prefix_ids_1) + list(prefix_ids_2), method=self.args.forward_method)
        x, y = embeddings[: len(prefix_ids_1)], embeddings[len(prefix_ids_1) :]
        world = 1
        if self.args.gather_negatives:
            x, _ = gather_with_grad(x)
            y, _ = gather_with_grad(y)
            world = len(gather_objects([0]))
            item_ids = gather_objects(item_ids)
        tau = self.temperature.clamp(min=self.args.min_temperature).reshape(())
        out = contrastive_loss(
            x,
            y,
            tau,
            kind=self.args.loss_type,
            normalize=self.args.normalize_embeddings,
            center=self.args.center_embeddings,
            item_ids=list(item_ids),
        )
        if world > 1:
            # Every process computes the same global loss, but only its own rows carry gradient; DDP averages
            # the gradients, so scale them by the world size while keeping the logged value.
            out["loss"] = out["loss"] * world - out["loss"].detach() * (world - 1)
        return out

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """What Trainer (transformers >= 5.24) calls for `activation_checkpointing: true` (`gradient_checkpointing`
        before 5.24). Checkpointing turns the KV cache off, so the embedder then takes the literal two-pass path (same
        numbers, more compute)."""
        base = base_model_of(self.embedder.model)
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(
                activation_checkpointing_kwargs=activation_checkpointing_kwargs, every_n_layers=every_n_layers,
                offload=offload,
            )  # fmt: skip
        else:  # transformers < 5.24
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """What Trainer calls before transformers 5.24 (5.24 calls `activation_checkpointing_enable`)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, state_dict: dict | None = None) -> None:
        """An embedding checkpoint (loads with ThoughtEmbedder.from_pretrained) plus the temperature.

        `state_dict` (full, as gathered by DeepSpeed ZeRO-3 / FSDP, names as in `self.state_dict()`) is written
        instead of the live parameters when given. Under ZeRO-3 the live parameters are partitioned (their local
        tensors are empty), so the files are written straight from `state_dict`; nothing is copied into the
        live modules (that would write partitions, not weights)."""
        state = save_wrapped_embedder(self, folder, state_dict)
        if state is not None:
            save_temperature(folder, state.get("temperature", self.temperature))

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore trained weights from a checkpoint folder (used when resuming)."""
        self.embedder.load_trained_state(folder)
        with torch.no_grad():
            self.temperature.copy_(load_temperature(folder).reshape(self.temperature.shape))


class LRCLTrainer(EmbedderCheckpointMixin, HubPushMixin, Trainer):
    """Trains `ThoughtEmbedder`s contrastively on two attribute-dropout views of each item.

    `train_dataset` holds items (`item_id`, `attributes`); `model` is a ThoughtEmbedder, a backbone name, or None
    (then `args.model_name_or_path` is loaded). LoRA comes from `args` unless the model already has an adapter.
    """

    def __init__(
        self,
        model: ThoughtEmbedder | str | None = None,
        args: LRCLConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        args = args or LRCLConfig(output_dir="lrcl-output")
        check_contrastive_batch(args, train_dataset)
        set_seed(args.seed)  # LoRA and the thought module are initialised randomly
        if model is None or isinstance(model, str):
            if isinstance(model, str):
                args.model_name_or_path = model
            model = build_embedder(args)
        elif args.use_lora and not model.has_adapter:
            model.attach_lora(lora_config(args, model.model))
        elif not args.use_lora and not model.has_adapter:
            model.model.requires_grad_(False)
        if args.share_template is not None:
            model.share_template = args.share_template
        self.embedder = model
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._view_step, self._view_draws = -1, 0
        super().__init__(
            model=LRCLModel(model, args),
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collate_items,
            callbacks=callbacks,
            optimizers=optimizers,
        )

    # ---- loss -------------------------------------------------------------------------------------------------
    def _view_rng(self) -> np.random.Generator:
        """Seeded by (seed, step, micro-batch, process): views are fresh every draw and identical on resume."""
        if self._view_step != self.state.global_step:
            self._view_step, self._view_draws = self.state.global_step, 0
        self._view_draws += 1
        key = [self.args.seed, self.state.global_step, self._view_draws, self.accelerator.process_index]
        return np.random.default_rng(key)

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        rng = self._view_rng()
        formatter, tokenizer = self.embedder.formatter, self.embedder.tokenizer
        first, second = [], []
        for attributes in inputs["attributes"]:
            view_1, view_2 = draw_views(normalise_attributes(attributes), self.args.view_drop_ratio, rng)
            first.append(formatter.prefix_ids(view_1, tokenizer))
            second.append(formatter.prefix_ids(view_2, tokenizer))
        out = model(prefix_ids_1=first, prefix_ids_2=second, item_ids=list(inputs["item_id"]))
        prefix = "" if model.training else "eval_"
        for name, value in out.items():
            if name != "loss":
                self._metrics[prefix + name].append(float(value))
        self._metrics[prefix + "contrastive_loss"].append(float(out["loss"].detach()))
        return (out["loss"], out) if return_outputs else out["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics:
            names = sorted(self._metrics)
            local = torch.tensor([sum(self._metrics[n]) / len(self._metrics[n]) for n in names])
            averaged = self.accelerator.reduce(local.to(self.accelerator.device), reduction="mean").cpu()
            is_eval = any(k.startswith("eval_") for k in logs)
            logs = {**logs, **{n: v.item() for n, v in zip(names, averaged) if n.startswith("eval_") == is_eval}}
            for name in [n for n in names if n.startswith("eval_") == is_eval]:
                del self._metrics[name]
        super().log(logs, start_time)
