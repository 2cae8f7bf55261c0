"""One read of the row for the sampler-matched forward: the candidates a backend gathers inside its
own forward (``forward_with_candidates``) against ``torch.topk``, the op's outputs bit for bit
against the path that reads the rows again, and the reads that remain (growth of unsettled rows).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefopt_kernels as pk
from prefopt_kernels import sampled_rows, sampling
from prefopt_kernels.backends import native, row_state
from prefopt_kernels.linear import sampled as linear_sampled
from prefopt_kernels.linear.tiles import TilePlan
from prefopt_kernels.spec import OpSpec

from contract import backends_on
from strategies import scaled
from test_sampling_logits import sampled_cases

GATHERING = [name for name in ("native", "triton") if name in backends_on(torch.device("cpu"))]
needs_gathering = pytest.mark.skipif(not GATHERING, reason="no backend gathers candidates in its forward here")


@st.composite
def rows_with_ties(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    batch, tokens = draw(st.sampled_from([(1, 1), (2, 3), (3, 5)]))
    vocab = draw(st.sampled_from([1, 7, 300, 1000, 1537, 3001]))
    x = torch.randn(batch, tokens + 1, vocab, generator=gen) * draw(st.sampled_from([0.1, 3.0]))
    style = draw(st.sampled_from(["plain", "ties", "inf", "all_inf"]))
    if style == "ties":
        x = torch.round(x)
    elif style == "inf":
        x[torch.rand(x.shape, generator=gen) < 0.5] = -math.inf
    elif style == "all_inf":
        x[:, 0] = -math.inf
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    x = x.to(dtype)[:, :tokens]  # a strided view: its rows are not contiguous with each other
    labels = torch.randint(0, vocab, (batch * tokens,), generator=gen)
    labels[torch.rand(batch * tokens, generator=gen) < 0.2] = -100
    count = draw(st.sampled_from([1, 2, 51, 1024, 1025, native.max_candidates(torch.device("cpu"))]))
    return x, labels, count


def check_gathered(backend, case):
    """The forward's candidates are each row's ``count`` largest logits in descending order, the
    multiset ``torch.topk`` keeps (ties and ``-inf`` included), ``-inf`` padded past V and on ignored
    rows; the forward's own statistics are bit for bit those of the forward without candidates."""
    x, labels, count = case
    module = __import__(f"prefopt_kernels.backends.{backend}", fromlist=["forward"])
    op = OpSpec(want_logp=True, want_entropy=True)
    plain = module.forward(x, labels, None, None, op)
    stats, largest = module.forward_with_candidates(x, labels, None, None, op, count)
    for name in ("row_max", "log_norm", "logp", "entropy"):  # bits: an all -inf row's NaN included
        assert torch.equal(getattr(stats, name).view(torch.int32), getattr(plain, name).view(torch.int32)), name
    rows = x.reshape(-1, x.shape[-1]).float()
    want = torch.full((rows.shape[0], count), -math.inf)
    kept = min(count, rows.shape[1])
    want[:, :kept] = rows.topk(kept, dim=1).values
    want[labels == -100] = -math.inf
    assert largest.shape == (rows.shape[0], count) and torch.equal(largest, want)


def check_fold_gathered(backend, case, start, stop):
    """A fold's candidates are its slice's ``count`` largest logits (``torch.topk``'s multiset,
    descending, ``-inf`` padded past the slice and on ignored rows, all ``-inf`` for an empty
    slice); the state it folds is bit for bit the fold's without candidates."""
    x, labels, count = case
    module = __import__(f"prefopt_kernels.backends.{backend}", fromlist=["fold"])
    op = OpSpec(want_logp=True, want_entropy=True)
    vocab = x.shape[-1]
    v0, v1 = sorted((int(start * vocab), int(stop * vocab)))
    piece = x[..., v0:v1]
    n = labels.numel()
    plain = module.fold(row_state.empty(n, op, False, "cpu"), piece, labels, None, None, op, v0)
    state, largest = module.fold_with_candidates(row_state.empty(n, op, False, "cpu"), piece, labels, None, None, op,
                                                 v0, count)
    for name, field in plain.tensors().items():  # bits: NaN included
        bits = (lambda t: t.view(torch.int32)) if field.is_floating_point() else (lambda t: t)
        assert torch.equal(bits(getattr(state, name)), bits(field)), name
    want = torch.full((n, count), -math.inf)
    kept = min(count, v1 - v0)
    if kept:
        want[:, :kept] = piece.reshape(n, v1 - v0).float().topk(kept, dim=1).values
    want[labels == -100] = -math.inf
    assert largest.shape == (n, count) and torch.equal(largest, want)


