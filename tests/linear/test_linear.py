r"""The fused linear ops (prefopt_kernels.linear) against the logits ops and float64 end to end.

Every value/gradient check runs one fused op on a backend and compares it with

* the same backend's logits op applied to ``z`` computed explicitly by torch ops
  (``z = logit_scale (h W^T + c)``, then ``softcap tanh(z / softcap)``), gradients by
  autograd through that explicit projection, and
* the float64 oracle of the logits ops (``oracle`` of tests/contract.py) on the float64
  logits of the float64 copies of the SAME rounded inputs: its values, and its gradient
  ``dL/dz`` chained to hidden, head weight and head bias by float64 autograd through the
  projection.

Tolerance: the numerics contract of DESIGN.md (tests/contract.py) plus the projection's
rounding bound. ``z`` itself is computed in finite precision, so the fused op meets the
contract on ITS logits, which are within ``dz`` of the exact ones:

* fp32 GEMM of K = H terms, any summation order or blocking (Higham, Accuracy and Stability,
  3.1): ``|fl(h . W_v) - h . W_v| <= gamma_K sum_k |h_k| |W_vk|`` with
  ``gamma_n = n u / (1 - n u)``, ``u = 2^-24``. We use this rigorous ``K u`` form rather
  than the statistical ``c sqrt(K) u``: it holds for every blocking, which is exactly how
  the fused tiles and the explicit full GEMM differ, and it is still ~250x tighter than a
  logit rounded to bf16 (the smallest projection bug we want to catch); in these tests it
  is the same size as the contract's own term, so it does not hide contract violations.
  Then up to four roundings of size ``u (A + |c|)`` each: the bias widened, the bias add
  and the logit_scale multiply (the transform runs in fp32 on every device); softcap's
  divide, tanh (<= 2 ulp, counted as 5 ulp) and multiply add ``u (|z_pre| + 10 |z|)``
  (tanh is 1-Lipschitz, so earlier errors do not grow). Hence, per entry,
  ``dz <= |s| (gamma_{K+3} A + u_g (1 + gamma_K) A + 4 u (A + |c|)) [+ u (|s| (A + |c|)
  + 10 |z|)]`` with ``A = |h| |W|^T``, ``c`` the bias, ``s`` the logit scale and ``u_g``
  the unit roundoff of the GEMM's output (0 in fp32).
* bf16 on CPU: half inputs (or bf16 autocast) give a bf16 GEMM whose output is the bf16
  rounding of an fp32-accumulated sum (checked in ``test_bf16_gemm_is_rounded_fp32``):
  ``u_g = 2^-8``. It is widened to fp32 before the bias, scale and softcap, and the
  backward's chain rule through softcap and scale runs in fp32, so every other term keeps
  fp32's ``u`` (a transform in bf16 misses these bounds by far); the backward's ``dL/dz``
  is then rounded once to bf16 for the GEMMs (the contract's ``ulp_bf16`` term).
* Values: to first order an output ``x`` moves by ``sum_v |dx/dz_v| dz_v`` (+ the same for
  the reference's logits); for the label log-prob ``sum_v |dlogp/dz_v| = 2 (1 - p_y) / T``:
  at most ``2 max_v dz_v / T``. The oracle computes ``dx/dz`` exactly (float64 autograd);
  the first-order term is doubled to cover the remainder (``dz`` is ~1e-5, or ~1e-2 in
  bf16, so the second-order term is below a few percent of the first).
* Gradients: ``G = dL/dz`` moves by ``sum_i |d2L/dz_v dz_i| dz_i`` (+ the reference's
  cross term), bounded through the Hessian's diagonal-plus-rank-3 structure
  (``hessian_bound``, checked against exact float64 Hessians; doubled as above), plus the contract's
  gradient term (in the tile's dtype), the rounding of the chain rule through softcap and
  scale (``1 - (z/c)^2`` formed from the rounded ``z``), and the fp32 accumulation of
  ``dh = G W`` (``gamma_V |G| |W|``), ``dW = G^T h`` and ``db = sum G`` (``gamma_N``);
  bf16 parameters add one final rounding. tv's gradient jumps where ``sign(p - q)`` is
  decided below rounding (the contract's exemption): the bound adds exactly that jump
  (``|g| p_j (1[j in U] + sum_U p_i) / T``) for the undecided entries ``U``.
* The explicit path has a bound of the same form, so fused and explicit agree within the sum
  of the two (twice the bound); with half GEMMs, autograd's backward rounds ``dL/dz`` and the
  GEMM's result to the half dtype, which adds ``2 u_bf16`` of the magnitudes accumulated.
* The bounds are rigorous to first order, so they are loose: measured errors stay below ~1%
  of them in fp32 (where the contract's own term is as large as the projection's) and below
  ~25% in bf16. What they catch (checked by injecting the faults):
  a missing bias, bias added after the scale, fp32 tiles rounded to bf16, the softcap
  factor missing in the backward, ``dL/dz`` rounded to bf16 before an fp32 GEMM, a wrong
  ``log_sum_sq_probs`` rescale, a 1e-4 relative error in the logits.

Triton runs in its interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1),
on the same tiny shapes as every other backend here (V 200-400, N <= 15). To keep the file
fast, the interpreter runs the explicit-path comparison in test_logprobs only, four of the
divergences in test_terms (every divergence runs on it in test_divergence) and two of the
three cases of test_uneven_tiles.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from torch.func import grad, jacrev, vmap

import prefopt_kernels as pk
from prefopt_kernels.linear import tiles as linear_tiles
from prefopt_kernels.linear.tiles import plan_tiles

from contract import OUTPUTS, backends_on, divergence_terms, row_terms, ulp, with_cpu_isas
from contract import oracle as logits_oracle

CPU = torch.device("cpu")
F64 = torch.float64
U32 = 2.0 ** -24  # unit roundoff of fp32
U16 = 2.0 ** -8  # unit roundoff of bf16 (8-bit significand)


BACKENDS = backends_on(CPU)
# The core cases run once per native CPU variant (fold, sweep and the slice backward over
# vocabulary tiles); the rest on the default variant.
ISA_BACKENDS = with_cpu_isas(BACKENDS)
# (divergence, beta, alpha): every divergence; js and alpha also at non-default parameters.
DIVERGENCE_CASES = [(d, 0.5, 0.5) for d in pk.DIVERGENCES] + [("js", 0.2, 0.5), ("alpha", 0.5, 1.7),
                                                              ("alpha", 0.5, -0.4)]
TRITON_TERMS_CASES = [("forward_kl", 0.5, 0.5), ("js", 0.2, 0.5), ("tv", 0.5, 0.5), ("alpha", 0.5, -0.4)]


def _ids(cases):
    return [f"{d}-b{b}-a{a}" for d, b, a in cases]


def _gamma(n: int, u: float = U32) -> float:
    return n * u / (1.0 - n * u)


# --------------------------------------------------------------------------- inputs


@dataclass
class Head:
    """One model's hidden states and LM head as the test holds them."""

    root: torch.Tensor  # the tensor the test owns: ``[..., H]`` (hidden is a view of it)
    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]
    scale: float = 1.0
    softcap: Optional[float] = None
    slicer: Optional[Callable] = None  # root -> hidden

    def hidden_of(self, root):
        return root if self.slicer is None else self.slicer(root)

    @property
    def hidden(self):
        return self.hidden_of(self.root)

    def leaves(self, requires_grad=True, requires=("hidden", "weight", "bias")):
        """Fresh leaf copies ``(root, weight, bias)``; those named in ``requires`` require grad."""
        def leaf(t, name):
            return None if t is None else t.detach().clone().requires_grad_(requires_grad and name in requires)
        return leaf(self.root, "hidden"), leaf(self.weight, "weight"), leaf(self.bias, "bias")


