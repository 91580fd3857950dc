"""The latent thought module and the embedder: invariances, gradients, fast == literal, save/load."""

import pytest
import torch

from conftest import ITEMS, save_tiny_backbone, tiny_causal_lm, tiny_embedder, tiny_tokenizer
from reaemb_trl.checkpointing import CheckpointError, adapter_weights_file
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
            literal = embedder.literal_thought_vector(ids, side)
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
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in embedder.thought_module.parameters())

    embedder.zero_grad()
    embedder.literal_thought_vector(ids).pow(2).sum().backward()  # the literal pass 1 as well
    assert all(p.grad is None for p in embedder.model.parameters())


@pytest.mark.parametrize("pooling", ["mean", "last", "thought_eos"])
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


def test_encode_of_no_items_is_empty_and_of_one_item_is_its_vector():
    embedder = tiny_embedder()
    for method in ("fast", "literal", "no_thought"):
        empty = embedder.encode([], method=method)
        assert empty.shape == (0, 32) and empty.dtype == torch.float32
    by_module = embedder.encode_with_thought_modules([], {"a": embedder.thought_module})
    assert {k: v.shape for k, v in by_module.items()} == {"a": (0, 32)}
    one = embedder.encode([ITEMS[0]])
    assert one.shape == (1, 32)
    torch.testing.assert_close(one, embedder.encode(ITEMS)[:1], atol=1e-5, rtol=1e-5)
    assert embedder.encode([{"title": "Toy Story"}]).shape == (1, 32)


@pytest.mark.parametrize("not_an_item_list", [[("title", "Toy Story")], ["Toy Story"], "Toy Story"])
def test_encode_of_something_that_is_not_a_list_of_items_says_what_an_item_is(not_an_item_list):
    with pytest.raises(ValueError, match=r"an item is a list of \(key, value\) pairs or a \{key: value\} mapping"):
        tiny_embedder().encode(not_an_item_list)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        tiny_embedder().encode([ITEMS[0]], batch_size=0)


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


def write_pre_rename_checkpoint(folder):
    """A checkpoint folder as reaemb-trl wrote it before `ThoughtEmbedder.thought_module` got its name, written by
    hand (no save_pretrained): config, prompt format, tokenizer, the backbone in the folder, and
    thought_module.safetensors holding the module's own keys. Returns the thought module's tensors."""
    import json

    from safetensors.torch import save_file

    d = 32
    tensors = {}
    for n, name in enumerate(("q_proj", "k_proj", "v_proj")):
        # exact binary fractions: the same bits on every machine, so the fingerprint below is a constant
        tensors[f"{name}.weight"] = ((torch.arange(d * d).reshape(d, d) * (n + 3)) % 17 - 8).float() / 128
        tensors[f"{name}.bias"] = ((torch.arange(d) + n) % 5 - 2).float() / 32
    folder.mkdir()
    save_file(tensors, folder / "thought_module.safetensors")
    save_tiny_backbone(folder / "backbone")
    tiny_tokenizer().save_pretrained(folder)
    (folder / "prompt_format.json").write_text(json.dumps({
        "system_prompt": "Condense the item.", "user_prefix": "Item: ", "max_value_chars": 100, "max_length": 256,
        "use_chat_template": True, "thought_token": "<|Thought|>"}))  # fmt: skip
    (folder / "reaemb_config.json").write_text(json.dumps({
        "format": "reaemb-trl/1", "backbone": None, "backbone_in_folder": True, "pooling": "mean", "hidden_size": d,
        "rope_base": 1000.0, "adapter": False, "architecture": "LlamaForCausalLM"}))  # fmt: skip
    return tensors