@pytest.mark.skipif("native" not in GATHERING, reason="the native extension is not built")
@settings(max_examples=scaled(60), deadline=None)
@given(case=rows_with_ties())
def test_native_gathered_candidates_are_the_rows_topk(case):
    check_gathered("native", case)


@pytest.mark.skipif("native" not in GATHERING, reason="the native extension is not built")
@settings(max_examples=scaled(40), deadline=None)
@given(case=rows_with_ties(), start=st.sampled_from([0.0, 0.3, 0.5]), stop=st.sampled_from([0.5, 0.9, 1.0]))
def test_native_fold_gathers_its_slice_topk(case, start, stop):
    check_fold_gathered("native", case, start, stop)


# Interpreted, a compaction's tl.topk over thousands of slots takes minutes: few candidates there.
@pytest.mark.skipif("triton" not in GATHERING, reason="Triton does not run here")
@settings(max_examples=scaled(3), deadline=None)
@given(case=rows_with_ties(), start=st.sampled_from([0.0, 0.3, 0.5]), stop=st.sampled_from([0.5, 0.9, 1.0]))
def test_triton_fold_gathers_its_slice_topk(case, start, stop):
    x, labels, count = case
    check_fold_gathered("triton", (x, labels, min(count, 51)), start, stop)


# Interpreted, every compaction's tl.topk over the buffer is slow: fewer draws.
@pytest.mark.skipif("triton" not in GATHERING, reason="Triton does not run here")
@settings(max_examples=scaled(4), deadline=None)
@given(case=rows_with_ties())
def test_triton_gathered_candidates_are_the_rows_topk(case):
    check_gathered("triton", case)


@needs_gathering
def test_nan_never_enters_the_candidates():
    x = torch.randn(2, 1, 2000)
    x[0, 0, ::3] = math.nan
    _, largest = native.forward_with_candidates(x, torch.tensor([0, 1]), None, None, OpSpec(), 100)
    finite = x[0, 0][~x[0, 0].isnan()]
    assert torch.equal(largest[0], finite.topk(100).values)


@needs_gathering
def test_candidate_count_is_checked():
    x = torch.randn(1, 1, 10)
    with pytest.raises(ValueError, match="candidates"):
        native.forward_with_candidates(x, torch.tensor([0]), None, None, OpSpec(), native.max_candidates("cpu") + 1)


def _without_gathering(monkeypatch):
    """The path that reads the rows again: the backend's forward gathers no candidates."""
    monkeypatch.setattr(sampled_rows, "candidate_count", lambda op, vocab: 0)


def check_one_read(backend, case):
    """The kept set decided from the forward's candidates is the one decided from a second read:
    ``logp``, ``log_kept_mass`` and the gradient agree bit for bit (growth rows included)."""
    x, labels, temperature, options = case

    def run():
        xi = x.clone().requires_grad_()
        with pk.use_backend(backend):
            logp, mass = pk.token_logprobs(xi, labels, temperature=temperature, return_kept_mass=True, **options)
        logp.backward(torch.linspace(0.5, 1.5, logp.numel()).reshape(logp.shape))
        return logp, mass, xi.grad

    one = run()
    with pytest.MonkeyPatch.context() as patch:
        _without_gathering(patch)
        two = run()
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.skipif("native" not in GATHERING, reason="the native extension is not built")
@settings(max_examples=scaled(30), deadline=None)
@given(case=sampled_cases())
def test_native_one_read_equals_two_reads_bit_for_bit(case):
    check_one_read("native", case)


# Interpreted, Triton runs each op in seconds: fewer draws.
@pytest.mark.skipif("triton" not in GATHERING, reason="Triton does not run here")
@settings(max_examples=scaled(3), deadline=None)
@given(case=sampled_cases())
def test_triton_one_read_equals_two_reads_bit_for_bit(case):
    check_one_read("triton", case)


