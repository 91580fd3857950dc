"""The latent thought module and the embedder: invariances, gradients, fast == literal, save/load."""

import pytest
import torch

from conftest import ITEMS, save_tiny_backbone, tiny_causal_lm, tiny_embedder, tiny_tokenizer
from reaemb_trl.embedder import ThoughtEmbedder
from reaemb_trl.prompt import ItemPromptFormatter, add_thought_token


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_thought_vector_ignores_padding_side_amount_and_batch_mates(family):
    embedder = tiny_embedder(family)
    ids = embedder.prefix_ids(ITEMS)
    with torch.no_grad():
        alone = torch.cat([embedder.thought_vector(embedder.encode_prefix([i], "left")) for i in ids])
        for side in ("left", "right"):
            batched = embedder.thought_vector(embedder.encode_prefix(ids, side))
            torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
            # extra padding: a much longer batch mate
            long_mate = ids[0] + ids[1] + ids[2]
            padded = embedder.thought_vector(embedder.encode_prefix([ids[3], long_mate], side))[0]
            torch.testing.assert_close(padded, alone[3], atol=1e-5, rtol=1e-5)
            literal = embedder.literal_thought(ids, side)
            torch.testing.assert_close(literal, alone, atol=1e-5, rtol=1e-5)


def test_thought_vector_changes_output_and_pass_one_sends_no_gradient_into_llm():
    embedder = tiny_embedder(lora=True)
    ids = embedder.prefix_ids(ITEMS[:3])
    prefix = embedder.encode_prefix(ids)
    thought = embedder.thought_vector(prefix)
    out = embedder.embed_from_thought(prefix, thought)
    shifted = embedder.embed_from_thought(prefix, thought + 1.0)
    assert (out - shifted).abs().max() > 1e-3

    embedder.zero_grad()
    embedder.thought_vector(prefix).pow(2).sum().backward()  # pass 1 alone
    llm_grads = [p.grad for n, p in embedder.model.named_parameters() if p.requires_grad]
    assert llm_grads and all(g is None or g.abs().max() == 0 for g in llm_grads)
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in embedder.thought.parameters())

    embedder.zero_grad()
    embedder.literal_thought(ids).pow(2).sum().backward()  # the literal pass 1 as well
    assert all(p.grad is None for p in embedder.model.parameters())


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fast_path_equals_literal_two_pass_in_values_and_gradients(family, side, pooling):
    results = {}
    for method in ("fast", "literal"):
        embedder = tiny_embedder(family, lora=True, pooling=pooling, seed=3).double()
        # One pass over whole rows; the shared-template path is compared in test_template_cache.py (its float64
        # comparison needs float64 norms: the stock RMSNorm rounds to float32 at a different place there).
        embedder.share_template = False
        with torch.no_grad():  # non-zero LoRA B so LoRA A gets gradient too
            for name, p in embedder.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        ids = embedder.prefix_ids(ITEMS)
        run = embedder.embed_fast if method == "fast" else embedder.embed_literal
        out = run(ids, side)
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().pow(2)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in embedder.named_parameters() if p.requires_grad}
        results[method] = (out.detach(), loss.detach(), grads)
    (fast_out, fast_loss, fast_grads), (lit_out, lit_loss, lit_grads) = results["fast"], results["literal"]
    torch.testing.assert_close(fast_out, lit_out, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(fast_loss, lit_loss, atol=1e-10, rtol=1e-8)
    assert fast_grads.keys() == lit_grads.keys() and any("lora_A" in n for n in fast_grads)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], lit_grads[name], atol=1e-9, rtol=1e-7, msg=name)


def test_encode_is_independent_of_batch_mates_and_order():
    embedder = tiny_embedder()
    full = embedder.encode(ITEMS, batch_size=4)
    single = torch.cat([embedder.encode([item]) for item in ITEMS])
    reversed_order = embedder.encode(ITEMS[::-1], batch_size=3, sort_by_length=False).flip(0)
    torch.testing.assert_close(full, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, reversed_order, atol=1e-5, rtol=1e-5)
    literal = embedder.encode(ITEMS, batch_size=4, method="literal")
    torch.testing.assert_close(full, literal, atol=1e-5, rtol=1e-5)


def test_save_then_load_gives_identical_embeddings(tmp_path):
    from peft import LoraConfig

    backbone = save_tiny_backbone(tmp_path / "backbone")
    embedder = ThoughtEmbedder.from_backbone(
        str(backbone),
        pooling="last",
        lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        formatter=ItemPromptFormatter(max_length=200, max_value_chars=20),
    )
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_B" in name or "thought" in name:
                p.add_(torch.randn_like(p) * 0.1)
    expected = embedder.encode(ITEMS)
    embedder.save_pretrained(tmp_path / "ckpt")
    loaded = ThoughtEmbedder.from_pretrained(tmp_path / "ckpt")
    assert loaded.formatter == embedder.formatter and loaded.pooling == "last"
    torch.testing.assert_close(loaded.encode(ITEMS), expected, atol=0, rtol=0)


def test_model_built_in_process_is_saved_with_its_backbone(tmp_path):
    embedder = tiny_embedder(lora=True)
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    expected = embedder.encode(ITEMS[:3])
    embedder.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "backbone" / "config.json").exists()
    torch.testing.assert_close(ThoughtEmbedder.from_pretrained(tmp_path / "ckpt").encode(ITEMS[:3]), expected)


def test_thought_token_added_without_shrinking_a_padded_embedding_table():
    model = tiny_causal_lm(vocab=512)  # tokenizer has 400 tokens: the table is padded
    tokenizer = tiny_tokenizer()
    token_id = add_thought_token(tokenizer, model)
    assert token_id == 400 and model.get_input_embeddings().weight.shape[0] == 512
    small = tiny_causal_lm(vocab=400)
    add_thought_token(tiny_tokenizer(), small)
    assert small.get_input_embeddings().weight.shape[0] == 401
