r"""How far two DPO trainers' logged values may differ by fp32 rounding: a bound, not a measurement.

The parity tests run TRL 1.16's own ``DPOTrainer._compute_loss`` twice, once on TRL's fused LM
head and once on ours. A logged value ``X`` (a reward, a margin, the loss, ...) is formed from
the heads' per-token outputs ``f_t`` (label log-prob, entropy, mean logit, ``log Σ p²``), so

    |X_ours - X_TRL| <= Σ_t |∂X/∂f_t| e_t  +  2 γ_K (|X| + Σ_t |∂X/∂f_t| (|f_t| + 1))     (*)

to first order (the second-order term, ~e², is below 1e-8 here). ``e_t`` bounds how far the two
heads' ``f_t`` can be apart:

    e_t = ε_t(our head's inputs) + ε_t(TRL's head's inputs) + |f_t(ours' inputs) - f_t(TRL's inputs)|,

each head's worst-case rounding ``ε_t`` below plus the exact (float64) difference of the heads'
inputs: from the second step on, the runs' parameters differ by the earlier steps' rounding,
and so do the hidden states and head weights each head is given. (So the logged values are
compared for the parameters each run had; whether those agree is for the tests' gradient and
parameter checks to say.) The second term of (*) is
each run's own fp32 arithmetic forming ``X``: ``K`` roundings (every reduction over at most
the batch's label positions, plus at most ``FORMING_OPS`` further operations), each a
relative perturbation of at most ``u`` of an intermediate that is, up to O(1) nonlinear
factors, linear in the ``f_t``; ``|X|`` covers the last operations. ``∂X/∂f_t`` is written out
for the metrics (sums and means) and taken by autograd from TRL's own ``_compute_loss`` for
the loss. A value of magnitude ~10 formed as a difference (a reward is ``β(Σ logp - Σ ref
logp)``) thus gets an absolute tolerance proportional to the magnitudes summed, not to the
difference.

Per-token rounding of one fp32 head (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., §3.1: a sum or inner product of ``n`` terms in any order errs by at most
``γ_n Σ|terms|``, ``γ_n = n u / (1 - n u)``, ``u = 2^-24``). With ``z = h Wᵀ`` (hidden size H,
vocabulary V; these models have no head bias, logit scale or temperature), ``a_i = Σ_k |h_k
W_ik|`` (>= ``|z_i|``), ``s_i = max z - z_i``, ``p = softmax z``, ``lse = log Σ exp z`` and
``κ = V + Σ_i p_i s_i + C_EXP + 1`` the relative error, in units of u, of the normaliser
``Σ_i exp(-s_i)`` as either head forms it (V - 1 additions; each term's exponent rounded by at
most ``u s_i``, its exp within ``C_EXP u``, weighted by the term's share ``p_i``; one
vocabulary block, V <= 512 being within our CPU kernels' block and TRL's chunk of 32768, so
no online rescaling rounds):

* the GEMM moves each ``z_i`` by at most ``γ_H a_i``, entering ``f`` through ``∂f/∂z``;
* log-prob: ``ε = γ_H (a_y + Σ_i p_i a_i) + u (κ + log V + s_y + |lse| + |logp|)`` (``∂logp/∂z
  = e_y - p``; then the normaliser, its log (of a value in [1, V]), and ``z_y - max z`` and
  ``- log``, or ``max + log`` and ``z_y - lse``);
* entropy ``H = lse - Σ p_i z_i``: ``γ_H Σ_i p_i |z_i - Σ p z| a_i + u (κ + log V + |lse| + |H|
  + Σ_i p_i w_i (V + κ + 2 s_i + C_EXP + 2))``, ``w_i = |z_i| + s_i``: the accumulator ``Σ
  exp(-s_i) x_i`` (``x_i = z_i`` in TRL's head, ``-s_i`` in ours; each term rounded
  relatively by its exponent's, its exp's, ``x_i``'s and the product's errors) divided by the
  normaliser;
* mean logit ``Σ_i z_i / V``: ``γ_H mean_i a_i + γ_V mean_i |z_i|``;
* ``q = log Σ p_i²`` (WPO's weights): ``γ_H Σ_i |2 p_i² / Σp² - 2 p_i| a_i + u (κ_2 + 2κ + 3 log V
  + |q|)``, ``κ_2 = V + 2 Σ_i p_i² s_i / Σp² + 2 C_EXP + 1`` for ``Σ exp(-2 s_i)``.

Under bf16 autocast the bound takes both heads' bf16 logits to be equal bit for bit (each a
dot product of the same bf16 hidden row and head row, rounded once to bf16), leaving the fp32
part above; were one rounded differently, a log-prob would move by ~1e-2 and the test would
fail, not pass wrongly.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from types import SimpleNamespace
from unittest import mock

import torch
from trl import DPOTrainer

U = 2.0 ** -24
# exp within 2 ulp: torch's CPU exp and this package's fast_exp (csrc/include/prefopt/fastmath.h).
C_EXP = 4
# Operations after the reductions that form a logged value from the per-token outputs, at most.
FORMING_OPS = 16
TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


class HeadCapture:
    """The inputs and outputs of every fused-LM-head call of the watched models, by training step.

    ``watch(model)`` before the trainer is built (so ``precompute_ref_log_probs``' pass is seen
    too); ``wrap(trainer)`` after. Each ``_compute_loss`` call opens a step holding its inputs
    and the head calls inside it (the policy's, then the reference's when it runs); calls
    outside a step (the precompute pass) go to ``loose``.
    """

    def __init__(self):
        self.steps, self.loose = [], []
        self._hidden, self._in_step = {}, False

    def watch(self, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # The decoder's final norm gives the last hidden state, the head's input.
        base.get_decoder().norm.register_forward_hook(
            lambda module, args, out: self._hidden.__setitem__(id(model), out.detach()))
        model.register_forward_hook(lambda module, args, kwargs, out: self._record(model, base, kwargs, out),
                                    with_kwargs=True)
        return model

    def _record(self, model, base, kwargs, out):
        if not kwargs.get("fused_lm_head"):
            return
        head = base.get_output_embeddings()
        assert head.bias is None
        call = dict(hidden=self._hidden[id(model)][:, :-1], weight=head.weight.detach().clone(),
                    labels=kwargs["labels"][:, 1:], log_probs=out.log_probs.detach(),
                    log_sum_sq_probs=None if out.log_sum_sq_probs is None else out.log_sum_sq_probs.detach())
        (self.steps[-1]["calls"] if self._in_step else self.loose).append(call)

    def wrap(self, trainer):
        compute = trainer._compute_loss

        def recorded(model, inputs, return_outputs):
            self.steps.append(dict(inputs={k: v.detach().clone() for k, v in inputs.items()}, calls=[]))
            self._in_step = True
            try:
                return compute(model, inputs, return_outputs)
            finally:
                self._in_step = False

        trainer._compute_loss = recorded
        return trainer


def token_bounds(call):
    """``(values, eps, mask)`` per label position of one head call: the exact (float64) outputs of
    its inputs and the worst-case fp32 rounding of each (module docstring); 0 off the labels."""
    h, w, labels = call["hidden"].double(), call["weight"].double(), call["labels"]
    vocab, hidden_size = w.shape
    assert vocab <= 512, "the bound counts no rescaling between vocabulary blocks"
    z, a = h @ w.T, h.abs() @ w.abs().T
    lse = z.logsumexp(-1)
    p = (z - lse[..., None]).exp()
    shift = z.amax(-1, keepdim=True) - z
    y = labels.clamp(min=0)[..., None]
    logp = z.gather(-1, y)[..., 0] - lse
    mean_z = (p * z).sum(-1)
    entropy = lse - mean_z
    p_sq = p * p
    sum_sq = p_sq.sum(-1)
    q = sum_sq.log()
    g_h, log_v = gamma(hidden_size), math.log(vocab)
    kappa = vocab + (p * shift).sum(-1) + C_EXP + 1
    kappa_2 = vocab + 2 * (p_sq * shift).sum(-1) / sum_sq + 2 * C_EXP + 1
    eps = dict(
        logp=g_h * (a.gather(-1, y)[..., 0] + (p * a).sum(-1))
        + U * (kappa + log_v + shift.gather(-1, y)[..., 0] + lse.abs() + logp.abs()),
        entropy=g_h * (p * (z - mean_z[..., None]).abs() * a).sum(-1)
        + U * (kappa + log_v + lse.abs() + entropy.abs()
               + (p * (z.abs() + shift) * (vocab + kappa[..., None] + 2 * shift + C_EXP + 2)).sum(-1)),
        mean=g_h * a.mean(-1) + gamma(vocab) * z.abs().mean(-1),
        q=g_h * ((2 * p_sq / sum_sq[..., None] - 2 * p).abs() * a).sum(-1)
        + U * (kappa_2 + 2 * kappa + 3 * log_v + q.abs()),
    )
    values = dict(logp=logp, entropy=entropy, mean=z.mean(-1), q=q)
    mask = labels != -100
    return ({k: torch.where(mask, v, 0.0) for k, v in values.items()},
            {k: torch.where(mask, v, 0.0) for k, v in eps.items()}, mask)


def _budgets(ours, theirs):
    """``(e, values, mask)`` for a pair of corresponding head calls: ``e`` per output, as in (*)."""
    (v_o, eps_o, mask), (v_s, eps_s, mask_s) = token_bounds(ours), token_bounds(theirs)
    assert torch.equal(mask, mask_s)
    return {k: eps_o[k] + eps_s[k] + (v_o[k] - v_s[k]).abs() for k in eps_o}, v_s, mask


class _Head(torch.nn.Module):
    """Stands in for a model under a fused LM head: returns the given per-token values."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs, log_sum_sq_probs=None):
        super().__init__()
        self.log_probs, self.log_sum_sq_probs = log_probs, log_sum_sq_probs

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                               log_sum_sq_probs=zeros if self.log_sum_sq_probs is None else self.log_sum_sq_probs,
                               aux_loss=None)