def make_head(lead, hidden_size, vocab, *, seed, dtype=torch.float32, bias=False, scale=1.0, softcap=None,
              z_std=3.0, sliced=False) -> Head:
    """Logits of about ``z_std`` standard deviation; ``sliced``: hidden is ``root[..., :-1, :]``."""
    g = torch.Generator().manual_seed(seed)
    full = list(lead)
    if sliced:
        full[-1] += 1
    root = torch.randn(*full, hidden_size, generator=g, dtype=F64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=F64) * (z_std / math.sqrt(hidden_size))
    b = torch.randn(vocab, generator=g, dtype=F64) * 0.5 if bias else None
    return Head(root.to(dtype), weight.to(dtype), None if b is None else b.to(dtype), scale, softcap,
                (lambda r: r[..., :-1, :]) if sliced else None)


def make_labels(lead, vocab, *, seed, ignored=()):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, tuple(lead), generator=g)
    flat = labels.view(-1)
    for i in ignored:
        flat[i] = -100
    return labels


def make_weight(lead, *, seed, zero_every=3):
    """Sparse ``div_weight``: every ``zero_every``-th token (from the second) is 0, the rest in [0.25, 1)."""
    g = torch.Generator().manual_seed(seed)
    w = 0.25 + 0.75 * torch.rand(tuple(lead), generator=g)
    w.view(-1)[1::zero_every] = 0.0
    return w


# --------------------------------------------------------------------------- float64 oracle
#
# Values and dL/dz come from the logits ops' oracle (tests/contract.py); the tolerances need
# derivatives of the same math with respect to both logits tensors (contract.row_terms).


def _row_loss(z, zr, onehot, g, **spec):
    return (g * row_terms(z, zr, onehot, **spec)).sum()


def _separable_loss(lp, lq, onehot, g, *, temperature, divergence, beta, alpha):
    """``[n, V]`` summands ``Phi_v(lp_v, lq_v)`` with ``L = sum_v Phi_v`` (ref_logp has no gradient)."""
    p = lp.exp()
    phi = g[:, :1] * onehot * lp - g[:, 1:2] * p * lp
    if divergence:
        phi = phi + g[:, 3:4] * divergence_terms(divergence, lp, lq, beta, alpha)
    return phi


def hessian_bound(z, zr, onehot, g, dz, dzr, **spec):
    r"""``sum_i |d2L/dz_v dz_i| dz_i + sum_i |d2L/dz_v dzr_i| dzr_i`` bounded from above, ``[n, V]``.

    Every loss here is separable in the log-probabilities, ``L = sum_v Phi_v(lp_v, lq_v)`` with
    ``lp = a - lse(a)``, ``a = z / T``. With ``phi' = dPhi_v/dlp_v``, ``phi''`` its derivative,
    ``psi = d2Phi_v/dlp_v dlq_v``, ``S = sum phi'`` and ``dlp_v/da_i = 1[v=i] - p_i``:

        d2L/da_i da_j = 1[i=j] (phi''_i - p_i S) - phi''_i p_j - p_i phi''_j + p_i p_j (S + sum phi''),
        d2L/da_i db_j = 1[i=j] psi_i - psi_i q_j - p_i psi_j + p_i q_j sum psi,

    and ``|H| dz`` is bounded term by term (triangle inequality); ``d/dz = d/da / T``. Checked
    against the exact Hessian in test_hessian_bound.
    """
    t = spec["temperature"]
    lp = torch.log_softmax(z / t, -1).detach().requires_grad_(True)
    lq = torch.log_softmax(zr / t, -1).detach().requires_grad_(True)
    p, q = lp.detach().exp(), lq.detach().exp()
    d1, = torch.autograd.grad(_separable_loss(lp, lq, onehot, g, **spec).sum(), lp, create_graph=True)
    d2, mixed = torch.autograd.grad(d1.sum(), (lp, lq), allow_unused=True, materialize_grads=True)
    d1, d2, mixed = d1.detach(), d2.detach(), mixed.detach()
    s1, s2, sm = d1.sum(-1, keepdim=True), d2.sum(-1, keepdim=True), mixed.sum(-1, keepdim=True)

    def dot(x, y):
        return (x * y).sum(-1, keepdim=True)

    own = ((d2 - p * s1).abs() * dz + d2.abs() * dot(p, dz) + p * dot(d2.abs(), dz)
           + (s1 + s2).abs() * p * dot(p, dz))
    cross = (mixed.abs() * dzr + mixed.abs() * dot(q, dzr) + p * dot(mixed.abs(), dzr)
             + sm.abs() * p * dot(q, dzr))
    return (own + cross) / (t * t), (d1 - p * s1) / t  # the bound, and dL/dz (a self-check)


def _jacobians(z, zr, onehot, spec):
    """``d terms[:, k] / dz`` and ``/ dzr``, ``[n, 4, V]`` each (rows are independent)."""
    z = z.detach().requires_grad_(True)
    zr = zr.detach().requires_grad_(True)
    terms = row_terms(z, zr, onehot, **spec)
    jz, jzr = [], []
    for k in range(terms.shape[-1]):
        a, b = torch.autograd.grad(terms[:, k].sum(), (z, zr), retain_graph=True, materialize_grads=True)
        jz.append(a)
        jzr.append(b)
    return torch.stack(jz, 1), torch.stack(jzr, 1)


def _exact_logits(h, w, b, scale, softcap):
    u = h @ w.T
    if b is not None:
        u = u + b
    z = scale * u
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _projection_bound(h, w, b, scale, softcap, z, u_gemm):
    """Per-entry bound on ``|z_computed - z_exact|`` (module docstring), float64 ``[n, V]``.

    ``u_gemm``: the unit roundoff of the GEMM's output (0 for an fp32 GEMM, whose rounding
    ``gamma_K`` covers); the transform after it runs in fp32.
    """
    a = h.abs() @ w.abs().T
    c = 0.0 if b is None else b.abs()
    bound = abs(scale) * (_gamma(h.shape[-1] + 3) * a + u_gemm * a * (1 + _gamma(h.shape[-1])) + 4 * U32 * (a + c))
    if softcap is not None:
        bound = bound + U32 * (abs(scale) * (a + c) + 10 * z.abs())
    return bound


@dataclass
class Expected:
    values: dict  # name -> float64 [lead]
    value_tol: dict
    grads: dict  # "hidden" [lead, H], "weight", "bias"
    grad_tol: dict
    grad_mag: dict  # per entry, the sum of magnitudes each gradient accumulates
    extras: dict  # name -> float64/bool [lead]
    extra_tol: dict
    kept: torch.Tensor  # bool [lead]: rows the op reads (labels kept, and weight > 0 for div-only)
    div_rows: torch.Tensor  # bool [lead]: rows with a divergence


