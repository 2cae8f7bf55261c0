"""Identities and hand-derived values that hold whatever the implementation.

Every check runs on every backend (the reference included) and compares to values derived
by hand or to a mathematical identity, never to another backend's output.
"""

import math

import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels.backends import DIVERGENCE_CODES, OpSpec, reference

from contract import DEVICE, backends_under_test, with_cpu_isas

ALL_BACKENDS = with_cpu_isas(backends_under_test()) + ["reference"]


def _logits(seed, shape, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_hand_computed_four_point_distributions(backend):
    # p = (.1, .2, .3, .4), q = (.4, .3, .2, .1); logits are logs of unnormalised weights.
    p = [0.1, 0.2, 0.3, 0.4]
    q = [0.4, 0.3, 0.2, 0.1]
    a = torch.tensor([[math.log(1.0), math.log(2.0), math.log(3.0), math.log(4.0)]], device=DEVICE)
    b = torch.tensor([[math.log(4.0), math.log(3.0), math.log(2.0), math.log(1.0)]], device=DEVICE)
    labels = torch.tensor([2], device=DEVICE)
    kl_qp = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    expected = {
        "forward_kl": kl_qp,
        "reverse_kl": kl_qp,  # the two distributions are mirror images
        "tv": 0.5 * (0.3 + 0.1 + 0.1 + 0.3),
        "hellinger": sum((math.sqrt(pi) - math.sqrt(qi)) ** 2 for pi, qi in zip(p, q)),
        "chi2": sum((pi - qi) ** 2 / qi for pi, qi in zip(p, q)),
        "js": sum(0.5 * qi * math.log(qi / (0.5 * (pi + qi))) + 0.5 * pi * math.log(pi / (0.5 * (pi + qi)))
                  for pi, qi in zip(p, q)),
        "alpha": sum((pi ** 0.5 * qi ** 0.5 - 0.5 * pi - 0.5 * qi) / (0.5 * -0.5) for pi, qi in zip(p, q)),
    }
    with pk.use_backend(backend):
        for name, value in expected.items():
            got = pk.token_divergence(a, b, divergence=name).item()
            assert got == pytest.approx(value, rel=2e-6, abs=1e-6), name
        logp, entropy = pk.token_logprobs(a, labels, return_entropy=True)
    assert logp.item() == pytest.approx(math.log(0.3), rel=1e-6)
    assert entropy.item() == pytest.approx(-sum(pi * math.log(pi) for pi in p), rel=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_logprob_gradient_by_hand(backend):
    # d logp / d a_j = (1[j = y] - p_j) / T with p = (.1, .2, .3, .4) at T = 2.
    a = torch.tensor([[math.log(1.0), math.log(2.0), math.log(3.0), math.log(4.0)]], device=DEVICE) * 2.0
    a.requires_grad_(True)
    with pk.use_backend(backend):
        pk.token_logprobs(a, torch.tensor([1], device=DEVICE), temperature=2.0).sum().backward()
    want = torch.tensor([[-0.1, 0.8, -0.3, -0.4]]) / 2.0
    torch.testing.assert_close(a.grad.cpu(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("divergence", pk.DIVERGENCES)
def test_divergence_of_a_distribution_from_itself_is_zero(backend, divergence):
    a = _logits(0, (3, 5, 1531)).requires_grad_(True)
    with pk.use_backend(backend):
        d = pk.token_divergence(a, a.detach().clone(), divergence=divergence, alpha=1.5)
        d.sum().backward()
    assert d.abs().max().item() < 1e-5
    # D_f has a minimum at q: the gradient vanishes there (tv's is a subgradient, skip it).
    if divergence != "tv":
        assert a.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_kl_is_reverse_kl_with_roles_swapped(backend):
    a, b = _logits(1, (4, 2, 777)), _logits(2, (4, 2, 777))
    with pk.use_backend(backend):
        forward = pk.token_divergence(a, b, divergence="forward_kl")
        reverse = pk.token_divergence(b, a, divergence="reverse_kl")
    torch.testing.assert_close(forward, reverse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_js_half_is_symmetric_and_bounded_by_log2(backend):
    a, b = _logits(3, (6, 1100), scale=20.0), _logits(4, (6, 1100), scale=20.0)
    with pk.use_backend(backend):
        ab = pk.token_divergence(a, b, divergence="js", beta=0.5)
        ba = pk.token_divergence(b, a, divergence="js", beta=0.5)
    torch.testing.assert_close(ab, ba, rtol=1e-5, atol=1e-6)
    assert (ab <= math.log(2) + 1e-6).all() and (ab >= -1e-7).all()
    # Very different rows approach the bound.
    assert ab.max().item() > 0.5 * math.log(2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tv_is_at_most_one(backend):
    a, b = _logits(5, (5, 2000), scale=50.0), _logits(6, (5, 2000), scale=50.0)
    with pk.use_backend(backend):
        tv = pk.token_divergence(a, b, divergence="tv")
    assert (tv <= 1.0 + 1e-6).all() and (tv >= 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("vocab", [1, 2, 1000, 2999])
def test_entropy_of_a_uniform_row_is_log_v(backend, vocab):
    a = torch.full((3, vocab), 7.25, device=DEVICE)
    with pk.use_backend(backend):
        _, entropy = pk.token_logprobs(a, torch.zeros(3, dtype=torch.long, device=DEVICE), return_entropy=True)
    torch.testing.assert_close(entropy.cpu(), torch.full((3,), math.log(vocab)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("divergence", pk.DIVERGENCES)
@pytest.mark.parametrize("want", ["div", "logp", "entropy"])
def test_reference_gradcheck(divergence, want):
    gen = torch.Generator().manual_seed(7)
    a = (torch.randn(3, 11, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    b = torch.randn(3, 11, generator=gen, dtype=torch.float64) * 2
    labels = torch.tensor([3, -100, 10])
    spec = OpSpec(temperature=0.8, divergence=DIVERGENCE_CODES[divergence], beta=0.3, alpha=1.7,
                  want_logp=True, want_entropy=True)
    torch.autograd.gradcheck(lambda x: reference.evaluate(x, labels, b, None, spec)[want], (a,))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_skipped_rows_are_never_read(backend):
    """Skipped rows may hold NaN: nothing reads them, their gradient rows are written as 0."""
    if backend == "reference":
        pytest.skip("the reference materialises every row by design")
    a = _logits(8, (4, 1500))
    b = _logits(9, (4, 1500))
    a[1:3] = float("nan")
    b[1:3] = float("nan")
    a.requires_grad_(True)
    with pk.use_backend(backend):
        # Without labels, a zero weight skips the whole row.
        div = pk.token_divergence(a, b, weight=torch.tensor([1.0, 0.0, 0.0, 0.5], device=DEVICE), divergence="js")
        div.sum().backward()
    assert torch.isfinite(div).all() and (div[1:3] == 0).all()
    assert (a.grad[1:3] == 0).all() and torch.isfinite(a.grad).all()

    a.grad = None
    with pk.use_backend(backend):
        # With labels, an ignored label skips the whole row, whatever the weight.
        terms = pk.token_terms(a, torch.tensor([5, -100, -100, 9], device=DEVICE), b,
                               div_weight=torch.tensor([1.0, 1.0, 0.0, 0.5], device=DEVICE))
        (terms.logp.sum() + terms.div.sum()).backward()
    for field in (terms.logp, terms.ref_logp, terms.div):
        assert torch.isfinite(field).all() and (field[1:3] == 0).all()
    assert (a.grad[1:3] == 0).all() and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_ignored_sequence_contributes_zero_without_nan(backend):
    a = _logits(10, (2, 3, 500)).requires_grad_(True)
    labels = torch.full((2, 3), -100, device=DEVICE)
    labels[1, 0] = 4
    with pk.use_backend(backend):
        terms = pk.token_terms(a, labels, _logits(11, (2, 3, 500)), return_entropy=True)
        (terms.logp.sum() + terms.div.sum() + terms.entropy.sum()).backward()
    assert (terms.logp[0] == 0).all() and (terms.div[0] == 0).all() and (terms.entropy[0] == 0).all()
    assert (a.grad[0] == 0).all() and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_masked_vocabulary_entries_get_zero_gradient(backend):
    a = _logits(12, (3, 900))
    b = _logits(13, (3, 900))
    a[:, ::3] = float("-inf")
    b[:, ::3] = float("-inf")
    a.requires_grad_(True)
    with pk.use_backend(backend):
        terms = pk.token_terms(a, torch.tensor([1, 2, 4], device=DEVICE), b, divergence="reverse_kl",
                               return_entropy=True)
        (terms.logp.sum() + terms.div.sum() + terms.entropy.sum()).backward()
    assert torch.isfinite(a.grad).all()
    assert (a.grad[:, ::3] == 0).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inplace_backward_writes_the_gradient_into_the_logits(backend):
    base = _logits(14, (2, 6, 1300), dtype=torch.bfloat16)
    ref = _logits(15, (2, 6, 1300), dtype=torch.bfloat16)
    labels = torch.randint(0, 1300, (2, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grads = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_(True)
        x = leaf * 1  # a non-leaf, as the logits of a model are
        with pk.use_backend(backend):
            terms = pk.token_terms(x, labels, ref, inplace_backward=inplace)
            (grad,) = torch.autograd.grad(terms.logp.sum() + terms.div.sum(), x)
        grads.append(grad.clone())
        if inplace:
            # The gradient IS the logits' storage, now overwritten.
            assert grad.data_ptr() == x.data_ptr()
            assert torch.equal(x.detach(), grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sliced_logits_are_read_without_a_copy(backend):
    from prefopt_kernels.layout import RowLayout

    full = _logits(16, (3, 9, 700)).requires_grad_(True)
    sliced = full[:, :-1, :]
    rows, = RowLayout.of(sliced).rows(sliced)
    assert rows.data_ptr() == sliced.data_ptr() and rows.shape == (3, 8, 700)
    labels = torch.randint(0, 700, (3, 8), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with pk.use_backend(backend):
        pk.token_logprobs(sliced, labels).sum().backward()
    want = torch.log_softmax(full.detach()[:, :-1].double(), -1).gather(-1, labels[..., None])
    with pk.use_backend(backend):
        got = pk.token_logprobs(sliced, labels)
    torch.testing.assert_close(got.double(), want[..., 0], rtol=1e-6, atol=1e-6)
    assert (full.grad[:, -1] == 0).all()


def test_use_backend_restores_and_env_overrides(monkeypatch):
    from prefopt_kernels import dispatch

    assert dispatch.selected_backend() == "auto"
    with pk.use_backend("reference"):
        assert dispatch.pick_backend(torch.device("cpu")).NAME == "reference"
    assert dispatch.selected_backend() == "auto"
    monkeypatch.setenv("PREFOPT_BACKEND", "reference")
    assert dispatch.pick_backend(torch.device("cpu")).NAME == "reference"
    monkeypatch.setenv("PREFOPT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PREFOPT_BACKEND"):
        dispatch.pick_backend(torch.device("cpu"))
    assert "reference" in pk.available_backends()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_reference_excluding_the_policy_argmax(backend):
    """q = (1, 0) while the policy puts most mass on entry 1; closed forms by hand.

    With p0 = sigmoid(a0 - a1), p1 = 1 - p0: hellinger D = 2 - 2 sqrt(p0) and
    dD/da = sqrt(p0) p1 (-1, 1); tv D = p1 and dD/da = p0 p1 (-1, 1).
    """
    a0, a1 = -13.5572, -4.9839
    p0 = 1.0 / (1.0 + math.exp(a1 - a0))
    p1 = 1.0 - p0
    expected = {
        "hellinger": (2.0 - 2.0 * math.sqrt(p0), math.sqrt(p0) * p1),
        "tv": (p1, p0 * p1),
    }
    for divergence, (value, slope) in expected.items():
        a = torch.tensor([[a0, a1]], device=DEVICE, requires_grad=True)
        b = torch.tensor([[-26.7687, -math.inf]], device=DEVICE)
        with pk.use_backend(backend):
            d = pk.token_divergence(a, b, divergence=divergence)
            d.sum().backward()
        assert d.item() == pytest.approx(value, rel=1e-6), divergence
        torch.testing.assert_close(a.grad.cpu(), torch.tensor([[-slope, slope]]), rtol=1e-5, atol=1e-9)