def _stand_in(trainer):
    """What TRL's ``compute_ref_log_probs`` and ``_compute_loss`` read of ``trainer``: its loss
    settings, an identity accelerator, and reference sums taken from the inputs."""
    names = ("beta", "loss_types", "loss_weights", "label_smoothing", "f_divergence_type",
             "f_alpha_divergence_coef", "use_weighting", "ld_alpha", "args")
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  autocast=contextlib.nullcontext)
    return SimpleNamespace(**{name: getattr(trainer, name) for name in names}, model=_Head(torch.zeros(1)),
                           ref_model=None, accelerator=accelerator, aux_loss_enabled=False,
                           precompute_ref_logps=True, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)


def _step_tolerances(trainer, ours, theirs, ref_row_budget, logs):
    """Tolerances (*) of one step's logged values, from both runs' captures of that step."""
    assert trainer.ld_alpha is None or 0.0 <= trainer.ld_alpha <= 1.0  # so a token's weight in a sum is <= 1
    trl = _stand_in(trainer)
    inputs = theirs["inputs"]
    e, values, mask = _budgets(ours["calls"][0], theirs["calls"][0])
    policy = theirs["calls"][0]
    x, q = policy["log_probs"].float(), policy["log_sum_sq_probs"]
    pairs = mask.shape[0] // 2
    chosen = torch.zeros_like(mask)
    chosen[:pairs] = True

    def sequence_sums(per_token):  # TRL's own formation of a row's sum (ld_alpha's weights included)
        return torch.cat(DPOTrainer.compute_ref_log_probs(trl, _Head(per_token), inputs)).double()

    sums = sequence_sums(x)
    if len(theirs["calls"]) == 2:
        e_ref, _, _ = _budgets(ours["calls"][1], theirs["calls"][1])
        ref_budget = e_ref["logp"].sum(1)
        ref_sums = sequence_sums(theirs["calls"][1]["log_probs"].float())
    else:  # precomputed reference sums: the budget of the precompute pass's rows
        ref_budget = torch.full((2 * pairs,), ref_row_budget, dtype=torch.float64)
        ref_sums = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).double()
    lengths = mask.sum(1).double()
    magnitudes = dict(logp=x.double().abs() + 1, entropy=values["entropy"].abs() + 1,
                      mean=values["mean"].abs() + 1, q=values["q"].abs() + 1)

    def bound(value, reductions, ref=0.0, **weights):
        weights = {k: torch.where(mask, w, 0.0) for k, w in weights.items()}
        first = sum((w * e[k]).sum() for k, w in weights.items()) + (ref * ref_budget).sum()
        size = abs(value) + sum((w * magnitudes[k]).sum() for k, w in weights.items()) \
            + (ref * (ref_sums.abs() + lengths)).sum()
        return float(first + 2 * gamma(reductions + FORMING_OPS) * size)

    rows_ops = mask.shape[1] + 2 * pairs  # a row's sum, then a mean over the batch
    tokens_ops = mask.numel()  # a mean over every label position of the batch
    beta, side = trainer.beta, chosen.any(1).double()
    tolerances = {}
    for key, rows, ref_rows in (("chosen", chosen, side), ("rejected", mask & ~chosen, 1 - side)):
        tolerances[f"logps/{key}"] = bound(logs[f"logps/{key}"], rows_ops, logp=rows / pairs)
        tolerances[f"rewards/{key}"] = bound(logs[f"rewards/{key}"], rows_ops, logp=beta * rows / pairs,
                                             ref=beta * ref_rows / pairs)
        tolerances[f"logits/{key}"] = bound(logs[f"logits/{key}"], tokens_ops, mean=rows / (rows & mask).sum())
    tolerances["rewards/margins"] = bound(logs["rewards/margins"], rows_ops, logp=beta * mask / pairs,
                                          ref=torch.full_like(side, beta / pairs))
    tolerances["entropy"] = bound(logs["entropy"], tokens_ops, entropy=mask / mask.sum())
    # A pair's accuracy can flip only where its margin is within its budget.
    margins = beta * ((sums - ref_sums)[:pairs] - (sums - ref_sums)[pairs:])
    undecided = 0
    for i in range(pairs):
        pair = torch.zeros_like(side)
        pair[[i, i + pairs]] = 1.0
        undecided += int(abs(margins[i]) <= bound(margins[i], rows_ops, logp=beta * pair[:, None] * mask,
                                                  ref=beta * pair))
    tolerances["rewards/accuracies"] = undecided / pairs

    # The loss: its sensitivities by autograd through TRL's own code. WPO's weights are formed
    # under no_grad there; here that block is differentiated too, since the logged loss depends on it.
    leaves = [x.clone().requires_grad_(), ref_sums.float().requires_grad_()]
    if trainer.use_weighting:
        leaves.append(q.float().clone().requires_grad_())
    step_inputs = dict(inputs, ref_chosen_logps=leaves[1][:pairs], ref_rejected_logps=leaves[1][pairs:])
    with mock.patch.object(torch, "no_grad", contextlib.nullcontext):
        loss = DPOTrainer._compute_loss(trl, _Head(leaves[0], leaves[2] if len(leaves) == 3 else None),
                                        step_inputs, False)
    grads = [torch.zeros_like(leaf, dtype=torch.float64) if g is None else g.abs().double()
             for leaf, g in zip(leaves, torch.autograd.grad(loss, leaves, allow_unused=True))]
    tolerances["loss"] = bound(logs["loss"], tokens_ops, logp=grads[0], ref=grads[1],
                               **(dict(q=grads[2]) if len(grads) == 3 else {}))
    return tolerances