def oracle(policy: Head, labels, ref: Optional[Head], *, gemm_dtype, upstream: dict, div_weight=None,
           divergence=None, beta=0.5, alpha=0.5, temperature=1.0, want=("logp",)) -> Expected:
    """Float64 values, gradients and tolerances of one fused call (see the module docstring).

    The values and ``dL/dz`` are those of the logits ops' oracle (``contract.oracle``) on the
    float64 logits ``z`` of the rounded inputs; the gradients of hidden, head weight and head
    bias chain ``dL/dz`` through the float64 projection by autograd.

    ``gemm_dtype``: the dtype the GEMM's inputs are rounded to (the tile dtype on CPU);
    ``upstream``: name -> fp32 ``[lead]`` upstream gradient of each differentiable output.
    """
    hidden = policy.hidden
    lead, hsize = hidden.shape[:-1], hidden.shape[-1]
    vocab = policy.weight.shape[0]
    n = lead.numel()
    u_gemm = 0.0 if gemm_dtype == torch.float32 else U16

    def leaf(t, dtype):
        return None if t is None else t.detach().to(dtype).to(F64).requires_grad_(True)

    h64 = leaf(hidden.reshape(n, hsize), gemm_dtype)
    w64 = leaf(policy.weight, gemm_dtype)
    b64 = leaf(policy.bias, policy.bias.dtype) if policy.bias is not None else None
    z = _exact_logits(h64, w64, b64, policy.scale, policy.softcap)
    with torch.no_grad():
        dz = _projection_bound(h64, w64, b64, policy.scale, policy.softcap, z, u_gemm)
    if ref is not None:
        rh = ref.hidden.detach().reshape(n, ref.hidden.shape[-1]).to(gemm_dtype).to(F64)
        rw = ref.weight.detach().to(gemm_dtype).to(F64)
        rb = None if ref.bias is None else ref.bias.detach().to(F64)
        zr = _exact_logits(rh, rw, rb, ref.scale, ref.softcap)
        dzr = _projection_bound(rh, rw, rb, ref.scale, ref.softcap, zr, u_gemm)
    else:
        zr = torch.zeros_like(z.detach())
        dzr = torch.zeros_like(zr)

    flat_labels = None if labels is None else labels.reshape(n)
    kept = torch.ones(n, dtype=torch.bool) if flat_labels is None else flat_labels != -100
    w = None if div_weight is None else div_weight.reshape(n)
    div_rows = kept & (w != 0) if (w is not None and divergence) else kept & bool(divergence)
    if flat_labels is None:
        kept = div_rows.clone()  # the divergence-only op drops zero-weight rows
    onehot = torch.zeros(n, vocab, dtype=F64)
    if flat_labels is not None:
        onehot[kept, flat_labels[kept]] = 1.0
    masks = torch.stack([kept, kept, kept, div_rows], -1).to(F64)  # [n, 4]
    gvec = torch.zeros(n, 4, dtype=F64)
    for key, g in upstream.items():
        gvec[:, OUTPUTS.index(key)] = g.reshape(n).to(F64)
    gvec = gvec * masks

    spec = dict(temperature=temperature, divergence=divergence, beta=beta, alpha=alpha)
    z0 = z.detach()
    # The logits ops' oracle on the exact logits: the values (0 on the rows the op skips) and
    # G = dL/dz for the upstream gradients.
    rows, gz = logits_oracle(z0, flat_labels, None if ref is None else zr, w, divergence=divergence, beta=beta,
                             alpha=alpha, temperature=temperature, want_logp="logp" in want,
                             want_ref_logp="ref_logp" in want, want_entropy="entropy" in want,
                             upstream={key: gvec[:, OUTPUTS.index(key)] for key in upstream})
    if gz is None:  # no upstream gradient
        gz = torch.zeros_like(z0)
    flat_values = {key: rows.get(key, torch.zeros(n, dtype=F64)) for key in OUTPUTS if key in want}
    # Autograd through the explicit float64 projection: the gradients of hidden, weight, bias.
    params = [t for t in (h64, w64, b64) if t is not None]
    grads = torch.autograd.grad(z, params, grad_outputs=gz, allow_unused=True)
    grads = dict(zip(("hidden", "weight", "bias"), list(grads) + [None]))
    grads["hidden"] = grads["hidden"].reshape(*lead, hsize)

    values = {key: v.reshape(lead) for key, v in flat_values.items()}
    s = torch.clamp(torch.maximum(z0.abs().amax(-1), zr.abs().amax(-1)) / temperature, min=1.0)
    contract = 1e-5 + 1e-6 * s  # [n]

    # Values: contract + doubled first-order propagation of the projection's error.
    jz, jzr = _jacobians(z0, zr, onehot, spec)  # [n, 4, V]
    value_tol = {}
    for i, key in enumerate(OUTPUTS):
        if key in want:
            prop = (jz[:, i].abs() * dz).sum(-1) + (jzr[:, i].abs() * dzr).sum(-1)
            value_tol[key] = (contract * (1 + flat_values[key].abs()) + 2 * prop).reshape(lead)

    # Gradients. G = dL/dz per row and its error bound E_z (contract + doubled Hessian term).
    hess, gz_check = hessian_bound(z0, zr, onehot, gvec, dz, dzr, **spec)
    torch.testing.assert_close(gz_check, gz, rtol=1e-9, atol=1e-12)  # the bound's own derivatives
    g_out = gvec.abs().sum(-1)
    # dL/dz is formed in fp32 and rounded once to the GEMM dtype for the backward's GEMMs.
    err_z = (contract * gz.abs().amax(-1) + 2e-7 * g_out)[:, None] + ulp(gz, gemm_dtype) + 2 * hess
    if divergence == "tv":
        lp = torch.log_softmax(z0 / temperature, -1)
        lq = torch.log_softmax(zr / temperature, -1)
        p, q = lp.exp(), lq.exp()
        move = 2 * (p * (dz + dz.amax(-1, keepdim=True)) + q * (dzr + dzr.amax(-1, keepdim=True))) / temperature
        undecided = ((p - q).abs() <= move + contract[:, None] * (p + q)).to(F64)
        jump = p * (undecided + (undecided * p).sum(-1, keepdim=True)) / temperature
        err_z = err_z + gvec[:, 3].abs()[:, None] * jump
    # Through softcap and scale: G_u = s tau' G, tau' = 1 - (z/c)^2 formed from the rounded z.
    if policy.softcap is not None:
        t = z0 / policy.softcap
        tau = 1 - t * t
        dtau = 2 * 2 * t.abs() * dz / policy.softcap + 4 * U32
    else:
        tau, dtau = torch.ones_like(z0), torch.zeros_like(z0)
    g_u = policy.scale * tau * gz
    err_u = abs(policy.scale) * (tau * err_z + gz.abs() * dtau) + 3 * U32 * g_u.abs()
    mag_u = g_u.abs() + err_u
    kept_rows = int(kept.sum())
    h_abs, w_abs = h64.detach().abs(), w64.detach().abs()
    grad_tol = {
        "hidden": (err_u @ w_abs + _gamma(vocab) * mag_u @ w_abs).reshape(*lead, hsize),
        "weight": err_u.T @ h_abs + _gamma(max(kept_rows, 1)) * mag_u.T @ h_abs,
        "bias": err_u.sum(0) + _gamma(max(kept_rows, 1)) * mag_u.sum(0),
    }
    grad_mag = {"hidden": (mag_u @ w_abs).reshape(*lead, hsize), "weight": mag_u.T @ h_abs, "bias": mag_u.sum(0)}
    out_dtypes = {"hidden": hidden.dtype, "weight": policy.weight.dtype,
                  "bias": None if policy.bias is None else policy.bias.dtype}
    for key in list(grad_tol):
        if grads.get(key) is None:
            grad_tol.pop(key)
            continue
        if out_dtypes[key] != torch.float32:  # the final rounding of the fp32 accumulator
            grad_tol[key] = grad_tol[key] * (1 + U16) + U16 * grads[key].abs()

    # TRL's extras, from their definitions.
    lp = torch.log_softmax(z0 / temperature, -1)
    extras = {
        "mean_logits": torch.where(kept, z0.mean(-1) / temperature, 0.0).reshape(lead),
        "log_sum_sq_probs": torch.where(kept, torch.logsumexp(2 * lp, -1), 0.0).reshape(lead),
        "is_top1": (kept & (z0.argmax(-1) == (flat_labels if flat_labels is not None else -1))).reshape(lead),
    }
    p = lp.exp()
    sq = torch.exp(2 * lp - torch.logsumexp(2 * lp, -1, keepdim=True))  # p^2 / sum p^2
    extra_tol = {
        "mean_logits": (contract * (1 + extras["mean_logits"].reshape(n).abs())
                        + (2 * dz.mean(-1) + _gamma(vocab) * z0.abs().mean(-1)) / temperature).reshape(lead),
        "log_sum_sq_probs": (contract * (1 + extras["log_sum_sq_probs"].reshape(n).abs())
                             + 2 * (2 * (sq - p).abs() / temperature * dz).sum(-1)).reshape(lead),
    }
    # is_top1 is decided only where the label's logit clears the rest by more than the error.
    top2 = z0.topk(2, -1).values if vocab > 1 else torch.cat([z0, z0 - math.inf], -1)
    extra_tol["is_top1_decided"] = ((top2[:, 0] - top2[:, 1]) > 4 * dz.amax(-1)).reshape(lead)
    return Expected(values, value_tol, grads, grad_tol, grad_mag, extras, extra_tol, kept.reshape(lead),
                    div_rows.reshape(lead))


