"""Row states: any cut of the vocabulary, folded and merged in any order, gives the whole-row result.

Every row is cut into k random slices (k = 1..7, uneven, empty ones included, and slices
whose logits are all ``-inf``); the slices are folded in a random order, some one after
another into one running state (in place: the kernels' merge epilogue), the others into
states of their own, and the states merged in a random order and finished by the backend's
``finalize``; the slices' second-sweep sums are added in a random order, by the sweeps
themselves, into one pair of accumulators and finished by its ``finish_sweep``; each slice's
gradient comes from the final statistics alone. Values and gradients must meet the numerics
contract against the float64 oracle and agree with the backend's own whole-row op.
"""

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefopt_kernels as pk
from prefopt_kernels.backends import OpSpec, row_state
from prefopt_kernels.divergences import Divergence
from prefopt_kernels.layout import RowLayout

from contract import DEVICE, assert_grads_close, assert_tokens_close, oracle, row_scale, with_cpu_isas
from strategies import cases, scaled


def _backend(name):
    return __import__(f"prefopt_kernels.backends.{name}", fromlist=["fold"])


ROW_STATE_BACKENDS = with_cpu_isas([name for name in pk.available_backends() if hasattr(_backend(name), "fold")])


def _cuts(rng: random.Random, vocab: int):
    """k slices ``[v0, v1)`` covering ``[0, vocab)``, uneven, possibly empty."""
    k = rng.randint(1, 7)
    points = sorted(rng.randint(0, vocab) for _ in range(k - 1))
    bounds = [0] + points + [vocab]
    return list(zip(bounds[:-1], bounds[1:]))


def _merge_in_random_order(states, spec, rng):
    states = list(states)
    while len(states) > 1:
        i, j = sorted(rng.sample(range(len(states)), 2))
        merged = row_state.merge(states[i], states[j], spec) if rng.random() < 0.5 else \
            row_state.merge(states[j], states[i], spec)
        states = [s for idx, s in enumerate(states) if idx not in (i, j)] + [merged]
    return states[0]


def _by_slices(module, rows, labels, ref_rows, weight, spec, cuts, rng):
    n = rows.shape[0] * rows.shape[1]
    order = list(range(len(cuts)))
    rng.shuffle(order)
    # A random share of the slices is folded one after another into one running state (the
    # kernels' merge epilogue), each of the others into an empty state of its own.
    running = row_state.empty(n, spec, ref_rows is not None, rows.device)
    pieces = [running]
    for idx in order:
        v0, v1 = cuts[idx]
        state = running if rng.random() < 0.5 else row_state.empty(n, spec, ref_rows is not None, rows.device)
        folded = module.fold(state, rows[..., v0:v1], labels,
                             None if ref_rows is None else ref_rows[..., v0:v1], weight, spec, v0)
        assert folded is state
        if state is not running:
            pieces.append(state)
    stats = module.finalize(_merge_in_random_order(pieces, spec, rng), labels, weight, spec)
    if spec.divergence and Divergence(spec.divergence).second_sweep:
        rng.shuffle(order)
        # The slices' sums added into one pair of accumulators in place, NaN before the first
        # slice writes them (the reference's in float64, which it keeps exact).
        dtype = torch.float64 if module.NAME == "reference" else torch.float32
        value, centred = (torch.full((n,), math.nan, dtype=dtype, device=rows.device) for _ in range(2))
        for position, idx in enumerate(order):
            v0, v1 = cuts[idx]
            sums = module.sweep(stats, rows[..., v0:v1], ref_rows[..., v0:v1], labels, weight, spec, v0,
                                value, centred, first_slice=position == 0)
            assert sums[0] is value and sums[1] is centred
        stats = module.finish_sweep(stats, value.to(torch.float32), centred.to(torch.float32),
                                    labels, weight, spec)
    return stats


