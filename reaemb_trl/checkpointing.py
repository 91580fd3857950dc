"""What LRCLTrainer and CRRLTrainer share about checkpoints: a folder that ThoughtEmbedder.from_pretrained loads."""

from __future__ import annotations

import os

import torch
from transformers.trainer import TRAINING_ARGS_NAME


class EmbedderCheckpointMixin:
    """For Trainer subclasses whose model wraps a ThoughtEmbedder and has `save_pretrained(folder, state_dict)` and
    `load_checkpoint(folder)`: Trainer's own saving would write a bare state dict nobody can load as an embedder."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.accelerator.unwrap_model(model or self.model).load_checkpoint(resume_from_checkpoint)
