"""LRCL: the loss against a hand computation, attribute-dropout views, and that training learns what it should."""

import math

import numpy as np
import pytest
import torch

from conftest import ASSETS, tiny_embedder
from reaemb_trl import ItemPromptFormatter, LRCLConfig, LRCLTrainer
from reaemb_trl.data.canonical import load_items
from reaemb_trl.lrcl_loss import contrastive_loss
from reaemb_trl.lrcl_trainer import draw_views


def _hand_soft_loss(x, y, tau):
    """The LRCL loss of docs/method.md, "LRCL", written out with Python loops."""
    n = len(x)
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
    z = [[dot(x[i], y[j]) / tau for j in range(n)] for i in range(n)]
    s = [[(dot(x[i], x[j]) + dot(y[i], y[j])) / (2 * tau) for j in range(n)] for i in range(n)]
    t = [[math.exp(s[i][j]) / sum(math.exp(v) for v in s[i]) for j in range(n)] for i in range(n)]

    def ce(logits, targets):
        log_norm = math.log(sum(math.exp(v) for v in logits))
        return -sum(tj * (lj - log_norm) for lj, tj in zip(logits, targets))

    zt = [[z[j][i] for j in range(n)] for i in range(n)]
    tt = [[t[j][i] for j in range(n)] for i in range(n)]
    return 0.5 * (sum(ce(z[i], t[i]) for i in range(n)) / n + sum(ce(zt[i], tt[i]) for i in range(n)) / n)


def test_soft_loss_matches_hand_computation():
    x = [[0.5, -1.0], [1.5, 0.25], [-0.75, 0.5]]
    y = [[0.25, -0.5], [1.0, 1.0], [-1.0, 0.0]]
    out = contrastive_loss(torch.tensor(x), torch.tensor(y), torch.tensor(0.7))
    assert out["loss"].item() == pytest.approx(_hand_soft_loss(x, y, 0.7), rel=1e-6)
    assert set(out) >= {"loss", "loss_x_to_y", "loss_y_to_x", "temperature", "accuracy", "positive_cosine"}


def test_centred_cosine_loss_matches_hand_computation():
    x = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-0.75, 0.5, 1.0]]
    y = [[0.25, -0.5, 1.5], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.5]]
    rows = x + y
    mean = [sum(r[k] for r in rows) / len(rows) for k in range(3)]

    def centred_unit(v):
        c = [a - m for a, m in zip(v, mean)]
        norm = math.sqrt(sum(a * a for a in c))
        return [a / norm for a in c]

    expected = _hand_soft_loss([centred_unit(v) for v in x], [centred_unit(v) for v in y], 0.3)
    out = contrastive_loss(torch.tensor(x), torch.tensor(y), torch.tensor(0.3), normalize=True, center=True)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    # centring alone: dot products of centred rows
    plain = [[a - m for a, m in zip(v, mean)] for v in rows]
    out = contrastive_loss(torch.tensor(x), torch.tensor(y), torch.tensor(0.7), center=True)
    assert out["loss"].item() == pytest.approx(_hand_soft_loss(plain[:3], plain[3:], 0.7), rel=1e-5)
    # a shift shared by all rows changes nothing once centred
    shifted = contrastive_loss(torch.tensor(x) + 5.0, torch.tensor(y) + 5.0, torch.tensor(0.7), center=True)
    assert shifted["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-5)


def test_infonce_and_same_item_rows_are_never_negatives():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    y = torch.tensor([[0.9, 0.1], [0.1, 0.9], [1.0, 0.0]])
    out = contrastive_loss(x, y, torch.tensor(1.0), kind="infonce", item_ids=["a", "b", "a"])
    logits = x @ y.T
    # rows 0 and 2 hold the same item: each only competes with row 1
    row0 = -torch.log_softmax(logits[0, [0, 1]], 0)[0]
    row1 = -torch.log_softmax(logits[1], 0)[1]
    row2 = -torch.log_softmax(logits[2, [1, 2]], 0)[1]
    col0 = -torch.log_softmax(logits[[0, 1], 0], 0)[0]
    col1 = -torch.log_softmax(logits[:, 1], 0)[1]
    col2 = -torch.log_softmax(logits[[1, 2], 2], 0)[1]
    expected = 0.5 * ((row0 + row1 + row2) / 3 + (col0 + col1 + col2) / 3)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    soft = contrastive_loss(x, y, torch.tensor(1.0), item_ids=["a", "b", "a"])
    assert torch.isfinite(soft["loss"])


def test_views_drop_floor_rho_n_and_differ():
    rng = np.random.default_rng(0)
    attributes = [(f"k{i}", f"v{i}") for i in range(5)]
    for _ in range(50):
        first, second = draw_views(attributes, 0.4, rng)
        assert len(first) == len(second) == 3  # 5 - floor(0.4 * 5)
        assert first != second and set(first) <= set(attributes)
    two = [("a", "1"), ("b", "2")]
    first, second = draw_views(two, 0.4, rng)
    assert first != second and sorted(first) == sorted(second) == two  # order is the only freedom
    assert draw_views([("a", "1")], 0.4, rng) == ([("a", "1")], [("a", "1")])


def _toy_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=25,
        per_device_train_batch_size=12,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        max_item_tokens=192,
    )
    values.update(overrides)
    return LRCLConfig(**values)


