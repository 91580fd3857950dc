"""The thought options: keys restricted to the item (`thought_keys="item"`), the thought written at a token's scale
(`thought_scale="token"`), the poolings that read the thought's position, the thought-swap leverage, and their
round trip through a checkpoint. The defaults compute exactly what they did before."""

import json
import math

import pytest
import torch

from conftest import ITEMS, tiny_causal_lm, tiny_tokenizer
from reaemb_trl.embedder import ThoughtEmbedder
from reaemb_trl.model_args import ModelArguments
from reaemb_trl.prefix_store import PrefixStore
from reaemb_trl.thought_leverage import swap_partners, thought_swap_leverage
from reaemb_trl.thought_module import LatentThoughtModule, apply_rope, median_token_norm, rope_angles


def embedder_with(seed: int = 0, **options) -> ThoughtEmbedder:
    torch.manual_seed(seed)
    return ThoughtEmbedder(tiny_causal_lm(seed=seed), tiny_tokenizer(), **options)


def test_item_keys_read_no_template_token_and_ignore_template_states():
    embedder = embedder_with(thought_keys="item")
    ids = embedder.prefix_ids(ITEMS)
    with torch.no_grad():
        prefix = embedder.encode_prefix(ids)
        module = embedder.thought_module
        weights = module.attention_weights(prefix.hidden, prefix.mask, prefix.pool_mask)
        item = prefix.pool_mask
        assert item.any(-1).all() and (item.sum(-1) < prefix.mask.sum(-1)).all()  # both kinds of token present
        assert weights[~item].abs().max() == 0
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(ids)))
        # change every template state but the query's (the last real token): mu stays; all keys would move
        last = torch.where(prefix.mask, torch.arange(prefix.mask.shape[1]), -1).argmax(-1)
        template = prefix.mask & ~item
        template[torch.arange(len(ids)), last] = False
        changed = prefix.hidden + 5.0 * torch.randn_like(prefix.hidden) * template.unsqueeze(-1)
        mu = module(prefix.hidden, prefix.mask, item)
        torch.testing.assert_close(module(changed, prefix.mask, item), mu, atol=0, rtol=0)
        module.keys = "all"
        assert (module(changed, prefix.mask, item) - module(prefix.hidden, prefix.mask, item)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="need item_mask"):
        LatentThoughtModule(32, keys="item")(prefix.hidden, prefix.mask)


def test_an_item_without_text_reads_its_query_token_alone():
    module = LatentThoughtModule(8, keys="item")
    hidden, mask = torch.randn(1, 5, 8), torch.ones(1, 5, dtype=torch.bool)
    weights = module.attention_weights(hidden, mask, torch.zeros_like(mask))
    assert weights.tolist() == [[0.0, 0.0, 0.0, 0.0, 1.0]]


def test_token_scale_writes_the_thought_at_a_trainable_token_norm():
    embedder = embedder_with(thought_scale="token")
    module = embedder.thought_module
    expected = median_token_norm(embedder.model, (embedder.thought_token_id,))
    weights = embedder.model.get_input_embeddings().weight
    assert expected == pytest.approx(weights[: embedder.thought_token_id].norm(dim=-1).median().item(), rel=0.05)
    assert module.output_gain.item() == pytest.approx(expected, rel=1e-6) and module.output_gain.requires_grad
    prefix = embedder.encode_prefix(embedder.prefix_ids(ITEMS))
    mu = embedder.thought_vector(prefix)
    torch.testing.assert_close(mu.norm(dim=-1), torch.full((len(ITEMS),), expected), atol=1e-5, rtol=1e-5)
    # the gain trains: a loss on ||mu|| moves it, and ||mu|| follows it
    optimizer = torch.optim.SGD([module.output_gain], lr=0.1)
    (mu.norm(dim=-1) - 2 * expected).pow(2).mean().backward()
    assert module.output_gain.grad.abs().item() > 0
    optimizer.step()
    assert module.output_gain.item() > expected
    with torch.no_grad():
        torch.testing.assert_close(embedder.thought_vector(prefix).norm(dim=-1),
                                   module.output_gain.expand(len(ITEMS)), atol=1e-5, rtol=1e-5)


def test_defaults_compute_exactly_the_papers_thought_and_keep_the_checkpoint_keys():
    embedder = embedder_with()
    module = embedder.thought_module
    assert set(module.state_dict()) == {f"{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")}
    with torch.no_grad():
        prefix = embedder.encode_prefix(embedder.prefix_ids(ITEMS))
        hidden, mask = prefix.hidden.masked_fill(~prefix.mask.unsqueeze(-1), 0.0), prefix.mask
        # r = softmax(RoPE(q) . RoPE(K) / sqrt(d)) V over the real tokens, the query at the last real token
        positions = mask.long().cumsum(-1) - 1
        last = torch.where(mask, torch.arange(mask.shape[1]), -1).argmax(-1)
        rows = torch.arange(len(ITEMS))
        cos_k, sin_k = rope_angles(positions.clamp(min=0), 32, 1000.0)
        cos_q, sin_q = rope_angles(positions[rows, last], 32, 1000.0)
        q = apply_rope(module.q_proj(hidden[rows, last]), cos_q, sin_q)
        k = apply_rope(module.k_proj(hidden), cos_k, sin_k)
        scores = torch.einsum("bd,bld->bl", q, k) / math.sqrt(32)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        expected = torch.einsum("bl,bld->bd", weights, module.v_proj(hidden))
        torch.testing.assert_close(embedder.thought_vector(prefix), expected, atol=0, rtol=0)


