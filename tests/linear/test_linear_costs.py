"""What a fused linear call costs on the host and in memory, counted with ``torch.profiler``.

Launches: the top-level aten ops that would each launch work on a GPU, as
``benchmarks.linear_costs`` defines them (views, metadata and allocations do not count), and
the native backend's kernel calls. Per tile a call costs its GEMMs and its backend kernels
(a fold in the forward, a sweep for a second-sweep divergence, which adds its partial sums
into the rows' in place, a ``slice_backward`` in the backward); everything else is paid once
per call: the backend kernels that find the kept tokens (``kept_tokens``) and finish the row
states (``finalize``, and ``finish_sweep`` for a second sweep), and exactly the ops listed
below. Workspace: the backward's peak
allocation above the gradients it returns, against ``memory_budget + 16 N H`` bytes. Both
counts are deterministic.
"""

from collections import Counter

import pytest
import torch

import prefopt_kernels as pk
from benchmarks.linear_costs import backward_workspace, step_ops
from prefopt_kernels.backends import native
from prefopt_kernels.linear import tiles as linear_tiles

pytestmark = pytest.mark.skipif(not native.is_available(), reason="counts the native backend's calls")

OPS = ["logprobs", "terms:forward_kl", "terms:js"]

# The aten ops a call launches once, whatever its tiling: fp32 heads without bias, every label
# kept, ``linear_call``'s inputs (``[N, H]`` hidden states, temperature 1, no extras). Each entry
# is (what it is for, its ops); the counts below are the lengths of these lists.
# The running row state is not filled: the first vocabulary chunk's fold writes it whole; nor are
# a second sweep's accumulators: the first vocabulary chunk's sweep writes them.
# The kept tokens and their labels' range are a backend kernel, not aten ops: its summary is
# read back once (``.tolist()``, no aten op) and its padded indices are the saved tensor.
FORWARD_ONCE = []
# The backend kernels a call launches once (counted with the per-tile ones, by their profiler
# labels): the kept tokens, their count and their labels' range; the row state's finish
# (``finalize``: every statistic of both heads, forward KL complete; ``finish_sweep`` for a
# second sweep).
KERNELS_ONCE = {
    "logprobs": ["kept_tokens", "finalize"],
    "terms:forward_kl": ["kept_tokens", "finalize"],
    "terms:js": ["kept_tokens", "finalize", "finish_sweep"],
}
DIVERGENCE_ONCE = {
    "logprobs": [],
    "terms:forward_kl": [],
    "terms:js": [
        ("the saved reference logit at the policy's argmax, a row of the state buffer", ["clone"]),
    ],
}
# None: the kept tokens are the forward's (saved, with their count on the CPU), and each fp32
# gradient accumulator is written by the first GEMM into it, not zero-filled.
BACKWARD_ONCE = []
# ``loss = logp.sum() (+ div.sum())`` and its backward: the seed, and each ``sum``'s gradient, an
# expanded (stride 0) tensor that the op makes contiguous for its kernels.
HARNESS = {
    "logprobs": ["sum", "ones_like", "contiguous"],
    "terms:forward_kl": ["sum", "sum", "add", "ones_like", "contiguous", "contiguous"],
    "terms:js": ["sum", "sum", "add", "ones_like", "contiguous", "contiguous"],
}


def per_call_ops(op: str) -> Counter:
    """The aten ops, by name, that a forward and backward of ``op`` launches once: the lists above."""
    listed = FORWARD_ONCE + DIVERGENCE_ONCE[op] + BACKWARD_ONCE + [("harness", HARNESS[op])]
    return Counter(name for _, ops in listed for name in ops)


@pytest.fixture(autouse=True)
def native_backend():
    with pk.use_backend("native"):
        yield


def _plans(monkeypatch):
    """Every :class:`TilePlan` a call makes, in order."""
    made = []
    original = linear_tiles.TilePlan.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(linear_tiles.TilePlan, "__init__", spy)
    return made


def _tile_counts(plans) -> list:
    """Tiles of the forward plan and of the backward plan (the second sweep reuses the forward's)."""
    forward_plan, backward_plan = plans
    return [len(p.token_ranges) * len(p.vocab_ranges) for p in (forward_plan, backward_plan)]


