"""experiments/crrl_headroom.py's supervised learner: each `--module-train` sends the gradient down exactly the paths
it names (the benchmark's conclusions about CRRL with `train_lora` rest on `lora_via_thought` being what CRRL can
learn: the adapter moves only through the thought vector mu)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_embedder
from experiments.crrl_headroom import centred_cosine_logits, supervised_loss, trainable_parameters

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture
def setting(items):
    embedder = tiny_embedder(lora=True, pooling="item_mean").eval()
    torch.manual_seed(3)
    for name, param in embedder.model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0, which would zero every gradient of A
            torch.nn.init.normal_(param, std=0.05)
    prefix_ids = embedder.prefix_ids(items[:4])
    d = embedder.thought_module.q_proj.in_features
    return embedder, prefix_ids, torch.randn(4, 5, d), torch.randn(d)


def _grads(output, params, grad_output=None):
    grads = torch.autograd.grad(output, params, grad_outputs=grad_output, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _via_mu_reference(embedder, prefix_ids, cands, center, lora):
    """d loss / d LoRA through mu alone: d loss / d mu with every other input constant, chained through mu(theta)."""
    prefix = embedder.encode_prefix(prefix_ids)
    mu = embedder.thought_module(prefix.hidden, prefix.mask)
    mu_leaf = mu.detach().requires_grad_(True)
    with torch.no_grad():
        frozen = embedder.encode_prefix(prefix_ids)
    emb = embedder.embed_from_thought(frozen, mu_leaf)
    loss = torch.nn.functional.cross_entropy(centred_cosine_logits(emb, cands, center),
                                             torch.zeros(len(prefix_ids), dtype=torch.long))
    (d_mu,) = torch.autograd.grad(loss, mu_leaf)
    return _grads(mu, lora, d_mu)


def test_lora_via_thought_reaches_the_adapter_only_through_mu(setting):
    embedder, prefix_ids, cands, center = setting
    _, lora = trainable_parameters(embedder, "lora_via_thought")
    via_mu = _grads(supervised_loss(embedder, prefix_ids, cands, center, "lora_via_thought", lora, NO_AUTOCAST), lora)
    reference = _via_mu_reference(embedder, prefix_ids, cands, center, lora)
    scale = max(float(g.abs().max()) for g in reference)
    assert scale > 0
    for got, want in zip(via_mu, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
    assert all(p.requires_grad for p in lora)  # the adapter is trainable again after the suffix pass

    # every path: the adapter also moves the pooled prefix, so its gradient differs from the via-mu one
    every_path = _grads(supervised_loss(embedder, prefix_ids, cands, center, "lora_all", lora, NO_AUTOCAST), lora)
    assert max(float((a - b).abs().max()) for a, b in zip(every_path, reference)) > 1e-2 * scale


def test_module_only_leaves_the_adapter_without_gradient(setting):
    embedder, prefix_ids, cands, center = setting
    module, lora = trainable_parameters(embedder, "module")
    assert lora == []
    adapter = [p for n, p in embedder.model.named_parameters() if "lora_" in n]
    for p in adapter:
        p.requires_grad_(False)
    loss = supervised_loss(embedder, prefix_ids, cands, center, "module", lora, NO_AUTOCAST)
    loss.backward()
    assert all(p.grad is None for p in adapter)
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in module)


def test_unknown_learner_is_named():
    with pytest.raises(ValueError, match="--module-train"):
        trainable_parameters(tiny_embedder(), "everything")