@pytest.mark.parametrize("pooling", ["thought", "thought_eos", "item_mean"])
def test_options_give_the_same_numbers_on_every_path(pooling):
    """fast == literal == several modules sharing one prefix pass == prefix rows kept in a PrefixStore (CRRL)."""
    embedder = embedder_with(seed=2, pooling=pooling, thought_keys="item", thought_scale="token")
    ids = embedder.prefix_ids(ITEMS)
    with torch.no_grad():
        fast = embedder.embed_fast(ids)
        torch.testing.assert_close(embedder.embed_literal(ids), fast, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(embedder.literal_thought_vector(ids),
                                   embedder.thought_vector(embedder.encode_prefix(ids)), atol=1e-5, rtol=1e-5)
        shared = embedder.encode_with_thought_modules(ITEMS, {"own": embedder.thought_module})["own"]
        torch.testing.assert_close(shared, fast, atol=1e-5, rtol=1e-5)
        store = PrefixStore(2**30)
        names = [str(i) for i in range(len(ids))]
        store.add(names[:3], embedder.encode_prefix(ids[:3]))
        store.add(names[3:], embedder.encode_prefix(ids[3:]))
        prefix = store.assemble(names)
        from_store = embedder.embed_from_thought(prefix, embedder.thought_vector(prefix))
        torch.testing.assert_close(from_store, fast, atol=1e-5, rtol=1e-5)


def test_thought_poolings_read_the_thought_and_eos_states():
    embedder = embedder_with(pooling="thought_eos")
    ids = embedder.prefix_ids(ITEMS[:2])
    with torch.no_grad():
        prefix = embedder.encode_prefix(ids)
        mu = embedder.thought_vector(prefix)
        both = embedder.embed_from_thought(prefix, mu)
        embedder.pooling = "thought"
        thought = embedder.embed_from_thought(prefix, mu)
        embedder.pooling = "last"
        eos = embedder.embed_from_thought(prefix, mu)
    torch.testing.assert_close(both, (thought + eos) / 2, atol=0, rtol=0)
    assert (thought - eos).abs().max() > 1e-3


def test_swap_partners_is_a_derangement():
    for n in (2, 3, 10):
        partner = swap_partners(n, seed=n)
        assert sorted(partner.tolist()) == list(range(n)) and all(partner[i] != i for i in range(n))


def test_leverage_is_zero_for_a_shared_thought_and_highest_for_thought_poolings():
    embedder = embedder_with(seed=1)
    ids = embedder.prefix_ids(ITEMS)
    leverage = thought_swap_leverage(embedder, ids, ["mean", "item_mean", "thought", "thought_eos"])
    assert all(v > 1e-3 for v in leverage.values())
    assert leverage["thought"] > leverage["item_mean"] and leverage["thought_eos"] > leverage["item_mean"]
    assert embedder.pooling == "mean"  # the embedder's own pooling is back
    with torch.no_grad():  # every item gets the same thought: swapping changes nothing
        embedder.thought_module.v_proj.weight.zero_()
    shared = thought_swap_leverage(embedder, ids, ["item_mean", "thought"])
    assert all(abs(v) < 1e-6 for v in shared.values())


def test_options_round_trip_through_a_checkpoint(tmp_path):
    embedder = embedder_with(seed=4, pooling="thought", thought_keys="item", thought_scale="token")
    with torch.no_grad():
        embedder.thought_module.output_gain.fill_(2.5)  # a trained gain, not the initial one
    expected = embedder.encode(ITEMS)
    embedder.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "reaemb_config.json").read_text())
    assert (config["pooling"], config["thought_keys"], config["thought_scale"]) == ("thought", "item", "token")
    loaded = ThoughtEmbedder.from_pretrained(tmp_path / "ckpt")
    assert loaded.thought_module.options() == embedder.thought_module.options()
    assert loaded.thought_module.output_gain.item() == 2.5
    torch.testing.assert_close(loaded.encode(ITEMS), expected, atol=0, rtol=0)
    other = loaded.thought_module_from(tmp_path / "ckpt")
    assert other.options() == loaded.thought_module.options() and other.output_gain.item() == 2.5


@pytest.mark.parametrize("field,value", [("thought_keys", "template"), ("thought_scale", "unit"),
                                         ("pooling", "eos")])
def test_model_arguments_reject_unknown_thought_options(field, value):
    with pytest.raises(ValueError, match=f"ModelArguments.{field} must be one of"):
        ModelArguments(**{field: value})


def test_lrcl_trains_the_options_and_saves_them(tmp_path):
    from conftest import ASSETS

    from reaemb_trl.data.canonical import load_items
    from reaemb_trl.lrcl_config import LRCLConfig
    from reaemb_trl.lrcl_trainer import LRCLTrainer

    embedder = embedder_with(pooling="thought_eos", thought_keys="item", thought_scale="token")
    args = LRCLConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=12,
                      learning_rate=1e-2, save_strategy="no", use_cpu=True, disable_tqdm=True, report_to="none",
                      max_item_tokens=192)
    trainer = LRCLTrainer(embedder, args, train_dataset=load_items(ASSETS / "tiny_catalog"))
    before = {n: p.detach().clone() for n, p in embedder.thought_module.named_parameters()}
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in embedder.thought_module.named_parameters())
    trainer.save_model(str(tmp_path / "ckpt"))
    loaded = ThoughtEmbedder.from_pretrained(tmp_path / "ckpt")
    assert loaded.pooling == "thought_eos" and loaded.thought_module.options()["keys"] == "item"
    assert loaded.thought_module.output_gain.item() == embedder.thought_module.output_gain.item()
