"""Tile planning of the fused linear ops: ``plan_tiles`` by hand and against its budget, and the
ops on tiles that cut the rows and the vocabulary unevenly (checked on the plans they made)."""

import math

import pytest
import torch

from prefopt_kernels.backends import row_state
from prefopt_kernels.linear.tiles import plan_tiles

from linear_cases import (BACKENDS, ISA_BACKENDS, PLAN_TILES, Call, check, make_labels, make_pair, make_upstream,
                          run_fused)
from linear_cases import tile_spy  # noqa: F401 - a fixture: pytest finds it among the module's names


@pytest.mark.parametrize("args, expected", [
    # 13 rows, fp32 single head (4 bytes/entry): 13 * 4 * 256 > 6500, so the token chunk halves
    # to 6; then 6500 // 24 = 270 >= 256, rounded down to a multiple of 16: 256.
    ((13, 300, 4, 0, 6500), (6, 256)),
    # t = 1: 1000 // 4 = 250 < 300 = V, rounded down to 240; below 16 entries no rounding (10 // 4 = 2 above).
    ((1, 300, 4, 0, 1000), (1, 240)),
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
                    if 16 <= v < vocab:  # a partial vocabulary chunk keeps tile rows aligned
                        assert v % 16 == 0


def _uneven(rows, vocab, plan):
    t, v = plan
    return 1 < t < rows and rows % t != 0 and v < vocab and vocab % v != 0


def _uneven_budget(call: Call, tile_spy):
    """A ``memory_budget`` whose forward and backward plans both cut the kept rows and V unevenly.

    The bytes per tile entry and per column are the op's own (recorded from a probe call on the
    reference backend); the budget is the first that plan_tiles turns into uneven chunks for all.
    """
    probe = Call(**{**call.__dict__, "memory_budget": None})
    run_fused("reference", probe, make_upstream(probe, 0))
    costs = [args for args, _ in tile_spy]
    tile_spy.clear()
    assert len(costs) >= 2, "expected a forward and a backward plan"
    for budget in range(1000, 400000, 100):
        if all(_uneven(rows, vocab, PLAN_TILES(rows, vocab, entry, column, budget))
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
    policy, ref = make_pair((15,), seed=31, vocab=400, softcaps=(softcap, None))
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


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32) if x.dtype == torch.float32 else x


@pytest.mark.parametrize("op, divergence", [("logprobs", None), ("terms", "reverse_kl"), ("terms", "js")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_first_vocabulary_chunk_writes_the_running_state(backend, op, divergence, monkeypatch, tile_spy):
    """The forward's running state is not filled before the first vocabulary chunk's fold, which
    writes every row: the same bits when the unfilled state holds NaN and an argmax beyond the
    vocabulary (ignored tokens, two vocabulary chunks, the extras that read the running max)."""
    policy, ref = make_pair((15,), seed=41, vocab=400)
    labels = make_labels((15,), 400, seed=42, ignored=(4, 11))
    call = Call(op, policy, labels, ref if op == "terms" else None, divergence=divergence, return_entropy=True,
                extras=("mean_logits", "is_top1", "log_sum_sq_probs"), memory_budget=3000)
    upstream = make_upstream(call, 43)
    want = run_fused(backend, call, upstream)
    forward_vocab_chunk = tile_spy[0][1][1]
    assert forward_vocab_chunk < 400, tile_spy
    unfilled = row_state.unfilled

    def garbage(*args, **kwargs):
        state = unfilled(*args, **kwargs)
        for name, value in state.tensors().items():
            value.fill_(12345 if name == "argmax" else math.nan)
        return state

    monkeypatch.setattr(row_state, "unfilled", garbage)
    got = run_fused(backend, call, upstream)
    for mine, expected in zip(got, want):
        pairs = zip(mine.values(), expected.values()) if isinstance(mine, dict) else zip(mine, expected)
        for m, e in pairs:
            assert (m is None) == (e is None) and (m is None or torch.equal(_bits(m), _bits(e)))
