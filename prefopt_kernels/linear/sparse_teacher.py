r"""Distillation from a teacher known only by its top-k log-probabilities per token.

A served teacher (vLLM) returns, per position, ``k`` token ids and their log-probabilities. TRL's
server distillation compares the student with it on ``k + 1`` points: the ``k`` ids and a tail
bucket holding the rest of the mass, ``log(1 - sum_k exp(lp_k))``. Here the student's side comes
from its hidden states and LM head in vocabulary tiles, never an ``[N, V]`` tensor:

* forward, one tiled pass: per row the log-sum-exp of the logits outside the ids (``lse_rest``),
  and the logits at the ids; then ``L = logaddexp(lse_rest, lse(ids))`` is the full
  log-normaliser, ``s_k = u_{id_k} - L`` and the tail ``s_tail = lse_rest - L`` (the complement is
  summed directly, so a tail of ``1e-7`` keeps its accuracy where ``1 - sum exp`` would not);
* the divergence between the two ``(k + 1)``-point distributions is
  :func:`prefopt_kernels.token_divergence` on the log-probabilities, so every backend and all seven
  divergences apply;
* backward, one tiled pass: with ``g_k = dD/ds_k``, ``g_r = dD/ds_tail`` and ``G = sum g``, the
  gradient of the tempered logit ``u_j`` is ``g_k - G p_j`` at an id and
  ``p_j (g_r e^{L - lse_rest} - G)`` elsewhere: the tail's share spread over the vocabulary.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..checks import check_budget, check_head, check_hidden, check_temperature, head_spec
from ..ops import token_divergence
from .heads import FP32, Head, accumulate
from .tiles import TilePlan, fp32_tile_count

# TRL's ``_add_tail_bucket`` clamps the top-k log-mass at -1e-7, so a tail is never below this.
TAIL_FLOOR = math.log(-math.expm1(-1e-7))
# Teacher log-probabilities may exceed 0 (and their log-sum 0) by this much: fp32 rounding of a
# log-softmax whose logits reach ~1e3 in magnitude (ulp(1e3) = 6e-5) stays below it.
LOGPROB_TOLERANCE = 1e-4
# The id of an absent entry (TRL's top-1 path drops the sampled token where it is the top-1).
ABSENT_ID = -1


def teacher_sparse_logprobs(teacher_logprobs: torch.Tensor, present: torch.Tensor, add_tail: bool) -> torch.Tensor:
    """The teacher's ``[n, k (+1)]`` log-probabilities: TRL's tail ``log(-expm1(min(lse, -1e-7)))``
    appended (in float64, rounded once), or renormalised over the ids without the tail; absent -inf."""
    lp = torch.where(present, teacher_logprobs.double(), -math.inf)
    log_mass = torch.logsumexp(lp, dim=-1, keepdim=True)
    if not add_tail:
        return (lp - log_mass).float()
    tail = torch.log(-torch.expm1(log_mass.clamp(max=-1e-7)))
    return torch.cat([lp, tail], dim=-1).float()


def _ids_in_tile(ids: torch.Tensor, present: torch.Tensor, v0: int, v1: int):
    """``(column, inside)``: each id's column in the tile ``[v0, v1)`` (clamped) and whether it lies there."""
    local = ids - v0
    inside = present & (local >= 0) & (local < v1 - v0)
    return local.clamp(0, v1 - v0 - 1), inside


