"""Sampler-matched log-probs of the fused linear ops against the sorting float64 oracle.

Hidden states and head weights are multiples of 1/8 in [-1, 1] with H = 16, so every fp32 GEMM
of any tile shape is exact and the oracle's float64 logits are the ones the tiles see (and
the logits sit on a grid of 1/64: heavy ties). Small random memory budgets cut the vocabulary
into many tiles and the tokens into several chunks; the growth path re-projects unsettled rows.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefopt_kernels as pk

from contract import backends_on
from sampling_cases import ambiguous_rows, oracle
from strategies import scaled

BACKENDS = backends_on(torch.device("cpu"))
HIDDEN = 16


def grid(shape, gen, spread=1.0):
    """Multiples of 1/8 in ``[-spread, spread]``: products and their sums over 16 terms are exact in fp32."""
    steps = int(8 * spread)
    return torch.randint(-steps, steps + 1, shape, generator=gen).float() / 8


def assert_close(got, want, what, rtol=1e-5):
    got, want = got.double(), want.double()
    if want.numel() == 0:
        return
    tol = rtol * (1 + want.abs().max())
    assert (got - want).abs().max() <= tol, f"{what}: {(got - want).abs().max().item()} > {tol.item()}"


@st.composite
def linear_cases(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    vocab = draw(st.sampled_from([300, 733, 1031, 2053]))
    tokens = draw(st.integers(1, 9))
    hidden = grid((tokens, HIDDEN), gen)
    weight = grid((vocab, HIDDEN), gen, spread=draw(st.sampled_from([0.25, 1.0])))
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    top = (hidden @ weight.t()).argmax(-1)
    pick = torch.rand(tokens, generator=gen)
    labels = torch.where(pick < 0.5, top, labels)
    labels[pick > 0.9] = -100
    options = dict(top_k=draw(st.sampled_from([None, 1, 7, 60, 1100])),
                   top_p=draw(st.sampled_from([None, 0.3, 0.9, 0.97])),
                   min_p=draw(st.sampled_from([None, 0.01, 0.2])))
    budget = draw(st.sampled_from([3000, 20000, 150000]))
    temperature = draw(st.sampled_from([0.7, 1.0]))
    return hidden, weight, labels, options, budget, temperature


def _oracle_options(options):
    return options["top_k"], options["top_p"], options["min_p"]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=scaled(25))
@given(case=linear_cases())
def test_linear_sampled_logprobs_match_the_oracle(backend, case):
    hidden, weight, labels, options, budget, temperature = case
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with pk.use_backend(backend):
        logp, log_kept_mass = pk.linear_token_logprobs(h, w, labels, temperature=temperature,
                                                       return_kept_mass=True, memory_budget=budget, **options)
    upstream = torch.rand(logp.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    logp.backward(upstream)
    logits = hidden.double() @ weight.double().t()
    want_logp, want_mass, want_dz = oracle(logits, labels, temperature, *_oracle_options(options))
    clear = ~ambiguous_rows(logits, temperature, *_oracle_options(options))
    assert torch.equal(torch.isinf(logp)[clear], torch.isinf(want_logp)[clear])
    finite = clear & torch.isfinite(want_logp)
    assert_close(logp[finite], want_logp[finite], "logp")
    assert_close(log_kept_mass[clear], want_mass[clear], "log_kept_mass")
    if bool(clear.all()):
        dz = want_dz * upstream.double()[:, None]
        assert_close(h.grad, dz @ weight.double(), "hidden gradient")
        assert_close(w.grad, dz.t() @ hidden.double(), "weight gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_terms_sample_the_policy_logp_only(backend):
    """``linear_token_terms`` with a softcap and a divergence: logp and log_kept_mass as
    ``token_terms`` on the same logits; ``ref_logp``, ``div`` unchanged by the options."""
    gen = torch.Generator().manual_seed(4)
    hidden, ref_hidden = grid((2, 5, HIDDEN), gen), grid((2, 5, HIDDEN), gen)
    weight, ref_weight = grid((901, HIDDEN), gen), grid((901, HIDDEN), gen)
    labels = torch.randint(0, 901, (2, 5), generator=gen)
    labels[0, :2] = (hidden[0, :2] @ weight.t()).argmax(-1)
    options = dict(top_k=30, top_p=0.9, min_p=0.02)
    with pk.use_backend(backend):
        plain = pk.linear_token_terms(hidden, weight, labels, ref_hidden, ref_weight, divergence="js", softcap=2.5,
                                      memory_budget=8000)
        sampled = pk.linear_token_terms(hidden, weight, labels, ref_hidden, ref_weight, divergence="js",
                                        softcap=2.5, memory_budget=8000, return_kept_mass=True, **options)
        logits = 2.5 * torch.tanh((hidden @ weight.t()) / 2.5)
        direct = pk.token_terms(logits, labels, 2.5 * torch.tanh((ref_hidden @ ref_weight.t()) / 2.5),
                                divergence="js", return_kept_mass=True, **options)
    assert torch.equal(plain.ref_logp, sampled.ref_logp) and torch.equal(plain.div, sampled.div)
    assert torch.equal(torch.isinf(sampled.logp), torch.isinf(direct.logp))
    finite = torch.isfinite(direct.logp)
    assert_close(sampled.logp[finite], direct.logp[finite], "logp")
    assert_close(sampled.log_kept_mass, direct.log_kept_mass, "log_kept_mass")
    assert plain.log_kept_mass is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_neutral_options_are_the_plain_path_bit_for_bit(backend):
    gen = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(7, HIDDEN, generator=gen), torch.randn(555, HIDDEN, generator=gen)
    labels = torch.randint(0, 555, (7,), generator=gen)
    results = []
    for options in ({}, dict(top_k=0, top_p=1.0, min_p=0.0)):
        h = hidden.clone().requires_grad_()
        with pk.use_backend(backend):
            logp, entropy = pk.linear_token_logprobs(h, weight, labels, return_entropy=True, memory_budget=9000,
                                                     **options)
        (logp.sum() + entropy.sum()).backward()
        results.append((logp, entropy, h.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_linear_label_outside_the_kept_set_is_minus_infinity_with_a_finite_gradient():
    hidden = torch.eye(HIDDEN)[:2].requires_grad_()
    weight = torch.zeros(300, HIDDEN)
    weight[:HIDDEN] = torch.eye(HIDDEN) * 3
    labels = torch.tensor([0, 0])  # row 0's top-1 is token 0 (kept), row 1's token 1 (label dropped)
    logp = pk.linear_token_logprobs(hidden, weight, labels, top_k=1, memory_budget=4000)
    assert logp[0] == 0.0 and logp[1] == -math.inf
    logp.backward(torch.tensor([1.0, 1.0]))
    assert torch.isfinite(hidden.grad).all()
    # Row 1 keeps token 1 alone: its gradient is -p_K(1) W_1 = -W_1.
    assert torch.equal(hidden.grad[1], -weight[1])
    assert torch.equal(hidden.grad[0], torch.zeros(HIDDEN))
