r"""What the tests of the fused linear ops (prefopt_kernels.linear) share: their inputs, the float64
oracle and its tolerances, running the ops and checking them (``check``).

The tests, by theme: test_linear_values.py (values and gradients of every op, leading shapes,
bf16), test_linear_gradients.py (partial gradients, dropped rows, in-place use),
test_linear_extras.py (TRL's extras), test_linear_tiles.py (tile planning, uneven tiles),
test_linear_trl_parity.py (TRL's chunked kernels) and test_linear_oracle.py (the oracle's own
premises); the bad-input table is test_linear_bad_input.py.

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
on the same tiny shapes as every other backend here (V 200-400, N <= 15). To keep the tests
fast, the interpreter runs the explicit-path comparison in test_logprobs only, four of the
divergences in test_terms (every divergence runs on it in test_divergence) and two of the
three cases of test_uneven_tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

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


def gamma(n: int, u: float = U32) -> float:
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


def make_pair(lead, *, seed, vocab=300, bias=True, sliced=False, dtype=torch.float32, softcaps=(None, None),
              scales=(1.0, 1.0), ref_std=None):
    """Policy (H = 32) and reference (H = 24) heads over the same vocabulary."""
    policy = make_head(lead, 32, vocab, seed=seed, bias=bias, sliced=sliced, dtype=dtype, softcap=softcaps[0],
                       scale=scales[0])
    ref = make_head(lead, 24, vocab, seed=seed + 100, bias=bias, sliced=sliced, dtype=dtype, softcap=softcaps[1],
                    scale=scales[1], z_std=ref_std or 3.0)
    return policy, ref


# --------------------------------------------------------------------------- float64 oracle
#
# Values and dL/dz come from the logits ops' oracle (tests/contract.py); the tolerances need
# derivatives of the same math with respect to both logits tensors (contract.row_terms).


def row_loss(z, zr, onehot, g, **spec):
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


def exact_logits(h, w, b, scale, softcap):
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
    bound = abs(scale) * (gamma(h.shape[-1] + 3) * a + u_gemm * a * (1 + gamma(h.shape[-1])) + 4 * U32 * (a + c))
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
    z = exact_logits(h64, w64, b64, policy.scale, policy.softcap)
    with torch.no_grad():
        dz = _projection_bound(h64, w64, b64, policy.scale, policy.softcap, z, u_gemm)
    if ref is not None:
        rh = ref.hidden.detach().reshape(n, ref.hidden.shape[-1]).to(gemm_dtype).to(F64)
        rw = ref.weight.detach().to(gemm_dtype).to(F64)
        rb = None if ref.bias is None else ref.bias.detach().to(F64)
        zr = exact_logits(rh, rw, rb, ref.scale, ref.softcap)
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
        "hidden": (err_u @ w_abs + gamma(vocab) * mag_u @ w_abs).reshape(*lead, hsize),
        "weight": err_u.T @ h_abs + gamma(max(kept_rows, 1)) * mag_u.T @ h_abs,
        "bias": err_u.sum(0) + gamma(max(kept_rows, 1)) * mag_u.sum(0),
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
                        + (2 * dz.mean(-1) + gamma(vocab) * z0.abs().mean(-1)) / temperature).reshape(lead),
        "log_sum_sq_probs": (contract * (1 + extras["log_sum_sq_probs"].reshape(n).abs())
                             + 2 * (2 * (sq - p).abs() / temperature * dz).sum(-1)).reshape(lead),
    }
    # is_top1 is decided only where the label's logit clears the rest by more than the error.
    top2 = z0.topk(2, -1).values if vocab > 1 else torch.cat([z0, z0 - math.inf], -1)
    extra_tol["is_top1_decided"] = ((top2[:, 0] - top2[:, 1]) > 4 * dz.amax(-1)).reshape(lead)
    return Expected(values, value_tol, grads, grad_tol, grad_mag, extras, extra_tol, kept.reshape(lead),
                    div_rows.reshape(lead))


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
    batch_invariant: bool = False
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
                  memory_budget=self.memory_budget, batch_invariant=self.batch_invariant)
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


def make_upstream(call: Call, seed: int) -> dict:
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


def explicit_on(backend):
    """The explicit-path comparison doubles a test's run time; in the Triton interpreter it runs
    in test_logprobs only (the float64 comparison runs everywhere)."""
    return backend != "triton"


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
    upstream = make_upstream(call, seed)
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


# The planner itself: tile_spy replaces the name the linear ops call.
PLAN_TILES = plan_tiles


@pytest.fixture
def tile_spy(monkeypatch):
    """Records every ``(rows, vocab, ...) -> (token_chunk, vocab_chunk)`` the linear ops plan."""
    calls = []

    def spy(*args):
        out = PLAN_TILES(*args)
        calls.append((args, out))
        return out

    monkeypatch.setattr(linear_tiles, "plan_tiles", spy)
    return calls