def _forward(ctx, h, weight, bias, ids, spec, temperature, budget, want_entropy):
    """The forward tile pass (see the module docstring); saves what the backward needs on ``ctx``.
    With ``want_entropy`` also ``H(p)`` of the full tempered distribution, from ``sum_j p_j u_j``
    accumulated beside the normaliser (one temporary tile per tile)."""
    head = Head(weight, bias, spec)
    n, k = ids.shape
    present = ids != ABSENT_ID
    plan = TilePlan([head], n, weight.shape[0], budget, (), backward=False)
    h_gemm = h.to(head.gemm_dtype).contiguous()
    u_ids = torch.full((n, k), -math.inf, dtype=FP32, device=h.device)
    rest_max = torch.full((n,), -math.inf, dtype=FP32, device=h.device)
    rest_sum = torch.zeros(n, dtype=FP32, device=h.device)
    rest_xsum = torch.zeros(n, dtype=FP32, device=h.device)  # sum e^(u - max) (u - max) off the ids
    for t0, t1 in plan.token_ranges:
        for v0, v1 in plan.vocab_ranges:
            u = plan.project(head, h_gemm[t0:t1], v0, v1, 0).mul_(1.0 / temperature)
            column, inside = _ids_in_tile(ids[t0:t1], present[t0:t1], v0, v1)
            u_ids[t0:t1] = torch.where(inside, u.gather(1, column), u_ids[t0:t1])
            # -inf at the ids (adding 0 elsewhere): what remains is the tail's part of the tile.
            u.scatter_add_(1, column, torch.where(inside, -math.inf, 0.0))
            old_max = rest_max[t0:t1]
            new_max = torch.maximum(old_max, u.amax(dim=1))
            shift = torch.where(new_max == -math.inf, 0.0, new_max)
            rescale = torch.exp(old_max - shift)
            if want_entropy:
                moved = torch.where(old_max == -math.inf, 0.0, old_max - shift)
                rest_xsum[t0:t1].add_(moved * rest_sum[t0:t1]).mul_(rescale)
            e = u.sub_(shift[:, None]).exp_()
            rest_sum[t0:t1].mul_(rescale).add_(e.sum(1))
            if want_entropy:
                rest_xsum[t0:t1].add_(torch.xlogy(e, e).sum(1))
            rest_max[t0:t1] = new_max
    lse_rest = rest_max + torch.log(rest_sum)
    log_norm = torch.logaddexp(lse_rest, torch.logsumexp(u_ids, dim=1))
    s_ids = u_ids - log_norm[:, None]
    tail = lse_rest - log_norm
    floored = tail < TAIL_FLOOR
    entropy = torch.zeros(n, dtype=FP32, device=h.device)
    if want_entropy:
        # H = L - sum_j p_j u_j, the sum split into the rest (relative to its max) and the ids.
        rest_max_safe = torch.where(rest_max == -math.inf, 0.0, rest_max)
        rest_mean = torch.exp(rest_max_safe - log_norm) * (rest_xsum + rest_max_safe * rest_sum)
        at_ids = torch.where(s_ids > -math.inf, s_ids.exp() * u_ids, 0.0).sum(1)
        entropy = log_norm - rest_mean - at_ids
    ctx.save_for_backward(h, weight, bias, ids, s_ids, log_norm, lse_rest, floored)
    ctx.spec, ctx.temperature, ctx.budget = spec, temperature, budget
    ctx.mark_non_differentiable(entropy)
    return torch.cat([s_ids, tail.clamp(min=TAIL_FLOOR)[:, None]], dim=1), entropy


