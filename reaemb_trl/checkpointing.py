"""Checkpoint I/O of both stages, in one place: the folder `ThoughtEmbedder.save_pretrained` writes and
`ThoughtEmbedder.from_pretrained` reads, the backbone loading they share, and what LRCLTrainer and CRRLTrainer add
(the trainer's model saved as an embedder, LRCL's temperature, the training arguments as JSON).

A checkpoint folder:
  reaemb_config.json           written last: a folder with it is complete
  thought_module.safetensors   the thought module's own state dict (q_proj.*, k_proj.*, v_proj.*; output_gain with
                               thought_scale "token")
  prompt_format.json, tokenizer files
  adapter/                     the LoRA adapter (peft), when the LLM has one
  backbone/                    the backbone weights, when they have no name to load them by
  lrcl_temperature.safetensors, training_config.json, training_args.bin: written by the trainers

Modules that only need the file names for checks and messages (the CLI, preflight, hub) import them inside functions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from reaemb_trl.atomic import write_atomic
from reaemb_trl.prompt import ItemPromptFormatter, add_thought_token
from reaemb_trl.thought_module import LatentThoughtModule

CONFIG_FILE = "reaemb_config.json"
THOUGHT_FILE = "thought_module.safetensors"
ADAPTER_DIR = "adapter"
BACKBONE_DIR = "backbone"
TEMPERATURE_FILE = "lrcl_temperature.safetensors"
TRAINING_CONFIG_FILE = "training_config.json"  # the TrainingArguments as JSON: readable without unpickling


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read; the message names the file and what to do."""