def test_training_changes_every_trainable_parameter_and_no_base_weight(tmp_path):
    embedder = tiny_embedder()
    base_before = {n: p.detach().clone() for n, p in embedder.model.named_parameters()}
    trainer = LRCLTrainer(
        embedder, _toy_args(tmp_path, max_steps=3), train_dataset=load_items(ASSETS / "tiny_catalog")
    )
    trainable_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable_before) and any("thought" in n for n in trainable_before)
    assert "temperature" in trainable_before
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if name in trainable_before:
            assert not torch.equal(param, trainable_before[name]), f"{name} did not change"
    for name, param in embedder.model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name.replace(".base_layer", "")]), f"base weight {name} changed"
    logged = trainer.state.log_history[0]
    assert {"loss_x_to_y", "loss_y_to_x", "temperature", "positive_cosine"} <= set(logged)


def test_loss_falls_on_a_toy_set(tmp_path):
    embedder = tiny_embedder()
    embedder.formatter = ItemPromptFormatter(system_prompt="", user_prefix="", use_chat_template=False)
    items = load_items(ASSETS / "tiny_catalog").select(range(12))
    args = _toy_args(tmp_path, loss_type="infonce", normalize_embeddings=True, init_temperature=0.1, max_steps=30)
    trainer = LRCLTrainer(embedder, args, train_dataset=items)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses


def test_cosine_with_a_low_learnable_temperature_learns(tmp_path):
    embedder = tiny_embedder()
    items = load_items(ASSETS / "tiny_catalog").select(range(12))
    args = _toy_args(tmp_path, normalize_embeddings=True, center_embeddings=True, init_temperature=0.05,
                     max_steps=30, share_template=True)
    trainer = LRCLTrainer(embedder, args, train_dataset=items)
    assert embedder.share_template is True
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in history]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
    temperature = trainer.model.temperature.item()
    assert temperature != pytest.approx(0.05, abs=1e-6) and temperature > args.min_temperature
    assert history[-1]["temperature"] == pytest.approx(temperature, rel=0.05)
    assert {"positive_cosine", "accuracy", "loss_x_to_y"} <= set(history[-1])


@pytest.mark.parametrize("overrides", [dict(per_device_train_batch_size=1),
                                       dict(per_device_train_batch_size=1, gradient_accumulation_steps=8)])
def test_one_row_per_contrastive_batch_is_refused_naming_the_field(tmp_path, overrides):
    """With one row there are no in-batch negatives: the loss and its gradient are 0, so training would learn nothing
    and still exit 0."""
    items = load_items(ASSETS / "tiny_catalog")
    with pytest.raises(ValueError, match=r"per_device_train_batch_size=1 gives 1 row\(s\) per contrastive batch.*>= 2"):
        LRCLTrainer(tiny_embedder(), _toy_args(tmp_path, **overrides), train_dataset=items)
    with pytest.raises(ValueError, match=r"train_dataset has 1 item\(s\)"):
        LRCLTrainer(tiny_embedder(), _toy_args(tmp_path), train_dataset=items.select(range(1)))


def test_training_emits_no_deprecation_warning_and_saves_its_config_as_json(tmp_path):
    """No FutureWarning about gradient/activation checkpointing from our calls (or peft's, which we make) in a run
    with `gradient_checkpointing` on; every save writes training_config.json, which gives the arguments back."""
    import dataclasses
    import json
    import warnings

    items = load_items(ASSETS / "tiny_catalog").select(range(8))
    fields = {f.name for f in dataclasses.fields(LRCLConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = _toy_args(tmp_path, max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
                     **{checkpointing: True})  # fmt: skip (transformers 5.24 renamed the field)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = LRCLTrainer(tiny_embedder(), args, train_dataset=items)
        trainer.train()
    noise = [str(w.message) for w in caught
             if issubclass(w.category, FutureWarning) and "checkpointing" in str(w.message)]  # fmt: skip
    assert not noise, noise
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "training_config.json").read_text())
    assert saved == json.loads(json.dumps(args.to_dict()))
    init = {f.name for f in dataclasses.fields(LRCLConfig) if f.init}
    assert LRCLConfig(**{k: v for k, v in saved.items() if k in init}).to_dict() == args.to_dict()
