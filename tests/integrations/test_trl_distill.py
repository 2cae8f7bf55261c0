"""``PrefOptDistillationTrainer`` against TRL 1.16's ``DistillationTrainer``, and every divergence
of its loss against float64.

* Parity: three plain-SGD steps (lr 0.5, constant) of stock and ours from the same student,
  teacher (wider, biased head), prompts and seed, at temperature 0.7, for TRL's three regimes
  of ``beta`` and with logit scales and soft caps read from the configs. Logged loss and entropy
  agree to ``rel=1e-5``; each step's gradients to ``1e-5 * max|g|`` per parameter; the final
  parameters to ``1e-5 * max|update| + 4 eps max|p|`` (each run rounds ``p + update`` once a step).
* Every divergence: :func:`distillation_loss` on tiny hidden states and heads (V = 67, a token
  masked out) against a float64 oracle over full logits written here from the definitions, loss
  and the student's gradients within ``1e-5`` relative; and a trainer run of each stays finite.
Skipped without TRL (or transformers).
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

import torch  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402

from distill_cases import distill_args, student_and_teacher, train  # noqa: E402
from prefopt_kernels import DIVERGENCES  # noqa: E402
from prefopt_kernels.integrations.trl_distill import (PrefOptDistillationConfig,  # noqa: E402
                                                      PrefOptDistillationTrainer, distillation_loss)
from trl_cases import make_tokenizer  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def _tokenizer():
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


PARITY_CASES = {
    "forward_kl": dict(beta=0.0),
    "jsd": dict(beta=0.3),
    "reverse_kl": dict(beta=1.0),
    "transforms": dict(beta=0.5, student_extra={"final_logit_softcapping": 1.5, "logit_scale": 1.3},
                       teacher_extra={"logits_scaling": 2.0}),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_matches_stock_distillation(tmp_path, case):
    options = dict(PARITY_CASES[case])
    student, teacher = student_and_teacher(options.pop("student_extra", None), options.pop("teacher_extra", None))
    initial = {name: p.detach().clone() for name, p in student.named_parameters()}
    tokenizer = _tokenizer()
    stock = train(DistillationTrainer, distill_args(DistillationConfig, tmp_path / "stock", **options),
                  student, teacher, tokenizer)
    ours = train(PrefOptDistillationTrainer, distill_args(PrefOptDistillationConfig, tmp_path / "ours", **options),
                 student, teacher, tokenizer)
    (stock_logs, stock_grads, stock_params), (our_logs, our_grads, our_params) = stock, ours
    assert len(stock_logs) == len(our_logs) == 4
    for theirs, mine in zip(stock_logs[:3], our_logs[:3]):
        assert mine["loss"] > 0
        for key in ("loss", "entropy", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key
    assert len(stock_grads) == len(our_grads) == 3
    for theirs, mine in zip(stock_grads, our_grads):
        for name, g in theirs.items():
            scale = g.abs().max().item()
            assert scale > 0, name
            assert (mine[name] - g).abs().max().item() <= 1e-5 * scale, name
    for name, p in stock_params.items():
        update = p - initial[name]
        bound = 1e-5 * update.abs().max().item() + 4 * EPS32 * p.abs().max().item()
        assert (our_params[name] - p).abs().max().item() <= bound, name


# --------------------------------------------------------------------------- every divergence vs float64


def _oracle(lp, lq, divergence, beta, alpha):
    """Per-token D_f(p, q) in float64 from full log-probabilities, written from the definitions."""
    p, q = lp.exp(), lq.exp()
    if divergence == "forward_kl":
        return (q * (lq - lp)).sum(-1)
    if divergence == "reverse_kl":
        return (p * (lp - lq)).sum(-1)
    if divergence == "js":
        lm = torch.logaddexp(lq + math.log(beta), lp + math.log(1 - beta))
        return beta * (q * (lq - lm)).sum(-1) + (1 - beta) * (p * (lp - lm)).sum(-1)
    if divergence == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if divergence == "hellinger":
        return ((p.sqrt() - q.sqrt()) ** 2).sum(-1)
    if divergence == "chi2":
        return ((p - q) ** 2 / q).sum(-1)
    assert divergence == "alpha"
    return ((p ** alpha * q ** (1 - alpha)).sum(-1) - 1) / (alpha * (alpha - 1))


class _Config:
    def __init__(self, **fields):
        self.__dict__.update(fields)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_matches_float64(divergence):
    torch.manual_seed(3)
    vocab, temperature, beta, alpha = 67, 0.8, 0.3, 1.7
    student_hidden = torch.randn(2, 5, 16, requires_grad=True)
    teacher_hidden = torch.randn(2, 5, 24)
    student_head, teacher_head = torch.nn.Linear(16, vocab, bias=False), torch.nn.Linear(24, vocab)
    student_config = _Config(final_logit_softcapping=3.0, model_type="llama")
    teacher_config = _Config(logit_scale=1.5, model_type="llama")
    completion_ids = torch.randint(0, vocab, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 0] = 0
    loss, entropy_sum, n_valid = distillation_loss(
        student_hidden, student_head, student_config, teacher_hidden, teacher_head, teacher_config,
        completion_ids, mask, divergence=divergence, beta=beta, alpha=alpha, temperature=temperature)
    loss.backward()
    assert n_valid.item() == 9

    h64 = student_hidden.detach().double().requires_grad_()
    w64 = student_head.weight.detach().double().requires_grad_()
    z = 3.0 * torch.tanh(h64 @ w64.t() / 3.0) / temperature
    z_t = 1.5 * (teacher_hidden.double() @ teacher_head.weight.detach().double().t()
                 + teacher_head.bias.detach().double()) / temperature
    lp, lq = z.log_softmax(-1), z_t.log_softmax(-1)
    per_token = _oracle(lp, lq, divergence, beta, alpha) * mask
    expected = per_token.sum() / 9
    expected.backward()
    entropy = -(lp.exp() * lp).sum(-1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert entropy_sum.item() == pytest.approx((entropy * mask).sum().item(), rel=1e-5)
    for ours, oracle in ((student_hidden.grad, h64.grad), (student_head.weight.grad, w64.grad)):
        assert (ours.double() - oracle).abs().max().item() <= 1e-5 * oracle.abs().max().item()


@pytest.mark.parametrize("divergence", ["tv", "hellinger", "chi2", "alpha"])
def test_other_divergences_train(tmp_path, divergence):
    student, teacher = student_and_teacher()
    initial = {name: p.detach().clone() for name, p in student.named_parameters()}
    args = distill_args(PrefOptDistillationConfig, tmp_path, steps=2, divergence=divergence, divergence_alpha=0.4)
    logs, grads, params = train(PrefOptDistillationTrainer, args, student, teacher, _tokenizer())
    losses = [entry["loss"] for entry in logs[:2]]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert all(torch.isfinite(g).all() for step in grads for g in step.values() if g is not None)
    assert any(not torch.equal(params[name], p) for name, p in initial.items())


@pytest.mark.parametrize("fields, match", [
    (dict(divergence="kl"), "divergence must be None or one of"),
    (dict(divergence="js", beta=1.0), "beta must lie in"),
    (dict(divergence="alpha", divergence_alpha=1.0), "divergence_alpha must"),
    (dict(beta=1.5), "beta must"),  # TRL refuses it first
])
def test_config_rejects_bad_divergences(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        PrefOptDistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **fields)


@pytest.mark.parametrize("beta, expected", [(0.0, ("forward_kl", 0.5)), (1.0, ("reverse_kl", 0.5)),
                                            (0.25, ("js", 0.25))])
def test_trl_beta_maps_to_our_divergences(tmp_path, beta, expected):
    config = PrefOptDistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], beta=beta)
    assert config.loss_divergence()[:2] == expected