def logged_tolerances(trainer, ours: HeadCapture, theirs: HeadCapture, log_history):
    """Per entry of ``log_history`` (one per step, then the summary), the tolerance (*) of each
    logged value formed from the heads' outputs; keys absent have none (compared as exact up to
    ``rel=1e-5``). ``trainer`` is either run's trainer (its loss settings)."""
    assert len(ours.steps) == len(theirs.steps) == len(log_history) - 1
    ref_row_budget = 0.0
    for mine, other in zip(ours.loose, theirs.loose, strict=True):
        e, _, _ = _budgets(mine, other)
        ref_row_budget = max(ref_row_budget, float(e["logp"].sum(1).max()))
    per_step = [_step_tolerances(trainer, mine, other, ref_row_budget, logs)
                for mine, other, logs in zip(ours.steps, theirs.steps, log_history)]
    steps = len(per_step)
    # train_loss: the mean of the steps' losses.
    return per_step + [{"train_loss": sum(t["loss"] for t in per_step) / steps
                        + 2 * gamma(steps + 1) * abs(log_history[-1]["train_loss"])}]


def assert_logs_match(ours, theirs, tolerances):
    """Every logged key but the timings: within its tolerance, or ``rel=1e-5`` (counts, the step,
    the learning rate, the gradient norm, whose tensors are compared on their own)."""
    assert len(ours) == len(theirs) == len(tolerances)
    failed = []
    for step, (a, b, tol) in enumerate(zip(ours, theirs, tolerances)):
        assert a.keys() == b.keys(), step
        for key in sorted(b.keys() - set(TIMING)):
            ok = abs(a[key] - b[key]) <= tol[key] if key in tol else math.isclose(a[key], b[key], rel_tol=1e-5)
            if not ok:
                failed.append((step, key, a[key], b[key], tol.get(key)))
    assert not failed, failed
