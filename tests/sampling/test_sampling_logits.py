"""Sampler-matched log-probs of the logits ops against the sorting float64 oracle, on every backend.

Rows are drawn plain, with heavy ties (logits on a coarse grid), flat (a nucleus wider than
the 1024 first candidates, so the growth path reads rows again) or with ``-inf`` entries; V
from 300 to 3000 (below and above the candidate count). Ambiguous rows (a decision within
rounding of its boundary, see ``sampling_cases``) are left out and must stay a minority.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefopt_kernels as pk
from prefopt_kernels import sampling

from contract import assert_grads_close, assert_tokens_close, backends_on, row_scale
from sampling_cases import ambiguous_rows, oracle
from strategies import scaled

BACKENDS = backends_on(torch.device("cpu"))


@st.composite
def sampled_cases(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    vocab = draw(st.sampled_from([300, 517, 1000, 1025, 1500, 2053, 3001]))
    lead = draw(st.sampled_from([(1, 3), (2, 3), (3, 1)]))
    style = draw(st.sampled_from(["plain", "ties", "flat", "inf"]))
    x = torch.randn(*lead, vocab, generator=gen) * draw(st.sampled_from([1.0, 3.0]))
    if style == "ties":
        x = torch.round(x * 2) / 2
    elif style == "flat":
        x = x * 0.05
    elif style == "inf":
        x[torch.rand(x.shape, generator=gen) < 0.3] = -math.inf
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    x = x.to(dtype)
    labels = torch.randint(0, vocab, lead, generator=gen)
    top = x.float().argmax(-1)
    pick = torch.rand(lead, generator=gen)
    labels = torch.where(pick < 0.5, top, labels)
    labels[pick > 0.9] = -100
    options = dict(
        top_k=draw(st.sampled_from([None, 0, 1, 3, 50, 1100, vocab + 5])),
        top_p=draw(st.sampled_from([None, 1.0, 0.05, 0.5, 0.9, 0.95])),
        min_p=draw(st.sampled_from([None, 0.0, 0.001, 0.05, 0.5, 1.0])),
    )
    temperature = draw(st.sampled_from([0.6, 1.0, 1.7]))
    return x, labels, temperature, options


def _oracle_options(options):
    return options["top_k"], options["top_p"], options["min_p"]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=scaled(40))
@given(case=sampled_cases())
def test_sampled_logprobs_match_the_sorting_oracle(backend, case):
    x, labels, temperature, options = case
    x = x.clone().requires_grad_()
    with pk.use_backend(backend):
        logp, log_kept_mass = pk.token_logprobs(x, labels, temperature=temperature, return_kept_mass=True, **options)
    upstream = torch.rand(logp.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    logp.backward(upstream)
    want_logp, want_mass, want_grad = oracle(x.detach(), labels, temperature, *_oracle_options(options))
    clear = ~ambiguous_rows(x.detach(), temperature, *_oracle_options(options))
    vocab = x.shape[-1]
    scale = row_scale(x.detach(), None, temperature).reshape(-1)
    got_logp, got_mass = logp.reshape(-1), log_kept_mass.reshape(-1)
    assert torch.equal(torch.isinf(got_logp)[clear], torch.isinf(want_logp)[clear])
    finite = clear & torch.isfinite(want_logp)
    assert_tokens_close(got_logp[finite], want_logp[finite], scale[finite], "logp")
    assert_tokens_close(got_mass[clear], want_mass[clear], scale[clear], "log_kept_mass")
    grad = x.grad.reshape(-1, vocab)
    want = want_grad * upstream.reshape(-1, 1).double()
    assert_grads_close(grad[clear], want[clear], scale[clear], upstream.reshape(-1)[clear], x.dtype, "gradient")
    assert not torch.isnan(grad).any() and not torch.isnan(got_logp).any()


def test_ambiguous_rows_are_rare():
    """The comparison above must mostly compare: ambiguous rows are a small share of its draws."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2053, generator=gen) * 3
    assert ambiguous_rows(x, 1.0, 50, 0.9, 0.05).float().mean() < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_growth_path_reads_unsettled_rows_again(backend, monkeypatch):
    """A flat row's 0.95 nucleus holds about 0.95 V > 1024 tokens: the first candidates cannot settle
    it, so the rows are read again with more candidates (at most ceil(log2(V / 1024)) times)."""
    calls = []
    decide = sampling.decide
    monkeypatch.setattr(sampling, "decide", lambda c, *a: calls.append(c.values.shape) or decide(c, *a))
    gen = torch.Generator().manual_seed(3)
    vocab = 3001
    x = torch.randn(2, 3, vocab, generator=gen) * 0.05
    x[0, 0] *= 100  # a peaked row beside the flat ones: settled by the first candidates
    x.requires_grad_()
    labels = torch.randint(0, vocab, (2, 3), generator=gen)
    with pk.use_backend(backend):
        logp = pk.token_logprobs(x, labels, top_p=0.95)
    logp.sum().backward()
    assert [tuple(shape) for shape in calls] == [(6, 1024), (5, 2048), (5, 3001)]
    want_logp, _, want_grad = oracle(x.detach(), labels, 1.0, None, 0.95, None)
    clear = ~ambiguous_rows(x.detach(), 1.0, None, 0.95, None)
    assert clear.sum() >= 4
    scale = row_scale(x.detach(), None, 1.0).reshape(-1)
    finite = clear & torch.isfinite(want_logp)
    assert_tokens_close(logp.reshape(-1)[finite], want_logp[finite], scale[finite], "logp")
    assert_grads_close(x.grad.reshape(-1, vocab)[clear], want_grad[clear], scale[clear], torch.ones(6)[clear],
                       torch.float32, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_neutral_options_are_the_plain_path_bit_for_bit(backend):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 777, generator=gen).to(torch.bfloat16)
    labels = torch.randint(0, 777, (3, 4), generator=gen)
    labels[0, 1] = -100
    results = []
    for options in ({}, dict(top_k=0, top_p=1.0, min_p=0.0), dict(top_k=None, top_p=None, min_p=None)):
        xi = x.clone().requires_grad_()
        with pk.use_backend(backend):
            logp, entropy = pk.token_logprobs(xi, labels, return_entropy=True, **options)
        (logp.sum() + entropy.sum()).backward()
        results.append((logp, entropy, xi.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    with pk.use_backend(backend):
        _, mass = pk.token_logprobs(x, labels, return_kept_mass=True)
    assert torch.equal(mass, torch.zeros_like(mass))


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_outside_the_kept_set(backend):
    """-inf, counted by ``torch.isinf(logp).sum()`` (no hidden state); its row's gradient is finite:
    ``-p_K(i) g / T`` on K and 0 elsewhere, the label's entry included."""
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -math.inf] + [-1.0] * 294] * 2, requires_grad=True)
    labels = torch.tensor([4, 0])
    temperature = 2.0
    with pk.use_backend(backend):
        logp, mass = pk.token_logprobs(x, labels, top_k=2, temperature=temperature, return_kept_mass=True)
    assert int(torch.isinf(logp).sum()) == 1 and logp[0] == -math.inf
    z = torch.tensor([4.0, 3.0], dtype=torch.float64) / temperature
    p_kept = torch.softmax(z, 0)
    assert abs(logp[1].item() - math.log(p_kept[0].item())) < 1e-6
    full = torch.logsumexp(x.detach().double()[0] / temperature, 0)
    assert abs(mass[0].item() - (torch.logsumexp(z, 0) - full).item()) < 1e-6
    logp.backward(torch.tensor([3.0, 0.0]))
    want = torch.zeros(300, dtype=torch.float64)
    want[:2] = -p_kept * 3.0 / temperature
    assert torch.isfinite(x.grad).all()
    assert torch.allclose(x.grad[0].double(), want, atol=1e-7)
    assert torch.equal(x.grad[1], torch.zeros(300))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_token_terms_samples_the_policy_logp_only(backend, inplace):
    """``ref_logp``, ``div`` and ``entropy`` stay the full distributions'; the gradient adds the kept
    set's logp term to the plain op's divergence and entropy terms."""
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(2, 3, 1031, generator=gen) * 2
    b = torch.randn(2, 3, 1031, generator=gen) * 2
    labels = a.argmax(-1)
    options = dict(top_k=40, top_p=0.8, min_p=0.01)
    upstream = [torch.rand(2, 3, generator=gen) for _ in range(3)]

    def run(sampled):
        x = a.clone().requires_grad_()
        with pk.use_backend(backend):
            terms = pk.token_terms(x * 1.0 if inplace else x, labels, b, divergence="reverse_kl",
                                   return_entropy=True, return_kept_mass=sampled, inplace_backward=inplace,
                                   **(options if sampled else {}))
        loss = (terms.logp * upstream[0]).sum() + (terms.div * upstream[1]).sum() + (terms.entropy * upstream[2]).sum()
        loss.backward()
        return terms, x.grad

    plain, plain_grad = run(False)
    sampled, sampled_grad = run(True)
    for name in ("ref_logp", "div", "entropy"):
        assert torch.equal(getattr(plain, name), getattr(sampled, name))
    assert plain.log_kept_mass is None and sampled.log_kept_mass.shape == (2, 3)
    want_logp, want_mass, want_grad = oracle(a, labels, 1.0, *options.values())
    assert torch.allclose(sampled.logp.reshape(-1).double(), want_logp, atol=1e-5)
    assert torch.allclose(sampled.log_kept_mass.reshape(-1).double(), want_mass, atol=1e-5)
    # The plain gradient less its logp term, plus the kept set's.
    x = a.double().reshape(-1, 1031)
    p = torch.softmax(x, -1)
    plain_logp_term = (torch.nn.functional.one_hot(labels.reshape(-1), 1031) - p) * upstream[0].reshape(-1, 1)
    want = plain_grad.reshape(-1, 1031).double() - plain_logp_term + want_grad * upstream[0].reshape(-1, 1)
    assert (sampled_grad.reshape(-1, 1031).double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("kwargs, argument", [
    (dict(top_k=-1), "top_k"), (dict(top_k=True), "top_k"), (dict(top_k=2.0), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=math.nan), "top_p"), (dict(top_p="0.9"), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.01), "min_p"), (dict(min_p=math.nan), "min_p"),
    (dict(return_kept_mass=1), "return_kept_mass"),
])
def test_bad_sampler_options_name_the_argument(kwargs, argument):
    x, labels = torch.randn(2, 50), torch.tensor([1, 2])
    h, w, ref_h = torch.randn(2, 8), torch.randn(50, 8), torch.randn(2, 8)
    calls = [
        lambda: pk.token_logprobs(x, labels, **kwargs),
        lambda: pk.token_terms(x, labels, x, **kwargs),
        lambda: pk.linear_token_logprobs(h, w, labels, **kwargs),
        lambda: pk.linear_token_terms(h, w, labels, ref_h, w, **kwargs),
    ]
    for call in calls:
        with pytest.raises((TypeError, ValueError), match=argument):
            call()


def test_decision_in_row_blocks_equals_one_block(monkeypatch):
    """The float64 decision runs in blocks of rows (bounded temporaries): any block size, the same bits."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(7, 1501, generator=gen) * 0.3
    labels = torch.randint(0, 1501, (7,), generator=gen)
    whole = pk.token_logprobs(x, labels, top_p=0.9, min_p=0.01, return_kept_mass=True)
    monkeypatch.setattr(sampling, "DECIDE_BLOCK_BYTES", 3 * 8 * 1024)  # 3 rows of 1024 candidates
    blocked = pk.token_logprobs(x, labels, top_p=0.9, min_p=0.01, return_kept_mass=True)
    for a, b in zip(whole, blocked):
        assert torch.equal(a, b)