def _backward(ctx, grad, _entropy_grad):
    """The backward tile pass: the gradients of ``h``, ``weight`` and ``bias`` (the entropy has none)."""
    h, weight, bias, ids, s_ids, log_norm, lse_rest, floored = ctx.saved_tensors
    head = Head(weight, bias, ctx.spec)
    inv_t = 1.0 / ctx.temperature
    needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    present = ids != ABSENT_ID
    grad = grad.float()
    g_ids = torch.where(present, grad[:, :-1], 0.0)
    # TRL's clamp passes no gradient to a floored tail.
    g_tail = torch.where(floored, 0.0, grad[:, -1])
    total = g_ids.sum(1) + g_tail
    tail_share = torch.where(g_tail == 0, 0.0, g_tail * torch.exp(log_norm - lse_rest))
    # dL/du_j = p_j * rest_coef off the ids; at an id, g_k - total p_j = p_j rest_coef + id_fix.
    rest_coef = (tail_share - total) * inv_t
    id_fix = (g_ids - s_ids.exp() * tail_share[:, None]) * inv_t
    n = ids.shape[0]
    plan = TilePlan([head], n, weight.shape[0], ctx.budget, (), backward=True, weight_grad=needs_weight)
    separate = fp32_tile_count([head], True) > 1
    h_gemm = h.to(head.gemm_dtype).contiguous()
    h_wide = h_gemm.float() if head.widened else h_gemm
    grad_h = torch.zeros((n, h.shape[1]), dtype=FP32, device=h.device) if needs_hidden else None
    grad_w = None
    if needs_weight:
        # An fp32 head accumulates in its output; a half one per vocabulary chunk, cast in once.
        grad_w = (torch.zeros if weight.dtype == FP32 else torch.empty)(weight.shape, dtype=weight.dtype,
                                                                        device=h.device)
    grad_b = torch.zeros(bias.shape, dtype=FP32, device=h.device) if needs_bias else None
    for v0, v1 in plan.vocab_ranges:
        w_gemm = head.weight_chunk(v0, v1)
        w_wide = w_gemm.float() if head.widened else w_gemm
        weight_acc = None
        if grad_w is not None:
            weight_acc = grad_w[v0:v1] if weight.dtype == FP32 else plan.weight_grad(v1 - v0).zero_()
        for t0, t1 in plan.token_ranges:
            z = plan.project(head, h_gemm[t0:t1], v0, v1, 0, w_gemm)
            dz = plan.tile(1, t1 - t0, v1 - v0) if separate else z
            torch.mul(z, inv_t, out=dz).sub_(log_norm[t0:t1, None]).exp_().mul_(rest_coef[t0:t1, None])
            column, inside = _ids_in_tile(ids[t0:t1], present[t0:t1], v0, v1)
            dz.scatter_add_(1, column, torch.where(inside, id_fix[t0:t1], 0.0))
            dz = head.pre_transform_grad(dz, z)
            dz_gemm = head.gemm_operand(dz)
            if head.widened:
                dz_gemm = dz_gemm.float()
            if grad_h is not None:
                accumulate(grad_h[t0:t1], dz_gemm, w_wide)
            if weight_acc is not None:
                accumulate(weight_acc, dz_gemm.t(), h_wide[t0:t1])
            if grad_b is not None:
                grad_b[v0:v1].add_(dz.sum(0))
        if weight_acc is not None and weight.dtype != FP32:
            grad_w[v0:v1].copy_(weight_acc)
    return (None if grad_h is None else grad_h.to(h.dtype), grad_w,
            None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


class SparseStudentLogprobs(torch.autograd.Function):
    """The student's ``[n, k + 1]`` log-probabilities at the ids and the tail, from kept rows ``h`` ``[n, H]``,
    and (``want_entropy``; else zeros) the entropy ``[n]`` of its full distribution, not differentiable."""

    @staticmethod
    def forward(ctx, h, weight, bias, ids, spec, temperature, budget, want_entropy):
        # The tiles are fp32 and the GEMM dtype is in ``spec``: autocast must not recast them.
        with torch.autocast(h.device.type, enabled=False):
            return _forward(ctx, h, weight, bias, ids, spec, temperature, budget, want_entropy)

    @staticmethod
    def backward(ctx, grad, entropy_grad):
        with torch.autocast(grad.device.type, enabled=False):
            return _backward(ctx, grad, entropy_grad)


def _gathered_student_logprobs(h, weight, bias, ids, spec, temperature):
    """The student renormalised over the ids alone (no tail): only the ``k`` rows of the head are read."""
    present = ids != ABSENT_ID
    rows = weight[ids.clamp(min=0)].to(spec.compute_dtype)
    z = torch.einsum("nh,nkh->nk", h.to(spec.compute_dtype), rows).float()
    if bias is not None:
        z = z + bias[ids.clamp(min=0)].float()
    z = z * spec.scale
    if spec.softcap is not None:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    u = torch.where(present, z / temperature, -math.inf)
    return u - torch.logsumexp(u, dim=1, keepdim=True)


def check_teacher(teacher_ids, teacher_logprobs, hidden: torch.Tensor, vocab: int, teacher_vocab_size) -> None:
    """Shapes, dtypes and devices of the teacher's top-k; its vocabulary against the head's."""
    integer = isinstance(teacher_ids, torch.Tensor) and not teacher_ids.dtype.is_floating_point and \
        not teacher_ids.dtype.is_complex and teacher_ids.dtype != torch.bool
    if not integer:
        got = teacher_ids.dtype if isinstance(teacher_ids, torch.Tensor) else type(teacher_ids).__name__
        raise TypeError(f"teacher_ids must be an integer torch.Tensor; got {got}")
    lead = tuple(hidden.shape[:-1])
    if teacher_ids.dim() != hidden.dim() or tuple(teacher_ids.shape[:-1]) != lead or teacher_ids.shape[-1] < 1:
        raise ValueError(f"teacher_ids must have shape [..., k] with [...] = hidden's {lead} and k >= 1; "
                         f"got {tuple(teacher_ids.shape)}")
    if not isinstance(teacher_logprobs, torch.Tensor) or not teacher_logprobs.dtype.is_floating_point:
        raise TypeError("teacher_logprobs must be a floating-point torch.Tensor")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(f"teacher_logprobs must have teacher_ids' shape {tuple(teacher_ids.shape)}; "
                         f"got {tuple(teacher_logprobs.shape)}")
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if x.device != hidden.device:
            raise ValueError(f"{name} must be on the device of hidden ({hidden.device}); got {x.device}")
    if teacher_vocab_size is not None and teacher_vocab_size != vocab:
        raise ValueError(f"teacher_vocab_size must equal the student head's vocabulary V = {vocab}; "
                         f"got {teacher_vocab_size!r}")


def check_teacher_values(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> None:
    """The kept rows' ids in ``[0, V)`` (or ``-1``, absent), no id twice in a row, log-probs at most
    :data:`LOGPROB_TOLERANCE` (each and their log-sum) and not NaN. One host sync."""
    present = ids != ABSENT_ID
    ordered = ids.sort(dim=1).values
    lp = torch.where(present, logprobs.double(), -math.inf)
    bad = torch.stack([
        ((ids < ABSENT_ID) | (ids >= vocab)).any(),
        ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != ABSENT_ID)).any(),
        torch.isnan(lp).any(),
        (lp > LOGPROB_TOLERANCE).any() | (torch.logsumexp(lp, dim=1) > LOGPROB_TOLERANCE).any(),
    ]).tolist()
    if bad[0]:
        raise ValueError(f"teacher_ids must lie in [0, {vocab}) (or be {ABSENT_ID}, absent) at kept tokens")
    if bad[1]:
        raise ValueError("teacher_ids must not repeat an id within a token's top-k")
    if bad[2]:
        raise ValueError("teacher_logprobs must not be NaN at kept tokens")
    if bad[3]:
        raise ValueError(f"teacher_logprobs must be log-probabilities: each, and their log-sum over a token's "
                         f"top-k, at most {LOGPROB_TOLERANCE:g} (fp32 rounding) at kept tokens")


