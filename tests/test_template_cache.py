"""Shared prompt template, `item_mean` pooling and `lora_layers`: each against the literal two-pass method."""

import types

import pytest
import torch

from conftest import ASSETS, ITEMS, tiny_embedder
from reaemb_trl.decoder_io import common_prefix_length
from reaemb_trl.embedder import MIN_TEMPLATE_TOKENS, ThoughtEmbedder
from reaemb_trl.prompt import ItemPromptFormatter


def exact_float64(embedder):
    """The embedder in float64 with RMSNorm computed in float64 too: the stock norms round to float32 whatever
    the input dtype, which would blur two exact computations of different shape to ~1e-8."""

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    embedder.double()
    for module in embedder.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(forward, module)
    return embedder


def trained_like(embedder, seed: int = 0):
    """Non-zero LoRA B (so LoRA A gets gradient) and a perturbed thought module."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return embedder


def values_and_grads(embedder, run):
    embedder.zero_grad(set_to_none=True)
    out = run()
    loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().pow(2)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in embedder.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_same(first, second):
    (out_a, grads_a), (out_b, grads_b) = first, second
    torch.testing.assert_close(out_a, out_b, atol=1e-11, rtol=1e-9)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_b[name].abs().max().item()
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-10 * max(scale, 1.0), rtol=1e-8, msg=name)


@pytest.mark.parametrize("pooling", ["mean", "last", "item_mean"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_template_equals_literal_in_values_and_every_gradient(family, side, pooling):
    embedder = trained_like(exact_float64(tiny_embedder(family, lora=True, pooling=pooling, seed=3)))
    ids = embedder.prefix_ids(ITEMS)  # different lengths
    shared = embedder.template_length(ids)
    assert shared >= MIN_TEMPLATE_TOKENS and shared == common_prefix_length(ids)
    fast = values_and_grads(embedder, lambda: embedder.embed_fast(ids, side))
    literal = values_and_grads(embedder, lambda: embedder.embed_literal(ids, side))
    assert any("lora_A" in n for n in fast[1]) and any("thought" in n for n in fast[1])
    assert_same(fast, literal)
    embedder.share_template = False
    assert embedder.template_length(ids) == 0
    assert_same(values_and_grads(embedder, lambda: embedder.embed_fast(ids, side)), literal)


def test_shared_prefix_states_equal_one_pass_over_whole_rows():
    """What CRRL caches (hidden, mask, lengths, keys/values) is the same with and without the shared template."""
    embedder = exact_float64(tiny_embedder("qwen2", lora=True))
    ids = embedder.prefix_ids(ITEMS)
    with torch.no_grad():
        shared = embedder.encode_prefix(ids)
        embedder.share_template = False
        whole = embedder.encode_prefix(ids)
    assert torch.equal(shared.lengths, whole.lengths)
    torch.testing.assert_close(shared.hidden[shared.mask], whole.hidden[whole.mask], atol=1e-12, rtol=0)
    for (k_s, v_s), (k_w, v_w) in zip(shared.past_key_values, whole.past_key_values):
        real_s, real_w = shared.mask[:, None, :, None].expand_as(k_s), whole.mask[:, None, :, None].expand_as(k_w)
        torch.testing.assert_close(k_s[real_s], k_w[real_w], atol=1e-12, rtol=0)
        torch.testing.assert_close(v_s[real_s], v_w[real_w], atol=1e-12, rtol=0)
    rows = torch.tensor([4, 1])
    with torch.no_grad():
        picked = embedder.thought_vector(shared.select(rows))
        torch.testing.assert_close(picked, embedder.thought_vector(whole)[rows], atol=1e-12, rtol=0)
        baseline = embedder.embed_without_thought(ids)  # the raw-backbone table uses the prefix pass too
        embedder.share_template = None
        torch.testing.assert_close(embedder.embed_without_thought(ids), baseline, atol=1e-12, rtol=0)


def test_crrl_concatenated_and_selected_prefix_states_give_the_literal_embeddings():
    """CRRL encodes chunks, concatenates them (cat_prefix_states), selects rows and runs only the suffix."""
    from reaemb_trl.prefix_store import cat_prefix_states

    embedder = trained_like(exact_float64(tiny_embedder("llama", lora=True)))
    ids = embedder.prefix_ids(ITEMS)
    rows = torch.tensor([5, 0, 3, 3])
    with torch.no_grad():
        assert embedder.template_length(ids[:2]) > 0 and embedder.template_length(ids[2:]) > 0
        prefix = cat_prefix_states([embedder.encode_prefix(ids[:2]), embedder.encode_prefix(ids[2:])])
        mu = embedder.thought_vector(prefix)
        noisy = mu[rows] + 0.1
        got = embedder.embed_from_thought(prefix.select(rows), noisy)
        expected = embedder.literal_embed_with_thought([ids[i] for i in rows], noisy)
    torch.testing.assert_close(mu, embedder.literal_thought_vector(ids), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_no_sharing_under_gradient_checkpointing():
    """Checkpointed layers drop the key/value cache, which the rows would need to read the template."""
    embedder = trained_like(tiny_embedder("llama", lora=True))
    base = embedder.model.get_base_model()
    # transformers >= 5.24 names it activation_checkpointing_enable (the old name warns there)
    (getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable)()
    ids = embedder.prefix_ids(ITEMS)
    embedder.train()
    assert embedder.template_length(ids) == 0
    prefix = embedder.encode_prefix(ids, use_cache=False)  # CRRL's LoRA-training policy forward
    vectors = embedder.thought_module(prefix.hidden, prefix.mask)
    torch.testing.assert_close(vectors, embedder.literal_thought_vector(ids), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # checkpointing only acts with gradients
        assert embedder.template_length(ids) > 0


def test_batch_without_common_template_falls_back(monkeypatch):
    embedder = exact_float64(tiny_embedder(lora=True))
    embedder.formatter = ItemPromptFormatter(system_prompt="", user_prefix="", use_chat_template=False)
    ids = embedder.prefix_ids(ITEMS)
    assert common_prefix_length(ids) < MIN_TEMPLATE_TOKENS and embedder.template_length(ids) == 0

    def no_template_pass(*args):
        raise AssertionError("a template pass ran for a batch without a common template")

    monkeypatch.setattr(embedder, "_encode_template", no_template_pass)
    assert_same(
        values_and_grads(embedder, lambda: embedder.embed_fast(ids)),
        values_and_grads(embedder, lambda: embedder.embed_literal(ids)),
    )


@pytest.mark.parametrize("pooling", ["mean", "item_mean"])
def test_item_vector_does_not_depend_on_batch_mates_or_padding(pooling):
    embedder = trained_like(exact_float64(tiny_embedder("llama", lora=True, pooling=pooling)))
    ids = embedder.prefix_ids(ITEMS)
    with torch.no_grad():
        alone = embedder.embed_literal([ids[0]])[0]
        # ITEMS[0], [3], [5] all start with "title": their common prefix reaches past the template
        for mates in ([0, 3, 5], [0, 2], [0, 1, 2, 3, 4, 5], [4, 0]):
            batch = [ids[i] for i in mates]
            assert embedder.template_length(batch) > 0
            for side in ("left", "right"):
                row = embedder.embed_fast(batch, side)[mates.index(0)]
                torch.testing.assert_close(row, alone, atol=1e-12, rtol=1e-10)
        assert common_prefix_length([ids[i] for i in (0, 3, 5)]) > common_prefix_length([ids[0], ids[2]])


def test_dropout_turns_sharing_off_unless_forced():
    from peft import LoraConfig

    embedder = tiny_embedder()
    embedder.attach_lora(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    ids = embedder.prefix_ids(ITEMS)
    embedder.train()
    assert embedder.template_length(ids) == 0  # each row draws its own dropout mask, as in the literal method
    embedder.share_template = True
    assert embedder.template_length(ids) > 0  # one mask for the template of the whole batch
    embedder.share_template = None
    embedder.eval()
    assert embedder.template_length(ids) > 0
    embedder.share_template = False
    assert embedder.template_length(ids) == 0
    embedder.share_template = None
    assert embedder.template_length(ids[:1]) == 0  # one row: nothing to share


def test_encode_runs_the_template_once_for_all_batches():
    embedder = tiny_embedder(lora=True)
    # first attributes differ in their first letter: every batch's common prefix is exactly the template
    items = [[(key, "x y z"[: 1 + i % 5])] for i, key in enumerate(["alpha", "brand", "city", "year", "zone", "name"])]
    template_passes = []
    body = embedder.model.get_base_model().model
    hook = body.register_forward_pre_hook(
        lambda module, args, kwargs: template_passes.append(1) if kwargs.get("input_ids") is not None
        and kwargs["input_ids"].shape[0] == 1 else None,
        with_kwargs=True,
    )
    try:
        table = embedder.encode(items, batch_size=2)
    finally:
        hook.remove()
    assert len(template_passes) == 1  # 3 batches, one template pass
    torch.testing.assert_close(table, embedder.encode(items, batch_size=2, method="literal"), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # outside encode nothing is kept between calls: weights may change in between
        embedder.encode_prefix(embedder.prefix_ids(items[:2]))
    assert embedder._template_memo is None


# ---- item_mean pooling -----------------------------------------------------------------------------------------
def test_item_span_is_the_rendered_attributes():
    embedder = tiny_embedder()
    tokenizer, formatter = embedder.tokenizer, embedder.formatter
    ids_all = embedder.prefix_ids(ITEMS)
    for attributes, ids, (start, end) in zip(ITEMS, ids_all, embedder.item_spans(ids_all).tolist()):
        assert tokenizer.decode(ids[start:end]).strip() == formatter.render_attributes(attributes)
        assert formatter.item_span(ids, tokenizer) == (start, end)
    plain = ItemPromptFormatter(system_prompt="", user_prefix="", use_chat_template=False)
    ids = plain.prefix_ids(ITEMS[0], tokenizer)
    start, end = plain.item_span(ids, tokenizer)
    assert tokenizer.decode(ids[start:end]).strip() == plain.render_attributes(ITEMS[0])


def test_item_mean_pooling_equals_hand_computation():
    embedder = trained_like(exact_float64(tiny_embedder("qwen2", lora=True, pooling="item_mean")))
    ids = embedder.prefix_ids(ITEMS)
    body = embedder.model.get_base_model().model
    with torch.no_grad():
        fast = embedder.embed_fast(ids)
        literal = embedder.embed_literal(ids)
        baseline = embedder.embed_without_thought(ids)
        vectors = embedder.literal_thought_vector(ids)
        for row, prefix in enumerate(ids):
            start, end = embedder.formatter.item_span(prefix, embedder.tokenizer)
            full = torch.tensor([prefix + embedder.formatter.suffix_ids(embedder.tokenizer)])
            embeds = body.get_input_embeddings()(full)
            embeds[0, len(prefix)] = vectors[row]
            states = body(inputs_embeds=embeds).last_hidden_state[0]
            picked = list(range(start, end)) + [len(prefix), len(prefix) + 1]
            torch.testing.assert_close(fast[row], states[picked].mean(0), atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(literal[row], states[picked].mean(0), atol=1e-12, rtol=1e-10)
            plain = body(input_ids=torch.tensor([prefix + [embedder.tokenizer.eos_token_id]])).last_hidden_state[0]
            expected = plain[list(range(start, end)) + [len(prefix)]].mean(0)
            torch.testing.assert_close(baseline[row], expected, atol=1e-12, rtol=1e-10)
    embedder.pooling = "mean"
    with torch.no_grad():
        assert (fast - embedder.embed_fast(ids)).abs().max() > 1e-3  # the template tokens are really left out


def test_item_mean_pooling_is_saved_and_needs_its_pool_mask(tmp_path):
    embedder = tiny_embedder(lora=True, pooling="item_mean")
    trained_like(embedder)
    expected = embedder.encode(ITEMS)
    embedder.save_pretrained(tmp_path / "ckpt")
    loaded = ThoughtEmbedder.from_pretrained(tmp_path / "ckpt")
    assert loaded.pooling == "item_mean"
    torch.testing.assert_close(loaded.encode(ITEMS), expected, atol=0, rtol=0)
    with torch.no_grad():
        prefix = embedder.encode_prefix(embedder.prefix_ids(ITEMS[:2]))
        prefix.pool_mask = None  # e.g. states concatenated by code that drops it
        with pytest.raises(ValueError, match="pool_mask"):
            embedder.embed_from_thought(prefix, embedder.thought_vector(prefix))


# ---- lora_layers ------------------------------------------------------------------------------------------------
def _lora_layer_indices(model) -> set[int]:
    return {int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}


def test_lora_layers_top_k_only_lower_layers_keep_no_activations_and_fast_equals_literal():
    from reaemb_trl import LRCLConfig
    from reaemb_trl.lrcl_trainer import lora_config

    embedder = tiny_embedder("llama", layers=4, seed=1)
    args = LRCLConfig(output_dir="unused", lora_layers=2, lora_dropout=0.0, lora_r=4,
                      lora_target_modules=["q_proj", "v_proj", "up_proj"], use_cpu=True)
    embedder.attach_lora(lora_config(args, embedder.model))
    assert _lora_layer_indices(embedder.model) == {2, 3}
    exact_float64(trained_like(embedder))
    ids = embedder.prefix_ids(ITEMS[:4])

    # Which decoder layers save tensors for backward during the (gradient-enabled) prefix pass?
    layers = embedder.model.get_base_model().model.layers
    current, saved = [None], set()
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
             for i, layer in enumerate(layers)]
    hooks += [layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)) for layer in layers]

    def pack(tensor):
        if current[0] is not None:
            saved.add(current[0])
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            prefix = embedder.encode_prefix(ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert saved == {2, 3}
    assert not prefix.past_key_values[1][1].requires_grad and prefix.past_key_values[2][1].requires_grad  # values

    fast = values_and_grads(embedder, lambda: embedder.embed_fast(ids))
    literal = values_and_grads(embedder, lambda: embedder.embed_literal(ids))
    assert_same(fast, literal)
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in fast[1] if "lora_" in n} == {2, 3}


def test_lora_layers_in_training_changes_only_top_layers(tmp_path):
    from reaemb_trl import LRCLConfig, LRCLTrainer
    from reaemb_trl.data.canonical import load_items

    embedder = tiny_embedder("qwen2", layers=3)
    args = LRCLConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=6, learning_rate=1e-2,
                      lora_layers=1, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"],
                      save_strategy="no", use_cpu=True, disable_tqdm=True, report_to="none", max_item_tokens=192)
    trainer = LRCLTrainer(embedder, args, train_dataset=load_items(ASSETS / "tiny_catalog"))
    assert _lora_layer_indices(embedder.model) == {2}
    before = {n: p.detach().clone() for n, p in embedder.model.named_parameters() if "lora_" in n}
    trainer.train()
    for name, param in embedder.model.named_parameters():
        if name in before:
            assert not torch.equal(param, before[name]), f"{name} did not change"
    with pytest.raises(ValueError, match="lora_layers"):
        LRCLConfig(output_dir="unused", lora_layers=0, use_cpu=True)
