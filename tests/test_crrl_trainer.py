"""CRRLTrainer: the Gaussian policy maths, the latent rollout, fast == literal, custom rewards, what trains, saving."""

from __future__ import annotations

import copy
import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from conftest import ITEMS, tiny_embedder
from reaemb_trl.candidates import CooccurrenceCandidates
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.crrl_policy import action_noise, clipped_policy_loss, compute_advantages, gaussian_kl, gaussian_log_prob
from reaemb_trl.crrl_trainer import CRRLTrainer
from reaemb_trl.rewards import RewardInputs

CATALOGUE = {str(i): [{"key": k, "value": v} for k, v in item] for i, item in enumerate(ITEMS)}
SEQS = {
    "u0": ["0", "1", "2", "3", "4"],
    "u1": ["1", "2", "5", "0", "3"],
    "u2": ["3", "4", "5", "2", "1"],
    "u3": ["0", "5", "4", "1", "2"],
}


def dataset() -> Dataset:
    return Dataset.from_list([{"item_id": k, "attributes": v} for k, v in CATALOGUE.items()])


def candidates(n: int = 4) -> CooccurrenceCandidates:
    return CooccurrenceCandidates.from_sequences(SEQS, list(CATALOGUE), candidate_num=n, pos_num=1, seed=0)


def config(tmp_path, **kwargs) -> CRRLConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, candidate_num=4,
        max_steps=2, logging_steps=1, use_cpu=True, save_strategy="no", noise_scale=0.5, learning_rate=1e-2,
        disable_tqdm=True, report_to="none",
    )
    defaults.update(kwargs)
    return CRRLConfig(**defaults)


def group_rows(items: list[str], G: int) -> list[dict]:
    """A generation batch as RepeatSampler lays it out: G consecutive copies of each item."""
    return [{"item_id": i, "attributes": CATALOGUE[i]} for i in items for _ in range(G)]


# ---- maths ------------------------------------------------------------------------------------------------------
def test_gaussian_log_prob_and_kl_by_hand():
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    mu = torch.tensor([[0.0, 0.0], [0.5, -0.5]])
    sigma = 0.5
    assert gaussian_log_prob(z, mu, sigma).tolist() == pytest.approx([-(1 + 4) / 0.5, -0.5 / 0.5])
    assert gaussian_kl(z, mu, sigma).tolist() == pytest.approx([10.0, 1.0])
    # the dropped constant cancels: log-ratios equal those of torch's Normal
    normal = torch.distributions.Normal
    full = normal(mu, sigma).log_prob(z).sum(-1) - normal(mu + 0.1, sigma).log_prob(z).sum(-1)
    assert (gaussian_log_prob(z, mu, sigma) - gaussian_log_prob(z, mu + 0.1, sigma)).tolist() == pytest.approx(full.tolist(), rel=1e-5)


def test_clipped_loss_by_hand():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))
    adv = torch.tensor([1.0, -1.0, -2.0, 2.0])
    loss, ratio = clipped_policy_loss(logp, old, adv, 0.2, 0.28)
    # r=1.5,A=1: min(1.5, 1.28) -> -1.28;  r=0.5,A=-1: min(-0.5, -0.8) -> 0.8
    # r=1.1,A=-2: min(-2.2, -2.2) -> 2.2;  r=0.7,A=2: min(1.4, 1.6) -> -1.4
    assert loss.tolist() == pytest.approx([-1.28, 0.8, 2.2, -1.4])
    assert ratio.tolist() == pytest.approx([1.5, 0.5, 1.1, 0.7])
    capped, _ = clipped_policy_loss(logp, old, adv, 0.2, 0.28, delta=1.2)
    assert capped[1].item() == pytest.approx(0.8)  # delta only caps r from above
    assert capped[3].item() == pytest.approx(-1.4)


def test_advantages_group_and_anchor():
    rewards = torch.tensor([[1.0], [2.0], [3.0], [float("nan")], [0.5], [0.5], [0.5], [0.5]])
    adv, summed, zero_std = compute_advantages(rewards, torch.ones(1), 4, scale_rewards="none")
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0, 0, 0, 0, 0])  # nan-aware mean; None row -> 0
    assert zero_std.tolist() == [False] * 4 + [True] * 4
    adv, _, _ = compute_advantages(rewards, torch.ones(1), 4, baseline="anchor")
    assert adv.tolist() == pytest.approx([0.0, 1.0, 2.0, 0.0, 0, 0, 0, 0])
    scaled, _, _ = compute_advantages(rewards, torch.ones(1), 4, scale_rewards="group")
    assert scaled[:3].tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001], rel=1e-3)