def _check_tiles_and_call(op, others, gemms, kernels, tiles):
    """Per tile: the GEMMs and the backend kernels; the rest is :data:`KERNELS_ONCE` and
    :func:`per_call_ops`."""
    sweeps = op == "terms:js"
    heads = 1 if op == "logprobs" else 2
    assert kernels == tiles[0] * (1 + sweeps) + tiles[1] + len(KERNELS_ONCE[op]), (kernels, tiles)
    assert gemms == tiles[0] * heads * (1 + sweeps) + tiles[1] * (heads + 2), (gemms, tiles)
    assert others == per_call_ops(op), (others, per_call_ops(op))


@pytest.mark.parametrize("op", OPS)
def test_per_tile_cost_is_the_gemms_and_the_backend_kernels(op, monkeypatch):
    """Halving the budget adds vocabulary chunks; each added tile adds only its GEMMs and its
    kernels: the rest of the call is the listed per-call ops at both."""
    plans = _plans(monkeypatch)
    tile_counts = []
    for budget in (320 << 10, 160 << 10):
        plans.clear()
        others, gemms, kernels = step_ops(op, 64, 32, 1500, torch.float32, budget)
        tiles = _tile_counts(plans)
        assert [len(p.token_ranges) for p in plans] == [1, 1]  # the same token chunks at both budgets
        _check_tiles_and_call(op, others, gemms, kernels, tiles)
        tile_counts.append(tiles)
    assert tile_counts[1][0] > tile_counts[0][0] and tile_counts[1][1] > tile_counts[0][1]


@pytest.mark.parametrize("op", OPS)
def test_host_ops_per_gemm_at_the_benchmark_shape(op, monkeypatch):
    """``python -m benchmarks.linear_costs``' shape: its tiles and the listed per-call ops, nothing
    more. For logprobs, with T tiles each way, 4T GEMMs and 2T kernels per tile: host ops per
    GEMM are 1.5 + (per-call ops and kernels) / 4T = 1.5 + 5/128 (it was 8 other ops per GEMM
    before the kernels merged the row states in place, 0.41 per GEMM above 1.5 before the
    per-call ops were first cut, 21/128 before the backward reused the kept tokens and the
    state and accumulators went unfilled, and 14/128 before one kernel found the kept tokens
    and their labels' range and one finished the row states). For js, 8T GEMMs and 3T kernels
    per tile (fold, sweep, slice_backward): 1.375 + (per-call ops and kernels) / 8T (1.690
    before the sweep added its sums into the accumulators itself, two adds per tile, and the
    finish became kernels)."""
    plans = _plans(monkeypatch)
    others, gemms, kernels = step_ops(op, 1024, 256, 32000, torch.float32, 4 << 20)
    tiles = _tile_counts(plans)
    _check_tiles_and_call(op, others, gemms, kernels, tiles)
    ratio = (sum(others.values()) + gemms + kernels) / gemms
    per_call = sum(per_call_ops(op).values()) + len(KERNELS_ONCE[op])
    if op == "logprobs":
        assert ratio == 1.5 + per_call / (4 * tiles[0]) and tiles[0] == tiles[1]
    if op == "terms:js":
        assert ratio == 1.375 + per_call / (8 * tiles[0]) and tiles[0] == tiles[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_workspace_within_budget_plus_16_n_h(dtype, monkeypatch):
    """Measured: the backward's peak allocation, less the gradients it returns, fits the
    bound; and the plan's own buffers fit the budget."""
    plans = _plans(monkeypatch)
    n, hidden, vocab, budget = 512, 128, 6000, 1 << 20
    peak = backward_workspace("logprobs", n, hidden, vocab, dtype, budget)
    assert peak <= budget + 16 * n * hidden, (peak, budget + 16 * n * hidden)
    backward_plan = plans[-1]
    assert backward_plan.workspace_bytes() <= budget
    # A bf16 head's fp32 [V, H] weight-gradient accumulator alone would break the bound.
    assert 4 * vocab * hidden > budget + 16 * n * hidden