# Which rows are read again is decided on the host, whichever backend gathered the candidates.
@pytest.mark.parametrize("backend", [b for b in GATHERING if b == "native"])
def test_settled_rows_are_read_once(backend, monkeypatch):
    """With top_k <= 1024 (and a nucleus within the candidates) no row is read after the forward;
    flat rows whose 0.95 nucleus exceeds 1024 tokens are the only ones read again (growth)."""
    folded = []
    fold = sampling.Candidates.fold
    monkeypatch.setattr(sampling.Candidates, "fold", lambda self, x, *a: folded.append(x.shape[0]) or fold(self, x, *a))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 3001, generator=gen) * 3
    labels = torch.randint(0, 3001, (2, 3), generator=gen)
    with pk.use_backend(backend):
        pk.token_logprobs(x, labels, top_k=1024, top_p=0.9, min_p=0.01)
        pk.token_logprobs(x, labels, top_k=50)
    assert folded == []
    x[1] *= 0.01  # three flat rows: their nucleus holds about 0.95 V tokens
    with pk.use_backend(backend):
        pk.token_logprobs(x, labels, top_p=0.95)
    assert sum(folded) == 3 + 3  # read with 2048, then with 3001 candidates


@needs_gathering
def test_first_read_falls_back_beyond_the_gathered_count():
    """A top_k whose candidates exceed what the kernel gathers reads the rows again, as before."""
    op = OpSpec(want_logp=True, top_k=native.max_candidates("cpu"))
    x = torch.randn(1, 2, 5000)
    stats, largest = sampled_rows.first_read(native, x, torch.tensor([0, 1]), None, None, op)
    assert largest is None and stats.row_max.shape == (2,)


@st.composite
def linear_sampled_cases(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    vocab = draw(st.sampled_from([300, 1031, 2053]))
    tokens = draw(st.integers(1, 5))
    hidden = torch.randn(tokens, 16, generator=gen)
    weight = torch.randn(vocab, 16, generator=gen) * draw(st.sampled_from([0.02, 1.0]))  # 0.02: flat, growth
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[torch.rand(tokens, generator=gen) > 0.8] = -100
    options = dict(top_k=draw(st.sampled_from([None, 1, 60, 1100])), top_p=draw(st.sampled_from([None, 0.9, 0.97])),
                   min_p=draw(st.sampled_from([None, 0.01])))
    return hidden, weight, labels, options, draw(st.sampled_from([3000, 150000])), draw(st.booleans())


# The candidates are gathered on the host from the fold's tiles whatever the backend folds them:
# the compiled backends suffice (the interpreted Triton fold of many small tiles takes minutes).
@pytest.mark.parametrize("backend", [b for b in backends_on(torch.device("cpu")) if b != "triton"])
@settings(max_examples=scaled(8), deadline=None)
@given(case=linear_sampled_cases())
def test_linear_candidates_from_the_fold_equal_a_second_projection(backend, case):
    """The fused linear forward takes its candidates from the fold's own tiles: its outputs and
    gradients are bit for bit those of the path that projects every tile once more."""
    hidden, weight, labels, options, budget, invariant = case

    def run():
        h = hidden.clone().requires_grad_()
        with pk.use_backend(backend):
            logp, mass = pk.linear_token_logprobs(h, weight, labels, memory_budget=budget, batch_invariant=invariant,
                                                  return_kept_mass=True, **options)
        logp.sum().backward()
        return logp, mass, h.grad

    one = run()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linear_sampled, "TileCandidates", lambda call: None)
        two = run()
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_linear_forward_projects_each_tile_once(monkeypatch):
    """With the kept set settled by the first candidates, a sampled forward projects as many tiles as
    the plain one: the candidates need no projection of their own."""
    projected = []
    project = TilePlan.project
    monkeypatch.setattr(TilePlan, "project", lambda self, *a, **k: projected.append(a[1].shape[0]) or project(self, *a, **k))
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(6, 16, generator=gen), torch.randn(3001, 16, generator=gen)
    labels = torch.randint(0, 3001, (6,), generator=gen)
    counts = []
    for options in ({}, dict(top_k=50, top_p=0.9, min_p=0.05)):
        projected.clear()
        pk.linear_token_logprobs(hidden, weight, labels, memory_budget=20000, **options)
        counts.append(len(projected))
    assert counts[0] > 1 and counts[1] == counts[0]
