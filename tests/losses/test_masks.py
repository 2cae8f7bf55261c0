"""SparsePO token masks on tiny models built from configs in code."""

import pytest
import torch
import torch.nn as nn

from prefopt_kernels.masks import ActivationTokenMask, LearnedTokenMask

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _expected_activation_mask(acts, valid, eps=1e-6):
    """Float64 formula: per hook mean over H, z-normalise, min-max, mask; average hooks."""
    out = torch.zeros(valid.shape, dtype=torch.float64)
    for a in acts:
        s = a.double().mean(-1)
        for b in range(s.shape[0]):
            idx = valid[b] > 0
            v = s[b, idx]
            z = (v - v.mean()) / (v.std(unbiased=False) + eps)
            out[b, idx] += (z - z.min()) / (z.max() - z.min() + eps)
    return out / len(acts)


def test_activation_mask_matches_formula_on_hf_model():
    from transformers.models.llama.modeling_llama import LlamaMLP

    model = _tiny_llama()
    ids = torch.randint(0, 50, (3, 9))
    valid = torch.ones(3, 9)
    valid[1, 6:] = 0
    valid[2, :2] = 0
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o)) for m in model.modules() if isinstance(m, LlamaMLP)]
    masker = ActivationTokenMask(LlamaMLP)
    mask = masker(model, valid, input_ids=ids)
    for h in hooks:
        h.remove()
    assert len(acts) == 2
    torch.testing.assert_close(mask.double(), _expected_activation_mask(acts, valid), atol=1e-5, rtol=1e-5)
    assert not mask.requires_grad
    assert float(mask[valid == 0].abs().max()) == 0.0
    assert 0.0 <= float(mask.min()) and float(mask.max()) <= 1.0
    # Hooks are gone after the call: a second forward records nothing.
    model(input_ids=ids)
    with pytest.raises(RuntimeError, match="record"):
        masker.compute(valid)


def test_activation_mask_context_manager_and_name_filter():
    model = _tiny_llama()
    ids = torch.randint(0, 50, (2, 5))
    masker = ActivationTokenMask(nn.Linear, name_filter="down_proj")
    with torch.no_grad(), masker.record(model):
        model(input_ids=ids)
    assert len(masker._scores) == 2
    mask = masker.compute(torch.ones(2, 5))
    assert mask.shape == (2, 5)
    with pytest.raises(ValueError, match="no module"):
        with ActivationTokenMask(nn.Conv2d).record(model):
            pass


def test_learned_mask_formula_and_gradients():
    model = _tiny_llama()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    valid = torch.ones(2, 6)
    valid[0, 4:] = 0
    net = LearnedTokenMask(16, len(hs), separate_kl=True)
    with torch.no_grad():
        net.a.normal_(0, 0.5)
        net.b.normal_(0, 0.5)
        net.w.normal_(0, 1.0)
    reward, kl = net(hs, valid)
    for k, got in enumerate((reward, kl)):
        total = 0.0
        for layer, h in enumerate(hs):
            x = torch.nn.functional.layer_norm(h.double(), (16,), net.norm.weight.double(), net.norm.bias.double())
            total = total + net.w[k, layer].double() * torch.relu(x @ net.a[k, layer].double() + net.b[k, layer].double())
        torch.testing.assert_close(got.double(), torch.relu(total) * valid, atol=1e-5, rtol=1e-5)
    assert bool((reward == 0).any())  # the ReLUs make it sparse
    (reward.sum() + kl.sum()).backward()
    assert net.a.grad is not None and float(net.a.grad.abs().sum()) > 0
    shared = LearnedTokenMask(16, len(hs))
    r, k = shared(hs)
    assert r is k


def test_learned_mask_starts_dense_and_checks_shapes():
    hs = tuple(torch.randn(2, 4, 8) for _ in range(3))
    net = LearnedTokenMask(8, 3)
    r, _ = net(hs)
    assert float(r.detach().min()) > 0.5
    with pytest.raises(ValueError, match="layers"):
        net(hs[:2])
    with pytest.raises(ValueError, match="hidden_states"):
        net(tuple(torch.randn(2, 4, 9) for _ in range(3)))


def test_masks_ignore_non_finite_values_at_padded_positions():
    """A padded position's inf activation or NaN hidden state reaches neither mask: 0 there and
    the valid positions' values unchanged (where, not a product with the 0/1 mask)."""
    acts = [torch.randn(2, 5, 4) for _ in range(2)]
    valid = torch.ones(2, 5)
    valid[0, 3:] = 0
    masker = ActivationTokenMask(nn.Identity)
    masker._scores = [a.mean(-1) for a in acts]
    clean = masker.compute(valid)
    dirty_acts = [a.clone() for a in acts]
    dirty_acts[0][0, 4] = float("inf")
    dirty_acts[1][0, 3] = float("nan")
    masker._scores = [a.mean(-1) for a in dirty_acts]
    dirty = masker.compute(valid)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    torch.testing.assert_close(clean.double(), _expected_activation_mask(acts, valid), atol=1e-6, rtol=1e-6)

    hs = tuple(torch.randn(2, 5, 8) for _ in range(3))
    net = LearnedTokenMask(8, 3)
    reward, _ = net(hs, valid)
    clean_grads = torch.autograd.grad(reward.sum(), [net.a, net.w, net.norm.weight])
    dirty_hs = tuple(h.clone() for h in hs)
    dirty_hs[1][0, 4] = float("nan")
    dirty_hs[2][0, 3] = float("inf")
    dirty_reward, _ = net(dirty_hs, valid)
    assert torch.equal(dirty_reward, reward) and float(dirty_reward[0, 3:].abs().max()) == 0.0
    # The backward too: the network's gradients are those of the clean input, not 0 * NaN.
    dirty_grads = torch.autograd.grad(dirty_reward.sum(), [net.a, net.w, net.norm.weight])
    for clean, dirty in zip(clean_grads, dirty_grads):
        assert torch.equal(dirty, clean)
