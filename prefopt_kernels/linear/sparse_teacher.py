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

from .. import distributed
from ..checks import check_budget, check_head, check_hidden, check_temperature, head_spec
from ..ops import token_divergence
from .heads import FP32, Head, accumulate
from .sharded_heads import TokensOfAllRanks, local_rows, vocab_shard_group
from .sparse_checks import (ABSENT_ID, LOGPROB_TOLERANCE, check_mask, check_teacher, check_teacher_values,
                            check_teacher_vocab, teacher_shard)
from .tiles import TilePlan, fp32_tile_count

__all__ = ["ABSENT_ID", "LOGPROB_TOLERANCE", "TAIL_FLOOR", "linear_sparse_teacher_divergence",
           "teacher_sparse_logprobs"]

# TRL's ``_add_tail_bucket`` clamps the top-k log-mass at -1e-7, so a tail is never below this.
TAIL_FLOOR = math.log(-math.expm1(-1e-7))


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


def _merge_rest(first, second):
    """The ``(max, sum, xsum)`` of the logits off the ids over two disjoint vocabulary slices, from
    each slice's: the online softmax's rescaling, ``xsum`` (``sum e^(u - max) (u - max)``) shifted
    to the new max as well."""
    new_max = torch.maximum(first[0], second[0])
    shift = torch.where(new_max == -math.inf, 0.0, new_max)
    total, xsum = torch.zeros_like(new_max), torch.zeros_like(new_max)
    for old_max, old_sum, old_xsum in (first, second):
        rescale = torch.exp(old_max - shift)
        moved = torch.where(old_max == -math.inf, 0.0, old_max - shift)
        total += old_sum * rescale
        xsum += (old_xsum + moved * old_sum) * rescale
    return new_max, total, xsum


def _merge_shards(u_ids, rest_max, rest_sum, rest_xsum, group):
    """Every rank's ids' logits and off-id state all-gathered and merged in rank order, so every
    rank holds the same bits: an id's logit comes from the one shard that holds it (-inf elsewhere)."""
    k = u_ids.shape[1]
    packed = torch.cat([u_ids.t(), torch.stack([rest_max, rest_sum, rest_xsum])])
    gathered = distributed.all_gather(packed, group)
    u_ids, rest = gathered[0, :k].t().contiguous(), tuple(gathered[0, k:])
    for part in gathered[1:]:
        u_ids = torch.maximum(u_ids, part[:k].t())
        rest = _merge_rest(rest, tuple(part[k:]))
    return (u_ids,) + rest


def _forward(ctx, h, weight, bias, ids, spec, temperature, budget, want_entropy, shard):
    """The forward tile pass (see the module docstring); saves what the backward needs on ``ctx``.
    With ``want_entropy`` also ``H(p)`` of the full tempered distribution, from ``sum_j p_j u_j``
    accumulated beside the normaliser (one temporary tile per tile). Sharded, ``weight`` holds the
    vocabulary rows ``[shard.v0, shard.v0 + V_r)`` and the shards' states merge before the end."""
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
            column, inside = _ids_in_tile(ids[t0:t1], present[t0:t1], shard.v0 + v0, shard.v0 + v1)
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
    if shard.group is not None:
        u_ids, rest_max, rest_sum, rest_xsum = _merge_shards(u_ids, rest_max, rest_sum, rest_xsum, shard.group)
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
    ctx.spec, ctx.temperature, ctx.budget, ctx.shard = spec, temperature, budget, shard
    ctx.mark_non_differentiable(entropy)
    return torch.cat([s_ids, tail.clamp(min=TAIL_FLOOR)[:, None]], dim=1), entropy


