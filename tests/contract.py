"""The numerics contract as executable checks, and the float64 oracle every backend meets.

Per-token outputs: ``|x - x_ref| <= (1e-5 + 1e-6 s)(1 + |x_ref|)``.
Gradients, per row: ``|g - g_ref| <= (1e-5 + 1e-6 s) max_j |g_ref_j| + 2e-7 |g_out| +
ulp_dtype(g_ref)``, with ``s = max(1, max|a|/T, max|b|/T)`` over the row's finite logits
and ``g_out`` the upstream gradient of that token.

``oracle`` gives the values and the logits' gradient of the same rounded inputs in float64,
from ``backends/reference.py``; the linear ops' oracle (tests/linear/linear_cases.py) applies
it to the float64 logits of the projection. ``row_terms`` is the same math differentiable with
respect to both logits tensors, for the sensitivities a tolerance needs.
"""

from __future__ import annotations

import math

import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels.backends import native, reference
from prefopt_kernels.backends import DIVERGENCE_CODES, OpSpec
from prefopt_kernels.divergences import GENERATORS, Divergence

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backends_on(device: torch.device):
    """Every available backend that runs on ``device``, the reference included."""
    names = []
    for name in pk.available_backends():
        module = __import__(f"prefopt_kernels.backends.{name}", fromlist=["supports"])
        if module.supports(device):
            names.append(name)
    return names


def backends_under_test():
    """Every backend that can run on ``DEVICE`` except the oracle itself."""
    return [name for name in backends_on(DEVICE) if name != "reference"]


def with_cpu_isas(names):
    """``names`` as pytest parameters, ``"native"`` once per CPU variant this machine runs.

    On CPU the native backend's ``"native"`` runs the variant in use (the widest, or
    ``PREFOPT_CPU_ISA``'s) and is followed by ``native-<isa>`` for every other variant of
    ``native.supported_cpu_isas()``, marked ``cpu_isa(<isa>)`` (conftest switches to it for
    the test). The value stays ``"native"``, so ``pk.use_backend(backend)`` is unchanged.
    """
    params = []
    for name in names:
        params.append(name)
        if name == "native" and DEVICE.type == "cpu":
            params += [pytest.param("native", id=f"native-{isa}", marks=pytest.mark.cpu_isa(isa))
                       for isa in native.supported_cpu_isas() if isa != native.current_cpu_isa()]
    return params


def row_scale(a: torch.Tensor, b, temperature: float) -> torch.Tensor:
    """``s`` per token: ``max(1, max|a|/T, max|b|/T)`` over finite entries; shape ``a.shape[:-1]``."""
    def finite_max(x):
        x = x.to(torch.float64).abs()
        return torch.where(torch.isfinite(x), x, torch.zeros_like(x)).amax(-1) / temperature

    s = finite_max(a)
    if b is not None:
        s = torch.maximum(s, finite_max(b))
    return torch.clamp(s, min=1.0)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at ``|x|`` (float64 result), subnormals included."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    x = x.to(torch.float64).abs()
    exponent = torch.floor(torch.log2(torch.clamp(x, min=info.tiny)))
    return torch.exp2(exponent - mantissa_bits)


def assert_tokens_close(x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, what: str) -> None:
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    scale = scale.cpu()
    # A true value beyond fp32's range may come out as the infinity of its sign.
    overflow = (ref.abs() > torch.finfo(torch.float32).max) & (x == torch.sign(ref) * math.inf)
    tol = (1e-5 + 1e-6 * scale) * (1.0 + ref.abs())
    err = (x - ref).abs()
    # The NaN policy: a NaN is right exactly where the oracle has one.
    bad = ~((x == ref) | overflow | (err <= tol) | (torch.isnan(x) & torch.isnan(ref)))
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} tokens outside the contract; "
        f"got {x[bad][:4].tolist()} want {ref[bad][:4].tolist()}"
    )


def assert_grads_close(g: torch.Tensor, g_ref: torch.Tensor, scale: torch.Tensor, g_out: torch.Tensor,
                       dtype: torch.dtype, what: str, rows=None) -> None:
    """``rows`` (bool, leading shape) limits the check to rows where the contract applies."""
    g = g.detach().to(torch.float64).cpu()
    g_ref = g_ref.detach().to(torch.float64).cpu()
    checked = torch.ones(g.shape[:-1], dtype=torch.bool) if rows is None else rows.cpu()
    # The NaN policy: a row's gradient is NaN as a whole, exactly where the oracle's is.
    nan_rows = torch.isnan(g_ref).all(-1)
    assert not (torch.isnan(g_ref).any(-1) & ~nan_rows).any(), f"{what}: the oracle has a partly NaN row"
    assert torch.isnan(g[checked & nan_rows]).all(), f"{what}: finite gradient in a row that must be NaN"
    checked = checked & ~nan_rows
    # A true gradient beyond the output dtype's range cannot be represented: out of contract.
    checked = checked & (g_ref.abs().amax(-1) <= torch.finfo(dtype).max)
    assert torch.isfinite(g[checked]).all(), f"{what}: non-finite gradient"
    row_max = g_ref.abs().amax(-1, keepdim=True)
    tol = (1e-5 + 1e-6 * scale.cpu()[..., None]) * row_max + 2e-7 * g_out.cpu().to(torch.float64)[..., None] + ulp(g_ref, dtype)
    bad = ~((g - g_ref).abs() <= tol) & checked[..., None]
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} gradient entries outside the contract; "
        f"got {g[bad][:4].tolist()} want {g_ref[bad][:4].tolist()}"
    )