def test_a_checkpoint_written_before_the_thought_module_rename_loads(tmp_path):
    """Checkpoint files kept their names and contents: an old folder loads, embeds, and keeps its fingerprint."""
    from reaemb_trl.item_table import checkpoint_fingerprint, embedder_fingerprint

    tensors = write_pre_rename_checkpoint(tmp_path / "old")
    loaded = ThoughtEmbedder.from_pretrained(tmp_path / "old")
    state = loaded.thought_module.state_dict()
    assert set(state) == set(tensors)
    assert all(torch.equal(state[k], v) for k, v in tensors.items())
    assert loaded.formatter.system_prompt == "Condense the item." and not loaded.has_adapter
    vectors = loaded.encode(ITEMS[:3])
    assert vectors.shape == (3, 32) and torch.isfinite(vectors).all()
    # The same fingerprint as before the rename (tables exported then still accept `reaemb encode` rows)
    fingerprint = checkpoint_fingerprint(tmp_path / "old")
    assert fingerprint == embedder_fingerprint(loaded, loaded.thought_module) == PRE_RENAME_FINGERPRINT
    # saving again writes the same file names, and the module's own keys
    loaded.save_pretrained(tmp_path / "new")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "new" / "thought_module.safetensors")) == set(tensors)


# checkpoint_fingerprint of write_pre_rename_checkpoint's folder, computed by the code before the rename.
PRE_RENAME_FINGERPRINT = "sha256:1adf0a30761e09cb766c01e3952d04facb8e75294a04d80876fa5afee002dfd9"


def test_thought_token_added_without_shrinking_a_padded_embedding_table():
    model = tiny_causal_lm(vocab=512)  # tokenizer has 400 tokens: the table is padded
    tokenizer = tiny_tokenizer()
    token_id = add_thought_token(tokenizer, model)
    assert token_id == 400 and model.get_input_embeddings().weight.shape[0] == 512
    small = tiny_causal_lm(vocab=400)
    add_thought_token(tiny_tokenizer(), small)
    assert small.get_input_embeddings().weight.shape[0] == 401


def test_same_adapter_as_holds_across_a_resized_vocabulary(tmp_path):
    """A backbone whose vocabulary has no spare row grows one for the thought token; PEFT then counts the resized
    embedding layers as trainable state, which the saved adapter never holds. Comparing with them made every
    checkpoint look different from its own LRCL start (so LRCL and CRRL exports never shared a prefix pass)."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    backbone = save_tiny_backbone(tmp_path / "backbone", vocab=len(tiny_tokenizer()))  # full: the thought token resizes
    embedder = ThoughtEmbedder.from_backbone(
        str(backbone), lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert embedder.model.get_input_embeddings().weight.shape[0] > len(tiny_tokenizer())
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    embedder.save_pretrained(tmp_path / "lrcl")
    loaded = ThoughtEmbedder.from_pretrained(tmp_path / "lrcl")
    assert loaded.same_adapter_as(tmp_path / "lrcl")

    other = tmp_path / "other"
    loaded.save_pretrained(other)
    file = adapter_weights_file(other)
    weights = load_file(file)
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = weights[key] + 1e-3
    save_file(weights, file)
    assert not loaded.same_adapter_as(other)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "other_module"])
def test_a_damaged_thought_module_file_is_one_clear_error(tmp_path, damage):
    embedder = tiny_embedder()
    embedder.save_pretrained(tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "thought_module.safetensors"
    if damage == "other_module":  # a readable file with another module's weights
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(2, 2)}, file)
    else:
        data = file.read_bytes()
        damaged = {"truncated": data[: len(data) // 2], "garbage": b"not safetensors" * 64, "empty": b""}
        file.write_bytes(damaged[damage])
    for load in (lambda: ThoughtEmbedder.from_pretrained(tmp_path / "ckpt"),
                 lambda: embedder.thought_module_from(tmp_path / "ckpt"),
                 lambda: embedder.load_trained_state(tmp_path / "ckpt")):  # fmt: skip
        with pytest.raises(CheckpointError, match=r"thought_module\.safetensors is damaged.*copy the checkpoint") as exc:
            load()
        assert str(tmp_path / "ckpt" / "thought_module.safetensors") in str(exc.value)
        assert "\n" not in str(exc.value)