def test_noise_is_keyed_and_anchor_is_noise_free():
    eps = action_noise(3, "train|0|0", [0, 0, 0, 1], [0, 1, 2, 0], ["a", "a", "a", "b"], 16)
    assert torch.equal(eps[0], torch.zeros(16)) and torch.equal(eps[3], torch.zeros(16))
    assert eps[1].abs().sum() > 0 and not torch.equal(eps[1], eps[2])
    one = action_noise(3, "train|0|0", [0], [2], ["a"], 16)
    assert torch.equal(one[0], eps[2])  # a row's noise does not depend on its batch mates
    no_anchor = action_noise(3, "train|0|0", [0], [0], ["a"], 16, anchor_copy=False)
    assert no_anchor.abs().sum() > 0


# ---- the trainer ------------------------------------------------------------------------------------------------
def test_rollout_anchor_copy_and_candidates(tmp_path):
    trainer = CRRLTrainer(tiny_embedder(), config(tmp_path), train_dataset=dataset(), candidates=candidates())
    trainer.model.train()
    out = trainer._generate_and_score_completions(group_rows(["0", "3"], 4))
    gen = trainer._last_generation
    assert torch.equal(gen["actions"][0], gen["mu"][0]) and torch.equal(gen["actions"][4], gen["mu"][4])
    assert not torch.equal(gen["actions"][1], gen["mu"][1])
    assert gen["similarities"].shape == (8, 4) and gen["candidate_embeddings"].shape == (8, 4, 32)
    assert gen["candidate_ids"][0] == gen["candidate_ids"][3]  # one candidate set per group
    assert out["advantages"].shape == (8,) and "prefix_index" in out
    # e_0 (anchor) is the plain embedding of the item
    emb = trainer.embedder
    plain = emb.embed_fast(emb.prefix_ids([[(a["key"], a["value"]) for a in CATALOGUE["0"]]]))
    torch.testing.assert_close(gen["item_embeddings"][0], plain[0].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_fast_path_equals_literal_path(tmp_path, beta):
    base = tiny_embedder(seed=1)
    trainers, outs = {}, {}
    for method in ("fast", "literal"):
        args = config(tmp_path, forward_method=method, beta=beta, reward_funcs=["rank", "softmax"],
                      reward_weights=[1.0, 0.5], similarity="cosine", reward_temperature=0.1)
        trainer = CRRLTrainer(copy.deepcopy(base), args, train_dataset=dataset(), candidates=candidates())
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        with torch.no_grad():  # move the module off its start so the KL term is not zero
            for p in trainer.embedder.thought_module.parameters():
                p.add_(0.01)
        outs[method] = trainer._generate_and_score_completions(group_rows(["1", "4"], 4))
        trainers[method] = trainer
    fast, literal = trainers["fast"]._last_generation, trainers["literal"]._last_generation
    for key in ("mu", "actions", "item_embeddings", "candidate_embeddings", "similarities", "rewards_per_func"):
        torch.testing.assert_close(fast[key], literal[key], atol=2e-5, rtol=1e-4, msg=key)
    # Advantages divide by the group's reward spread, which can be ~1e-3 here (the rank reward is often constant
    # within a group), so float32 noise in the rewards is amplified by 1 / spread: compare on the reward scale.
    rewards = (literal["rewards_per_func"].double() * torch.tensor([1.0, 0.5], dtype=torch.float64)).sum(-1)
    spread = rewards.view(-1, 4).std(dim=1).repeat_interleave(4) + 1e-4
    torch.testing.assert_close(fast["advantages"].double() * spread, literal["advantages"].double() * spread,
                               atol=2e-5, rtol=0, msg="advantages x group reward spread")
    # The policy loss and its gradients, from the same advantages (the literal path's) on both paths.
    results = {}
    for method, trainer in trainers.items():
        out = dict(outs[method], advantages=outs["literal"]["advantages"])
        out["old_logps"] = trainer._last_generation["old_logps"] - 0.05  # exercise ratios != 1
        loss = trainer.compute_loss(trainer.model, out)
        loss.backward()
        results[method] = (loss.detach(), [p.grad.clone() for p in trainer.embedder.thought_module.parameters()])
    torch.testing.assert_close(results["fast"][0], results["literal"][0], atol=1e-5, rtol=1e-4)
    for a, b in zip(results["fast"][1], results["literal"][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)  # float32 noise amplified by 1 / sigma^2


CUSTOM_REWARD = textwrap.dedent(
    '''
    CALLS = []

    def copy_reward(item_ids, copy_index, candidate_ids, positive_mask, positive_weights, item_embeddings,
                    candidate_embeddings, similarities, trainer_state, attributes, **kwargs):
        CALLS.append(dict(n=len(item_ids), shapes=(tuple(item_embeddings.shape), tuple(candidate_embeddings.shape),
                          tuple(similarities.shape), tuple(positive_mask.shape)), step=trainer_state.global_step,
                          has_attributes=len(attributes) == len(item_ids), kwargs=sorted(kwargs)))
        return [None if c == 3 else float(c) for c in copy_index]
    '''
)


def test_custom_reward_by_dotted_path_reaches_the_loss(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(CUSTOM_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = config(tmp_path, reward_funcs=["my_rewards:copy_reward"], scale_rewards="none", max_steps=1)
    trainer = CRRLTrainer(tiny_embedder(), args, train_dataset=dataset(), candidates=candidates())
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    out = trainer._generate_and_score_completions(group_rows(["2", "5"], 4))
    import my_rewards

    call = my_rewards.CALLS[-1]
    assert call["n"] == 8 and call["shapes"] == ((8, 32), (8, 4, 32), (8, 4), (8, 4)) and call["has_attributes"]
    # the keywords are RewardInputs' fields plus the dataset's columns, nothing else
    named = {"item_ids", "copy_index", "candidate_ids", "positive_mask", "positive_weights", "item_embeddings",
             "candidate_embeddings", "similarities", "trainer_state", "attributes"}
    fields = {f.name for f in dataclasses.fields(RewardInputs)}
    assert set(call["kwargs"]) == fields - named | {"item_id"}
    # rewards 0, 1, 2, None per group: nan-aware mean 1 -> advantages -1, 0, 1, 0
    assert out["advantages"].tolist() == pytest.approx([-1, 0, 1, 0, -1, 0, 1, 0])
    # the advantages drive the loss: its gradient is sum_g A_g (z_g - mu) / sigma^2 / rows (ratio 1)
    loss = trainer.compute_loss(trainer.model, out)
    loss.backward()
    assert trainer.embedder.thought_module.v_proj.bias.grad.abs().sum() > 0
    gen = trainer._last_generation
    expected_dmu = -(out["advantages"].unsqueeze(1) * (gen["actions"] - gen["mu"])).sum(0) / 0.25 / 8
    mu = gen["mu"].clone().requires_grad_(True)
    manual = clipped_policy_loss(gaussian_log_prob(gen["actions"], mu, 0.5), gaussian_log_prob(gen["actions"], mu, 0.5).detach(),
                                 out["advantages"], 0.2, 0.28)[0].mean()
    manual.backward()
    torch.testing.assert_close(mu.grad.sum(0), expected_dmu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, manual, atol=1e-6, rtol=1e-5)


NON_FINITE_REWARD = textwrap.dedent(
    '''
    import math

    def log_of_zero_reward(copy_index, **kwargs):
        return [-math.inf if c == 1 else (None if c == 2 else 0.5) for c in copy_index]
    '''
)


def test_non_finite_reward_is_an_error_naming_the_function_and_the_count(tmp_path, monkeypatch):
    """An inf (a log of 0) would turn every advantage of the batch into 0, the rank reward's signal included, and
    train on nothing with exit code 0: it is an error instead. None stays TRL's "cannot score this row"."""
    (tmp_path / "bad_rewards.py").write_text(NON_FINITE_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = config(tmp_path, reward_funcs=["rank", "bad_rewards:log_of_zero_reward"])
    trainer = CRRLTrainer(tiny_embedder(), args, train_dataset=dataset(), candidates=candidates())
    trainer.model.train()
    with pytest.raises(ValueError, match=r"non-finite rewards .* 'log_of_zero_reward' \(2 of 8 rows\).* None"):
        trainer._generate_and_score_completions(group_rows(["2", "5"], 4))


def test_unknown_reward_name_fails_when_the_config_is_built(tmp_path):
    with pytest.raises(ValueError) as error:
        config(tmp_path, reward_funcs=["rank", "nosuch"])
    message = str(error.value)
    assert "\n" not in message and message.startswith("CRRLConfig.reward_funcs: unknown reward 'nosuch'")
    assert "log_softmax" in message and "package.module:function" in message
    with pytest.raises(ValueError, match="CRRLConfig.reward_funcs: cannot import module 'no_such_module'"):
        config(tmp_path, reward_funcs=["no_such_module:reward"])


def test_training_changes_only_the_thought_module_and_saves(tmp_path):
    from reaemb_trl.embedder import ThoughtEmbedder

    embedder = tiny_embedder(lora=True)
    llm_before = {k: v.clone() for k, v in embedder.model.state_dict().items()}
    thought_before = {k: v.clone() for k, v in embedder.thought_module.state_dict().items()}
    args = config(tmp_path, reward_funcs=["softmax"], similarity="cosine", reward_temperature=0.05, beta=0.1)
    trainer = CRRLTrainer(embedder, args, train_dataset=dataset(), candidates=candidates())
    trainer.train()
    assert all(torch.equal(llm_before[k], v) for k, v in embedder.model.state_dict().items())
    assert any(not torch.equal(thought_before[k], v) for k, v in embedder.thought_module.state_dict().items())
    logged = {k for h in trainer.state.log_history for k in h}
    assert {"reward", "reward_std", "frac_reward_zero_std", "rewards/softmax_reward/mean", "kl", "clip_ratio/region_mean"} <= logged
    trainer.save_model(str(tmp_path / "final"))
    loaded = ThoughtEmbedder.from_pretrained(tmp_path / "final")
    for a, b in zip(loaded.thought_module.state_dict().values(), embedder.thought_module.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="similarity"):
        config(tmp_path, similarity="l2")
    with pytest.raises(ValueError, match="anchor_copy"):
        config(tmp_path, advantage_baseline="anchor", anchor_copy=False)
    with pytest.raises(ValueError, match="pos_num"):
        config(tmp_path, pos_num=4, candidate_num=4)
    with pytest.raises(ValueError, match="reward weights"):  # checked against the functions the trainer gets
        CRRLTrainer(tiny_embedder(), config(tmp_path, reward_weights=[1.0, 2.0]), train_dataset=dataset(),
                    candidates=candidates())
    paper = CRRLConfig(output_dir=str(tmp_path / "p"), use_cpu=True)
    assert (paper.learning_rate, paper.num_generations, paper.epsilon, paper.epsilon_high, paper.beta, paper.num_iterations) == (
        1e-4, 8, 0.2, 0.28, 0.0, 2)
    assert (paper.noise_scale, paper.candidate_num, paper.pos_num, paper.anchor_copy) == (0.1, 10, 1, True)


def test_config_warns_about_nothing_it_sets_itself(tmp_path):
    """TRL's default of the deprecated `gradient_checkpointing` made transformers print a FutureWarning on every
    CRRL run; the user had nothing to change."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = config(tmp_path)
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False


def test_training_raises_the_reward_on_a_toy_catalogue(tmp_path):
    """Two genres, users stay within one: the positive of an item is from its genre, the negatives from the other.
    The thought module can learn to write genre into the embedding; the noise-free reward must go up."""
    import random

    from reaemb_trl.data.canonical import read_items
    from reaemb_trl.prompt import ItemPromptFormatter

    catalogue = read_items(Path(__file__).parent / "assets" / "tiny_catalog")
    groups = [[it for it in catalogue if it["attributes"][2]["value"] == g][:4] for g in ("Comedy", "Horror")]
    items = groups[0] + groups[1]
    rng = random.Random(0)
    seqs = {f"u{u}": [it["item_id"] for it in rng.sample(groups[u % 2], 4)] + ["val", "test"] for u in range(20)}
    index = CooccurrenceCandidates.from_sequences(seqs, [it["item_id"] for it in items], candidate_num=4, pos_num=1)
    G = 8
    args = config(tmp_path, per_device_train_batch_size=len(items) * G, num_generations=G, max_steps=15,
                  noise_scale=0.3, learning_rate=0.03, reward_funcs=["softmax"], similarity="cosine",
                  reward_temperature=0.02, num_iterations=1)
    embedder = tiny_embedder(hidden=16)
    embedder.formatter = ItemPromptFormatter(use_chat_template=False, system_prompt="", user_prefix="")
    llm_before = {k: v.clone() for k, v in embedder.model.state_dict().items()}
    trainer = CRRLTrainer(embedder, args, train_dataset=Dataset.from_list(items), candidates=index)

    def anchor_reward() -> float:
        trainer.model.eval()
        trainer.num_generations_eval = 2
        trainer._generate_and_score_completions([dict(it) for it in items for _ in range(2)])
        trainer.model.train()
        return trainer._last_generation["rewards_per_func"][0::2].mean().item()  # copy 0 = noise-free

    before = anchor_reward()
    trainer.train()
    after = anchor_reward()
    assert after > before + 0.05, (before, after)
    logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert sum(logged[-5:]) / 5 > sum(logged[:3]) / 3
    assert all(torch.equal(llm_before[k], v) for k, v in embedder.model.state_dict().items())
