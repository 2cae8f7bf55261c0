"""The Triton forward's candidate buffer over long rows (``kernels/candidates.py``): the 16-byte
chunks of aligned rows and the per-thread chunks of unaligned ones, every way the buffer settles
(packing what the threshold keeps, keeping only the largest), ties at the threshold, ``-inf`` and
NaN; each row's gathered values against ``torch.topk`` of the row with NaN taken as ``-inf``."""

import math

import pytest
import torch

from prefopt_kernels.spec import OpSpec

from contract import backends_on

pytestmark = pytest.mark.skipif("triton" not in backends_on(torch.device("cpu")), reason="Triton does not run here")


def rows_of(style: str, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """``[1, 3, vocab]`` logits, a strided view (its rows are not contiguous with each other)."""
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(1, 4, vocab, generator=gen)
    if style == "ascending":  # every chunk of every tile beats the threshold: settles keep the largest
        x = torch.linspace(-3, 3, vocab).expand(1, 4, vocab) + 1e-3 * x
    elif style == "records":  # one rising value per chunk: settles drop the rest of each chunk and pack
        x = x - 10
        x[..., ::8] = torch.linspace(0, 3, x[..., ::8].shape[-1])
    elif style == "ties":  # most values equal the threshold once it is set
        x = torch.round(x)
    elif style == "holes":
        x[torch.rand(x.shape, generator=gen) < 0.3] = -math.inf
        x[torch.rand(x.shape, generator=gen) < 0.1] = math.nan
    return x.to(dtype)[:, :3]


def expected(x: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).float()
    rows = torch.where(rows.isnan(), -math.inf, rows)
    want = torch.full((rows.shape[0], count), -math.inf)
    kept = min(count, rows.shape[1])
    want[:, :kept] = rows.topk(kept, dim=1).values
    want[labels == -100] = -math.inf
    return want


# Interpreted, each settle's tl.topk takes seconds: five tiles of 1024 per row, three rows.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # chunks of 8 and of 4
@pytest.mark.parametrize("vocab", [5000, 5001])  # aligned rows and unaligned ones (read element by element)
@pytest.mark.parametrize("style", ["ascending", "records", "ties", "holes"])
def test_triton_buffer_keeps_each_rows_largest(dtype, vocab, style, count=51):
    from prefopt_kernels.backends import triton as backend

    x = rows_of(style, vocab, dtype)
    labels = torch.tensor([0, -100, 1])
    stats, largest = backend.forward_with_candidates(x, labels, None, None, OpSpec(want_logp=True), count)
    plain = backend.forward(x, labels, None, None, OpSpec(want_logp=True))
    assert torch.equal(stats.logp.view(torch.int32), plain.logp.view(torch.int32))
    assert largest.dtype == torch.float32 and torch.equal(largest, expected(x, labels, count))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # chunks of 16 and of 8
def test_triton_buffer_unaligned_chunks_settle_by_bisection(dtype, vocab=5001, count=51):
    """An unaligned row's chunk is every value one thread holds: columns ``l, l + LANES, ...`` of a
    tile (``candidates.lane_count``). One rising value per chunk (a tile's first ``LANES`` columns)
    and the rest far below: every chunk of every tile enters, the buffer fills at the second tile,
    and each settle raises the threshold by bisection and packs the few values at or above it
    (most of each chunk is dropped)."""
    from prefopt_kernels.backends import triton as backend
    from prefopt_kernels.backends.triton.config import launch_config
    from prefopt_kernels.backends.triton.kernels.candidates import lane_count

    block = launch_config(vocab, dtype.itemsize, two_rows=False)[0]
    lanes = lane_count(8 * dtype.itemsize, block)
    assert vocab > 2 * block and block // lanes > 1  # several settles, chunks of more than one value
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(1, 4, vocab, generator=gen) - 10
    rising = torch.arange(vocab) % block < lanes
    x[..., rising] = torch.linspace(0, 3, int(rising.sum()))
    x = x.to(dtype)[:, :3]
    labels = torch.tensor([0, -100, 1])
    stats, largest = backend.forward_with_candidates(x, labels, None, None, OpSpec(want_logp=True), count)
    assert torch.equal(largest, expected(x, labels, count))


@pytest.mark.parametrize("count", [-1, 2049])
def test_triton_candidate_count_outside_the_limit_is_refused(count):
    from prefopt_kernels.backends import row_state
    from prefopt_kernels.backends import triton as backend

    assert backend.MAX_CANDIDATES == 2048
    x, spec = torch.zeros(1, 2, 100), OpSpec(want_logp=True)
    with pytest.raises(ValueError, match="count must be in"):
        backend.forward_with_candidates(x, None, None, None, spec, count)
    with pytest.raises(ValueError, match="count must be in"):
        backend.fold_with_candidates(row_state.empty(2, spec, False, x.device), x, None, None, None, spec, 0, count)


def test_triton_fold_of_an_empty_slice_gathers_only_minus_infinity(count=3):
    from prefopt_kernels.backends import row_state
    from prefopt_kernels.backends import triton as backend

    x, spec = torch.zeros(1, 2, 0, dtype=torch.bfloat16), OpSpec(want_logp=True)
    _, largest = backend.fold_with_candidates(row_state.empty(2, spec, False, x.device), x, None, None, None, spec,
                                              0, count)
    assert largest.dtype == torch.float32 and torch.equal(largest, torch.full((2, count), -math.inf))