def oracle(a, labels, b, weight, *, divergence=None, beta=0.5, alpha=0.5, temperature=1.0,
           ignore_index=-100, want_logp=False, want_ref_logp=False, want_entropy=False,
           upstream=None):
    """Float64 values and gradient of the same rounded inputs, from ``backends/reference.py``.

    Returns ``(values, grad)``: ``values`` maps output names to float64 tensors of the leading
    shape; ``grad`` is the float64 gradient of ``sum(upstream[k] * values[k])`` with
    respect to ``a`` (or ``None`` without ``upstream``).
    """
    lead, vocab = a.shape[:-1], a.shape[-1]
    a64 = a.detach().to(torch.float64).cpu().reshape(-1, vocab)
    b64 = None if b is None else b.detach().to(torch.float64).cpu().reshape(-1, vocab)
    spec = OpSpec(temperature=temperature, ignore_index=ignore_index,
                  divergence=DIVERGENCE_CODES[divergence] if divergence else 0, beta=beta, alpha=alpha,
                  want_logp=want_logp, want_ref_logp=want_ref_logp, want_entropy=want_entropy)
    flat_labels = None if labels is None else labels.cpu().reshape(-1)
    flat_weight = None if weight is None else weight.cpu().reshape(-1)
    values = reference.evaluate(a64.detach(), flat_labels, b64, flat_weight, spec)
    grad = None
    if upstream:
        grad = reference.gradient(a64, flat_labels, b64, flat_weight, spec, upstream).reshape(*lead, vocab)
    return {k: v.detach().reshape(lead) for k, v in values.items()}, grad


# The per-token outputs of the ops, in the order of ``row_terms``' last axis.
OUTPUTS = ("logp", "entropy", "ref_logp", "div")


def divergence_terms(divergence: str, log_p, log_q, beta=0.5, alpha=0.5):
    """The summands ``q_v f(p_v / q_v)`` of ``D(p, q)`` over the vocabulary (float64), each a function of
    ``(log p_v, log q_v)`` alone: the generators of ``prefopt_kernels.divergences`` that the oracle sums."""
    return GENERATORS[Divergence[divergence.upper()]](log_p, log_q, beta, alpha)[0]


def row_terms(a, b, onehot, *, temperature=1.0, divergence=None, beta=0.5, alpha=0.5):
    """``[..., 4]`` float64: the ``OUTPUTS`` of float64 policy logits ``a`` and reference logits ``b``
    (``[..., V]``; the labels one-hot in ``onehot``), differentiable with respect to both (the oracle
    detaches the reference). The oracle's math without its row skipping and NaN policy: for finite
    logits, the derivatives of its values with respect to either logits tensor."""
    log_p = torch.log_softmax(a / temperature, -1)
    log_q = torch.log_softmax(b / temperature, -1)
    logp = (onehot * log_p).sum(-1)
    entropy = -(torch.exp(log_p) * log_p).sum(-1)
    ref_logp = (onehot * log_q).sum(-1)
    div = divergence_terms(divergence, log_p, log_q, beta, alpha).sum(-1) if divergence else torch.zeros_like(logp)
    return torch.stack([logp, entropy, ref_logp, div], -1)


def _softmax_pairs(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float):
    """``(p, q)`` float64 ``[rows, V]`` of the rows whose logits are all finite (``None`` if none)."""
    a = logits.detach().double().reshape(-1, logits.shape[-1]) / temperature
    b = ref_logits.detach().double().reshape(-1, ref_logits.shape[-1]) / temperature
    finite = torch.isfinite(a).all(-1) & torch.isfinite(b).all(-1)
    if not finite.any():
        return None
    return torch.softmax(a[finite], -1), torch.softmax(b[finite], -1)


def in_forward_kl_argmax_gap(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> bool:
    """True when a row's forward KL gradient at the argmax, formed there directly, would miss the
    contract: ``p_k > 1/2`` and ``q_k`` within 1e-5 of it.

    The kernels add a row's exponentials in fp32 with the maximum's ``exp(0) = 1`` among them, so
    ``log_norm`` carries a few eps ``delta`` and ``(p_k - q_k) / T`` formed at ``k`` carries about
    ``p_k delta / T``, more than the contract's ``2e-7 |g_out|``. The whole-row backward writes that
    entry from the row's zero sum instead (:func:`in_forward_kl_rounding_gap` has what is left).
    """
    pairs = _softmax_pairs(logits, ref_logits, temperature)
    if pairs is None:
        return False
    p, q = pairs
    k = p.argmax(-1, keepdim=True)
    p_k, q_k = p.gather(-1, k), q.gather(-1, k)
    return bool(((p_k > 0.5) & ((p_k - q_k).abs() < 1e-5)).any())


def in_forward_kl_rounding_gap(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> bool:
    """True when a row lies where the kernels' forward KL gradient can still miss the contract's
    ``2e-7 |g_out|`` term.

    ``log_norm``'s few eps ``delta`` (up to about 3e-7 measured) make each ``p_j`` off by
    ``p_j delta``; forward KL's ``(p_j - q_j) / T`` has no term of that size to hide it where
    ``q_j`` is within 1e-5 of ``p_j``. Entry ``j`` is then off by about ``w_j delta / T``, with
    ``w_j = p_j``, except at a peaked argmax (``p_k > 1/2``), which the whole-row backward writes
    from the row's zero sum: ``w_k = 1 - p_k`` (the sum of the others' errors). The row is in
    the gap where some such entry has ``w_j / T > 0.5``: moderately peaked rows at ``T < 1``.
    Summing the row's exponentials with the maximum apart (``log_norm = log1p(...)``) in every
    forward would close it.
    """
    pairs = _softmax_pairs(logits, ref_logits, temperature)
    if pairs is None:
        return False
    p, q = pairs
    weight = torch.where(p > 0.5, 1.0 - p, p)
    return bool((((p - q).abs() < 1e-5) & (weight / temperature > 0.5)).any())