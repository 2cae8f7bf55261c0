"""``linear_sparse_teacher_divergence`` against a float64 oracle over full logits.

The oracle is TRL's sparse server loss written out in float64 on the explicit logits
``z = logit_scale (h W^T + c)`` (softcap after), ``log_softmax(z / T)``: the student's
log-probs at the teacher's ids, TRL's tail ``log(-expm1(min(lse, -1e-7)))`` on both sides (or
renormalisation over the ids without it), then each divergence from its definition on the
``(k + 1)`` points with ``0 log 0 = 0``. fp32 inputs, H = 16, |z| <~ 10: values agree to
``1e-5`` relative (plus ``1e-7`` absolute), gradients to ``1e-5 max|g|``, on every backend,
with tile sizes drawn at random (memory budgets from one 1 x 16 tile up to the whole problem).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels import DIVERGENCES, linear_sparse_teacher_divergence

from sparse_teacher_oracle import sparse_oracle

BACKENDS = pk.available_backends()


def _case(seed, vocab, k, absent=False, biased=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 4, 16, generator=g)
    weight = torch.randn(vocab, 16, generator=g) * 0.6
    bias = torch.randn(vocab, generator=g) if biased else None
    teacher = torch.randn(3, 4, vocab, generator=g, dtype=torch.float64).mul(2.0).log_softmax(-1)
    lp, ids = teacher.topk(k, dim=-1)
    # The teacher's top-k in a random order, as a server may return it.
    order = torch.argsort(torch.rand(3, 4, k, generator=g), dim=-1)
    ids, lp = ids.gather(-1, order), lp.gather(-1, order).float()
    if absent and k > 1:
        ids[0, 1, -1] = -1
        ids[2, 3, 0] = -1
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False
    return hidden, weight, bias, ids, lp, mask


def _check(backend, divergence, seed, vocab, k, budget, *, temperature=1.0, scale=1.0, softcap=None,
           add_tail=True, absent=False, beta=0.3, alpha=1.7):
    hidden, weight, bias, ids, lp, mask = _case(seed, vocab, k, absent)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with pk.use_backend(backend):
        out = linear_sparse_teacher_divergence(leaves[0], leaves[1], ids, lp, head_bias=leaves[2],
                                               divergence=divergence, beta=beta, alpha=alpha, mask=mask,
                                               temperature=temperature, logit_scale=scale, softcap=softcap,
                                               add_tail=add_tail, memory_budget=budget)
        upstream = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed + 1))
        (out * upstream).sum().backward()
    expected, oracle_leaves = sparse_oracle(hidden, weight, bias, ids, lp, mask, divergence=divergence, beta=beta,
                                      alpha=alpha, temperature=temperature, scale=scale, softcap=softcap,
                                      add_tail=add_tail)
    (expected * upstream.double()).sum().backward()
    assert out.dtype == torch.float32 and out.shape == (3, 4)
    assert out[1, 2].item() == 0.0
    tolerance = 1e-5 * (1 + expected.abs()) + 1e-7
    assert ((out.double() - expected.detach()).abs() <= tolerance).all(), (out, expected)
    for name, ours, oracle in zip(("hidden", "weight", "bias"), leaves, oracle_leaves):
        g, g_ref = ours.grad.double(), oracle.grad
        assert (g - g_ref).abs().max().item() <= 1e-5 * g_ref.abs().max().item() + 1e-12, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_on_every_backend(backend, divergence):
    # A 1200-byte budget: tiles of 1 x 288 and 1 x 13.
    _check(backend, divergence, seed=DIVERGENCES.index(divergence), vocab=301, k=4, budget=1200)


@pytest.mark.parametrize("seed", range(6))
def test_random_tiles_and_options(seed):
    rng = random.Random(seed)
    vocab = rng.choice([37, 500, 1237])
    k = rng.choice([1, 2, 5, 9])
    budget = rng.choice([4 * 16 + 64, 4 * 200 * 7, 1 << 22]) + rng.randrange(64)
    _check("auto", rng.choice(("forward_kl", "reverse_kl", "js")), seed, vocab, k, budget,
           temperature=rng.choice([1.0, 0.7, 1.6]), scale=rng.choice([1.0, 0.5]), softcap=rng.choice([None, 4.0]),
           absent=seed % 2 == 1)


@pytest.mark.parametrize("divergence", ["forward_kl", "js", "alpha"])
def test_without_tail_renormalises_over_the_ids(divergence):
    _check("auto", divergence, seed=11, vocab=211, k=5, budget=None, add_tail=False, absent=True, temperature=0.8)


def test_floored_tail_matches_trl_clamp():
    # One id holds all but ~1e-9 of the student's mass: its tail is floored at log(1e-7), no gradient.
    hidden = torch.zeros(1, 4)
    hidden[0, 0] = 1.0
    weight = torch.zeros(50, 4)
    weight[7, 0] = 25.0
    ids, lp = torch.tensor([[7]]), torch.tensor([[-0.5]])
    h = hidden.clone().requires_grad_()
    out = linear_sparse_teacher_divergence(h, weight, ids, lp, divergence="forward_kl")
    out.sum().backward()
    lp_s = -math.log1p(49 * math.exp(-25.0))
    floor = math.log(-math.expm1(-1e-7))
    t_tail = math.log(-math.expm1(-0.5))
    expected = math.exp(-0.5) * (-0.5 - lp_s) + math.exp(t_tail) * (t_tail - floor)
    assert out.item() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(h.grad).all()


def test_half_precision_head_gradient_is_rounded_once():
    hidden, weight, bias, ids, lp, mask = _case(5, 333, 3)
    fp32 = [x.clone().requires_grad_() for x in (hidden, weight)]
    half = [x.to(torch.bfloat16).requires_grad_() for x in (hidden, weight)]
    for h, w in (fp32, half):
        linear_sparse_teacher_divergence(h, w, ids, lp, mask=mask, memory_budget=4096).sum().backward()
    assert half[1].grad.dtype == torch.bfloat16
    assert (half[1].grad.float() - fp32[1].grad).abs().max() <= 0.05 * fp32[1].grad.abs().max()


def _bad_input_args():
    hidden, weight, bias, ids, lp, mask = _case(9, 40, 3)
    return dict(hidden=hidden, head_weight=weight, teacher_ids=ids, teacher_logprobs=lp, mask=mask)


def _with_ids(edit):
    def change(args):
        args["teacher_ids"] = args["teacher_ids"].clone()
        edit(args["teacher_ids"])
    return change


def _with_logprobs(edit):
    def change(args):
        args["teacher_logprobs"] = args["teacher_logprobs"].clone()
        edit(args["teacher_logprobs"])
    return change


BAD_INPUTS = {
    "id above the vocabulary": (_with_ids(lambda ids: ids[0, 0].fill_(40)), "teacher_ids must lie in"),
    "negative id other than -1": (_with_ids(lambda ids: ids[2, 1, 0].fill_(-2)), "teacher_ids must lie in"),
    "duplicate id": (_with_ids(lambda ids: ids[1, 1, 2].copy_(ids[1, 1, 0])), "teacher_ids must not repeat"),
    "k = 0": (lambda a: a.update(teacher_ids=a["teacher_ids"][..., :0],
                                 teacher_logprobs=a["teacher_logprobs"][..., :0]), "k >= 1"),
    "float ids": (lambda a: a.update(teacher_ids=a["teacher_ids"].float()), "teacher_ids must be an integer"),
    "log-prob above 0": (_with_logprobs(lambda lp: lp[0, 0, 0].fill_(0.01)), "teacher_logprobs must be log-prob"),
    "log-probs summing above 1": (_with_logprobs(lambda lp: lp.fill_(-0.5)), "teacher_logprobs must be log-prob"),
    "NaN log-prob": (_with_logprobs(lambda lp: lp[2, 2, 1].fill_(math.nan)), "teacher_logprobs must not be NaN"),
    "log-probs of another shape": (lambda a: a.update(teacher_logprobs=a["teacher_logprobs"][..., :2]),
                                   "teacher_logprobs must have teacher_ids' shape"),
    "ids of another leading shape": (lambda a: a.update(teacher_ids=a["teacher_ids"][:2],
                                                        teacher_logprobs=a["teacher_logprobs"][:2]),
                                     "teacher_ids must have shape"),
    "mismatched vocabularies": (lambda a: a.update(teacher_vocab_size=41), "teacher_vocab_size must equal"),
    "mask of another shape": (lambda a: a.update(mask=a["mask"][0]), "mask must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case):
    edit, match = BAD_INPUTS[case]
    args = _bad_input_args()
    edit(args)
    hidden, weight, ids, lp = (args.pop(name) for name in ("hidden", "head_weight", "teacher_ids", "teacher_logprobs"))
    with pytest.raises((ValueError, TypeError), match=match):
        linear_sparse_teacher_divergence(hidden, weight, ids, lp, **args)


def test_rounding_above_zero_is_accepted_and_masked_rows_are_not_checked():
    args = _bad_input_args()
    lp = args["teacher_logprobs"].clone()
    lp[0, 0] = torch.tensor([5e-5, -math.inf, -math.inf])  # within LOGPROB_TOLERANCE of a log-probability
    ids = args["teacher_ids"].clone()
    ids[1, 2] = 10_000  # a masked token's ids are never read
    out = linear_sparse_teacher_divergence(args["hidden"], args["head_weight"], ids, lp, mask=args["mask"])
    assert torch.isfinite(out).all() and out[1, 2] == 0


def test_no_tensor_of_tokens_by_vocabulary():
    # Every tensor the forward and backward create, recorded at the dispatcher: none is [N, V].
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(x, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, x.numel())
            return out

    tokens, vocab, hidden_size = 64, 2000, 8
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(tokens, hidden_size, generator=g, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=g, requires_grad=True)
    lp, ids = torch.randn(tokens, vocab, generator=g).log_softmax(-1).topk(8, dim=-1)
    with LargestTensor():
        linear_sparse_teacher_divergence(hidden, weight, ids, lp, divergence="js", memory_budget=64 * 1024
                                         ).sum().backward()
    assert vocab * hidden_size <= LargestTensor.largest < tokens * vocab // 4


@pytest.mark.parametrize("add_tail", [True, False])
def test_entropy_of_the_full_student_distribution(add_tail):
    hidden, weight, bias, ids, lp, mask = _case(7, 1237, 5, absent=True)
    div, entropy = linear_sparse_teacher_divergence(hidden, weight, ids, lp, head_bias=bias, mask=mask,
                                                    temperature=0.7, softcap=4.0, add_tail=add_tail,
                                                    return_entropy=True, memory_budget=4096)
    z = hidden.double() @ weight.double().t() + bias.double()
    log_p = (4.0 * torch.tanh(z / 4.0) / 0.7).log_softmax(-1)
    expected = torch.where(mask, -(log_p.exp() * log_p).sum(-1), 0.0)
    assert not entropy.requires_grad
    assert ((entropy.double() - expected).abs() <= 1e-5 * (1 + expected.abs())).all()
    # Without the tail, asking for the entropy takes the tiled path instead of the gathered rows.
    alone = linear_sparse_teacher_divergence(hidden, weight, ids, lp, head_bias=bias, mask=mask, temperature=0.7,
                                             softcap=4.0, add_tail=add_tail, memory_budget=4096)
    torch.testing.assert_close(div, alone, rtol=1e-5, atol=1e-7)
