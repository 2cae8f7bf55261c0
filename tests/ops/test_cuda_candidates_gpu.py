"""The CUDA forward's candidates on a GPU: each row's largest raw logits from the same read as
its statistics, against torch.topk (values, NaN left out, -inf padded), and the statistics
against the plain CUDA forward's."""

from __future__ import annotations

import pytest
import torch

from prefopt_kernels.backends import native
from prefopt_kernels.checks import op_spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not native.is_available() or not native.has_cuda(),
                       reason="needs the native extension built with CUDA"),
]


def _expected(rows: torch.Tensor, count: int) -> torch.Tensor:
    """torch.topk's values of each fp32 row without its NaN, -inf padded to ``count``."""
    out = torch.full((rows.shape[0], count), float("-inf"))
    for i, row in enumerate(rows.float().cpu()):
        kept = row[~row.isnan()]
        k = min(count, kept.numel())
        out[i, :k] = torch.topk(kept, k).values
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [151936, 32000, 50257, 3001, 37])
@pytest.mark.parametrize("count", [1, 51, 1024, 2048])
def test_candidates_equal_topk_and_keep_the_statistics(dtype, vocab, count):
    gen = torch.Generator(device="cuda").manual_seed(vocab + count)
    n = 6
    logits = (torch.randn(2, n // 2, vocab, device="cuda", generator=gen) * 4).to(dtype)
    logits[0, 1] = torch.round(logits[0, 1].float() * 2).to(dtype)  # heavy ties
    logits[1, 0] = logits[1, 0].sort().values  # rising: the threshold moves on every tile
    logits[1, 1, ::7] = float("-inf")
    logits[1, 1, 3::97] = float("nan")
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    labels[4] = -100  # a skipped row: all -inf
    spec = op_spec(temperature=0.7, want_logp=True)
    stats, values = native.forward_with_candidates(logits, labels, None, None, spec, count)
    plain = native.forward(logits, labels, None, None, spec)
    want = _expected(logits.reshape(n, vocab), count)
    want[4] = float("-inf")
    assert torch.equal(values.cpu(), want)
    # The max bit for bit; the sums within the contract (the gathering kernel runs at most 256
    # threads, so its summation order differs from the plain forward's); NaN where the row has one.
    torch.testing.assert_close(stats.row_max, plain.row_max, rtol=0, atol=0, equal_nan=True)
    for name in ("log_norm", "logp"):
        torch.testing.assert_close(getattr(stats, name), getattr(plain, name), rtol=0, atol=1e-5, equal_nan=True)
