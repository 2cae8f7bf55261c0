"""Every kernel backend on fixed, hand-built cases: values and gradients against the float64
oracle under the numerics contract, row skipping, strided rows, masked entries, large
vocabularies, peaked rows, and agreement between backends (Triton runs on CPU under
``TRITON_INTERPRET=1``); the native extension's build.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields

import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels.backends import OpSpec, RowStats, native, present_stats, reference
from prefopt_kernels.divergences import DIVERGENCES, Divergence

from contract import assert_grads_close, assert_tokens_close, backends_under_test, oracle, row_scale, with_cpu_isas

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = with_cpu_isas(backends_under_test())
needs_native = pytest.mark.skipif(not native.is_available(), reason="native extension not built")


def _logits(n, v, dtype, seed, *, scale=3.0, masked=0, strided=False):
    """Policy and reference logits ``[n, v]``; ``masked`` leading entries of every row are -inf
    in both; ``strided`` returns row-sliced views (row stride > v)."""
    g = torch.Generator().manual_seed(seed)
    width = v + 7 if strided else v
    a = torch.randn(n, width, generator=g, dtype=torch.float64) * scale
    b = a + torch.randn(n, width, generator=g, dtype=torch.float64) * (scale / 2)
    a, b = a.to(dtype), b.to(dtype)
    if masked:
        a[:, :masked] = -math.inf
        b[:, :masked] = -math.inf
    if strided:
        a, b = a[:, 3:3 + v], b[:, 3:3 + v]
    return a, b


def _labels(n, v, seed, ignored=(1,)):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(v // 2, v, (n,), generator=g)
    for i in ignored:
        if i < n:
            labels[i] = -100
    return labels


def _upstream(n, seed, keys):
    g = torch.Generator().manual_seed(seed + 2)
    return {k: torch.randn(n, generator=g, dtype=torch.float64).to(torch.float32) for k in keys}


def _run(backend, fn, a, upstream):
    """Values and the gradient wrt ``a`` of ``sum_k upstream[k] * out[k]`` through the public op."""
    x = a.detach().clone().requires_grad_(True)
    with pk.use_backend(backend):
        out = fn(x)
        total = sum((upstream[k] * out[k]).sum() for k in upstream)
        total.backward()
    return {k: v.detach() for k, v in out.items()}, x.grad


def _g_out(upstream):
    return torch.stack([u.abs() for u in upstream.values()]).amax(0)


@pytest.mark.gpu  # in the GPU subset too: scripts/gpu_check.sh checks its own build with it
def test_extension_builds():
    """The module imports (unless the build was switched off) and has_cuda reflects the build."""
    if os.environ.get("PREFOPT_NO_NATIVE") == "1" and not native.is_available():
        pytest.skip("native build disabled by PREFOPT_NO_NATIVE=1")
    assert native.is_available(), "prefopt_kernels._C did not build or does not import"
    from prefopt_kernels import _C

    assert isinstance(_C.has_cuda(), bool)
    assert native.has_cuda() == _C.has_cuda()
    assert native.supports(torch.device("cpu"))
    assert native.supports(torch.device("cuda")) == _C.has_cuda()
    if os.environ.get("PREFOPT_EXPECT_CUDA") == "1":  # set by GPU-machine scripts
        assert _C.has_cuda(), "the CUDA kernels were not compiled"
    assert _C.cpu_isa() in ("generic", "avx2", "avx512")
    assert "native" in pk.available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_entropy(backend, dtype, temperature):
    n, v = 6, 1537
    a, _ = _logits(n, v, dtype, seed=3, masked=40, strided=True)
    labels = _labels(n, v, seed=3)
    up = _upstream(n, 3, ("logp", "entropy"))

    def fn(x):
        logp, ent = pk.token_logprobs(x, labels, temperature=temperature, return_entropy=True)
        return {"logp": logp, "entropy": ent}

    got, grad = _run(backend, fn, a, up)
    want, grad_ref = oracle(a, labels, None, None, temperature=temperature, want_logp=True,
                            want_entropy=True, upstream=up)
    s = row_scale(a, None, temperature)
    for k in ("logp", "entropy"):
        assert_tokens_close(got[k], want[k], s, k)
    assert_grads_close(grad, grad_ref, s, _g_out(up), dtype, "grad")
    assert (grad[1] == 0).all() and got["logp"][1] == 0 and got["entropy"][1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_token_terms(backend, dtype, divergence):
    n, v = 7, 2100
    beta, alpha = 0.3, (1.7 if divergence == "alpha" else 0.5)
    a, b = _logits(n, v, dtype, seed=11, masked=25, strided=True)
    labels = _labels(n, v, seed=11)
    weight = torch.tensor([1.0, 1.0, 0.0, 2.0, 0.5, 1.0, 0.0])
    up = _upstream(n, 11, ("logp", "div", "entropy"))

    def fn(x):
        t = pk.token_terms(x, labels, b, divergence=divergence, div_weight=weight, temperature=0.9,
                           beta=beta, alpha=alpha, return_entropy=True)
        return {"logp": t.logp, "ref_logp": t.ref_logp, "div": t.div, "entropy": t.entropy}

    got, grad = _run(backend, fn, a, up)
    want, grad_ref = oracle(a, labels, b, weight, divergence=divergence, beta=beta, alpha=alpha,
                            temperature=0.9, want_logp=True, want_ref_logp=True, want_entropy=True,
                            upstream=up)
    s = row_scale(a, b, 0.9)
    for k in ("logp", "ref_logp", "div", "entropy"):
        assert_tokens_close(got[k], want[k], s, f"{divergence} {k}")
    rows = None
    if divergence == "tv":  # sign(p - q) decided below rounding is exempt: compare elsewhere
        rows = torch.ones(n, dtype=torch.bool)
    assert_grads_close(grad, grad_ref, s, _g_out(up), dtype, f"{divergence} grad", rows=rows)
    assert (got["div"][[2, 6]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_divergence_weight_skips_rows(backend, divergence, dtype):
    """Without labels a weight-0 row is skipped entirely: div 0 and a zero gradient row."""
    n, v = 5, 999
    a, b = _logits(n, v, dtype, seed=5)
    weight = torch.tensor([1.0, 0.0, 3.0, 0.0, 1.0])
    up = _upstream(n, 5, ("div",))

    def fn(x):
        return {"div": pk.token_divergence(x, b, divergence=divergence, weight=weight)}

    got, grad = _run(backend, fn, a, up)
    want, grad_ref = oracle(a, None, b, weight, divergence=divergence, upstream=up)
    s = row_scale(a, b, 1.0)
    assert_tokens_close(got["div"], want["div"], s, divergence)
    assert_grads_close(grad, grad_ref, s, _g_out(up), dtype, divergence)
    assert (got["div"][[1, 3]] == 0).all() and (grad[[1, 3]] == 0).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocab_accuracy(dtype):
    """Blocked reductions: no accuracy loss at V = 128k."""
    n, v = 2, 131072
    a, b = _logits(n, v, dtype, seed=21, scale=2.0)
    labels = _labels(n, v, seed=21, ignored=())
    up = _upstream(n, 21, ("logp", "div", "entropy"))

    def fn(x):
        t = pk.token_terms(x, labels, b, divergence="reverse_kl", return_entropy=True)
        return {"logp": t.logp, "div": t.div, "entropy": t.entropy}

    got, grad = _run("native", fn, a, up)
    want, grad_ref = oracle(a, labels, b, None, divergence="reverse_kl", want_logp=True,
                            want_ref_logp=True, want_entropy=True, upstream=up)
    s = row_scale(a, b, 1.0)
    for k in ("logp", "div", "entropy"):
        assert_tokens_close(got[k], want[k], s, k)
    assert_grads_close(grad, grad_ref, s, _g_out(up), dtype, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_entries_no_nan(backend, divergence):
    """-inf logits (masked vocabulary, same entries in both rows) give finite values and a zero
    gradient there; a row whose label is ignored may even be all -inf."""
    n, v = 3, 700
    a, b = _logits(n, v, torch.float32, seed=2)
    a[:, ::3] = -math.inf
    b[:, ::3] = -math.inf
    a[1] = -math.inf
    b[1] = -math.inf
    labels = torch.tensor([1, -100, 5])
    up = _upstream(n, 2, ("logp", "div", "entropy"))

    def fn(x):
        t = pk.token_terms(x, labels, b, divergence=divergence, return_entropy=True)
        return {"logp": t.logp, "div": t.div, "entropy": t.entropy}

    got, grad = _run(backend, fn, a, up)
    for k, val in got.items():
        assert torch.isfinite(val).all(), k
    assert torch.isfinite(grad).all()
    assert (grad[:, ::3] == 0).all() and (grad[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bridge_row_stats(backend):
    """The backend-level contract: skipped rows hold 0 in every RowStats field."""
    n, v = 4, 300
    a, b = _logits(n, v, torch.float32, seed=4)
    a, b = a.view(2, 2, v), b.view(2, 2, v)  # backends see [B, T, V] views
    labels = torch.tensor([3, -100, 7, 9])
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0])
    spec = OpSpec(divergence=Divergence.JS, want_logp=True, want_ref_logp=True, want_entropy=True)
    module = __import__(f"prefopt_kernels.backends.{backend}", fromlist=["forward"])
    stats = module.forward(a, labels, b, weight, spec)
    ref = reference.forward(a, labels, b, weight, spec)
    for field in ("logp", "ref_logp", "entropy", "div", "div_s", "ref_at_argmax"):
        got = getattr(stats, field)
        assert got.dtype == torch.float32 and got.shape == (n,)
        assert got[1] == 0, field
        keep = torch.tensor([True, False, field not in ("div", "div_s", "ref_at_argmax"), True])
        torch.testing.assert_close(got[keep], getattr(ref, field)[keep], rtol=1e-5, atol=1e-5)
    assert stats.div[2] == 0 and stats.div_s[2] == 0 and stats.ref_at_argmax[2] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("has_ref", [False, True])
@pytest.mark.parametrize("want_logp,want_ref_logp,want_entropy",
                         [(False, False, False), (False, True, True), (True, False, False)])
def test_forward_writes_only_the_asked_outputs(backend, has_ref, want_logp, want_ref_logp, want_entropy):
    """With labels given, an output the spec leaves out is neither returned nor written over
    another field: exactly :func:`present_stats`' fields, each as the reference computes it.
    (The public ops always ask for ``logp`` when they pass labels; a backend must not rely on it.)"""
    n, v = 4, 300
    a, b = _logits(n, v, torch.float32, seed=8)
    a, b = a.view(2, 2, v), b.view(2, 2, v)
    b = b if has_ref else None
    labels = torch.tensor([3, -100, 7, 299])
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0]) if has_ref else None
    spec = OpSpec(divergence=Divergence.REVERSE_KL if has_ref else 0, want_logp=want_logp,
                  want_ref_logp=want_ref_logp, want_entropy=want_entropy)
    module = __import__(f"prefopt_kernels.backends.{backend}", fromlist=["forward"])
    stats = module.forward(a, labels, b, weight, spec)
    want = reference.forward(a, labels, b, weight, spec)
    present = present_stats(spec, True, has_ref)
    for field in fields(RowStats):
        got = getattr(stats, field.name)
        if field.name not in present:
            assert got is None, field.name
            continue
        assert got.dtype == torch.float32 and got.shape == (n,), field.name
        expected = getattr(want, field.name)
        if field.name in ("ref_row_max", "ref_log_norm"):  # unspecified where the divergence is off
            got, expected = got[weight != 0], expected[weight != 0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=field.name)


@needs_native
@pytest.mark.skipif("triton" not in pk.available_backends(), reason="triton backend not available")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_agrees_with_triton(divergence):
    """Native and Triton kernels give the same values and gradients (within the contract)."""
    n, v = 4, 1000
    a, b = _logits(n, v, torch.float32, seed=13, masked=10)
    labels = _labels(n, v, seed=13)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0])
    up = _upstream(n, 13, ("logp", "div", "entropy"))
    results = {}
    for backend in ("native", "triton"):
        x = a.detach().clone().requires_grad_(True)
        with pk.use_backend(backend):
            t = pk.token_terms(x, labels, b, divergence=divergence, div_weight=weight,
                               temperature=1.3, return_entropy=True)
            out = {"logp": t.logp, "ref_logp": t.ref_logp, "div": t.div, "entropy": t.entropy}
            sum((up[k] * out[k]).sum() for k in up).backward()
        results[backend] = ({k: val.detach() for k, val in out.items()}, x.grad)
    (nv, ng), (tv, tg) = results["native"], results["triton"]
    s = row_scale(a, b, 1.3)
    for k in nv:
        assert_tokens_close(nv[k], tv[k], 2 * s, f"{divergence} {k}")
    if divergence != "tv":
        assert_grads_close(ng, tg, 2 * s, _g_out(up), torch.float32, f"{divergence} grad")


@needs_native
@pytest.mark.slow
def test_int64_row_offsets():
    """Row offsets beyond 2^31 elements: the last row of a > 4 GiB bf16 buffer."""
    v = 1024
    rows = (2**31) // v + 2
    big = torch.zeros(rows, v, dtype=torch.bfloat16)
    big[-1] = torch.linspace(-3, 3, v).to(torch.bfloat16)
    a = big[-2:]
    labels = torch.tensor([0, v - 1])
    with pk.use_backend("native"):
        logp = pk.token_logprobs(big, torch.full((rows,), -100).index_copy_(0, torch.tensor([rows - 2, rows - 1]), labels))
    want, _ = oracle(a, labels, None, None, want_logp=True)
    assert_tokens_close(logp[-2:], want["logp"], row_scale(a, None, 1.0), "logp")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "chi2", "alpha"])
def test_peaked_policy_far_from_reference(backend, divergence):
    """A peaked policy whose argmax the reference all but excludes: f'(t_k) is huge, and the
    centred S keeps the gradient exact where S - f'(t_k) would cancel (or overflow)."""
    a = torch.tensor([[6.164, -1.1737], [-65.3637, 17.0529]])
    b = torch.tensor([[-8.7152, 2.2737], [12.1004, 25.1408]])
    up = {"div": torch.ones(2)}

    def fn(x):
        return {"div": pk.token_divergence(x, b, divergence=divergence, alpha=-0.5)}

    got, grad = _run(backend, fn, a, up)
    want, grad_ref = oracle(a, None, b, None, divergence=divergence, alpha=-0.5, upstream=up)
    s = row_scale(a, b, 1.0)
    assert_tokens_close(got["div"], want["div"], s, divergence)
    assert_grads_close(grad, grad_ref, s, _g_out(up), torch.float32, divergence)
