"""CRRLTrainer: stage 2 of ReaEmb, GRPO on the latent thought (docs/method.md, "CRRL"), a `trl.GRPOTrainer` subclass.

The "generations" of a group are Gaussian perturbations of the thought vector: copy g of item a takes the action
`z_g = mu_theta(x_a) + sigma * eps_g` (copy 0 noise-free when `anchor_copy`), its embedding `e_g` is the pooled LLM
output with thought z_g, and rewards score `e_g` against co-occurrence candidates. The policy is Gaussian,
`log pi(z | x) = -||z - mu_theta(x)||^2 / (2 sigma^2)` (+ const), one ratio per row, PPO-clipped as in TRL.

How it hooks into GRPOTrainer (TRL 1.16):

- `__init__` does NOT run `GRPOTrainer.__init__` (its tokenizer / generation / LM-head / vLLM setup assumes a
  causal LM producing text). `_init_grpo_state` sets, in one place, the attributes that the GRPOTrainer methods
  CRRL inherits read; `tests/test_trl_coupling.py` reads those methods' source in the installed TRL and fails,
  naming the attribute, when one is missing. Then `_BaseTrainer.__init__` (i.e. `transformers.Trainer`) runs.
- Kept from GRPOTrainer unchanged: `get_train_dataloader`, `_get_train_sampler` (RepeatSampler: G consecutive
  copies of an item, the same order on every process), `_prepare_inputs` (generation every
  `steps_per_generation * num_iterations` steps, `_buffered_inputs`), `training_step`, `compute_loss`,
  `prediction_step`, `log` (the `_metrics` averaging).
- Overridden: `_generate_and_score_completions` (latent actions instead of text), `_compute_loss` (Gaussian
  log-prob, no LLM pass), `evaluate` (the frozen yardstick of `crrl_yardstick` when items are held out),
  `_save` / `_load_from_checkpoint` (a `ThoughtEmbedder` checkpoint folder), `create_model_card` (no LM card).
  Rewards are computed by `_latent_rewards` (TRL's reward contract; the keyword arguments are the fields of
  `rewards.RewardInputs` plus the dataset's columns).

Elsewhere: the policy maths and `CRRLPolicy` in `crrl_policy` (its low-rank delta in `thought_delta`), the LLM
passes in `crrl_rollout` (prefix cache: `prefix_store`), the rewards in `rewards`, the similarity in `similarity`.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from accelerate.utils import gather, gather_object
from transformers import Trainer
from transformers.trainer_utils import set_seed
from trl import GRPOTrainer
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import identity, nanstd

from reaemb_trl.candidates import CooccurrenceCandidates
from reaemb_trl.checkpointing import EmbedderCheckpointMixin
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.crrl_policy import (
    CRRLPolicy,
    action_noise,
    clipped_policy_loss,
    compute_advantages,
    gaussian_kl,
    gaussian_log_prob,
    sigma_rms,
    sigma_units,
)
from reaemb_trl.crrl_rollout import CatalogueReference, RolloutEncoder, build_catalogue, row_candidates
from reaemb_trl.embedder import ThoughtEmbedder
from reaemb_trl.hub import HubPushMixin
from reaemb_trl.rewards import CollaborativeTable, RewardInputs, resolve_rewards, reward_name, reward_weights
from reaemb_trl.similarity import similarity_matrix
from reaemb_trl.zero3 import gathered_for_rollout


class CRRLTrainer(EmbedderCheckpointMixin, HubPushMixin, GRPOTrainer):
    """GRPO on the latent thought of a `ThoughtEmbedder`; only the thought module trains (optionally LoRA too).

    Args:
        model: a ThoughtEmbedder, a checkpoint folder (LRCL output) or None (`args.lrcl_checkpoint`).
        args: `CRRLConfig`.
        train_dataset: `datasets.Dataset` with `item_id` (and `attributes`) per item; optional columns
            `candidate_ids` (N ids) and `positive_weights` (N floats, > 0 marks a positive) fix the candidates of a
            row, otherwise `candidates` draws them. Other columns are passed to the reward functions.
        candidates: a `CooccurrenceCandidates` index (positives fixed, negatives redrawn every epoch).
        catalogue: id -> attributes of every item that can be a candidate (default: the train/eval datasets).
        reward_funcs: callables or names; default `args.reward_funcs`.
        yardstick: a `crrl_yardstick.CRRLYardstick`; when given, `evaluate()` scores it (on held-out items) instead of
            running rollouts on `eval_dataset`.
    """

    _tag_names = ["trl", "grpo", "reaemb", "crrl"]
    _name = "CRRL"

    def __init__(
        self,
        model: ThoughtEmbedder | str | os.PathLike | None = None,
        args: CRRLConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        candidates: CooccurrenceCandidates | None = None,
        catalogue=None,
        reward_funcs: Sequence[Any] | Any | None = None,
        callbacks=None,
        optimizers=(None, None),
        yardstick=None,
    ):
        args = args or CRRLConfig(output_dir="crrl-output")
        if not isinstance(args, CRRLConfig):
            raise TypeError(f"args must be a CRRLConfig, got {type(args).__name__}")
        set_seed(args.seed)
        policy = CRRLPolicy.for_training(model, args)
        self.embedder = embedder = policy.embedder

        # ---- rewards (TRL attributes) ---------------------------------------------------------------------------
        self.reward_funcs = resolve_rewards(args.reward_funcs if reward_funcs is None else reward_funcs)
        self.reward_func_names = [reward_name(f) for f in self.reward_funcs]
        self.reward_weights = reward_weights(args.reward_weights, len(self.reward_funcs))
        self.reward_processing_classes = [None] * len(self.reward_funcs)
        self.collaborative_table = CollaborativeTable.load(args.collaborative_table) if args.collaborative_table else None

        # ---- data: candidates and the catalogue ------------------------------------------------------------------
        self.candidates = candidates
        columns = set(getattr(train_dataset, "column_names", None) or [])
        if train_dataset is not None and "item_id" not in columns:
            raise KeyError(f"train_dataset needs an 'item_id' column; it has {sorted(columns)}")
        if train_dataset is not None and candidates is None and "candidate_ids" not in columns:
            raise ValueError("give `candidates` (a CooccurrenceCandidates index) or a `candidate_ids` column")
        self.encoder = RolloutEncoder(embedder, build_catalogue(train_dataset, eval_dataset, catalogue), args)
        self.yardstick = yardstick
        self._prefix_cache: dict[str, tuple] = {}  # fast path: (hidden, mask, item spans), what the loss reads
        self._reference: CatalogueReference | None = None
        self._spread: tuple[int, torch.Tensor] | None = None  # (step measured, per-coordinate std of mu)
        self._rollout_global_step = -1
        self._eval_generations = 0
        self._last_generation: dict[str, Any] = {}

        self._init_grpo_state(args)
        _BaseTrainer.__init__(
            self,
            model=policy,
            args=args,
            data_collator=identity,  # rows stay dicts, as in GRPO
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=embedder.tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.ref_thought_module = None  # the starting thought module, for the KL term
        if self.beta != 0.0:
            self.ref_thought_module = copy.deepcopy(embedder.thought_module).requires_grad_(False).to(
                self.accelerator.device)

    def _init_grpo_state(self, args: CRRLConfig) -> None:
        """The state GRPOTrainer.__init__ would set and that the GRPOTrainer methods CRRL inherits read.

        This is the one place that couples CRRL to GRPOTrainer's private attributes: when moving TRL's pin, run
        tests/test_trl_coupling.py, which lists the attributes those methods read in the installed TRL."""
        self.num_generations = args.num_generations
        self.num_generations_eval = args.num_generations_eval or self.num_generations
        self.num_iterations = args.num_iterations
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self.beta = args.beta
        self.loss_type = args.loss_type
        self.scale_rewards = args.scale_rewards
        self.multi_objective_aggregation = args.multi_objective_aggregation
        self.importance_sampling_level = args.importance_sampling_level
        self.shuffle_dataset = args.shuffle_dataset
        self.max_completion_length = args.max_completion_length
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.environment_factories = None
        self.environments = None
        self._multi_environment = False
        self.tools = []
        self.rollout_func = None
        self._has_async_funcs = False
        self.ref_model = None
        self.use_adaptive_entropy = False
        self.entropy_coef = 0.0
        self._last_world_entropy = None
        self._entropy_bonus_enabled = False
        self.aux_loss_enabled = False
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self._step = 0
        self._buffered_inputs = None
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        self._current_train_step_time = 0.0
        if args.log_completions:
            warnings.warn("log_completions is not supported by CRRL (there are no text completions); ignoring it")
        self.log_completions = False
        self.log_multimodal = False
        self.log_unique_prompts = False
        self.num_completions_to_print = args.num_completions_to_print
        self._logs = {"advantages": [], "rewards": defaultdict(list), "extra": defaultdict(list)}
        self._pending_extra_logs = defaultdict(list)
        self._pending_metrics = defaultdict(list)

    # ---- data ---------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["item_id", "attributes", "candidate_ids", "positive_weights"]

    # ---- the catalogue table: reference candidates, the centre of centred cosine, the yardstick ----------------
    @torch.no_grad()
    def _noise_free(self, encode):
        """`encode()` under the run's mixed precision, weights gathered under ZeRO-3, the policy's mode kept."""
        policy = self.accelerator.unwrap_model(self.model)
        training = policy.training
        with self.accelerator.autocast(), gathered_for_rollout(self.model_wrapped, self.accelerator,
                                                               self.args.ds3_gather_for_generation):
            out = encode()
        policy.train(training)  # encode() restores the embedder's mode; the policy keeps the frozen LLM in eval
        return out

    def catalogue_table(self) -> tuple[list[str], torch.Tensor]:
        """Noise-free embeddings of every catalogue item under the current thought module (float32, on device)."""
        ids, table = self._noise_free(self.encoder.catalogue_table)
        return ids, table.to(self.accelerator.device)

    def _thought_spread(self) -> torch.Tensor | None:
        """noise_scale_mode=spread: each coordinate's std of mu over the training items, measured at the first
        rollout and again when the reference table is (every `reference_refresh_steps` steps; once with 0)."""
        if self.args.noise_scale_mode != "spread":
            return None
        step, every = self.state.global_step, self.args.reference_refresh_steps
        if self._spread is None or (every > 0 and step - self._spread[0] >= every):
            items = [str(i) for i in self.train_dataset["item_id"]]
            self._spread = (step, self._noise_free(lambda: self.encoder.thought_spread(items)))
        return self._spread[1]

    def _needs_reference(self) -> bool:
        return self.args.reference_refresh_steps > 0 or self.args.similarity == "centered_cosine"

    def _refresh_reference(self) -> None:
        """(Re)compute the catalogue table when due: at the start, then every `reference_refresh_steps` steps."""
        step, every = self.state.global_step, self.args.reference_refresh_steps
        if self._reference is not None and (every == 0 or step - self._reference.step < every):
            return
        self._reference = CatalogueReference(step, *self.catalogue_table())

    def _similarities(self, items: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        kind = self.args.similarity
        center = self._reference.center.to(items.device) if kind == "centered_cosine" else None
        return similarity_matrix(items, cands, kind, center)

    # ---- the latent rollout ------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        n = len(inputs)
        item_ids = [str(x["item_id"]) for x in inputs]
        # Rows of the global generation batch are the processes' local batches in process order; groups are G
        # consecutive rows of it (RepeatSampler), so (group, copy) do not depend on the number of processes.
        global_rows = np.arange(n) + self.accelerator.process_index * n
        groups, copies = (global_rows // G).tolist(), (global_rows % G).tolist()
        if mode == "train":
            step_key = f"train|{self.state.global_step}|{self._step % max(1, self.args.gradient_accumulation_steps)}"
            self._rollout_global_step = self.state.global_step
        else:
            step_key = f"eval|{self.state.global_step}|{self._eval_generations}"
            self._eval_generations += 1
        if self._needs_reference():
            self._refresh_reference()
        spread = self._thought_spread()
        epoch = int(self.state.epoch or 0) if mode == "train" else 0  # negatives are redrawn every training epoch
        candidate_ids, positive_weights = row_candidates(inputs, self.candidates, epoch)
        eps = action_noise(
            self.args.noise_seed, step_key, groups, copies, item_ids, self.embedder.thought_module.hidden_size,
            anchor_copy=self.args.anchor_copy, antithetic=self.args.antithetic,
        )
        literal = self.args.forward_method == "literal"
        # The LLM passes run under the run's mixed precision (bf16/fp16); the thought module always in float32.
        # Under ZeRO-3 the weights are gathered once per rollout: ranks make different numbers of LLM calls.
        rollout_weights = gathered_for_rollout(self.model_wrapped, self.accelerator, self.args.ds3_gather_for_generation)
        reference = self._reference if self.args.reference_refresh_steps > 0 else None  # the candidates' embeddings
        embed = self.encoder.embed_literal if literal else self.encoder.embed_fast
        with torch.no_grad(), self.accelerator.autocast(), rollout_weights:
            rollout = embed(item_ids, candidate_ids, eps, reference, self.ref_thought_module, spread)
            mu, sigma, z = rollout.mu, rollout.sigma, rollout.actions
            item_emb, cand_emb = rollout.item_embeddings, rollout.candidate_embeddings
            similarities = self._similarities(item_emb, cand_emb)
            old_logps = gaussian_log_prob(z, mu, sigma)
        if rollout.prefix_states is not None:
            self._prefix_cache[mode] = rollout.prefix_states

        positive_weights = positive_weights.to(device)
        reward_inputs = RewardInputs(
            item_ids=item_ids, copy_index=copies, candidate_ids=candidate_ids, positive_mask=positive_weights > 0,
            positive_weights=positive_weights, item_embeddings=item_emb, candidate_embeddings=cand_emb,
            similarities=similarities, similarity=self.args.similarity, actions=z,
            reward_temperature=self.args.reward_temperature, collaborative_table=self.collaborative_table,
            trainer_state=self.state, log_extra=self._log_completion_extra, log_metric=self._log_metric,
        )
        rewards_per_func = self._latent_rewards(inputs, reward_inputs)  # gathered: (global rows, F)
        advantages, rewards, is_std_zero = compute_advantages(
            rewards_per_func, self.reward_weights, G, self.scale_rewards, self.multi_objective_aggregation,
            self.args.advantage_baseline, self.args.anchor_copy,
        )
        process_slice = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        all_advantages = advantages.clone()
        advantages = advantages[process_slice]
        self._log_rollout_metrics(mode, G, rewards_per_func, rewards, is_std_zero, mu, sigma, similarities,
                                  positive_weights)

        self._last_generation = dict(  # the whole rollout, for tests and benchmarks
            item_ids=item_ids, copy_index=copies, candidate_ids=candidate_ids, eps=eps, mu=mu, sigma=sigma, actions=z,
            item_embeddings=item_emb, candidate_embeddings=cand_emb, similarities=similarities,
            rewards_per_func=rewards_per_func, advantages=all_advantages, old_logps=old_logps,
        )

        output: dict[str, Any] = {
            "actions": z.to(device), "advantages": advantages.to(device), "sigma": sigma.to(device),
            "mu": mu.to(device), "old_logps": old_logps.to(device),
            # The policy loss's own log-prob at its first use replaces `old_logps` when no update has happened since
            # this rollout (see _compute_loss): then the first iteration's ratio is exactly 1.
            "first_use": torch.ones(n, dtype=torch.bool, device=device),
        }
        if rollout.ref_mu is not None:
            output["ref_mu"] = rollout.ref_mu.to(device)
        if literal or self.args.train_lora:
            output["prefix_ids"] = [self.encoder.prefix_ids(i) for i in item_ids]
        else:
            output["prefix_index"] = rollout.prefix_index
        return output

    def _log_rollout_metrics(self, mode, G, rewards_per_func, rewards, is_std_zero, mu, sigma, similarities,
                             positive_weights) -> None:
        metrics = self._metrics[mode]
        device = self.accelerator.device
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, i]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        metrics["frac_reward_zero_std"].append(is_std_zero.float().mean().item())
        if self.args.anchor_copy and G > 2:
            # groups whose noisy copies all score alike while the anchor scores differently: no usable signal
            grouped = rewards.view(-1, G)
            noisy_flat = (grouped[:, 1:] == grouped[:, 1:2]).all(dim=1)
            metrics["frac_anchor_only_differs"].append((noisy_flat & (grouped[:, 0] != grouped[:, 1])).float().mean().item())
        anchor_sim = similarities.gather(1, positive_weights.argmax(-1, keepdim=True)).squeeze(1)
        rms, sigma = mu.norm(dim=-1) / mu.shape[-1] ** 0.5, sigma_rms(sigma)
        metrics["thought/mu_norm"].append(self.accelerator.gather(mu.norm(dim=-1)).mean().item())
        metrics["thought/sigma"].append(self.accelerator.gather(sigma).mean().item())
        metrics["thought/sigma_over_rms_mu"].append(self.accelerator.gather(sigma / rms.clamp(min=1e-12)).mean().item())
        metrics["similarity/positive_mean"].append(self.accelerator.gather(anchor_sim).mean().item())
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            stats = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=device)
            total, count = self.accelerator.gather(stats).view(-1, 2).sum(dim=0).tolist()
            metrics[name].append(total / max(count, 1))
        self._pending_metrics.clear()
        self._pending_extra_logs.clear()

    def _latent_rewards(self, inputs: list[dict], reward_inputs: RewardInputs) -> torch.Tensor:
        """TRL's reward contract: keyword arguments, one `float | None` per row, None -> NaN; gathered from all
        processes. (GRPOTrainer's `_calculate_rewards` takes text completions; this is its latent counterpart.)
        A non-finite reward raises on every process: it would turn every advantage of the batch into 0."""
        device = self.accelerator.device
        n = len(inputs)
        kwargs = reward_inputs.keywords(inputs)
        rewards_per_func = torch.zeros(n, len(self.reward_funcs), device=device)
        non_finite = torch.zeros(1, len(self.reward_funcs), device=device)
        for i, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names)):
            values = func(**kwargs)
            if len(values) != n:
                raise ValueError(f"The reward function '{name}' returned {len(values)} rewards, but {n} were expected")
            scores = [torch.nan if v is None else float(v) for v in values]
            non_finite[0, i] = sum(v is not None and not math.isfinite(x) for v, x in zip(values, scores))
            rewards_per_func[:, i] = torch.tensor(scores, dtype=torch.float32, device=device)
        non_finite = gather(non_finite).sum(dim=0).tolist()
        if any(non_finite):
            rows = n * self.accelerator.num_processes
            bad = ", ".join(f"'{name}' ({int(count)} of {rows} rows)"
                            for name, count in zip(self.reward_func_names, non_finite) if count)
            raise ValueError(f"non-finite rewards (inf or nan) from reward function {bad}: return None for a row "
                             "it cannot score (see reaemb_trl.rewards)")
        if torch.isnan(rewards_per_func).all(dim=1).any():
            row = int(torch.isnan(rewards_per_func).all(dim=1).nonzero()[0, 0])
            warnings.warn(f"every reward function returned None for item {kwargs['item_ids'][row]!r}; its advantage is 0")
        return gather(rewards_per_func)

    # ---- the policy loss (no LLM pass on the fast path) -----------------------------------------------------------
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        if self.args.forward_method == "literal":
            mu = model(prefix_ids=inputs["prefix_ids"], literal=True)
        elif self.args.train_lora:
            mu = model(prefix_ids=inputs["prefix_ids"])
        else:
            hidden, mask, spans = self._prefix_cache[mode]
            index = inputs["prefix_index"]
            mu = model(hidden=hidden[index], mask=mask[index], item_mask=None if spans is None else spans[index])
        mu = mu.float()
        sigma = inputs["sigma"].float()
        z, advantages = inputs["actions"].float(), inputs["advantages"].float()
        logp = gaussian_log_prob(z, mu, sigma)
        if mode == "train" and bool(inputs["first_use"].all()) and self.state.global_step == self._rollout_global_step:
            # No optimizer step since the rollout: the policy is the rollout's, so its log-prob computed exactly as
            # the later iterations will compute theirs is the old log-prob (ratio exactly 1, no float drift).
            inputs["old_logps"] = logp.detach()
        inputs["first_use"] = torch.zeros_like(inputs["first_use"])
        old_logp = inputs["old_logps"]
        per_row, ratio = clipped_policy_loss(
            logp, old_logp, advantages, self.epsilon_low, self.epsilon_high, self.loss_type, self.args.delta,
            self.args.sapo_temperature_pos, self.args.sapo_temperature_neg,
        )
        kl = None
        if self.beta != 0.0:
            kl = gaussian_kl(mu, inputs["ref_mu"], sigma)
            per_row = per_row + self.beta * kl
        loss = per_row.mean()
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps

        def global_mean(x: torch.Tensor) -> float:
            totals = self.accelerator.reduce(torch.stack([x.float().sum(), torch.tensor(float(x.numel()), device=x.device)]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if kl is not None:
            metrics["kl"].append(global_mean(kl.detach()))
        log_ratio = (logp - old_logp).detach().abs()
        metrics["policy/log_ratio_abs"].append(global_mean(log_ratio))
        if mode == "train":
            generate_every = self.args.steps_per_generation * self.num_iterations
            iteration = (self._step % generate_every) // self.args.steps_per_generation + 1
            metrics[f"policy/log_ratio_abs/iter{iteration}"].append(global_mean(log_ratio))
            # how far mu moved since the rollout, in units of sigma (PPO's clip range allows ~0.25)
            moved = sigma_units(mu.detach() - inputs["mu"].float(), sigma)
            metrics[f"policy/delta_mu_over_sigma/iter{iteration}"].append(global_mean(moved))
        if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
            low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
            high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
            metrics["clip_ratio/low_mean"].append(global_mean(low))
            metrics["clip_ratio/high_mean"].append(global_mean(high))
            metrics["clip_ratio/region_mean"].append(global_mean(low | high))
            metrics["clip_ratio/low_min"].append(self.accelerator.gather(low.float()).min().item())
            metrics["clip_ratio/high_max"].append(self.accelerator.gather(high.float()).max().item())
        elif self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_mean((ratio > self.epsilon_high) & (advantages > 0)))
        return loss

    # ---- evaluation: the frozen yardstick on held-out items --------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """With a yardstick: embed the catalogue with the current (noise-free) thought module and score the frozen
        yardstick of `crrl_yardstick` (held-out anchor rewards, validation pairs); logged to the `report_to` sinks.
        Without one: TRL's evaluation (rollouts and policy loss on `eval_dataset`)."""
        if self.yardstick is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        ids, table = self.catalogue_table()
        self.last_catalogue_table = (ids, table)  # the quickstart writes it as an item table (no second encoding)
        scores = self.yardstick.score(table.cpu(), ids)
        if {"anchor_normalized_centered_cosine", "pairs_centered_cosine"} <= scores.keys():  # held-out items and
            # validation pairs alike: what runs are selected on (metric_for_best_model: eval_selection)
            scores["selection"] = (scores["anchor_normalized_centered_cosine"] + scores["pairs_centered_cosine"]) / 2
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in scores.items()}
        metrics["epoch"] = self.state.epoch
        Trainer.log(self, metrics)  # not GRPOTrainer.log: that would flush the pending training metrics here
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _load_best_model(self) -> None:
        """load_best_model_at_end: Trainer's own loader looks for model.safetensors and, not finding it, only warns."""
        self.accelerator.unwrap_model(self.model).load_checkpoint(self.state.best_model_checkpoint)

    def create_model_card(self, *args, **kwargs) -> None:
        """No LM model card: the checkpoint is an embedding model (see its reaemb_config.json)."""
        return None
