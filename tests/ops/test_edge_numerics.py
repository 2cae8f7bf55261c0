"""Edge numerics of the kernels: alpha near 0 and 1, js's beta near 0 and 1, extreme
temperatures, the NaN policy and infinite divergences, on every backend that runs here.

Parameter edges are checked against the float64 oracle under the numerics contract and,
more tightly (relative error), against the definitions evaluated with 40-digit mpmath
arithmetic on the same rounded logits: the contract's absolute floor would let a divergence
of size 1e-7 be 100% wrong.
"""

from __future__ import annotations

import mpmath
import pytest
import torch

import prefopt_kernels as pk

from contract import (DEVICE, assert_grads_close, assert_tokens_close, backends_under_test,
                      in_forward_kl_argmax_gap, in_forward_kl_rounding_gap, oracle, row_scale, with_cpu_isas)

KERNELS = with_cpu_isas(backends_under_test())
ALL_BACKENDS = KERNELS + ["reference"]
NAN, INF = float("nan"), float("inf")

ALPHAS = (1e-7, -1e-7, 1e-4, 1 + 1e-9, 1 - 1e-9, 1 + 1e-5, 1 - 1e-5, 1 - 1e-3)
BETAS = (1e-7, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-7)


def _pair(seed, shape, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    b = a + torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return a.to(dtype), b.to(dtype)


def _div_and_grad(backend, a, b, divergence, beta=0.5, alpha=0.5, temperature=1.0):
    x = a.detach().clone().to(DEVICE).requires_grad_(True)
    with pk.use_backend(backend):
        div = pk.token_divergence(x, b.to(DEVICE), divergence=divergence, beta=beta, alpha=alpha,
                                  temperature=temperature)
    div.sum().backward()
    return div.detach().cpu(), x.grad.cpu()


def _exact(a, b, divergence, beta, alpha, temperature=1.0):
    """The definitions in 40-digit arithmetic on the rounded logits: ``D`` per row,
    ``dD/da_j = p_j (f'(t_j) - sum_i p_i f'(t_i)) / T`` and the size of the terms that
    gradient is the difference of, ``max_j p_j |f'(t_j)| / T``."""
    mp = mpmath.mp
    mp.dps = 40
    T, beta, alpha = mp.mpf(temperature), mp.mpf(beta), mp.mpf(alpha)
    values, grads, sizes = [], [], []
    for row_a, row_b in zip(a.double().tolist(), b.double().tolist()):
        ea = [mp.exp(mp.mpf(v) / T) for v in row_a]
        eb = [mp.exp(mp.mpf(v) / T) for v in row_b]
        p = [e / mp.fsum(ea) for e in ea]
        q = [e / mp.fsum(eb) for e in eb]
        if divergence == "alpha":
            terms = [(pi**alpha * qi ** (1 - alpha) - alpha * pi - (1 - alpha) * qi) / (alpha * (alpha - 1))
                     for pi, qi in zip(p, q)]
            slopes = [((pi / qi) ** (alpha - 1) - 1) / (alpha - 1) for pi, qi in zip(p, q)]
        else:
            m = [beta * qi + (1 - beta) * pi for pi, qi in zip(p, q)]
            terms = [beta * qi * mp.log(qi / mi) + (1 - beta) * pi * mp.log(pi / mi) for pi, qi, mi in zip(p, q, m)]
            slopes = [(1 - beta) * mp.log(pi / mi) for pi, mi in zip(p, m)]
        s = mp.fsum(pi * si for pi, si in zip(p, slopes))
        values.append(float(mp.fsum(terms)))
        grads.append([float(pi * (si - s) / T) for pi, si in zip(p, slopes)])
        sizes.append(float(max(abs(pi * si) for pi, si in zip(p, slopes)) / T))
    return (torch.tensor(values, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64),
            torch.tensor(sizes, dtype=torch.float64))


def _assert_relative(got, want, rtol, what):
    err = ((got.double() - want).abs() / want.abs()).max().item()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def _assert_grad_close(got, want, sizes, what):
    """Per row: 2e-6 of the row's largest entry, plus 1e-6 of the size of the terms whose
    difference the gradient is (fp32 forms each term to a few ulp; where the terms nearly
    cancel, that sets the floor)."""
    err = (got.double() - want).abs().amax(-1)
    tol = 2e-6 * want.abs().amax(-1) + 1e-6 * sizes
    assert (err <= tol).all(), f"{what}: gradient errors {err.tolist()} > {tol.tolist()}"


# --------------------------------------------------------------------------- parameter edges


# Each parameter edge: (divergence, the keyword it sets, its values, the _pair seeds and scale
# of the exact check). js takes a wide spread of log t, so that both its log1p and its
# logaddexp forms are taken.
EDGES = {
    "alpha": ("alpha", ALPHAS, (1, 2), 2.0),
    "js": ("beta", BETAS, (3, 4), 12.0),
}


def _params(divergence, value):
    """``(beta, alpha)`` with the edge value in the divergence's own parameter."""
    keyword = EDGES[divergence][0]
    return (value, 0.5) if keyword == "beta" else (0.5, value)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", sorted(EDGES))
def test_parameter_edges_meet_the_contract(backend, dtype, divergence):
    keyword, values, (seed, _), _ = EDGES[divergence]
    a, b = _pair(seed, (3, 97), dtype=dtype)
    for value in values:
        beta, alpha = _params(divergence, value)
        div, grad = _div_and_grad(backend, a, b, divergence, beta=beta, alpha=alpha)
        want, want_grad = oracle(a, None, b, None, divergence=divergence, beta=beta, alpha=alpha,
                                 upstream={"div": torch.ones(3)})
        s = row_scale(a, b, 1.0)
        assert_tokens_close(div, want["div"], s, f"{keyword}={value!r}")
        assert_grads_close(grad, want_grad, s, torch.ones(3), dtype, f"d {keyword}={value!r}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("divergence", sorted(EDGES))
def test_parameter_edges_match_the_exact_definition(backend, divergence):
    keyword, values, (_, seed), scale = EDGES[divergence]
    a, b = _pair(seed, (2, 24), scale=scale)
    for value in values:
        beta, alpha = _params(divergence, value)
        div, grad = _div_and_grad(backend, a, b, divergence, beta=beta, alpha=alpha)
        want, want_grad, sizes = _exact(a, b, divergence, beta, alpha)
        _assert_relative(div, want, 2e-6, f"{keyword}={value!r}")
        _assert_grad_close(grad, want_grad, sizes, f"{keyword}={value!r}")


# --------------------------------------------------------------------------- temperatures


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("temperature", [1e-30, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_temperatures(backend, temperature, dtype):
    # Logits of modest size, distinct in every row (at T = 1e-30, float64 cannot resolve ties
    # of a / T either, so the oracle would be off there), then one masked entry.
    g = torch.Generator().manual_seed(5)
    a = torch.stack([(torch.randperm(64, generator=g) - 32) * 0.3 for _ in range(8)]).to(dtype)
    a, b = a[:4].clone(), a[4:].clone()
    a[0, 7] = b[0, 7] = -INF  # its gradient stays exactly 0
    labels = torch.tensor([3, 50, 63, 0])
    upstream = {k: torch.randn(4, generator=g) for k in ("logp", "entropy", "div")}
    s = row_scale(a, b, temperature)
    for divergence in pk.DIVERGENCES:
        x = a.detach().clone().to(DEVICE).requires_grad_(True)
        with pk.use_backend(backend):
            out = pk.token_terms(x, labels.to(DEVICE), b.to(DEVICE), divergence=divergence, temperature=temperature,
                                 beta=0.3, alpha=0.7 if divergence == "alpha" else 0.5, return_entropy=True)
        sum((getattr(out, k) * u.to(DEVICE)).sum() for k, u in upstream.items()).backward()
        want, grad = oracle(a, labels, b, None, divergence=divergence, beta=0.3,
                            alpha=0.7 if divergence == "alpha" else 0.5, temperature=temperature,
                            want_logp=True, want_ref_logp=True, want_entropy=True, upstream=upstream)
        for key in ("logp", "ref_logp", "entropy", "div"):
            assert_tokens_close(getattr(out, key), want[key], s, f"{divergence} {key}")
        assert torch.isfinite(out.logp).all() and torch.isfinite(out.entropy).all()
        # A finite divergence beyond fp32's range has no meaningful gradient.
        rows = ~(torch.isfinite(want["div"]) & (want["div"].abs() > torch.finfo(torch.float32).max))
        g_out = sum(u.abs() for u in upstream.values())
        assert_grads_close(x.grad, grad, s, g_out, dtype, f"d {divergence}", rows=rows)
        assert x.grad.cpu()[0, 7] == 0 or torch.isnan(x.grad.cpu()[0]).all()


# --------------------------------------------------------------------------- NaN policy

VOCAB = 2053  # prime, three interpreter tiles
BAD = [(side, value, pos) for side in ("policy", "ref") for value in (NAN, INF) for pos in (0, VOCAB // 2, VOCAB - 1)]
# Rows after the BAD ones: a clean row; a reference NaN where the weight is 0; a reference +inf
# whose divergence has upstream gradient 0; a policy NaN in a skipped row (label ignored, or
# weight 0 without labels); a policy +inf whose every upstream gradient is 0.
CLEAN, REF_WEIGHT0, REF_GRAD0, SKIPPED, POLICY_GRAD0 = range(len(BAD), len(BAD) + 5)
ROWS = len(BAD) + 5


def _nan_case(dtype):
    a, b = _pair(7, (ROWS, VOCAB), dtype=dtype)
    policy_bad = torch.zeros(ROWS, dtype=torch.bool)
    ref_bad = torch.zeros(ROWS, dtype=torch.bool)
    for row, (side, value, pos) in enumerate(BAD):
        (a if side == "policy" else b)[row, pos] = value
        (policy_bad if side == "policy" else ref_bad)[row] = True
    b[REF_WEIGHT0, 5] = NAN
    b[REF_GRAD0, VOCAB - 1] = INF
    a[SKIPPED, 1] = NAN
    b[SKIPPED] = NAN
    a[POLICY_GRAD0, 1000] = INF
    ref_bad[[REF_WEIGHT0, REF_GRAD0]] = True
    policy_bad[POLICY_GRAD0] = True
    g = torch.Generator().manual_seed(8)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=g)
    labels[SKIPPED] = -100
    weight = torch.ones(ROWS)
    weight[REF_WEIGHT0] = 0.0
    upstream = {k: torch.rand(ROWS, generator=g) + 0.5 for k in ("logp", "entropy", "div")}
    upstream["div"][REF_GRAD0] = 0.0
    for u in upstream.values():
        u[POLICY_GRAD0] = 0.0
    return a, b, labels, weight, upstream, policy_bad, ref_bad


def _assert_rows(x, nan_rows, zero_rows, what):
    x = x.detach().cpu()
    assert torch.isnan(x[nan_rows]).all(), f"{what}: rows that must be NaN are not"
    assert torch.isfinite(x[~nan_rows]).all(), f"{what}: NaN or inf outside the NaN rows"
    assert (x[zero_rows] == 0).all(), f"{what}: skipped rows must hold 0"


def _assert_grad_rows(grad, nan_rows, zero_rows, what):
    grad = grad.cpu()
    assert torch.isnan(grad[nan_rows]).all(), f"{what}: a gradient row that must be NaN is not (entirely)"
    assert torch.isfinite(grad[~nan_rows]).all(), f"{what}: NaN or inf in a gradient row that must be finite"
    assert (grad[zero_rows] == 0).all(), f"{what}: skipped rows must get a zero gradient"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_policy_token_logprobs(backend, dtype):
    a, _, labels, _, upstream, policy_bad, _ = _nan_case(dtype)
    skipped = labels == -100
    x = a.detach().clone().to(DEVICE).requires_grad_(True)
    with pk.use_backend(backend):
        logp, entropy = pk.token_logprobs(x, labels.to(DEVICE), return_entropy=True)
    ((logp * upstream["logp"].to(DEVICE)).sum() + (entropy * upstream["entropy"].to(DEVICE)).sum()).backward()
    nan_rows = policy_bad & ~skipped
    _assert_rows(logp, nan_rows, skipped, "logp")
    _assert_rows(entropy, nan_rows, skipped, "entropy")
    _assert_grad_rows(x.grad, nan_rows, skipped, "d logp")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", pk.DIVERGENCES)
def test_nan_policy_token_terms(backend, dtype, divergence):
    a, b, labels, weight, upstream, policy_bad, ref_bad = _nan_case(dtype)
    skipped = labels == -100
    x = a.detach().clone().to(DEVICE).requires_grad_(True)
    with pk.use_backend(backend):
        out = pk.token_terms(x, labels.to(DEVICE), b.to(DEVICE), divergence=divergence, div_weight=weight.to(DEVICE),
                             return_entropy=True, alpha=1.5)
    sum((getattr(out, k) * u.to(DEVICE)).sum() for k, u in upstream.items()).backward()
    div_active = (weight != 0) & ~skipped
    _assert_rows(out.logp, policy_bad & ~skipped, skipped, "logp")
    _assert_rows(out.entropy, policy_bad & ~skipped, skipped, "entropy")
    _assert_rows(out.ref_logp, ref_bad & ~skipped, skipped, "ref_logp")
    _assert_rows(out.div, (policy_bad | ref_bad) & div_active, skipped | (weight == 0), "div")
    nan_grad = (policy_bad & ~skipped) | (ref_bad & div_active & (upstream["div"] != 0))
    _assert_grad_rows(x.grad, nan_grad, skipped, f"d {divergence}")
    # Against the oracle: every value, and the gradient rows of the rows without a special value
    # (the others are pinned above).
    want, grad = oracle(a, labels, b, weight, divergence=divergence, alpha=1.5, want_logp=True,
                        want_ref_logp=True, want_entropy=True, upstream=upstream)
    s = row_scale(a, b, 1.0)
    for key in ("logp", "ref_logp", "entropy", "div"):
        assert_tokens_close(getattr(out, key), want[key], s, key)
    rows = ~(policy_bad | ref_bad)
    if divergence == "tv":
        rows &= torch.arange(ROWS) == CLEAN  # tv's sign exemption aside, the clean row is decided
    assert_grads_close(x.grad, grad, s, sum(u.abs() for u in upstream.values()), dtype, divergence, rows=rows)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", pk.DIVERGENCES)
def test_nan_policy_token_divergence(backend, dtype, divergence):
    a, b, _, weight, upstream, policy_bad, ref_bad = _nan_case(dtype)
    weight[SKIPPED] = 0.0  # without labels, a zero weight skips the row
    skipped = weight == 0
    x = a.detach().clone().to(DEVICE).requires_grad_(True)
    with pk.use_backend(backend):
        div = pk.token_divergence(x, b.to(DEVICE), divergence=divergence, weight=weight.to(DEVICE), alpha=-0.5)
    (div * upstream["div"].to(DEVICE)).sum().backward()
    _assert_rows(div, (policy_bad | ref_bad) & ~skipped, skipped, "div")
    nan_grad = (policy_bad & ~skipped) | (ref_bad & ~skipped & (upstream["div"] != 0))
    _assert_grad_rows(x.grad, nan_grad, skipped, f"d {divergence}")


# --------------------------------------------------------------------------- infinite divergences


def _support_case(policy_excludes):
    """Rows of 40 logits where one side alone excludes entries 3 and 20 (its logits -inf
    there, while the other side gives them real mass)."""
    a, b = _pair(9, (3, 40))
    a[:, [3, 20]] = a[:, [3, 20]].abs() + 1.0  # p not underflowing where q may be 0
    b[:, [3, 20]] = b[:, [3, 20]].abs() + 1.0
    (a if policy_excludes else b)[:, [3, 20]] = -INF
    return a, b


# (divergence, alpha, whether the policy is the side that excludes): +inf divergences.
INFINITE = [("reverse_kl", 0.5, False), ("chi2", 0.5, False), ("alpha", 2.0, False),
            ("forward_kl", 0.5, True), ("alpha", -0.5, True)]
# Finite despite one side's -inf entries.
FINITE = [("forward_kl", 0.5, False), ("reverse_kl", 0.5, True), ("chi2", 0.5, True), ("js", 0.5, True),
          ("js", 0.5, False), ("tv", 0.5, True), ("hellinger", 0.5, False), ("alpha", 0.5, True),
          ("alpha", 0.5, False), ("alpha", 2.0, True), ("alpha", -0.5, False)]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("divergence,alpha,policy_excludes", INFINITE)
def test_infinite_divergence_has_a_nan_gradient(backend, divergence, alpha, policy_excludes):
    a, b = _support_case(policy_excludes)
    upstream = torch.tensor([1.0, 0.0, -2.0])  # the middle row's divergence term is inactive
    x = a.detach().clone().to(DEVICE).requires_grad_(True)
    with pk.use_backend(backend):
        div = pk.token_divergence(x, b.to(DEVICE), divergence=divergence, alpha=alpha)
    (div * upstream.to(DEVICE)).sum().backward()
    assert (div.cpu() == INF).all()
    grad = x.grad.cpu()
    assert torch.isnan(grad[[0, 2]]).all()
    assert (grad[1] == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("divergence,alpha,policy_excludes", FINITE)
def test_finite_divergence_with_excluded_entries_keeps_a_finite_gradient(backend, divergence, alpha,
                                                                          policy_excludes):
    a, b = _support_case(policy_excludes)
    div, grad = _div_and_grad(backend, a, b, divergence, alpha=alpha)
    want, want_grad = oracle(a, None, b, None, divergence=divergence, alpha=alpha, upstream={"div": torch.ones(3)})
    s = row_scale(a, b, 1.0)
    assert torch.isfinite(div).all() and torch.isfinite(grad).all()
    assert_tokens_close(div, want["div"], s, divergence)
    assert_grads_close(grad, want_grad, s, torch.ones(3), torch.float32, divergence)
    if policy_excludes:
        assert (grad[:, [3, 20]] == 0).all()


def _nearly_equal_peaked_rows(temperature, rows=32, vocab=256, seed=0):
    """fp32 logits near 17 with one dominant entry (p ~ 0.9) and a reference 1e-3 away: the
    forward KL's gradient p - q is tiny while p and q are not."""
    g = torch.Generator().manual_seed(seed)
    a = 17.0 - 6.0 * temperature - torch.rand(rows, vocab, generator=g, dtype=torch.float64) * 6 * temperature
    a[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=g)] = 17.0
    b = a + 1e-3 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    return a.float(), b.float()


def _argmax_gap_inputs(name):
    """``(logits, ref_logits, T)`` of each documented case of the gap ``in_forward_kl_argmax_gap`` names."""
    if name == "peaked_rows":
        a, b = _nearly_equal_peaked_rows(0.7)
        return a, b, 0.7
    # Two entries, p_k and q_k about 1 - 5e-7: 1 + 4.2e-7 and 1 + 5.3e-7 round to one fp32 sum.
    return torch.tensor([[6.1640, -1.1737]]), torch.tensor([[6.0768, -1.1510]]), 0.5


# The whole-row backward writes a peaked row's argmax entry as minus the sum of the others (the
# gradient sums to 0): near p_k = 1, (p_k - q_k) / T there no longer rides on log_norm's few eps.
@pytest.mark.parametrize("inputs", ["peaked_rows", "two_entries"])
@pytest.mark.parametrize("backend", KERNELS)
def test_forward_kl_gradient_in_the_argmax_gap(backend, inputs):
    a, b, temperature = _argmax_gap_inputs(inputs)
    assert in_forward_kl_argmax_gap(a, b, temperature) and not in_forward_kl_rounding_gap(a, b, temperature)
    upstream = torch.ones(a.shape[0])
    div, grad = _div_and_grad(backend, a, b, "forward_kl", temperature=temperature)
    want, want_grad = oracle(a, None, b, None, divergence="forward_kl", temperature=temperature,
                             upstream={"div": upstream})
    s = row_scale(a, b, temperature)
    assert_tokens_close(div, want["div"], s, "forward_kl")
    assert_grads_close(grad, want_grad, s, upstream, torch.float32, "forward_kl gradient")


@pytest.mark.parametrize("backend", KERNELS)
def test_one_entry_row_keeps_the_nan_policy(backend):
    """A row of one entry is its own peaked argmax, with no other entry to sum: its gradient is
    still NaN where the reference is NaN, and 0 (p = q = 1) where it is finite."""
    div, grad = _div_and_grad(backend, torch.tensor([[0.25], [0.25]]), torch.tensor([[NAN], [3.0]]), "forward_kl")
    assert torch.isnan(div[0]) and div[1] == 0
    assert torch.isnan(grad[0]).all() and (grad[1] == 0).all()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("backend", KERNELS)
def test_confident_label_gradient_is_accurate_relative_to_its_size(backend, temperature, inplace):
    """One logit L above V - 1 zeros, the label on it: by hand, ``p_y = e^(L/T) / (e^(L/T) + V - 1)``
    and ``dlogp/da_y = (1 - p_y) / T = (V - 1) / (T (e^(L/T) + V - 1))``, about 2e-6 here. Formed as
    ``1 - p_y`` in fp32 it would carry ``log_norm``'s few eps: a few percent of its size. Every
    other entry is ``-p_j / T = -1 / (T (e^(L/T) + V - 1))``."""
    vocab, top = 1000, 20.0 * temperature
    logits = torch.zeros(2, vocab)
    logits[:, 7] = top
    labels = torch.tensor([7, 3])  # the second row's label is not its argmax
    leaf = logits.to(DEVICE).requires_grad_(True)
    x = leaf.clone() if inplace else leaf  # in place, the gradient is written over x's own storage
    with pk.use_backend(backend):
        logp = pk.token_logprobs(x, labels.to(DEVICE), temperature=temperature, inplace_backward=inplace)
    logp.sum().backward()
    grad = leaf.grad.cpu().double()
    denominator = temperature * (mpmath.exp(20) + vocab - 1)
    other = -1 / denominator
    want_top = [(vocab - 1) / denominator, mpmath.exp(20) * other]
    for row in range(2):
        torch.testing.assert_close(grad[row, 7].item(), float(want_top[row]), rtol=1e-5, atol=0)
    want_rest = torch.full((vocab,), float(other), dtype=torch.float64)
    want_rest[3] += 1 / temperature
    torch.testing.assert_close(grad[1, :7], want_rest[:7], rtol=1e-5, atol=0)
    torch.testing.assert_close(grad[0, 8:], torch.full((vocab - 8,), float(other), dtype=torch.float64),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_alpha_near_zero_gradient_where_the_policy_underflows(backend):
    """alpha = -1e-6, a peaked policy far from a peaked reference: p_1 underflows even in float64
    while p_1 f'(t_1) = p_1^a q_1^(1-a) / (a - 1) stays near -1. Hand value: with d = a_0 - a_1,
    p_1^a q_1^(1-a) = exp(-a d) to float64 accuracy (p_0, q_1 round to 1), so the gradient is
    (+-exp(-a d) / (1 - a)) at (0, 1)."""
    alpha = -1e-6
    logits = torch.tensor([[15409.9609, -2934.2891]])
    ref_logits = torch.tensor([[-21787.8945, 5684.3130]])
    x = logits.to(DEVICE).requires_grad_(True)
    with pk.use_backend(backend):
        pk.token_divergence(x, ref_logits.to(DEVICE), divergence="alpha", alpha=alpha).sum().backward()
    d = float(logits[0, 0].double() - logits[0, 1].double())
    slope = mpmath.exp(-alpha * d) / (1 - alpha)
    want = torch.tensor([[float(slope), -float(slope)]])
    torch.testing.assert_close(x.grad.cpu(), want, rtol=2e-6, atol=0)
