"""What a fused linear call costs on the host and in memory, counted with ``torch.profiler``.

Launches: the top-level aten ops that would each launch work on a GPU, as
``benchmarks.linear_costs`` defines them (views, metadata and allocations do not count), and
the native backend's kernel calls. Per tile a call may cost its GEMMs and its backend kernels
(a fold in the forward, a sweep for a second-sweep divergence, a ``slice_backward`` in the
backward) and, for the second sweep, the two adds of its partial sums; everything else is
paid once per call. Workspace: the backward's peak allocation above the gradients it returns,
against ``memory_budget + 16 N H`` bytes. Both counts are deterministic.
"""

import pytest
import torch

import prefopt_kernels as pk
from benchmarks.linear_costs import backward_workspace, step_counts
from prefopt_kernels.backends import native
from prefopt_kernels.linear import tiles as linear_tiles

pytestmark = pytest.mark.skipif(not native.is_available(), reason="counts the native backend's calls")

OPS = ["logprobs", "terms:forward_kl", "terms:js"]


@pytest.fixture(autouse=True)
def native_backend():
    with pk.use_backend("native"):
        yield


@pytest.mark.parametrize("op", OPS)
def test_at_most_one_other_host_op_per_gemm(op):
    """Besides its GEMMs a call launches at most one op per GEMM: backend kernels and aten ops
    together (before the kernels merged the row states in place: 8 per GEMM for logprobs)."""
    counts = step_counts(op, 1024, 256, 32000, torch.float32, 4 << 20)
    others = counts["launches"] - counts["gemms"] + counts["kernels"]
    assert others <= counts["gemms"], counts


def _plans(monkeypatch):
    """Every :class:`TilePlan` a call makes, in order."""
    made = []
    original = linear_tiles.TilePlan.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(linear_tiles.TilePlan, "__init__", spy)
    return made


@pytest.mark.parametrize("op", OPS)
def test_per_tile_cost_is_the_gemms_and_the_backend_kernels(op, monkeypatch):
    """Halving the budget adds vocabulary chunks; each added tile adds only its GEMMs, its kernel
    and (second sweep) its two adds: the rest of the call costs the same whatever the tiling."""
    plans = _plans(monkeypatch)
    results = []
    for budget in (320 << 10, 160 << 10):
        plans.clear()
        counts = step_counts(op, 64, 32, 1500, torch.float32, budget)
        # A forward plan, and for the backward a second one; the second sweep reuses the forward's.
        forward_plan, backward_plan = plans
        tiles = [len(p.token_ranges) * len(p.vocab_ranges) for p in (forward_plan, backward_plan)]
        sweeps = op == "terms:js"
        assert counts["kernels"] == tiles[0] * (1 + sweeps) + tiles[1], (counts, tiles)
        heads = 1 if op == "logprobs" else 2
        assert counts["gemms"] == tiles[0] * heads * (1 + sweeps) + tiles[1] * (heads + 2), (counts, tiles)
        assert [len(p.token_ranges) for p in plans] == [1, 1]  # the same token chunks at both budgets
        results.append((counts["launches"] - counts["gemms"] - 2 * sweeps * tiles[0], tiles))
    (overhead_a, tiles_a), (overhead_b, tiles_b) = results
    assert tiles_b[0] > tiles_a[0] and tiles_b[1] > tiles_a[1]
    assert overhead_a == overhead_b


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
