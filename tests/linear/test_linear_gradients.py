"""Gradients and rows of the fused linear ops: a loss that reads some outputs and some policy
tensors only, no gradient for the reference, outputs modified in place, ignored rows, a custom
ignore_index and a logit scale of 0 (tolerances: linear_cases.py)."""

import math

import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels.linear.heads import accumulate

from linear_cases import (BACKENDS, OPS, Call, assert_close, check, explicit_on, make_head, make_labels, make_pair,
                          make_upstream, oracle, run_fused)


PARTIAL = {
    # The loss reads some outputs only, and only some policy tensors require grad.
    "terms_div_only": dict(op="terms", loss_on=("div",)),
    "terms_logp_only_bias_only": dict(op="terms", loss_on=("logp",), requires=("bias",)),
    "logprobs_entropy_only_weight_only": dict(op="logprobs", loss_on=("entropy",), requires=("weight",)),
    "divergence_hidden_only": dict(op="divergence", requires=("hidden",)),
}


@pytest.mark.parametrize("case", list(PARTIAL))
@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_upstream_and_grads(backend, case):
    cfg = dict(PARTIAL[case])
    op = cfg.pop("op")
    policy, ref = make_pair((6,), seed=171, vocab=200, softcaps=(7.0, None))
    labels = make_labels((6,), 200, seed=172, ignored=(4,))
    call = Call(op, policy, None if op == "divergence" else labels, None if op == "logprobs" else ref,
                divergence="hellinger", return_entropy=op != "divergence", **cfg)
    check(backend, call, seed=173, key=("partial", case), explicit=explicit_on(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_gets_no_gradient(backend):
    policy, ref = make_pair((6,), seed=71)
    labels = make_labels((6,), 300, seed=72)
    for call in (Call("terms", policy, labels, ref, divergence="js", return_entropy=True),
                 Call("divergence", policy, ref=ref, divergence="reverse_kl")):
        upstream = make_upstream(call, 73)
        _, _, grads = run_fused(backend, call, upstream)  # asserts every reference .grad is None
        assert grads[0] is not None and grads[0].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_can_be_modified_in_place(backend):
    """Each output is a tensor of its own, as the logits ops' are: a loss may mask it in place, and the
    gradient is then that of the masked sum (float64 full logits)."""
    g = torch.Generator().manual_seed(91)
    h = torch.randn(2, 5, 16, generator=g, dtype=torch.float64).float().requires_grad_(True)
    w = torch.randn(301, 16, generator=g, dtype=torch.float64).float()
    labels = torch.randint(0, 301, (2, 5), generator=g)
    keep = (torch.rand(2, 5, generator=g) > 0.4).float()
    with pk.use_backend(backend):
        logp = pk.linear_token_logprobs(h, w, labels)
        logp.mul_(keep)
        logp.sum().backward()
    h64 = h.detach().double().requires_grad_(True)
    expected = torch.log_softmax(h64 @ w.double().t(), -1).gather(-1, labels[..., None])[..., 0] * keep.double()
    expected.sum().backward()
    torch.testing.assert_close(logp.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend, op, dtype):
    """Every token ignored (or every div_weight 0): zeros, zero gradients, no error, no NaN (no
    tile runs, so no GEMM writes the gradients' accumulators: fp32 and half heads alike)."""
    policy, ref = make_pair((2, 3), seed=81, dtype=dtype)
    labels = torch.full((2, 3), -100)
    weight = torch.zeros(2, 3)
    call = Call(op, policy, None if op == "divergence" else labels, None if op == "logprobs" else ref,
                div_weight=weight if op == "divergence" else None, divergence="js",
                return_entropy=op != "divergence", extras=() if op == "divergence" else ("mean_logits", "is_top1"))
    values, extras, grads = run_fused(backend, call, make_upstream(call, 82))
    for v in values.values():
        assert v.shape == (2, 3) and v.dtype == torch.float32 and (v == 0).all()
    for g in grads:
        assert g is None or (g == 0).all()
    if extras:
        assert (extras["mean_logits"] == 0).all() and not extras["is_top1"].any()


@pytest.mark.parametrize("widened", [False, True])
@pytest.mark.parametrize("inner", [1, 2, 7])
def test_first_product_writes_the_bits_of_a_zero_fill_and_an_accumulation(inner, widened):
    """``accumulate(first=True)`` into garbage, then once more, gives the bits of a zero-filled
    accumulator and two accumulations, ``-0.0`` products included: a row of ``-0.0`` times
    positive values sums to ``-0.0`` term by term, where ``0 + (-0.0)`` is ``+0.0``."""
    g = torch.Generator().manual_seed(5)
    dtype = torch.bfloat16 if widened else torch.float32
    a = [torch.randn(6, inner, generator=g).to(dtype) for _ in range(2)]
    b = [(torch.rand(inner, 5, generator=g) + 0.5).to(dtype) for _ in range(2)]
    a[0][2] = -0.0
    a[1][2] = -0.0
    expected = torch.zeros(6, 5)
    got = torch.full((6, 5), float("nan"))
    for i in range(2):
        accumulate(expected, a[i], b[i])
        accumulate(got, a[i], b[i], first=i == 0)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), i
    assert (expected[2] == 0).all() and not torch.signbit(expected[2]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_custom(backend):
    """A non-default ignore_index drops those rows; -100 is then an out-of-range label."""
    policy = make_head((6,), 16, 300, seed=91)
    labels = make_labels((6,), 300, seed=92, ignored=(1, 4))
    custom = torch.where(labels == -100, 299, labels.clamp(max=298))
    labels = torch.where(labels == -100, -100, custom)
    with pk.use_backend(backend):
        out = pk.linear_token_logprobs(policy.root, policy.weight, custom, ignore_index=299)
        with pytest.raises(ValueError, match="^labels"):
            pk.linear_token_logprobs(policy.root, policy.weight, torch.full((6,), -100), ignore_index=299)
    exp = oracle(policy, labels, None, gemm_dtype=torch.float32, upstream={})
    assert (out[[1, 4]] == 0).all()
    assert_close(out, exp.values["logp"], exp.value_tol["logp"], "logp with ignore_index=299")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_scale_zero_is_uniform(backend):
    """logit_scale = 0 gives z = 0: the uniform distribution (by hand: logp = -log V, H = log V,
    log sum p^2 = -log V, mean logit 0, top-1 only for label 0, the first of V equal maxima) and
    every gradient is 0 (dz/dh carries the factor 0)."""
    policy = make_head((5,), 16, 200, seed=181, bias=True)
    labels = torch.tensor([0, 7, 199, -100, 0])
    root, weight, bias = policy.leaves()
    with pk.use_backend(backend):
        logp, entropy, extras = pk.linear_token_logprobs(
            root, weight, labels, head_bias=bias, logit_scale=0.0, return_entropy=True,
            extras=("mean_logits", "is_top1", "log_sum_sq_probs"))
    (logp.sum() + entropy.sum()).backward()
    kept = labels != -100
    log_v = torch.tensor(math.log(200.0))
    contract = 1e-5 + 1e-6  # s = 1: every logit is 0
    assert ((logp[kept] + log_v).abs() <= contract * (1 + log_v)).all() and logp[3] == 0
    assert ((entropy[kept] - log_v).abs() <= contract * (1 + log_v)).all() and entropy[3] == 0
    assert ((extras["log_sum_sq_probs"][kept] + log_v).abs() <= contract * (1 + log_v)).all()
    assert (extras["mean_logits"] == 0).all()
    assert extras["is_top1"].tolist() == [True, False, False, False, True]
    for g in (root.grad, weight.grad, bias.grad):
        assert g is None or (g == 0).all()