@pytest.mark.parametrize("divergence, beta, alpha", [(None, 0.5, 0.5)] + DIVERGENCE_CASES)
def test_hessian_bound(divergence, beta, alpha):
    """The structured bound of hessian_bound is >= the exact ``|H| dz`` (float64 Hessians by
    torch.func) and within a small factor of it, so the gradient tolerances are sound and not
    vacuous."""
    g = torch.Generator().manual_seed(191)
    n, vocab = 3, 40
    z = torch.randn(n, vocab, generator=g, dtype=F64) * 3
    zr = z + torch.randn(n, vocab, generator=g, dtype=F64) * 1.5
    onehot = torch.nn.functional.one_hot(torch.randint(0, vocab, (n,), generator=g), vocab).to(F64)
    gvec = torch.randn(n, 4, generator=g, dtype=F64)
    dz = torch.rand(n, vocab, generator=g, dtype=F64) * 1e-5
    dzr = torch.rand(n, vocab, generator=g, dtype=F64) * 1e-5
    spec = dict(temperature=0.8, divergence=divergence, beta=beta, alpha=alpha)
    if divergence is None:
        gvec[:, 3] = 0.0
    hzz, hzr = vmap(jacrev(grad(functools.partial(_row_loss, **spec)), argnums=(0, 1)))(z, zr, onehot, gvec)
    exact = torch.einsum("nvi,ni->nv", hzz.abs(), dz) + torch.einsum("nvi,ni->nv", hzr.abs(), dzr)
    bound, _ = hessian_bound(z, zr, onehot, gvec, dz, dzr, **spec)
    assert (bound >= exact * (1 - 1e-9)).all()
    # Not vacuous: measured 2-9x the exact value summed over a row (up to ~30x at single
    # entries, where the exact rank-3 terms cancel).
    assert (bound.sum(-1) <= 16 * exact.sum(-1)).all()


def assert_close(got, want, tol, what):
    got = got.detach().to(F64)
    want = want.detach().to(F64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{bad.numel()} entries outside the bound; worst err/tol "
        f"{float((err / tol.clamp(min=1e-300)).max()):.3g}; got {got[bad][:3].tolist()} want {want[bad][:3].tolist()} "
        f"tol {tol[bad][:3].tolist()}"
    )


# --------------------------------------------------------------------------- running the ops


OPS = ("logprobs", "divergence", "terms")


@dataclass
class Call:
    op: str
    policy: Head
    labels: Optional[torch.Tensor] = None
    ref: Optional[Head] = None
    div_weight: Optional[torch.Tensor] = None
    divergence: Optional[str] = None
    beta: float = 0.5
    alpha: float = 0.5
    temperature: float = 1.0
    return_entropy: bool = False
    extras: tuple = ()
    memory_budget: Optional[int] = None
    loss_on: Optional[tuple] = None  # the outputs the test's loss uses (default: every differentiable one)
    requires: tuple = ("hidden", "weight", "bias")  # the policy tensors that require grad

    def outputs(self):
        """The differentiable outputs of the op, by name, in the order it returns them."""
        if self.op == "logprobs":
            return ("logp", "entropy") if self.return_entropy else ("logp",)
        if self.op == "divergence":
            return ("div",)
        return ("logp", "div", "entropy") if self.return_entropy else ("logp", "div")

    def want(self):
        return self.outputs() + (("ref_logp",) if self.op == "terms" else ())

    def kwargs(self):
        kw = dict(temperature=self.temperature, logit_scale=self.policy.scale, softcap=self.policy.softcap,
                  memory_budget=self.memory_budget)
        if self.op != "logprobs":
            kw.update(divergence=self.divergence, beta=self.beta, alpha=self.alpha, div_weight=self.div_weight,
                      ref_logit_scale=self.ref.scale, ref_softcap=self.ref.softcap)
        if self.op != "divergence":
            kw.update(return_entropy=self.return_entropy, extras=self.extras)
        return kw


def _unpack(call: Call, result):
    """``(values by name, extras dict or None)`` of a fused op's return value, checking its structure."""
    if call.op == "logprobs":
        items = result if isinstance(result, tuple) else (result,)
        expected_len = 1 + call.return_entropy + bool(call.extras)
        assert len(items) == expected_len, f"linear_token_logprobs returned {len(items)} items"
        extras = items[-1] if call.extras else None
        values = dict(zip(call.outputs(), items))
    elif call.op == "divergence":
        assert isinstance(result, torch.Tensor)
        values, extras = {"div": result}, None
    else:
        if call.extras:
            assert isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)
            terms, extras = result
        else:
            terms, extras = result, None
        assert isinstance(terms, pk.TokenTerms)
        values = {"logp": terms.logp, "ref_logp": terms.ref_logp, "div": terms.div}
        if call.return_entropy:
            values["entropy"] = terms.entropy
        else:
            assert terms.entropy is None
    if extras is not None:
        assert isinstance(extras, dict) and set(extras) == set(call.extras), f"extras keys {set(extras)}"
    return values, extras


def _upstream(call: Call, seed: int) -> dict:
    lead = call.policy.hidden.shape[:-1]
    g = torch.Generator().manual_seed(seed + 7)
    upstream = {k: torch.randn(tuple(lead), generator=g, dtype=F64).to(torch.float32) for k in call.outputs()}
    return {k: v for k, v in upstream.items() if call.loss_on is None or k in call.loss_on}


def run_fused(backend, call: Call, upstream: dict, *, autocast=False):
    """Values, extras and gradients ``(root, weight, bias)`` of the fused op; the reference's
    tensors require grad and must receive none."""
    root, weight, bias = call.policy.leaves(requires=call.requires)
    hidden = call.policy.hidden_of(root)
    args = [hidden, weight]
    ref_leaves = None
    if call.op == "logprobs":
        fn = pk.linear_token_logprobs
        args.append(call.labels)
    else:
        ref_leaves = call.ref.leaves(requires_grad=True)
        ref_hidden = call.ref.hidden_of(ref_leaves[0])
        if call.op == "divergence":
            fn = pk.linear_token_divergence
            args += [ref_hidden, ref_leaves[1]]
        else:
            fn = pk.linear_token_terms
            args += [call.labels, ref_hidden, ref_leaves[1]]
    kw = call.kwargs()
    kw["head_bias"] = bias
    if call.op != "logprobs":
        kw["ref_head_bias"] = ref_leaves[2]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with pk.use_backend(backend), ctx:
        result = fn(*args, **kw)
        values, extras = _unpack(call, result)
        loss = sum((values[k] * g).sum() for k, g in upstream.items())
    loss.backward()
    if ref_leaves is not None:
        assert all(t is None or t.grad is None for t in ref_leaves), "a reference tensor received a gradient"
        if "ref_logp" in values:
            assert not values["ref_logp"].requires_grad
    if extras:
        assert not any(v.requires_grad for v in extras.values()), "extras must not be differentiable"
    return values, extras, (root.grad, weight.grad, None if bias is None else bias.grad)


def _explicit(head: Head, root, weight, bias, gemm_dtype):
    """``z`` by torch ops: the GEMM in ``gemm_dtype``, the transform in fp32; ``[n, V]``, differentiable."""
    hidden = head.hidden_of(root)
    h = hidden.reshape(-1, hidden.shape[-1]).to(gemm_dtype)
    z = (h @ weight.to(gemm_dtype).T).float()
    if bias is not None:
        z = z + bias.float()
    if head.scale != 1.0:
        z = z * head.scale
    if head.softcap is not None:
        z = torch.tanh(z / head.softcap) * head.softcap
    return z