@pytest.mark.parametrize("backend", ROW_STATE_BACKENDS)
@pytest.mark.parametrize("divergence", [None] + list(pk.DIVERGENCES))
@given(case=cases(max_tokens=6), seed=st.integers(0, 2**31 - 1), entropy=st.booleans())
@settings(max_examples=scaled(25))
def test_sliced_rows_match_the_whole_row(backend, divergence, case, seed, entropy):
    rng = random.Random(seed)
    module = _backend(backend)
    vocab = case.logits.shape[-1]
    cuts = _cuts(rng, vocab)
    a, b = case.logits.clone(), case.ref_logits.clone()
    # One slice holds only -inf in both rows (outside the labels' entries).
    v0, v1 = cuts[rng.randrange(len(cuts))]
    hole = torch.zeros(vocab, dtype=torch.bool)
    hole[v0:v1] = True
    keep = torch.zeros(a.shape, dtype=torch.bool).scatter_(-1, case.labels.clamp(min=0)[..., None], True)
    if vocab > 1 and rng.random() < 0.5:
        a = a.masked_fill(hole & ~keep, -math.inf)
        b = b.masked_fill(hole & ~keep, -math.inf)
    has_ref = divergence is not None
    spec = OpSpec(temperature=case.temperature, divergence=Divergence[divergence.upper()] if has_ref else 0,
                  beta=0.3, alpha=0.6, want_logp=True, want_ref_logp=has_ref, want_entropy=entropy)
    # The backend interface: labels and weight are contiguous [N].
    labels = case.labels.reshape(-1).contiguous().to(DEVICE)
    weight = None if (case.weight is None or not has_ref) else case.weight.reshape(-1).contiguous().to(DEVICE)
    inputs = (a.to(DEVICE), b.to(DEVICE) if has_ref else None)
    rows, ref_rows = RowLayout.of(*inputs).rows(*inputs)
    stats = _by_slices(module, rows, labels, ref_rows, weight, spec, cuts, rng)

    want, grad_ref = oracle(a, case.labels, b if has_ref else None, None if weight is None else case.weight,
                            divergence=divergence, beta=0.3, alpha=0.6, temperature=case.temperature,
                            want_logp=True, want_ref_logp=has_ref, want_entropy=entropy,
                            upstream=_upstream(case.labels.shape, seed, entropy, has_ref))
    s = row_scale(a, b if has_ref else None, case.temperature).reshape(-1)
    keys = ["logp"] + (["entropy"] if entropy else []) + (["ref_logp", "div"] if has_ref else [])
    for key in keys:
        assert_tokens_close(getattr(stats, key), want[key].reshape(-1), s, f"{backend} sliced {key}")

    # Each slice's gradient from the final statistics alone.
    up = _upstream(case.labels.shape, seed, entropy, has_ref)
    flat_up = {k: v.reshape(-1).to(DEVICE) for k, v in up.items()}
    grad = torch.empty(rows.shape, dtype=a.dtype, device=DEVICE)
    rng.shuffle(cuts)
    for v0, v1 in cuts:
        module.slice_backward(rows[..., v0:v1], labels, None if ref_rows is None else ref_rows[..., v0:v1],
                              weight, spec, stats, flat_up["logp"], flat_up.get("entropy"),
                              flat_up.get("div"), grad[..., v0:v1], v0)
    g_out = sum(g.abs() for g in up.values())
    rows_checked = None
    if has_ref:
        rows_checked = ~(torch.isfinite(want["div"]) & (want["div"].abs() > torch.finfo(torch.float32).max))
        if divergence == "tv":
            rows_checked = None if not rows_checked.any() else rows_checked & _tv_decided(a, b, case.temperature)
    assert_grads_close(grad.reshape(a.shape), grad_ref, row_scale(a, b if has_ref else None, case.temperature),
                       g_out, case.dtype, f"{backend} sliced grad", rows=rows_checked)


def _upstream(shape, seed, entropy, has_ref):
    gen = torch.Generator().manual_seed(seed % (2**31))
    keys = ["logp"] + (["entropy"] if entropy else []) + (["div"] if has_ref else [])
    return {k: torch.randn(shape, generator=gen) for k in keys}


def _tv_decided(a, b, temperature):
    p = torch.softmax(a.to(torch.float64) / temperature, -1)
    q = torch.softmax(b.to(torch.float64) / temperature, -1)
    gap = (p - q).abs()
    return ((gap > 1e-4 * (p + q)) | (p + q < 1e-30)).all(-1)


def test_merge_is_associative_and_commutative_on_hand_built_states():
    """Three one-entry slices merged in every order give the same state, equal to the formulas."""
    spec = OpSpec(temperature=0.5, divergence=Divergence.REVERSE_KL, want_logp=True, want_ref_logp=True,
                  want_entropy=True)
    a = torch.tensor([[1.0, 3.0, -2.0]])
    b = torch.tensor([[0.5, -1.0, 2.0]])
    labels = torch.tensor([2])
    rows, ref_rows = RowLayout.of(a, b).rows(a, b)
    module = _backend("reference")
    pieces = [module.fold(row_state.empty(1, spec, True, "cpu"), rows[..., j:j + 1], labels, ref_rows[..., j:j + 1],
                          None, spec, j) for j in range(3)]
    orders = [(0, 1, 2), (2, 1, 0), (1, 0, 2), (2, 0, 1)]
    results = []
    for i, j, k in orders:
        left = row_state.merge(row_state.merge(pieces[i], pieces[j], spec), pieces[k], spec)
        right = row_state.merge(pieces[i], row_state.merge(pieces[j], pieces[k], spec), spec)
        results += [left, right]
    for r in results[1:]:
        for key, value in results[0].tensors().items():
            torch.testing.assert_close(r.tensors()[key], value, rtol=1e-6, atol=1e-6)
    s = results[0]
    # By hand: max 3 at index 1, Z = sum exp((a - 3)/0.5), b_k = -1.
    u = (a[0].double() - 3.0) / 0.5
    assert s.max.item() == 3.0 and s.argmax.item() == 1 and s.ref_at_argmax.item() == -1.0
    assert abs(s.sum_exp.item() - torch.exp(u).sum().item()) < 1e-6
    assert s.label_logit.item() == -2.0 and s.ref_label_logit.item() == 2.0
    stats = row_state.finalize(s, labels, None, spec)
    p = torch.softmax(a[0].double() / 0.5, -1)
    q = torch.softmax(b[0].double() / 0.5, -1)
    assert abs(stats.logp.item() - math.log(p[2].item())) < 1e-5
    assert abs(stats.div.item() - (p * (p.log() - q.log())).sum().item()) < 1e-5


