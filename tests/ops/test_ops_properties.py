"""Property-based checks of every op and divergence against the float64 oracle.

Each drawn case runs forward and backward on the backend under test and on
``backends/reference.py`` in float64 over the SAME rounded inputs; values and gradients must
meet the numerics contract (tests/contract.py).
"""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import prefopt_kernels as pk

from contract import (DEVICE, assert_grads_close, assert_tokens_close, backends_under_test,
                      in_forward_kl_rounding_gap, oracle, row_scale, with_cpu_isas)
from strategies import cases, scaled

BACKENDS = backends_under_test()
# token_terms, whose kernel paths (every divergence, both sweeps, forward and backward)
# include the other properties', runs once per CPU variant; the rest run on the default
# variant only, to keep the suite's time (test_backends and test_edge_numerics hold the
# entropy, the weights and the beta/alpha edges on every variant).
ISA_BACKENDS = with_cpu_isas(BACKENDS)
# Divergences that stay finite when the two supports differ.
FINITE_ON_DISJOINT = ("js", "tv", "hellinger")


def _upstream(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def _tv_rows_decided(a, b, temperature):
    """Rows where every sign(p - q) is decided well above rounding (tv's exemption)."""
    p = torch.softmax(a.to(torch.float64) / temperature, -1)
    q = torch.softmax(b.to(torch.float64) / temperature, -1)
    gap = (p - q).abs()
    return ((gap > 1e-4 * (p + q)) | (p + q < 1e-30)).all(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases(), entropy=st.booleans(), seed=st.integers(0, 1000))
@settings(max_examples=scaled(200))
def test_token_logprobs(backend, case, entropy, seed):
    logits = case.logits.to(DEVICE).requires_grad_(True)
    labels = case.labels.to(DEVICE)
    g_logp = _upstream(labels.shape, seed)
    g_ent = _upstream(labels.shape, seed + 1)
    with pk.use_backend(backend):
        out = pk.token_logprobs(logits, labels, temperature=case.temperature, return_entropy=entropy)
    logp, ent = out if entropy else (out, None)
    loss = (logp * g_logp.to(DEVICE)).sum() + ((ent * g_ent.to(DEVICE)).sum() if entropy else 0)
    loss.backward()

    upstream = {"logp": g_logp}
    if entropy:
        upstream["entropy"] = g_ent
    want, grad = oracle(case.logits, case.labels, None, None, temperature=case.temperature,
                        want_logp=True, want_entropy=entropy, upstream=upstream)
    s = row_scale(case.logits, None, case.temperature)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    assert_tokens_close(logp, want["logp"], s, "logp")
    if entropy:
        assert_tokens_close(ent, want["entropy"], s, "entropy")
    g_out = g_logp.abs() + (g_ent.abs() if entropy else 0)
    assert logits.grad.dtype == case.dtype
    assert_grads_close(logits.grad, grad, s, g_out, case.dtype, "d logp")
    ignored = case.labels == -100
    assert (logp.detach().cpu()[ignored] == 0).all()
    assert (logits.grad.cpu()[ignored] == 0).all()


def _check_divergence(backend, case, divergence, beta, alpha, seed, terms):
    if divergence == "forward_kl" and backend != "reference":
        assume(not in_forward_kl_rounding_gap(case.logits, case.ref_logits, case.temperature))
    logits = case.logits.to(DEVICE).requires_grad_(True)
    ref_logits = case.ref_logits.to(DEVICE)
    weight = None if case.weight is None else case.weight.to(DEVICE)
    labels = case.labels.to(DEVICE)
    g_div = _upstream(case.labels.shape, seed)
    g_logp = _upstream(case.labels.shape, seed + 1)
    with pk.use_backend(backend):
        if terms:
            out = pk.token_terms(logits, labels, ref_logits, divergence=divergence, div_weight=weight,
                                 temperature=case.temperature, beta=beta, alpha=alpha)
            div = out.div
            loss = (div * g_div.to(DEVICE)).sum() + (out.logp * g_logp.to(DEVICE)).sum()
        else:
            div = pk.token_divergence(logits, ref_logits, divergence=divergence, beta=beta, alpha=alpha,
                                      weight=weight, temperature=case.temperature)
            loss = (div * g_div.to(DEVICE)).sum()
    loss.backward()

    upstream = {"div": g_div}
    if terms:
        upstream["logp"] = g_logp
    want, grad = oracle(case.logits, case.labels if terms else None, case.ref_logits, case.weight,
                        divergence=divergence, beta=beta, alpha=alpha, temperature=case.temperature,
                        want_logp=terms, want_ref_logp=terms, upstream=upstream)
    s = row_scale(case.logits, case.ref_logits, case.temperature)
    assert div.dtype == torch.float32 and div.shape == case.labels.shape
    assert_tokens_close(div, want["div"], s, divergence)
    g_out = g_div.abs() + (g_logp.abs() if terms else 0)
    # A finite divergence beyond fp32's range has no meaningful gradient (an infinite or NaN
    # one has a NaN gradient row, which is checked); tv's sign must be decided.
    rows = ~(torch.isfinite(want["div"]) & (want["div"].abs() > torch.finfo(torch.float32).max))
    if divergence == "tv":
        rows &= _tv_rows_decided(case.logits, case.ref_logits, case.temperature)
    assert_grads_close(logits.grad, grad, s, g_out, case.dtype, f"d {divergence}", rows=rows)
    if terms:
        assert_tokens_close(out.logp, want["logp"], s, "logp")
        assert_tokens_close(out.ref_logp, want["ref_logp"], s, "ref_logp")
        assert not out.ref_logp.requires_grad
    if case.weight is not None:
        assert (div.detach().cpu()[case.weight == 0] == 0).all()


# (beta, alpha), the parameter edges included.
PARAMS = st.sampled_from([(0.5, 0.5), (0.1, -0.5), (0.9, 2.0), (0.3, 0.3), (1e-6, 1 + 1e-7), (1 - 1e-6, -1e-6)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", pk.DIVERGENCES)
@given(case=cases(), params=PARAMS,
       seed=st.integers(0, 1000))
@settings(max_examples=scaled(80))
def test_token_divergence(backend, divergence, case, params, seed):
    beta, alpha = params
    _check_divergence(backend, case, divergence, beta, alpha, seed, terms=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", FINITE_ON_DISJOINT)
@given(case=cases(disjoint_support=True), seed=st.integers(0, 1000))
@settings(max_examples=scaled(60))
def test_token_divergence_disjoint_support(backend, divergence, case, seed):
    _check_divergence(backend, case, divergence, 0.5, 0.5, seed, terms=False)


@pytest.mark.parametrize("backend", ISA_BACKENDS)
@pytest.mark.parametrize("divergence", pk.DIVERGENCES)
@given(case=cases(), seed=st.integers(0, 1000))
@settings(max_examples=scaled(50))
def test_token_terms(backend, divergence, case, seed):
    _check_divergence(backend, case, divergence, 0.4, 0.6, seed, terms=True)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases(), seed=st.integers(0, 1000))
@settings(max_examples=scaled(80))
def test_token_terms_with_entropy(backend, case, seed):
    logits = case.logits.to(DEVICE).requires_grad_(True)
    labels = case.labels.to(DEVICE)
    upstream = {k: _upstream(case.labels.shape, seed + i) for i, k in enumerate(("logp", "entropy", "div"))}
    with pk.use_backend(backend):
        out = pk.token_terms(logits, labels, case.ref_logits.to(DEVICE), return_entropy=True,
                             temperature=case.temperature)
    sum((getattr(out, k) * g.to(DEVICE)).sum() for k, g in upstream.items()).backward()
    want, grad = oracle(case.logits, case.labels, case.ref_logits, None, divergence="forward_kl",
                        temperature=case.temperature, want_logp=True, want_ref_logp=True,
                        want_entropy=True, upstream=upstream)
    s = row_scale(case.logits, case.ref_logits, case.temperature)
    for key in ("logp", "ref_logp", "div", "entropy"):
        assert_tokens_close(getattr(out, key), want[key], s, key)
    g_out = sum(g.abs() for g in upstream.values())
    assert_grads_close(logits.grad, grad, s, g_out, case.dtype, "d terms")
