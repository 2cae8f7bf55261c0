"""Rows whose starts are not 16-byte aligned: the Triton kernels read each row from the aligned
element before it (a masked first tile, whole tiles, a masked last tile) when every row tensor
of a launch shares the rows' misalignment, and from the row's own start otherwise
(``backends/triton/config.row_alignment``). Both meet the float64 oracle at every misalignment,
with tile counts from one tile to several."""

from __future__ import annotations

import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels.backends.triton.config import row_alignment

from contract import assert_grads_close, assert_tokens_close, backends_under_test, oracle, row_scale

needs_triton = pytest.mark.skipif("triton" not in backends_under_test(), reason="Triton backend not available")


def _rows(n, v, dtype, seed, shift=0):
    """``[n, v]`` logits; ``shift`` > 0 takes them from a wider buffer at that column offset
    (row stride ``v + shift``), so each row sits at another offset from alignment."""
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(n, v + shift, generator=g, dtype=torch.float64) * 3).to(dtype)
    return full[:, shift:]


def test_alignment_rule():
    a = torch.zeros(2, 3, 50257, dtype=torch.bfloat16)
    assert row_alignment(2048, a, torch.zeros_like(a)) == 8
    assert row_alignment(1024, a.float(), torch.zeros_like(a.float())) == 4
    # Same strides but a base one element past alignment: rows cannot be aligned together.
    wide = torch.zeros(2 * 3 * 50257 + 1, dtype=torch.bfloat16)
    assert row_alignment(2048, a, wide[1:].view(2, 3, 50257)) == 1
    # Strides that differ modulo 8 elements put the pair's rows at different offsets.
    assert row_alignment(2048, a, torch.zeros(2, 3, 50258, dtype=torch.bfloat16)[..., :50257]) == 1
    assert row_alignment(2048, a, torch.zeros(2, 3, 50265, dtype=torch.bfloat16)[..., :50257]) == 8
    assert row_alignment(2048, a, torch.zeros(2, 3, 50257, dtype=torch.float16)) == 8
    assert row_alignment(2048, a, a.float()) == 1
    # A tile narrower than a vector reads each row from its own start.
    assert row_alignment(4, a, torch.zeros_like(a)) == 1


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("v", [1, 5, 1029, 2999])
@pytest.mark.parametrize("ref_shift", [0, 3])
def test_misaligned_rows_meet_the_oracle(dtype, v, ref_shift):
    """Nine rows of an odd vocabulary start at every offset from alignment; ``ref_shift`` 3
    puts the reference rows at other offsets than the policy's (each row then read from its
    own start)."""
    n, temperature = 9, 0.8
    a = _rows(n, v, dtype, seed=v)
    b = _rows(n, v, dtype, seed=v + 1, shift=ref_shift)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(v))
    labels[2] = -100
    g = torch.Generator().manual_seed(v + 2)
    up = {k: torch.randn(n, generator=g) for k in ("logp", "div", "entropy")}
    x = a.detach().clone().requires_grad_(True)
    with pk.use_backend("triton"):
        t = pk.token_terms(x, labels, b, divergence="js", beta=0.3, temperature=temperature, return_entropy=True)
        got = {"logp": t.logp, "div": t.div, "entropy": t.entropy}
        sum((up[k] * got[k]).sum() for k in up).backward()
    want, grad_ref = oracle(a, labels, b, None, divergence="js", beta=0.3, temperature=temperature,
                            want_logp=True, want_entropy=True, upstream=up)
    s = row_scale(a, b, temperature)
    for k in got:
        assert_tokens_close(got[k].detach(), want[k], s, f"js {k} V={v}")
    g_out = torch.stack([u.abs() for u in up.values()]).amax(0)
    assert_grads_close(x.grad, grad_ref, s, g_out, dtype, f"js grad V={v}")
