"""The fused linear ops' extras (TRL's ``mean_logits``, ``is_top1``, ``log_sum_sq_probs``):
values against float64, ``is_top1`` at exact ties across tiles, and the structure of the return
value with and without them."""

import pytest
import torch

import prefopt_kernels as pk

from linear_cases import BACKENDS, F64, Call, check, exact_logits, explicit_on, make_head, make_labels, make_pair
from linear_cases import tile_spy  # noqa: F401 - a fixture: pytest finds it among the module's names


@pytest.mark.parametrize("backend", BACKENDS)
def test_extras_values(backend):
    # Logits with a clear top-1 for some labels: the label is set to the argmax in every other row.
    policy = make_head((8,), 32, 200, seed=101, bias=True, softcap=8.0)
    z = exact_logits(policy.root.to(F64), policy.weight.to(F64), policy.bias.to(F64), 1.0, 8.0)
    labels = make_labels((8,), 200, seed=102, ignored=(7,))
    labels[::2] = z.argmax(-1)[::2]
    extras = ("mean_logits", "is_top1", "log_sum_sq_probs")
    for entropy in (False, True):
        _, got, _, exp = check(backend, Call("logprobs", policy, labels, temperature=0.6, return_entropy=entropy,
                                             extras=extras), seed=103, key=("extras", entropy),
                               explicit=explicit_on(backend))
        assert got["is_top1"][::2].all() and not got["is_top1"][7]
    ref = make_head((8,), 24, 200, seed=104)
    _, got, _, _ = check(backend, Call("terms", policy, labels, ref, divergence="tv", return_entropy=True,
                                       extras=("log_sum_sq_probs", "is_top1")), seed=105,
                         key=("extras", "terms"), explicit=explicit_on(backend))
    assert set(got) == {"log_sum_sq_probs", "is_top1"}


def _tie_head(vocab=300, hidden_size=8):
    """Integer-valued hidden states and weights, so every logit is exact in fp32 whatever the
    summation order: rows 40 and 290 of the head are equal and give the largest logit. The
    four tokens share one hidden state, so their rows of logits are identical."""
    g = torch.Generator().manual_seed(111)
    h = torch.randint(-2, 3, (1, hidden_size), generator=g).float().expand(4, -1).clone()
    h[:, 0] = 4.0
    w = torch.randint(-1, 2, (vocab, hidden_size), generator=g).float()
    w[:, 0] = 0.0
    w[[40, 290]] = 0.0
    w[[40, 290], 0] = 10.0  # z = 40 there, |z| <= 2 * 7 = 14 elsewhere
    return h, w


@pytest.mark.parametrize("budget", [None, 1000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_is_top1_first_argmax_tie(backend, budget, tile_spy):
    """is_top1 is True only for the FIRST maximum: label 40 yes, its exact twin 290 no, 41 no;
    with a small budget the twins fall in different vocabulary tiles."""
    h, w = _tie_head()
    z = h @ w.T
    assert z[:, 40].eq(z.max(-1).values).all() and z[:, 290].eq(z[:, 40]).all()
    labels = torch.tensor([40, 290, 41, -100])
    with pk.use_backend(backend):
        logp, extras = pk.linear_token_logprobs(h, w, labels, extras=("is_top1",), memory_budget=budget)
    assert extras["is_top1"].tolist() == [True, False, False, False]
    assert logp[0] == logp[1]  # the twins have the same probability
    if budget is not None:
        (_, vocab, *_), (_, v) = tile_spy[0]
        assert v <= 290 and 40 // v != 290 // v, "the twins must be in different tiles"


def test_extras_structure():
    policy, ref = make_pair((5,), seed=121)
    labels = make_labels((5,), 300, seed=122)
    h, w = policy.root, policy.weight
    assert isinstance(pk.linear_token_logprobs(h, w, labels), torch.Tensor)
    out = pk.linear_token_logprobs(h, w, labels, extras=["is_top1"])  # a list is accepted too
    assert isinstance(out, tuple) and len(out) == 2 and list(out[1]) == ["is_top1"]
    out = pk.linear_token_logprobs(h, w, labels, return_entropy=True, extras=("log_sum_sq_probs", "mean_logits"))
    assert len(out) == 3 and isinstance(out[2], dict) and set(out[2]) == {"log_sum_sq_probs", "mean_logits"}
    assert out[0].shape == out[1].shape == (5,)
    terms = pk.linear_token_terms(h, w, labels, ref.root, ref.weight)
    assert isinstance(terms, pk.TokenTerms) and terms.entropy is None
    terms, extras = pk.linear_token_terms(h, w, labels, ref.root, ref.weight, return_entropy=True,
                                          extras=("mean_logits",))
    assert isinstance(terms, pk.TokenTerms) and terms.entropy is not None and set(extras) == {"mean_logits"}
    assert extras["mean_logits"].dtype == torch.float32 and extras["mean_logits"].shape == (5,)