# ---- loading --------------------------------------------------------------------------------------------------
def quantization_config(kind: str):
    from transformers import BitsAndBytesConfig

    if kind != "4bit":
        raise ValueError(f"quantization must be '4bit' (bitsandbytes nf4), got {kind!r}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_causal_lm(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    quantization: str | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A causal LM from a hub id or folder; `quantization="4bit"` loads it in bitsandbytes nf4, ready for QLoRA."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        kwargs["quantization_config"] = quantization_config(quantization)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


@contextmanager
def quiet_peft():
    """peft (<= 0.22) reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model: a
    FutureWarning on every run that no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def read_config(folder: str | os.PathLike) -> dict:
    file = Path(folder) / CONFIG_FILE
    if not file.exists():
        raise FileNotFoundError(f"{folder} is not a reaemb-trl checkpoint: {CONFIG_FILE} is missing")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problem = exc
    raise CheckpointError(f"{file} is not readable JSON ({problem}): the checkpoint is damaged; save it again")


def load_thought_state(module: LatentThoughtModule, folder: str | os.PathLike) -> LatentThoughtModule:
    """Load the thought module file of checkpoint `folder` into `module`; a damaged file is one clear error."""
    file = Path(folder) / THOUGHT_FILE
    try:
        module.load_state_dict(load_file(file))
        return module
    except (SafetensorError, RuntimeError) as exc:  # not a safetensors file / not this module's weights
        reason = " ".join(str(exc).split())[:200]
    raise CheckpointError(
        f"{file} is damaged or is not this checkpoint's thought module ({reason}): copy the checkpoint folder again, "
        "or re-export / retrain it"
    )


def load_embedder(cls, folder: str | os.PathLike, *, backbone=None, dtype=None, is_trainable=False, device=None):
    """`cls` (ThoughtEmbedder) from a checkpoint folder written by `save_embedder` (LRCL or CRRL); the options are
    `ThoughtEmbedder.from_pretrained`'s."""
    from transformers import AutoTokenizer

    from reaemb_trl.assets import resolve_model_path

    folder = Path(folder)
    config = read_config(folder)
    in_folder = bool(config.get("backbone_in_folder"))
    path = str(folder / BACKBONE_DIR) if in_folder else resolve_model_path(backbone or config["backbone"])
    model = load_causal_lm(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    add_thought_token(tokenizer, model)
    if config["adapter"]:
        from peft import PeftModel

        with quiet_peft():
            model = PeftModel.from_pretrained(model, folder / ADAPTER_DIR, is_trainable=is_trainable)
    # thought_keys / thought_scale: absent from checkpoints written before they existed, which used the defaults
    module = LatentThoughtModule(config["hidden_size"], config["rope_base"], config.get("thought_keys", "all"),
                                 config.get("thought_scale", "none"))
    thought_module = load_thought_state(module, folder)
    embedder = cls(
        model,
        tokenizer,
        thought_module=thought_module,
        formatter=ItemPromptFormatter.load(folder),
        pooling=config["pooling"],
        backbone=None if in_folder else config["backbone"],
    )
    if device is not None:
        embedder.to(device)
    return embedder.train(is_trainable)


def adapter_weights_file(folder: str | os.PathLike) -> Path:
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    return Path(folder) / ADAPTER_DIR / SAFETENSORS_WEIGHTS_NAME


def same_adapter(embedder, folder: str | os.PathLike) -> bool:
    """Whether checkpoint `folder` carries exactly `embedder`'s LoRA weights (or both have none)."""
    from peft import get_peft_model_state_dict

    file = adapter_weights_file(folder)
    if not embedder.has_adapter or not file.exists():
        return not embedder.has_adapter and not file.exists()
    theirs = load_file(file)
    # as saved: without the (resized) embedding layers, which the LoRA checkpoint never holds
    mine = get_peft_model_state_dict(embedder.model, save_embedding_layers=False)
    mine = {k: v.detach().cpu() for k, v in mine.items()}
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def load_trained_state(embedder, folder: str | os.PathLike, adapter: bool = True) -> None:
    """The thought module of checkpoint `folder`, and its LoRA adapter when `adapter` and it has one, into
    `embedder` (resuming)."""
    from peft import set_peft_model_state_dict

    load_thought_state(embedder.thought_module, folder)
    adapter_file = adapter_weights_file(folder)
    if adapter and adapter_file.exists():
        set_peft_model_state_dict(embedder.model, load_file(adapter_file))


def load_temperature(folder: str | os.PathLike) -> torch.Tensor:
    return load_file(Path(folder) / TEMPERATURE_FILE)["temperature"]


# ---- saving ---------------------------------------------------------------------------------------------------
def save_embedder(
    embedder, folder: str | os.PathLike, include_backbone: bool | None = None, state_dict: dict | None = None
) -> None:
    """Write adapter, thought module, prompt format, tokenizer and config of `embedder` into `folder`.

    The backbone weights are stored too when `include_backbone` is true, or when the backbone has no name that can be
    loaded again (e.g. a model built in-process). `state_dict` (names as in `embedder.state_dict()`: `model.*`,
    `thought_module.*`) is written instead of the live weights when given: under DeepSpeed ZeRO-3 the live parameters
    are partitioned (empty local tensors) and the gathered full state dict is the only copy."""
    folder = Path(folder)
    if include_backbone is None:
        include_backbone = embedder.backbone is None
    model_state = module_state = None
    if state_dict is not None:
        model_state = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        prefix = "thought_module."
        module_state = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        missing = sorted(set(embedder.thought_module.state_dict()) - set(module_state))
        if missing:
            raise KeyError(f"state_dict lacks thought-module weights {missing}; keys: {sorted(state_dict)[:5]}...")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".reaemb-save-", dir=folder))
    try:
        # The file holds the module's own keys (q_proj.weight, ...), not the embedder's `thought_module.*` names.
        source = module_state if module_state is not None else embedder.thought_module.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in source.items()}, staging / THOUGHT_FILE)
        embedder.formatter.save(staging)
        embedder.tokenizer.save_pretrained(staging)
        has_adapter = embedder.has_adapter
        if has_adapter:
            # The row grown for the thought token is never read (the thought vector replaces it), so the
            # embedding table is not part of the adapter.
            embedder.model.save_pretrained(staging / ADAPTER_DIR, state_dict=model_state, save_embedding_layers=False)
        if include_backbone:
            _save_base_weights(embedder.model, staging / BACKBONE_DIR, model_state)
        config = {
            "format": "reaemb-trl/1",
            "backbone": None if include_backbone else embedder.backbone,
            "backbone_in_folder": include_backbone,
            "pooling": embedder.pooling,
            "hidden_size": embedder.thought_module.hidden_size,
            "rope_base": embedder.thought_module.rope_base,
            "thought_keys": embedder.thought_module.keys,
            "thought_scale": embedder.thought_module.scale,
            "adapter": has_adapter,
            "architecture": (embedder.config.architectures or [None])[0],
        }
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        # Move entries in one by one (the folder may also hold Trainer checkpoints and logs); the config
        # goes last, so a folder with a config is always complete.
        (folder / CONFIG_FILE).unlink(missing_ok=True)
        for entry in sorted(staging.iterdir(), key=lambda p: p.name == CONFIG_FILE):
            target = folder / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_base_weights(model, folder: Path, state_dict: dict | None = None) -> None:
    """Save the backbone without any LoRA layers (peft renames wrapped weights to `*.base_layer.*`).

    `state_dict` (names as in `model.state_dict()`) replaces the live weights when given."""
    is_peft = hasattr(model, "peft_config")
    base = model.get_base_model() if is_peft else model
    if state_dict is None:
        source = base.state_dict()
    else:
        prefix = "base_model.model." if is_peft else ""
        source = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    state = {k.replace(".base_layer", ""): v for k, v in source.items() if "lora_" not in k}
    base.save_pretrained(folder, state_dict=state)