def _garbage(state: row_state.RowState) -> row_state.RowState:
    """``state`` filled with what no fold may read: NaN, and an argmax out of any vocabulary."""
    for name, value in state.tensors().items():
        value.fill_(12345 if name == "argmax" else math.nan)
    return state


@pytest.mark.parametrize("backend", ROW_STATE_BACKENDS)
@pytest.mark.parametrize("divergence", [None, "forward_kl", "reverse_kl", "js"])
@pytest.mark.parametrize("width", [0, 37])
def test_first_slice_fold_writes_what_a_fold_into_the_empty_state_gives(backend, divergence, width):
    """``first_slice``: the state is not read and every row is written, bit for bit as a fold
    into :func:`row_state.empty`: read rows, an all ``-inf`` row, an ignored label and a zero
    weight (rows not read get the empty state), and a slice of width 0."""
    module = _backend(backend)
    gen = torch.Generator().manual_seed(11)
    n, v0, has_ref = 6, 5, divergence is not None
    a = torch.randn(1, n, width, generator=gen) * 3
    b = torch.randn(1, n, width, generator=gen) * 3
    a[0, 3] = -math.inf
    # In the slice, before it, ignored, in the slice, past it, at its last entry.
    labels = torch.tensor([v0 + 1, 0, -100, v0 + 2, v0 + width + 3, v0 + width - 1]).to(DEVICE)
    weight = torch.tensor([1.0, 0.5, 1.0, 1.0, 0.0, 2.0]).to(DEVICE) if has_ref else None
    spec = OpSpec(temperature=0.7, divergence=Divergence[divergence.upper()] if has_ref else 0,
                  want_logp=True, want_ref_logp=has_ref, want_entropy=True)
    rows, ref_rows = RowLayout.of(a.to(DEVICE), b.to(DEVICE)).rows(a.to(DEVICE), b.to(DEVICE))
    ref_rows = ref_rows if has_ref else None

    want = module.fold(row_state.empty(n, spec, has_ref, DEVICE), rows, labels, ref_rows, weight, spec, v0)
    got = module.fold(_garbage(row_state.unfilled(n, spec, has_ref, DEVICE)), rows, labels, ref_rows, weight,
                      spec, v0, first_slice=True)
    for name, value in want.tensors().items():
        mine = got.tensors()[name]
        bits = (value, mine) if name == "argmax" else (value.view(torch.int32), mine.view(torch.int32))
        assert torch.equal(*bits), (backend, name, value, mine)
    # The skipped row holds the empty state.
    assert got.max[2] == -math.inf and got.sum_exp[2] == 0 and got.argmax[2] == -1 and got.label_logit[2] == 0


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