def _backward(ctx, grad, _entropy_grad):
    """The backward tile pass: the gradients of ``h``, ``weight`` and ``bias`` (the entropy has none).
    Sharded, from the global statistics alone; the hidden states' gradient is summed over the ranks."""
    h, weight, bias, ids, s_ids, log_norm, lse_rest, floored = ctx.saved_tensors
    shard = ctx.shard
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
    # The first GEMM into each accumulator row writes it: no zero fill, unless no tile runs.
    vocab_ranges = plan.vocab_ranges if plan.token_ranges else []
    make = torch.empty if vocab_ranges else torch.zeros
    grad_h = make((n, h.shape[1]), dtype=FP32, device=h.device) if needs_hidden else None
    # An fp32 head accumulates in its output; a half one per vocabulary chunk, cast in once.
    grad_w = make(weight.shape, dtype=weight.dtype, device=h.device) if needs_weight else None
    grad_b = torch.zeros(bias.shape, dtype=FP32, device=h.device) if needs_bias else None
    for v0, v1 in vocab_ranges:
        w_gemm = head.weight_chunk(v0, v1)
        w_wide = w_gemm.float() if head.widened else w_gemm
        weight_acc = None
        if grad_w is not None:
            weight_acc = grad_w[v0:v1] if weight.dtype == FP32 else plan.weight_grad(v1 - v0)
        for t0, t1 in plan.token_ranges:
            z = plan.project(head, h_gemm[t0:t1], v0, v1, 0, w_gemm)
            dz = plan.tile(1, t1 - t0, v1 - v0) if separate else z
            torch.mul(z, inv_t, out=dz).sub_(log_norm[t0:t1, None]).exp_().mul_(rest_coef[t0:t1, None])
            column, inside = _ids_in_tile(ids[t0:t1], present[t0:t1], shard.v0 + v0, shard.v0 + v1)
            dz.scatter_add_(1, column, torch.where(inside, id_fix[t0:t1], 0.0))
            dz = head.pre_transform_grad(dz, z)
            dz_gemm = head.gemm_operand(dz)
            if head.widened:
                dz_gemm = dz_gemm.float()
            if grad_h is not None:
                accumulate(grad_h[t0:t1], dz_gemm, w_wide, first=v0 == 0)
            if weight_acc is not None:
                accumulate(weight_acc, dz_gemm.t(), h_wide[t0:t1], first=t0 == 0)
            if grad_b is not None:
                grad_b[v0:v1].add_(dz.sum(0))
        if weight_acc is not None and weight.dtype != FP32:
            grad_w[v0:v1].copy_(weight_acc)
    if grad_h is not None and shard.group is not None:
        distributed.all_reduce_sum(grad_h, process_group=shard.group)
    return (None if grad_h is None else grad_h.to(h.dtype), grad_w,
            None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


class SparseStudentLogprobs(torch.autograd.Function):
    """The student's ``[n, k + 1]`` log-probabilities at the ids and the tail, from kept rows ``h`` ``[n, H]``,
    and (``want_entropy``; else zeros) the entropy ``[n]`` of its full distribution, not differentiable;
    ``shard`` (a :class:`~prefopt_kernels.distributed.Shard`) says which vocabulary rows ``weight`` holds."""

    @staticmethod
    def forward(ctx, h, weight, bias, ids, spec, temperature, budget, want_entropy, shard):
        # The tiles are fp32 and the GEMM dtype is in ``spec``: autocast must not recast them.
        with torch.autocast(h.device.type, enabled=False):
            return _forward(ctx, h, weight, bias, ids, spec, temperature, budget, want_entropy, shard)

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


def linear_sparse_teacher_divergence(hidden, head_weight, teacher_ids, teacher_logprobs, *, head_bias=None,
                                     divergence: str = "forward_kl", beta: float = 0.5, alpha: float = 0.5,
                                     mask=None, temperature: float = 1.0, logit_scale: float = 1.0, softcap=None,
                                     add_tail: bool = True, teacher_vocab_size: Optional[int] = None,
                                     return_entropy: bool = False, memory_budget: Optional[int] = None,
                                     process_group=None):
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
        process_group: a ``torch.distributed`` group over which the student head is sharded by
            vocabulary (as :func:`prefopt_kernels.linear_token_logprobs`): each rank passes its
            rows ``head_weight[V_r, H]`` (and ``head_bias[V_r]``), shards in rank order, any
            sizes (0 included), and the replicated ``hidden``, teacher and ``mask``;
            ``teacher_ids`` are global. Each rank folds its shard into the ids' logits and the
            off-id log-sum-exp, those are all-gathered and merged in rank order (every rank
            gets the same bits), and the backward needs only the merged statistics; the hidden
            states' gradient is summed over the ranks. Per kept token the forward moves
            ``4 R (k + 3)`` bytes, the backward ``4 H``. Ranks that disagree on the call raise
            the same error naming the argument. Without ``add_tail`` the tiled pass runs.
            An FSDP2 head (a ``DTensor`` placed ``Shard(0)`` on a 1-D mesh) runs so over its
            mesh with every rank's tokens gathered, as the other fused linear ops do.

    Returns:
        fp32 ``[...]`` per-token divergence, or ``(divergence, entropy)``; 0 at masked tokens;
        gradients reach ``hidden``, ``head_weight`` and ``head_bias`` (the tail's share spread
        over the whole vocabulary in the backward's tiles; sharded, the rank's rows of the head).
    """
    check_hidden(hidden, "hidden")
    fsdp_group = None if process_group is not None else vocab_shard_group(head_weight, head_bias)
    if fsdp_group is not None:
        check_teacher(teacher_ids, teacher_logprobs, hidden, teacher_vocab_size)
        check_mask(mask, hidden)
        tokens = TokensOfAllRanks(hidden.shape[:-1], head_weight, fsdp_group, hidden.device)
        out = linear_sparse_teacher_divergence(
            tokens.rows(hidden, 1), local_rows(head_weight), tokens.rows(teacher_ids, 1),
            tokens.rows(teacher_logprobs, 1), head_bias=local_rows(head_bias), divergence=divergence, beta=beta,
            alpha=alpha, mask=tokens.rows(mask, 0), temperature=temperature, logit_scale=logit_scale,
            softcap=softcap, add_tail=add_tail, teacher_vocab_size=teacher_vocab_size,
            return_entropy=return_entropy, memory_budget=memory_budget, process_group=fsdp_group)
        mine = tokens.own(dict(zip(("div", "entropy"), out if return_entropy else (out,))))
        return (mine["div"], mine["entropy"]) if return_entropy else mine["div"]
    check_head(hidden, head_weight, head_bias, "", None, process_group is not None)
    check_teacher(teacher_ids, teacher_logprobs, hidden, teacher_vocab_size)
    temperature = check_temperature(temperature)
    budget = check_budget(memory_budget)
    for name, flag in (("add_tail", add_tail), ("return_entropy", return_entropy)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {flag!r:.60}")
    spec = head_spec(hidden, head_bias, logit_scale, softcap, "")
    k = teacher_ids.shape[-1]
    lead = tuple(hidden.shape[:-1])
    check_mask(mask, hidden)
    if mask is None:
        index = torch.arange(math.prod(lead), device=hidden.device)
    else:
        index = (mask.reshape(-1) != 0).nonzero().squeeze(1)
    ids = teacher_ids.reshape(-1, k).index_select(0, index).long()
    logprobs = teacher_logprobs.reshape(-1, k).index_select(0, index)
    shard = teacher_shard(process_group, spec, ids, logprobs, index, head_weight.shape[0], hidden,
                          divergence=divergence, beta=beta, alpha=alpha, temperature=temperature,
                          return_entropy=return_entropy, add_tail=add_tail, teacher_vocab_size=teacher_vocab_size,
                          budget=budget)
    check_teacher_vocab(teacher_vocab_size, shard.vocab)
    check_teacher_values(ids, logprobs, shard.vocab)
    out = torch.zeros(lead, dtype=FP32, device=hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    entropy = None
    # Sharded, the rows at the ids are spread over the ranks: the tiled pass serves the no-tail case too.
    if add_tail or return_entropy or shard.group is not None:
        student, entropy = SparseStudentLogprobs.apply(h, head_weight, head_bias, ids, spec, temperature, budget,
                                                       return_entropy, shard)
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