def run_explicit(backend, call: Call, upstream: dict, gemm_dtype):
    """The same values and gradients from the logits ops on the explicitly projected ``z``."""
    root, weight, bias = call.policy.leaves(requires=call.requires)
    lead = call.policy.hidden.shape[:-1]
    z = _explicit(call.policy, root, weight, bias, gemm_dtype)
    labels = None if call.labels is None else call.labels.reshape(-1)
    weight_flat = None if call.div_weight is None else call.div_weight.reshape(-1)
    if call.ref is not None:
        r_root, r_weight, r_bias = call.ref.leaves(requires_grad=False)
        zr = _explicit(call.ref, r_root, r_weight, r_bias, gemm_dtype)
    with pk.use_backend(backend):
        if call.op == "logprobs":
            out = pk.token_logprobs(z, labels, temperature=call.temperature, return_entropy=call.return_entropy)
            values = dict(zip(call.outputs(), out if call.return_entropy else (out,)))
        elif call.op == "divergence":
            values = {"div": pk.token_divergence(z, zr, divergence=call.divergence, beta=call.beta, alpha=call.alpha,
                                                 weight=weight_flat, temperature=call.temperature)}
        else:
            t = pk.token_terms(z, labels, zr, divergence=call.divergence, div_weight=weight_flat,
                               temperature=call.temperature, beta=call.beta, alpha=call.alpha,
                               return_entropy=call.return_entropy)
            values = {"logp": t.logp, "ref_logp": t.ref_logp, "div": t.div}
            if call.return_entropy:
                values["entropy"] = t.entropy
    values = {k: v.reshape(lead) for k, v in values.items()}
    loss = sum((values[k] * g).sum() for k, g in upstream.items())
    loss.backward()
    return values, (root.grad, weight.grad, None if bias is None else bias.grad)


def _root_grad(head: Head, g_hidden):
    """The oracle's gradient of ``hidden`` placed in the root tensor's shape (0 outside the view)."""
    full = torch.zeros(head.root.shape, dtype=F64)
    head.hidden_of(full).copy_(g_hidden)
    return full


_ORACLE_CACHE = {}


def check(backend, call: Call, *, seed=0, gemm_dtype=None, autocast=False, explicit=True, key=None):
    """Run the fused op and compare it with the explicit path and the float64 oracle.

    ``key``: a name for this case's inputs, the same on every backend, so that the oracle
    (which does not depend on the backend) is computed once per case.
    """
    if gemm_dtype is None:
        gemm_dtype = torch.bfloat16 if autocast else call.policy.root.dtype
    upstream = _upstream(call, seed)
    values, extras, grads = run_fused(backend, call, upstream, autocast=autocast)
    exp = _ORACLE_CACHE.get(key) if key is not None else None
    if exp is None:
        exp = oracle(call.policy, call.labels, call.ref, gemm_dtype=gemm_dtype, upstream=upstream,
                     div_weight=call.div_weight, divergence=call.divergence, beta=call.beta, alpha=call.alpha,
                     temperature=call.temperature, want=call.want())
        if key is not None:
            _ORACLE_CACHE[key] = exp
    lead = call.policy.hidden.shape[:-1]
    dropped = ~exp.kept
    for key in call.want():
        v = values[key]
        assert v.dtype == torch.float32 and v.shape == lead, f"{key}: {v.dtype} {tuple(v.shape)}"
        assert_close(v, exp.values[key], exp.value_tol[key], f"{backend} {call.op} {key} vs float64")
        assert (v.detach()[dropped] == 0).all(), f"{key} not 0 at dropped rows"
    if "div" in values:
        assert (values["div"].detach()[~exp.div_rows] == 0).all(), "div not 0 where div_weight is 0"

    # Gradients of hidden (in the root's shape), head weight and head bias.
    names = ("hidden", "weight", "bias")
    params = (call.policy.root, call.policy.weight, call.policy.bias)
    for name, got, param in zip(names, grads, params):
        if param is None:
            continue
        if name not in call.requires:
            assert got is None, f"{name} does not require grad but got one"
            continue
        assert got is not None and got.dtype == param.dtype, f"d {name}: {None if got is None else got.dtype}"
        want = exp.grads[name]
        tol = exp.grad_tol[name]
        if name == "hidden":
            want, tol = _root_grad(call.policy, want), _root_grad(call.policy, tol)
        assert_close(got, want, tol, f"{backend} {call.op} d {name} vs float64")
    if grads[0] is not None:
        g_hidden = call.policy.hidden_of(grads[0])
        assert (g_hidden[dropped] == 0).all(), "hidden's gradient not 0 at dropped rows"

    if explicit:
        e_values, e_grads = run_explicit(backend, call, upstream, gemm_dtype)
        for key in call.want():
            assert_close(values[key], e_values[key], 2 * exp.value_tol[key], f"{backend} {call.op} {key} vs explicit")
        for name, got, other, param in zip(names, grads, e_grads, params):
            if param is None or name not in call.requires:
                continue
            tol = 2 * exp.grad_tol[name]
            if gemm_dtype != torch.float32:
                # Autograd's half GEMMs round dL/dz to the half dtype and write their result in it.
                tol = tol + 2 * U16 * exp.grad_mag[name]
            if name == "hidden":
                tol = _root_grad(call.policy, tol)
            assert_close(got, other, tol, f"{backend} {call.op} d {name} vs explicit")

    if call.extras:
        check_extras(extras, exp, call)
    return values, extras, grads, exp


def check_extras(extras, exp: Expected, call: Call):
    dropped = ~exp.kept
    for key in call.extras:
        v = extras[key]
        assert v.shape == call.policy.hidden.shape[:-1]
        if key == "is_top1":
            assert v.dtype == torch.bool
            decided = exp.extra_tol["is_top1_decided"]
            assert decided[exp.kept].float().mean() > 0.5, "too few decided rows for is_top1 to test anything"
            assert torch.equal(v[decided], exp.extras[key][decided]), "is_top1"
            assert not v[dropped].any()
        else:
            assert v.dtype == torch.float32
            assert_close(v, exp.extras[key], exp.extra_tol[key], key)
            assert (v[dropped] == 0).all(), f"{key} not 0 at ignored rows"


# --------------------------------------------------------------------------- tile planning


@pytest.mark.parametrize("args, expected", [
    # 13 rows, fp32 single head (4 bytes/entry): 13 * 4 * 256 > 6500, so the token chunk halves
    # to 6; then 6500 // 24 = 270 >= 256.
    ((13, 300, 4, 0, 6500), (6, 270)),
    # Plenty of budget: the token chunk is capped at 4096 rows; 2^26 // (4096 * 4) = 4096.
    ((10000, 50000, 4, 0, 64 * 2**20), (4096, 4096)),
    # Nothing fits: halve to one row, then the vocabulary chunk is what is left (10 // 4 = 2).
    ((5, 100, 4, 0, 10), (1, 2)),
    # Even less: both chunks are at least 1.
    ((3, 10, 4, 0, 1), (1, 1)),
    # A whole small vocabulary fits: vocab chunk = V, no token split (2 * 7 * 4 + 7 * 8 <= 1000).
    ((2, 7, 4, 8, 1000), (2, 7)),
    # Per-column cost: t=4: 600 // (4 * 4 + 8) = 25 < 50 = V; t=2: 600 // 16 = 37 < 50; t=1: 600 // 12 = 50.
    ((4, 50, 4, 8, 600), (1, 50)),
])
def test_plan_tiles_hand_values(args, expected):
    assert plan_tiles(*args) == expected


def test_plan_tiles_fits_budget():
    for rows in (1, 3, 13, 100, 5000):
        for vocab in (1, 7, 300, 1000):
            for entry, column in ((4, 0), (8, 64), (12, 128)):
                for budget in (1, 100, 5000, 10**5, 10**7):
                    t, v = plan_tiles(rows, vocab, entry, column, budget)
                    assert 1 <= t <= min(rows, 4096) and 1 <= v <= vocab
                    if budget >= entry + column:  # one entry fits: the tile fits
                        assert t * v * entry + v * column <= budget, (rows, vocab, entry, column, budget, t, v)
                    if t > 1:  # the token chunk shrinks first
                        assert v >= min(vocab, 256)


