"""Rows whose starts are not 16-byte aligned: the Triton kernels read each row from the aligned
element before it (a masked first tile, whole tiles, a masked last tile) when every row of every
row tensor of a launch sits at one offset from alignment, and from the row's own start otherwise
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
    aligned = torch.zeros(2, 3, 4096, dtype=torch.bfloat16)
    assert row_alignment(2048, aligned, torch.zeros_like(aligned)) == 8
    assert row_alignment(1024, aligned.float(), torch.zeros_like(aligned.float())) == 4
    # Strides that are multiples of 16 bytes and bases at one offset: every row sits one
    # element past alignment, so the rows are read aligned together.
    wide = torch.zeros(2 * 3 * 4096 + 1, dtype=torch.bfloat16)
    shifted = wide[1:].view(2, 3, 4096)
    assert row_alignment(2048, shifted, torch.zeros(2 * 3 * 4096 + 1, dtype=torch.float16)[1:].view(2, 3, 4096)) == 8
    # Bases at different offsets.
    assert row_alignment(2048, aligned, shifted) == 1
    # GPT-2's V: consecutive rows sit at different offsets, so each is read from its own start
    # (aligning them would tie a token's rounding to its position in the batch).
    odd = torch.zeros(2, 3, 50257, dtype=torch.bfloat16)
    assert row_alignment(2048, odd, torch.zeros_like(odd)) == 1
    assert row_alignment(2048, aligned, aligned.float()) == 1
    # A tile narrower than a vector reads each row from its own start.
    assert row_alignment(4, aligned, torch.zeros_like(aligned)) == 1


@needs_triton
@pytest.mark.parametrize("v", [1029, 2999])
def test_a_token_keeps_its_bits_at_every_position(v):
    """The same row at every position of a batch of an odd vocabulary (each position at another
    offset from alignment) gives the same bits."""
    row = _rows(1, v, torch.bfloat16, seed=v)
    ref = _rows(1, v, torch.bfloat16, seed=v + 1)
    n = 9
    a, b = row.expand(n, v).contiguous(), ref.expand(n, v).contiguous()
    labels = torch.full((n,), v // 3)
    with pk.use_backend("triton"):
        t = pk.token_terms(a, labels, b, divergence="js", return_entropy=True)
    for out in (t.logp, t.ref_logp, t.div, t.entropy):
        assert torch.equal(out, out[:1].expand(n)), out


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


@needs_triton
@pytest.mark.parametrize("divergence, params", [("alpha", dict(alpha=0.7)), ("chi2", {}), ("tv", {}),
                                                ("hellinger", {}), ("js", dict(beta=0.8))])
def test_second_sweeps_read_misaligned_rows_by_position_free_lanes(divergence, params):
    """The second sweeps' whole tiles on rows each read from its own start (V = 2999, three
    tiles under the interpreter; reference rows at other offsets than the policy's): the
    divergence and its gradient meet the float64 oracle, and a row's divergence has the same
    bits at every position. js with beta > 1/2 sweeps with the reference as its main side."""
    n, v, temperature = 9, 2999, 0.9
    a = _rows(n, v, torch.bfloat16, seed=7)
    b = _rows(n, v, torch.bfloat16, seed=8, shift=3)
    up = torch.randn(n, generator=torch.Generator().manual_seed(9))
    x = a.detach().clone().requires_grad_(True)
    with pk.use_backend("triton"):
        div = pk.token_divergence(x, b, divergence=divergence, temperature=temperature, **params)
        (up * div).sum().backward()
        repeated = pk.token_divergence(a[:1].expand(n, v).contiguous(), b[:1].expand(n, v).contiguous(),
                                       divergence=divergence, temperature=temperature, **params)
    want, grad_ref = oracle(a, None, b, None, divergence=divergence, temperature=temperature,
                            upstream={"div": up}, **params)
    s = row_scale(a, b, temperature)
    assert_tokens_close(div.detach(), want["div"], s, f"{divergence} div")
    assert_grads_close(x.grad, grad_ref, s, up.abs(), torch.bfloat16, f"{divergence} grad")
    assert torch.equal(repeated, repeated[:1].expand(n)), repeated