@pytest.mark.parametrize("backend", ROW_STATE_BACKENDS)
@pytest.mark.parametrize("divergence", [d.key for d in Divergence if d.second_sweep])
def test_sweep_adds_its_sums_into_the_accumulators_bit_for_bit(backend, divergence):
    """``sweep`` adds each slice's sums into the accumulators in place, bit for bit what the
    sums of each slice, swept on their own, added into zero-filled fp32 accumulators in slice
    order give (the accumulation before the sweep did it). The accumulators are NaN before the
    first slice (``first_slice``: not read); the slices include an empty one and one where a
    row's logits are all ``-inf`` (a ``-0.0`` sum on some backends, whose first-slice sum is
    ``0.0 + -0.0 = +0.0``); an ignored label and a zero weight have no divergence term and end
    at exactly ``+0.0``."""
    module = _backend(backend)
    gen = torch.Generator().manual_seed(5)
    n, vocab = 6, 40
    cuts = [(0, 17), (17, 17), (17, 40)]
    a = torch.randn(1, n, vocab, generator=gen) * 3
    b = torch.randn(1, n, vocab, generator=gen) * 3
    a[0, 3, 17:] = -math.inf  # the last slice is all -inf in both rows
    b[0, 3, 17:] = -math.inf
    a[0, 4, :17] = -math.inf  # the first slice is all -inf in the policy's row alone
    labels = torch.tensor([1, 30, -100, 2, 20, 5]).to(DEVICE)
    weight = torch.tensor([1.0, 0.5, 1.0, 1.0, 2.0, 0.0]).to(DEVICE)
    spec = OpSpec(temperature=0.7, divergence=Divergence[divergence.upper()], beta=0.3, alpha=0.6,
                  want_logp=True, want_ref_logp=True)
    rows, ref_rows = RowLayout.of(a.to(DEVICE), b.to(DEVICE)).rows(a.to(DEVICE), b.to(DEVICE))
    state = module.fold(row_state.empty(n, spec, True, DEVICE), rows, labels, ref_rows, weight, spec, 0)
    stats = row_state.finalize(state, labels, weight, spec)

    def nans():
        return torch.full((n,), math.nan, device=DEVICE)

    def swept(v0, v1, value, centred, first_slice):
        return module.sweep(stats, rows[..., v0:v1], ref_rows[..., v0:v1], labels, weight, spec, v0, value,
                            centred, first_slice=first_slice)

    # Each slice on its own (the reference's sums in float64, as it gave them), added into zeros.
    part_dtype = torch.float64 if module.NAME == "reference" else torch.float32
    want = [torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)]
    for v0, v1 in cuts:
        parts = (torch.full((n,), math.nan, dtype=part_dtype, device=DEVICE) for _ in range(2))
        for acc, part in zip(want, swept(v0, v1, *parts, True)):
            acc.add_(part)
    got = nans(), nans()
    for position, (v0, v1) in enumerate(cuts):
        value, centred = swept(v0, v1, *got, position == 0)
        assert value is got[0] and centred is got[1]
    for name, mine, old in zip(("value_sum", "centred_sum"), got, want):
        assert not mine.isnan().any(), (backend, name, mine)
        assert torch.equal(_bits(mine), _bits(old)), (backend, name, mine, old)
        # No divergence term (an ignored label, a zero weight): exactly +0.0.
        assert _bits(mine)[[2, 5]].tolist() == [0, 0], (backend, name, mine)

    # Hand-derived: a first slice takes the accumulators as +0.0 and adds (+0.0 + -0.0 = +0.0);
    # a later slice adds into what they hold (-0.0 + +0.0 = +0.0, NaN stays NaN).
    for first_slice, held, want_bits in ((True, math.nan, 0), (False, -0.0, 0)):
        acc = [torch.full((n,), held, device=DEVICE) for _ in range(2)]
        swept(17, 17, *acc, first_slice)
        for name, mine in zip(("value_sum", "centred_sum"), acc):
            assert _bits(mine).tolist() == [want_bits] * n, (backend, name, first_slice, mine)
    acc = [torch.full((n,), math.nan, device=DEVICE) for _ in range(2)]
    swept(17, 17, *acc, False)
    assert all(mine.isnan().all() for mine in acc), (backend, acc)
    # The all -inf slice of row 3, swept first: its sums, +0.0 or below, never -0.0.
    acc = nans(), nans()
    swept(17, 40, *acc, True)
    for name, mine in zip(("value_sum", "centred_sum"), acc):
        assert not (mine[3] == 0 and torch.signbit(mine[3])), (backend, name, mine)


@pytest.mark.parametrize("backend", [name for name in ROW_STATE_BACKENDS if name != "reference"])
def test_sweep_refuses_accumulators_it_cannot_write_naming_them(backend):
    """The kernels add into the accumulators through raw pointers: a wrong dtype, length or a
    non-contiguous view is refused with the argument's name."""
    module = _backend(backend)
    n = 4
    spec = OpSpec(divergence=Divergence.JS, want_logp=True, want_ref_logp=True)
    rows = torch.randn(1, n, 8, device=DEVICE)
    labels = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    state = module.fold(row_state.empty(n, spec, True, DEVICE), rows, labels, rows, None, spec, 0)
    stats = row_state.finalize(state, labels, None, spec)
    good = torch.empty(n, device=DEVICE)
    for bad in (torch.empty(n, dtype=torch.float64, device=DEVICE), torch.empty(n + 1, device=DEVICE),
                torch.empty(2 * n, device=DEVICE)[::2]):
        with pytest.raises(ValueError, match="value_sum"):
            module.sweep(stats, rows, rows, labels, None, spec, 0, bad, good, first_slice=True)
        with pytest.raises(ValueError, match="centred_sum"):
            module.sweep(stats, rows, rows, labels, None, spec, 0, good, bad, first_slice=True)