_PLAN_TILES = plan_tiles


@pytest.fixture
def tile_spy(monkeypatch):
    """Records every ``(rows, vocab, ...) -> (token_chunk, vocab_chunk)`` the linear ops plan."""
    calls = []

    def spy(*args):
        out = _PLAN_TILES(*args)
        calls.append((args, out))
        return out

    monkeypatch.setattr(linear_tiles, "plan_tiles", spy)
    return calls


# --------------------------------------------------------------------------- values and gradients


LOGPROB_CASES = {
    "plain": dict(),
    "bias_scale_temperature_entropy": dict(bias=True, scale=0.7, temperature=0.7, return_entropy=True),
    "softcap_entropy_ignored": dict(bias=True, softcap=4.0, temperature=1.3, return_entropy=True,
                                    ignored=(0, 5, 6)),
    "scale_softcap_negative_scale": dict(scale=-1.6, softcap=2.5, return_entropy=True, ignored=(3,)),
}


@pytest.mark.parametrize("case", list(LOGPROB_CASES))
@pytest.mark.parametrize("backend", ISA_BACKENDS)
def test_logprobs(backend, case):
    cfg = dict(LOGPROB_CASES[case])
    ignored = cfg.pop("ignored", ())
    temperature = cfg.pop("temperature", 1.0)
    entropy = cfg.pop("return_entropy", False)
    policy = make_head((12,), 32, 300, seed=1, **cfg)
    labels = make_labels((12,), 300, seed=2, ignored=ignored)
    check(backend, Call("logprobs", policy, labels, temperature=temperature, return_entropy=entropy), seed=3,
          key=("logprobs", case))


def _pair(lead, *, seed, vocab=300, bias=True, sliced=False, dtype=torch.float32, softcaps=(None, None),
          scales=(1.0, 1.0), ref_std=None):
    """Policy (H = 32) and reference (H = 24) heads over the same vocabulary."""
    policy = make_head(lead, 32, vocab, seed=seed, bias=bias, sliced=sliced, dtype=dtype, softcap=softcaps[0],
                       scale=scales[0])
    ref = make_head(lead, 24, vocab, seed=seed + 100, bias=bias, sliced=sliced, dtype=dtype, softcap=softcaps[1],
                    scale=scales[1], z_std=ref_std or 3.0)
    return policy, ref


def _explicit_on(backend):
    """The explicit-path comparison doubles a test's run time; in the Triton interpreter it runs
    in test_logprobs only (the float64 comparison runs everywhere)."""
    return backend != "triton"