def linear_sparse_teacher_divergence(hidden, head_weight, teacher_ids, teacher_logprobs, *, head_bias=None,
                                     divergence: str = "forward_kl", beta: float = 0.5, alpha: float = 0.5,
                                     mask=None, temperature: float = 1.0, logit_scale: float = 1.0, softcap=None,
                                     add_tail: bool = True, teacher_vocab_size: Optional[int] = None,
                                     return_entropy: bool = False, memory_budget: Optional[int] = None):
    r"""Per-token ``D_f(s, t)`` between the student and a top-k teacher on ``k + 1`` points, in tiles.

    The student's logits ``z`` are those of :func:`prefopt_kernels.linear_token_logprobs`
    (``logit_scale``, ``softcap``, bias), tempered: ``log p = log_softmax(z / T)``. Over the
    support of the ``k`` ids: ``s_k = log p(id_k)`` and ``t_k = teacher_logprobs[k]``; with
    ``add_tail`` (TRL's ``loss_add_tail``) each side gets a ``(k + 1)``-th point, TRL's tail
    bucket ``log(1 - sum_k exp(x_k))`` with the top-k log-mass clamped at ``-1e-7`` (so a tail is
    at least ``log(1e-7)``, and a floored tail passes no gradient, as TRL's clamp); the student's
    is summed over the vocabulary outside the ids, not formed as ``1 - sum``. Without ``add_tail``
    both sides are renormalised over the ids. The result is
    :func:`prefopt_kernels.token_divergence` of the student (policy ``p``) from the teacher
    (reference ``q``) on those points: ``forward_kl = KL(t || s)`` is TRL's ``beta = 0``,
    ``reverse_kl`` its ``beta = 1``, ``js(beta)`` its generalised JSD, plus ``tv``,
    ``hellinger``, ``chi2`` and ``alpha``. The student's points are renormalised by that op,
    which changes nothing unless the tail is floored (then by at most 1e-7 relative).

    Args:
        hidden: ``[..., H]`` the student's hidden states (fp32, bf16, fp16).
        head_weight, head_bias: the student's LM head ``[V, H]`` and optional ``[V]``.
        teacher_ids: ``[..., k]`` integer ids in ``[0, V)``, ``k >= 1``, no id twice in a
            token; ``-1`` marks an absent entry (its teacher log-prob is ignored; the
            student's mass there stays in the tail).
        teacher_logprobs: ``[..., k]`` float log-probabilities (``-inf`` allowed); values above
            ``1e-4`` (beyond fp32 rounding), or whose log-sum is, raise.
        divergence, beta, alpha: as :func:`prefopt_kernels.token_divergence`.
        mask: optional ``[...]``; tokens where it is 0 (or False) are dropped before any
            matmul, get 0 and are not checked.
        temperature, logit_scale, softcap, memory_budget: as
            :func:`prefopt_kernels.linear_token_logprobs`; the temperature acts on the student
            only (the teacher's log-probs come tempered as served).
        add_tail: append the tail bucket (TRL's default); without it the head's rows at the
            ids alone are read, and a token whose ids are all absent gets 0.
        teacher_vocab_size: the teacher's vocabulary, if known: it must equal ``V``.
        return_entropy: also return the entropy ``H(p)`` of the student's full tempered
            distribution (not differentiable); the tiled pass then runs without ``add_tail`` too.

    Returns:
        fp32 ``[...]`` per-token divergence, or ``(divergence, entropy)``; 0 at masked tokens;
        gradients reach ``hidden``, ``head_weight`` and ``head_bias`` (the tail's share spread
        over the whole vocabulary in the backward's tiles).
    """
    check_hidden(hidden, "hidden")
    check_head(hidden, head_weight, head_bias, "", None, False)
    vocab = head_weight.shape[0]
    check_teacher(teacher_ids, teacher_logprobs, hidden, vocab, teacher_vocab_size)
    temperature = check_temperature(temperature)
    budget = check_budget(memory_budget)
    for name, flag in (("add_tail", add_tail), ("return_entropy", return_entropy)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {flag!r:.60}")
    spec = head_spec(hidden, head_bias, logit_scale, softcap, "")
    k = teacher_ids.shape[-1]
    lead = tuple(hidden.shape[:-1])
    if mask is None:
        index = torch.arange(math.prod(lead), device=hidden.device)
    else:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != lead or mask.device != hidden.device:
            raise ValueError(f"mask must be a tensor of shape {lead} on {hidden.device}")
        index = (mask.reshape(-1) != 0).nonzero().squeeze(1)
    ids = teacher_ids.reshape(-1, k).index_select(0, index).long()
    logprobs = teacher_logprobs.reshape(-1, k).index_select(0, index)
    check_teacher_values(ids, logprobs, vocab)
    out = torch.zeros(lead, dtype=FP32, device=hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    entropy = None
    if add_tail or return_entropy:
        student, entropy = SparseStudentLogprobs.apply(h, head_weight, head_bias, ids, spec, temperature, budget,
                                                       return_entropy)
        if not add_tail:
            at_ids = student[:, :-1]
            student = at_ids - torch.logsumexp(at_ids, dim=1, keepdim=True)
    else:
        student = _gathered_student_logprobs(h, head_weight, head_bias, ids, spec, temperature)
    teacher = teacher_sparse_logprobs(logprobs, ids != ABSENT_ID, add_tail)
    if not add_tail:
        # Without a tail a token whose ids are all absent has no distribution: it contributes 0, as in TRL.
        has_support = (ids != ABSENT_ID).any(dim=1, keepdim=True)
        student = torch.where(has_support, student, 0.0)
        teacher = torch.where(has_support, teacher, 0.0)
    div = token_divergence(student.contiguous(), teacher.contiguous(), divergence=divergence, beta=beta,
                           alpha=alpha)
    div = out.reshape(-1).index_put((index,), div).reshape(lead)
    if not return_entropy:
        return div
    return div, out.reshape(-1).index_put((index,), entropy).reshape(lead)