def save_wrapped_embedder(wrapper: nn.Module, folder: str | os.PathLike, state_dict: dict | None) -> dict | None:
    """Save `wrapper.embedder` (a trainer's model: LRCLModel, CRRLPolicy) into `folder`.

    `state_dict`: the full state dict Trainer passes under DeepSpeed ZeRO-3 / FSDP (names as in
    `wrapper.state_dict()`). The files are written straight from it: the live parameters are empty partitions
    then. Returns the (prefix-stripped) state dict used, or None when nothing could be written: ZeRO-3 without
    `zero3_save_16bit_model` passes `{}`, and DeepSpeed's own checkpoint holds the weights."""
    if state_dict:
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        missing = sorted(n for n, p in wrapper.named_parameters() if p.requires_grad and n not in state_dict)
        if missing:
            raise KeyError(f"state_dict lacks trainable weights {missing[:5]} (of {len(missing)})")
        prefix = "embedder."
        embedder_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        save_embedder(wrapper.embedder, folder, state_dict=embedder_state)
        return state_dict
    if any(hasattr(p, "ds_numel") for p in wrapper.parameters()):
        logging.getLogger(__name__).warning(
            "DeepSpeed ZeRO-3 without zero3_save_16bit_model: no embedding checkpoint written to %s; set "
            "zero3_save_16bit_model: true (accelerate_configs/deepspeed_zero3.yaml) to get a loadable folder",
            folder,
        )
        return None
    save_embedder(wrapper.embedder, folder)
    return dict(wrapper.state_dict())


def save_temperature(folder: str | os.PathLike, temperature: torch.Tensor) -> None:
    temperature = temperature.detach().float().cpu().reshape(1)
    write_atomic(Path(folder) / TEMPERATURE_FILE, lambda tmp: save_file({"temperature": temperature}, tmp))


def save_training_config(folder: str | os.PathLike, args) -> None:
    """`args` (TrainingArguments) as JSON: what `reaemb push` and model cards read, no pickle needed."""
    text = json.dumps(args.to_dict(), indent=2, sort_keys=True, default=str) + "\n"
    write_atomic(Path(folder) / TRAINING_CONFIG_FILE, lambda tmp: tmp.write_text(text))


class EmbedderCheckpointMixin:
    """For Trainer subclasses whose model wraps a ThoughtEmbedder and has `save_pretrained(folder, state_dict)` and
    `load_checkpoint(folder)`: Trainer's own saving would write a bare state dict nobody can load as an embedder."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        save_training_config(output_dir, self.args)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.accelerator.unwrap_model(model or self.model).load_checkpoint(resume_from_checkpoint)
