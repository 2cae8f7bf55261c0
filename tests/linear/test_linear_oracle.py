"""The float64 oracle's own premises (linear_cases.py): its bound on the Hessian term of the
gradient tolerances, and the rounding of a CPU bf16 GEMM that the bf16 bounds assume."""

import functools

import pytest
import torch
from torch.func import grad, jacrev, vmap

from linear_cases import DIVERGENCE_CASES, F64, U16, gamma, hessian_bound, row_loss


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
    hzz, hzr = vmap(jacrev(grad(functools.partial(row_loss, **spec)), argnums=(0, 1)))(z, zr, onehot, gvec)
    exact = torch.einsum("nvi,ni->nv", hzz.abs(), dz) + torch.einsum("nvi,ni->nv", hzr.abs(), dzr)
    bound, _ = hessian_bound(z, zr, onehot, gvec, dz, dzr, **spec)
    assert (bound >= exact * (1 - 1e-9)).all()
    # Not vacuous: measured 2-9x the exact value summed over a row (up to ~30x at single
    # entries, where the exact rank-3 terms cancel).
    assert (bound.sum(-1) <= 16 * exact.sum(-1)).all()


def test_bf16_gemm_is_rounded_fp32():
    """The premise of the bf16 bound: a CPU bf16 GEMM's result is the bf16 rounding of an
    fp32-accumulated sum, within ``gamma_K (fp32) + u_bf16`` of the exact one."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(16, 64, generator=g).bfloat16()
    w = torch.randn(300, 64, generator=g).bfloat16()
    z = (h @ w.T).to(F64)
    exact = h.to(F64) @ w.to(F64).T
    bound = gamma(64) * (h.to(F64).abs() @ w.to(F64).abs().T) + U16 * exact.abs() * (1 + gamma(64))
    assert ((z - exact).abs() <= bound).all()
