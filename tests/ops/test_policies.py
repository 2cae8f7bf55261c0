"""The autograd and dispatch policies of prefopt_kernels.ops, on every backend.

In-place backward is safe against every misuse PyTorch itself detects (version counter),
the ops refuse double backward, backend selection is thread-local, and the reference (the
tests' oracle) is right where one row excludes entries the other keeps.
"""

import threading

import pytest
import torch

import prefopt_kernels as pk
from contract import DEVICE, backends_under_test
from prefopt_kernels import dispatch

ALL_BACKENDS = backends_under_test() + ["reference"]


def _inputs(seed, shape=(3, 5, 211), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(shape, generator=gen) * 2).to(dtype).to(DEVICE)
    b = (torch.randn(shape, generator=gen) * 2).to(dtype).to(DEVICE)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen).to(DEVICE)
    return a, b, labels


def _activation(a):
    """A non-leaf copy of ``a`` (the logits of a model are an activation), and its leaf."""
    leaf = a.clone().requires_grad_(True)
    return leaf, leaf * 1.0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inplace_backward_bumps_the_version_so_a_later_reader_raises(backend):
    a, b, labels = _inputs(1)
    _, x = _activation(a)
    saved_first = x.sin()  # its backward runs after the op's and needs the original logits
    with pk.use_backend(backend):
        logp = pk.token_logprobs(x, labels, inplace_backward=True)
    version = x._version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + saved_first.sum()).backward()
    assert x._version > version


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inplace_backward_is_exact_when_every_other_reader_ran_first(backend):
    a, b, labels = _inputs(2)
    grads = []
    for inplace in (False, True):
        leaf, x = _activation(a)
        with pk.use_backend(backend):
            terms = pk.token_terms(x, labels, b, divergence="reverse_kl", inplace_backward=inplace)
        saved_later = x.sin()  # created after the op: autograd runs its backward first
        (terms.logp.sum() + 0.5 * terms.div.sum() + saved_later.sum()).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inplace_backward_run_twice_raises(backend):
    a, b, labels = _inputs(3)
    _, x = _activation(a)
    with pk.use_backend(backend):
        div = pk.token_divergence(x, b, divergence="js", inplace_backward=True)
    div.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        div.sum().backward()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_two_inplace_ops_on_the_same_logits_raise(backend):
    a, b, labels = _inputs(4)
    _, x = _activation(a)
    with pk.use_backend(backend):
        logp = pk.token_logprobs(x, labels, inplace_backward=True)
        div = pk.token_divergence(x, b, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + div.sum()).backward()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op", ["logprobs", "divergence", "terms"])
def test_double_backward_raises(backend, op):
    a, b, labels = _inputs(5)
    x = a.clone().requires_grad_(True)
    with pk.use_backend(backend):
        if op == "logprobs":
            out = pk.token_logprobs(x, labels)
        elif op == "divergence":
            out = pk.token_divergence(x, b, divergence="chi2")
        else:
            out = pk.token_terms(x, labels, b).div
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
    # Without create_graph the same graph still differentiates.
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all()


def test_backend_choice_is_per_thread_and_restored():
    names = [n for n in ALL_BACKENDS if n != "reference"][:1] + ["reference"]
    if len(names) < 2:
        pytest.skip("one backend only")
    inside = threading.Barrier(len(names))
    seen = {}

    def worker(name):
        before = dispatch.selected_backend()
        with pk.use_backend(name):
            inside.wait(timeout=30)  # every thread is inside its own block now
            picked = dispatch.pick_backend(DEVICE).NAME
            inside.wait(timeout=30)
        seen[name] = (before, picked, dispatch.selected_backend())

    with pk.use_backend("reference"):  # the main thread's choice must not leak into workers
        threads = [threading.Thread(target=worker, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert dispatch.selected_backend() == "reference"
    assert dispatch.selected_backend() == "auto"
    for name in names:
        assert seen[name] == ("auto", name, "auto")


def test_nested_backend_blocks_restore_in_order():
    with pk.use_backend("reference"):
        with pk.use_backend("auto"):
            assert dispatch.selected_backend() == "auto"
            with pk.use_backend("reference"):
                assert dispatch.selected_backend() == "reference"
            assert dispatch.selected_backend() == "auto"
        assert dispatch.selected_backend() == "reference"
    assert dispatch.selected_backend() == "auto"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_chi2_with_entries_only_the_policy_excludes(backend):
    """Pearson chi^2 = sum (p - q)^2 / q counts q at every p = 0 entry (f(0) = 1)."""
    a = torch.tensor([[0.3, -1.2, float("-inf"), 2.0, float("-inf"), 0.1]])
    b = torch.tensor([[1.0, 0.5, -0.4, 0.2, 1.5, -2.0]])
    p = torch.softmax(a.double(), -1)
    q = torch.softmax(b.double(), -1)
    want = ((p - q) ** 2 / q).sum(-1)
    # By hand: the two excluded entries contribute q_2 + q_4 of the total.
    assert (want - ((p - q) ** 2 / q)[:, [0, 1, 3, 5]].sum(-1) - q[:, [2, 4]].sum(-1)).abs().item() < 1e-12
    x = a.to(DEVICE).requires_grad_(True)
    with pk.use_backend(backend):
        got = pk.token_divergence(x, b.to(DEVICE), divergence="chi2")
    got.sum().backward()
    assert abs(got.item() - want.item()) <= 1e-5 * (1 + want.item())
    # d/da_j = p_j (f'(t_j) - S) with f'(t) = 2 (t - 1): S = 2 sum p^2/q - 2.
    s_term = 2 * (p**2 / q).sum(-1, keepdim=True) - 2
    want_grad = torch.where(p > 0, p * (2 * (p / q - 1) - s_term), torch.zeros_like(p))
    torch.testing.assert_close(x.grad.cpu().double(), want_grad, rtol=0, atol=1e-5 * want_grad.abs().max().item())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_parameters_accept_real_scalars(backend):
    np = pytest.importorskip("numpy")
    a, b, labels = _inputs(6)
    with pk.use_backend(backend):
        plain = pk.token_divergence(a, b, divergence="js", beta=0.25, temperature=1.5)
        numpy = pk.token_divergence(a, b, divergence="js", beta=np.float32(0.25), temperature=np.float64(1.5))
    torch.testing.assert_close(numpy, plain, rtol=0, atol=0)