@pytest.mark.parametrize("divergence, beta, alpha", DIVERGENCE_CASES, ids=_ids(DIVERGENCE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence(backend, divergence, beta, alpha):
    # chi2 and alpha > 1 weigh p / q: keep the reference close enough that they stay moderate.
    # The reference alone is soft-capped here (the policy is in test_terms).
    policy, ref = _pair((8,), seed=11, vocab=200, scales=(1.3, 0.8), ref_std=2.0, softcaps=(None, 4.0))
    weight = make_weight((8,), seed=12)
    call = Call("divergence", policy, ref=ref, div_weight=weight, divergence=divergence, beta=beta, alpha=alpha,
                temperature=1.2)
    check(backend, call, seed=13, key=("divergence", divergence, beta, alpha), explicit=_explicit_on(backend))


@pytest.mark.parametrize("divergence, beta, alpha", DIVERGENCE_CASES, ids=_ids(DIVERGENCE_CASES))
@pytest.mark.parametrize("backend", ISA_BACKENDS)
def test_terms(backend, divergence, beta, alpha):
    if backend == "triton" and (divergence, beta, alpha) not in TRITON_TERMS_CASES:
        pytest.skip("the Triton interpreter is slow: every divergence runs on it in test_divergence")
    policy, ref = _pair((9,), seed=21, vocab=200, softcaps=(5.0, 6.0), scales=(1.0, 1.2), ref_std=2.0)
    labels = make_labels((9,), 200, seed=22, ignored=(2,))
    weight = make_weight((9,), seed=23)
    call = Call("terms", policy, labels, ref, div_weight=weight, divergence=divergence, beta=beta, alpha=alpha,
                temperature=0.9, return_entropy=True)
    check(backend, call, seed=24, key=("terms", divergence, beta, alpha), explicit=_explicit_on(backend))


def _uneven(rows, vocab, plan):
    t, v = plan
    return 1 < t < rows and rows % t != 0 and v < vocab and vocab % v != 0


def _uneven_budget(call: Call, tile_spy):
    """A ``memory_budget`` whose forward and backward plans both cut the kept rows and V unevenly.

    The bytes per tile entry and per column are the op's own (recorded from a probe call on the
    reference backend); the budget is the first that plan_tiles turns into uneven chunks for all.
    """
    probe = Call(**{**call.__dict__, "memory_budget": None})
    run_fused("reference", probe, _upstream(probe, 0))
    costs = [args for args, _ in tile_spy]
    tile_spy.clear()
    assert len(costs) >= 2, "expected a forward and a backward plan"
    for budget in range(1000, 400000, 100):
        if all(_uneven(rows, vocab, _PLAN_TILES(rows, vocab, entry, column, budget))
               for rows, vocab, entry, column, _ in costs):
            return budget
    raise AssertionError(f"no budget cuts every pass unevenly: {costs}")


UNEVEN = {
    # op, divergence, policy softcap; 15 tokens, 2 ignored (or weight 0): 13 kept rows, V = 400.
    # 13 rows: the token chunks the planner can pick (13, 6, 3, 1) include two that cut 13
    # unevenly, so a forward and a backward with different bytes per entry can both be uneven.
    "logprobs": ("logprobs", None, None),
    "divergence_js": ("divergence", "js", None),
    "terms_forward_kl_softcap": ("terms", "forward_kl", 5.0),
}


@pytest.mark.parametrize("case", list(UNEVEN))
@pytest.mark.parametrize("backend", ISA_BACKENDS)
def test_uneven_tiles(backend, case, tile_spy):
    """V not a multiple of the vocabulary chunk and the kept rows not a multiple of the token chunk,
    in the forward and the backward (checked on the plans the op really made)."""
    if backend == "triton" and case == "logprobs":
        pytest.skip("the Triton interpreter is slow: the other two cases cover its tiles")
    op, divergence, softcap = UNEVEN[case]
    policy, ref = _pair((15,), seed=31, vocab=400, softcaps=(softcap, None))
    labels = make_labels((15,), 400, seed=32, ignored=(4, 11))
    weight = None
    if op == "divergence":
        labels = None
        weight = torch.ones(15)
        weight[[4, 11]] = 0.0
    call = Call(op, policy, labels, None if op == "logprobs" else ref, div_weight=weight, divergence=divergence,
                return_entropy=op != "divergence",
                extras=("mean_logits", "is_top1", "log_sum_sq_probs") if op != "divergence" else ())
    call.memory_budget = _uneven_budget(call, tile_spy)
    check(backend, call, seed=33, explicit=False, key=("uneven", case))
    assert len(tile_spy) >= 2 and all(_uneven(rows, vocab, plan) for (rows, vocab, *_), plan in tile_spy), tile_spy


LEADING = {
    "slice_B_Tm1": dict(lead=(2, 3), sliced=True),  # [B, T-1, H] view of a [B, T, H] tensor
    "flat_N": dict(lead=(5,)),  # 1-D leading shape
    "three_d": dict(lead=(2, 2, 2)),
    "single_token": dict(lead=()),
}


@pytest.mark.parametrize("shape", list(LEADING))
@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shapes(backend, shape):
    cfg = LEADING[shape]
    lead = cfg["lead"]
    policy, ref = _pair(lead, seed=41, vocab=200, sliced=cfg.get("sliced", False))
    n = int(torch.Size(lead).numel())
    labels = make_labels(lead, 200, seed=42, ignored=(1,) if n > 1 else ())
    weight = make_weight(lead, seed=43) if n > 1 else None
    explicit = _explicit_on(backend)
    check(backend, Call("logprobs", policy, labels, return_entropy=True), seed=44, key=("lead", shape, 1),
          explicit=explicit)
    check(backend, Call("terms", policy, labels, ref, div_weight=weight, divergence="reverse_kl"), seed=45,
          key=("lead", shape, 2), explicit=explicit)


def test_bf16_gemm_is_rounded_fp32():
    """The premise of the bf16 bound: a CPU bf16 GEMM's result is the bf16 rounding of an
    fp32-accumulated sum, within ``gamma_K (fp32) + u_bf16`` of the exact one."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(16, 64, generator=g).bfloat16()
    w = torch.randn(300, 64, generator=g).bfloat16()
    z = (h @ w.T).to(F64)
    exact = h.to(F64) @ w.to(F64).T
    bound = _gamma(64) * (h.to(F64).abs() @ w.to(F64).abs().T) + U16 * exact.abs() * (1 + _gamma(64))
    assert ((z - exact).abs() <= bound).all()


@pytest.mark.parametrize("op", ["logprobs", "terms_js", "divergence_alpha"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend, op):
    """bf16 hidden and heads: bf16 tiles on CPU; against the explicit bf16 path and float64."""
    softcaps = (6.0, None) if op == "terms_js" else (None, None)
    policy, ref = _pair((8,), seed=51, vocab=200, dtype=torch.bfloat16, softcaps=softcaps, scales=(1.1, 1.0),
                        ref_std=2.0)
    labels = make_labels((8,), 200, seed=52, ignored=(3,))
    if op == "logprobs":
        call = Call("logprobs", policy, labels, return_entropy=True, temperature=0.8)
    elif op == "terms_js":
        call = Call("terms", policy, labels, ref, divergence="js", beta=0.3, div_weight=make_weight((8,), seed=53),
                    return_entropy=True)
    else:
        call = Call("divergence", policy, ref=ref, divergence="alpha", alpha=0.3)
    check(backend, call, seed=54, key=("bf16", op), explicit=_explicit_on(backend))


@pytest.mark.parametrize("op", ["logprobs", "terms"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16(backend, op):
    """fp32 inputs under CPU bf16 autocast: bf16 GEMM inputs, fp32 gradients."""
    policy, ref = _pair((8,), seed=61, vocab=200, scales=(0.9, 1.0), ref_std=2.0)
    labels = make_labels((8,), 200, seed=62, ignored=(0,))
    if op == "logprobs":
        call = Call("logprobs", policy, labels, return_entropy=True)
    else:
        call = Call("terms", policy, labels, ref, divergence="forward_kl", temperature=1.5)
    values, _, grads, _ = check(backend, call, seed=63, autocast=True, key=("autocast", op),
                                explicit=_explicit_on(backend))
    assert all(g.dtype == torch.float32 for g in grads if g is not None)
    # Autocast really changed the computation: the fp32 oracle's bound is far tighter than
    # the bf16 GEMM's error, so the result must differ from the fp32 explicit path.
    e_values, _ = run_explicit(backend, call, _upstream(call, 63), torch.float32)
    assert (values["logp"] - e_values["logp"]).abs().max() > 1e-4


# --------------------------------------------------------------------------- gradients and rows


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
    policy, ref = _pair((6,), seed=171, vocab=200, softcaps=(7.0, None))
    labels = make_labels((6,), 200, seed=172, ignored=(4,))
    call = Call(op, policy, None if op == "divergence" else labels, None if op == "logprobs" else ref,
                divergence="hellinger", return_entropy=op != "divergence", **cfg)
    check(backend, call, seed=173, key=("partial", case), explicit=_explicit_on(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_gets_no_gradient(backend):
    policy, ref = _pair((6,), seed=71)
    labels = make_labels((6,), 300, seed=72)
    for call in (Call("terms", policy, labels, ref, divergence="js", return_entropy=True),
                 Call("divergence", policy, ref=ref, divergence="reverse_kl")):
        upstream = _upstream(call, 73)
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


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend, op):
    """Every token ignored (or every div_weight 0): zeros, zero gradients, no error, no NaN."""
    policy, ref = _pair((2, 3), seed=81)
    labels = torch.full((2, 3), -100)
    weight = torch.zeros(2, 3)
    call = Call(op, policy, None if op == "divergence" else labels, None if op == "logprobs" else ref,
                div_weight=weight if op == "divergence" else None, divergence="js",
                return_entropy=op != "divergence", extras=() if op == "divergence" else ("mean_logits", "is_top1"))
    values, extras, grads = run_fused(backend, call, _upstream(call, 82))
    for v in values.values():
        assert v.shape == (2, 3) and v.dtype == torch.float32 and (v == 0).all()
    for g in grads:
        assert g is None or (g == 0).all()
    if extras:
        assert (extras["mean_logits"] == 0).all() and not extras["is_top1"].any()


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


# --------------------------------------------------------------------------- extras


@pytest.mark.parametrize("backend", BACKENDS)
def test_extras_values(backend):
    # Logits with a clear top-1 for some labels: the label is set to the argmax in every other row.
    policy = make_head((8,), 32, 200, seed=101, bias=True, softcap=8.0)
    z = _exact_logits(policy.root.to(F64), policy.weight.to(F64), policy.bias.to(F64), 1.0, 8.0)
    labels = make_labels((8,), 200, seed=102, ignored=(7,))
    labels[::2] = z.argmax(-1)[::2]
    extras = ("mean_logits", "is_top1", "log_sum_sq_probs")
    for entropy in (False, True):
        _, got, _, exp = check(backend, Call("logprobs", policy, labels, temperature=0.6, return_entropy=entropy,
                                             extras=extras), seed=103, key=("extras", entropy),
                               explicit=_explicit_on(backend))
        assert got["is_top1"][::2].all() and not got["is_top1"][7]
    ref = make_head((8,), 24, 200, seed=104)
    _, got, _, _ = check(backend, Call("terms", policy, labels, ref, divergence="tv", return_entropy=True,
                                       extras=("log_sum_sq_probs", "is_top1")), seed=105,
                         key=("extras", "terms"), explicit=_explicit_on(backend))
    assert set(got) == {"log_sum_sq_probs", "is_top1"}


def _tie_head(vocab=300, hidden_size=8):
    """Integer-valued hidden states and weights, so every logit is exact in fp32 whatever the
    summation order: rows 40 and 290 of the head are equal and give the largest logit. The
    four tokens share one hidden state, so their rows of logits are identical."""
    g = torch.Generator().manual_seed(111)
    h = torch.randint(-2, 3, (1, hidden_size), generator=g).float().expand(4, -1).clone()
    h[:, 0] = 4.0
    w = torch.randint(-1, 2, (vocab, hidden_size), generator=g).float()
    w[:, 0] = 0.0
    w[[40, 290]] = 0.0
    w[[40, 290], 0] = 10.0  # z = 40 there, |z| <= 2 * 7 = 14 elsewhere
    return h, w


@pytest.mark.parametrize("budget", [None, 1000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_is_top1_first_argmax_tie(backend, budget, tile_spy):
    """is_top1 is True only for the FIRST maximum: label 40 yes, its exact twin 290 no, 41 no;
    with a small budget the twins fall in different vocabulary tiles."""
    h, w = _tie_head()
    z = h @ w.T
    assert z[:, 40].eq(z.max(-1).values).all() and z[:, 290].eq(z[:, 40]).all()
    labels = torch.tensor([40, 290, 41, -100])
    with pk.use_backend(backend):
        logp, extras = pk.linear_token_logprobs(h, w, labels, extras=("is_top1",), memory_budget=budget)
    assert extras["is_top1"].tolist() == [True, False, False, False]
    assert logp[0] == logp[1]  # the twins have the same probability
    if budget is not None:
        (_, vocab, *_), (_, v) = tile_spy[0]
        assert v <= 290 and 40 // v != 290 // v, "the twins must be in different tiles"


def test_extras_structure():
    policy, ref = _pair((5,), seed=121)
    labels = make_labels((5,), 300, seed=122)
    h, w = policy.root, policy.weight
    assert isinstance(pk.linear_token_logprobs(h, w, labels), torch.Tensor)
    out = pk.linear_token_logprobs(h, w, labels, extras=["is_top1"])  # a list is accepted too
    assert isinstance(out, tuple) and len(out) == 2 and list(out[1]) == ["is_top1"]
    out = pk.linear_token_logprobs(h, w, labels, return_entropy=True, extras=("log_sum_sq_probs", "mean_logits"))
    assert len(out) == 3 and isinstance(out[2], dict) and set(out[2]) == {"log_sum_sq_probs", "mean_logits"}
    assert out[0].shape == out[1].shape == (5,)
    terms = pk.linear_token_terms(h, w, labels, ref.root, ref.weight)
    assert isinstance(terms, pk.TokenTerms) and terms.entropy is None
    terms, extras = pk.linear_token_terms(h, w, labels, ref.root, ref.weight, return_entropy=True,
                                          extras=("mean_logits",))
    assert isinstance(terms, pk.TokenTerms) and terms.entropy is not None and set(extras) == {"mean_logits"}
    assert extras["mean_logits"].dtype == torch.float32 and extras["mean_logits"].shape == (5,)


# --------------------------------------------------------------------------- TRL parity


def _trl(module):
    return pytest.importorskip(f"trl.kernels.{module}")


@pytest.mark.parametrize("softcap, scale, temperature", [(None, 1.0, 1.0), (5.0, 0.8, 0.7)])
def test_trl_logprob_parity(softcap, scale, temperature):
    trl_lp = _trl("chunked_logprob")
    policy = make_head((14,), 32, 300, seed=141, bias=True, softcap=softcap, scale=scale)
    labels = make_labels((14,), 300, seed=142, ignored=(1, 8))
    kept = labels != -100
    targets = torch.where(kept, labels, 0)  # TRL computes every row: ignored ones need a valid id
    outputs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    call = Call("logprobs", policy, labels, temperature=temperature, return_entropy=True,
                extras=("mean_logits", "is_top1", "log_sum_sq_probs"))
    upstream = _upstream(call, 143)
    ours, our_extras, our_grads, exp = check("native" if "native" in BACKENDS else "reference", call, seed=143,
                                             explicit=False)

    h, w, b = policy.leaves()
    trl_out = trl_lp.ChunkedLogProbFunction.apply(h, w, b, targets, temperature, 128, softcap, scale, outputs)
    logp, entropy, lssp, mean_logits, is_top1 = trl_out
    (((logp * upstream["logp"]) + entropy * upstream["entropy"]) * kept).sum().backward()
    # Both are within the bound of the exact value: they agree within twice the bound.
    assert_close(logp[kept], ours["logp"][kept], 2 * exp.value_tol["logp"][kept], "TRL logp")
    assert_close(entropy[kept], ours["entropy"][kept], 2 * exp.value_tol["entropy"][kept], "TRL entropy")
    assert_close(lssp[kept], our_extras["log_sum_sq_probs"][kept], 2 * exp.extra_tol["log_sum_sq_probs"][kept],
                 "TRL log_sum_sq_probs")
    assert_close(mean_logits[kept], our_extras["mean_logits"][kept], 2 * exp.extra_tol["mean_logits"][kept],
                 "TRL mean_logits")
    decided = exp.extra_tol["is_top1_decided"] & kept
    assert torch.equal(is_top1[decided], our_extras["is_top1"][decided])
    for name, got, ours_g in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), our_grads):
        assert_close(got, ours_g, 2 * exp.grad_tol[name], f"TRL d {name}")


def _js64(p, q, beta):
    """Our js of probabilities ``p`` (policy) and ``q`` (reference), the oracle's (tests/contract.py):
    beta KL(q||m) + (1-beta) KL(p||m) with m = beta q + (1 - beta) p."""
    return divergence_terms("js", p.log(), q.log(), beta).sum(-1)


def _trl_jsd64(ps, pt, beta):
    """TRL's generalised JSD transcribed from chunked_divergence._jsd_tile (student ps, teacher pt)."""
    log_ps, log_pt = ps.log(), pt.log()
    log_m = torch.logaddexp(log_ps + math.log(1 - beta), log_pt + math.log(beta))
    return (beta * pt * (log_pt - log_m) + (1 - beta) * ps * (log_ps - log_m)).sum(-1)


def test_trl_js_beta_mapping():
    """TRL's beta equals our js beta, with student = policy (p) and teacher = reference (q):
    both mix ``m = beta q + (1 - beta) p`` and weigh ``KL(q||m)`` by ``beta``. Checked in float64
    on the formulas, on TRL's fp32 kernel, and shown to be discriminating (beta -> 1 - beta fails)."""
    trl_div = _trl("chunked_divergence")
    g = torch.Generator().manual_seed(151)
    p = torch.softmax(torch.randn(6, 300, generator=g, dtype=F64) * 2, -1)
    q = torch.softmax(torch.randn(6, 300, generator=g, dtype=F64) * 2, -1)
    for beta in (0.1, 0.3, 0.5, 0.8):
        torch.testing.assert_close(_trl_jsd64(p, q, beta), _js64(p, q, beta), rtol=1e-12, atol=1e-14)
        if beta != 0.5:
            assert (_trl_jsd64(p, q, 1 - beta) - _js64(p, q, beta)).abs().max() > 1e-3
    # The endpoints: TRL's 0 is KL(teacher||student) = our forward_kl, 1 is our reverse_kl.
    policy, ref = _pair((6,), seed=152, bias=False, ref_std=1.0)
    z = _exact_logits(policy.root.to(F64), policy.weight.to(F64), None, 1.0, None)
    zr = _exact_logits(ref.root.to(F64), ref.weight.to(F64), None, 1.0, None)
    lp, lq = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    want = {0.0: (lq.exp() * (lq - lp)).sum(-1), 1.0: (lp.exp() * (lp - lq)).sum(-1),
            0.1: _js64(lp.exp(), lq.exp(), 0.1)}
    # fp32 kernels are within ~1e-6 relative of these; the mirrored beta is 100x the tolerance away.
    mirrored = _js64(lp.exp(), lq.exp(), 0.9)
    assert ((mirrored - want[0.1]).abs() > 1e-2 * want[0.1].abs()).all()
    for beta, expected in want.items():
        div, _ = trl_div.ChunkedDivergenceFunction.apply(policy.root, policy.weight, None, ref.root, ref.weight, None,
                                                          beta, 1.0, 1.0, None, 1.0, None)
        torch.testing.assert_close(div.to(F64), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("divergence, trl_beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("js", 0.3)])
def test_trl_divergence_parity(divergence, trl_beta):
    trl_div = _trl("chunked_divergence")
    policy, ref = _pair((12,), seed=161, softcaps=(6.0, None), scales=(1.2, 0.9))
    beta = 0.3 if divergence == "js" else 0.5  # TRL's beta is ours (test_trl_js_beta_mapping)
    call = Call("divergence", policy, ref=ref, divergence=divergence, beta=beta, temperature=0.8)
    upstream = _upstream(call, 162)
    ours, _, our_grads, exp = check("native" if "native" in BACKENDS else "reference", call, seed=162, explicit=False)
    h, w, b = policy.leaves()
    div, _ = trl_div.ChunkedDivergenceFunction.apply(h, w, b, ref.root, ref.weight, ref.bias, trl_beta, 0.8,
                                                      policy.scale, policy.softcap, ref.scale, ref.softcap)
    (div * upstream["div"]).sum().backward()
    assert_close(div, ours["div"], 2 * exp.value_tol["div"], f"TRL {divergence}")
    for name, got, ours_g in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), our_grads):
        assert_close(got, ours_g, 2 * exp.grad_tol[name], f"TRL d {name}")
