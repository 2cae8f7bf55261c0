"""The two passes of a fused linear call over its tiles: the forward folds every projected tile
into the rows' running states in place (and sweeps it again for a second-sweep divergence), the
backward re-projects every tile, vocabulary chunk by vocabulary chunk, and accumulates the
gradients of the hidden states, the head weight and its bias."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional

import torch

from .. import distributed
from ..backends import RowStats, row_state
from ..spec import LinearSpec
from .heads import FP32, Head, accumulate, gather_rows, pad_rows, scatter_rows, token_rows
from .sampled import kept_tile_gradient
from .tiles import TilePlan, fp32_tile_count


@dataclass
class LinearCall:
    """Everything one pass over the tiles needs; each registered op builds it from its arguments."""

    spec: LinearSpec
    heads: List[Head]  # the policy's, then the reference's when there is one
    index: torch.Tensor  # [n] int64: the kept tokens, in flat order
    every_token: bool  # every token is kept: ``index`` is ``0, 1, ..., N - 1``
    labels: Optional[torch.Tensor]  # [n] int64 of the kept tokens
    weight: Optional[torch.Tensor]  # [n] fp32 of the kept tokens
    vocab: int  # this rank's (the local) vocabulary
    backend: object
    shard: distributed.Shard  # the vocabulary shard of this rank (the whole vocabulary unsharded)

    @property
    def policy(self) -> Head:
        return self.heads[0]

    @property
    def reference(self) -> Optional[Head]:
        return self.heads[1] if len(self.heads) > 1 else None

    def rows(self, x: torch.Tensor, t0: int, t1: int, dtype) -> torch.Tensor:
        """Kept rows ``[t0, t1)`` of ``x`` ``[..., H]`` as a contiguous ``[m, H]`` in ``dtype``
        (``m <= t1 - t0``: the kept rows end at ``n``): a view of ``x`` where every token is
        kept and its strides allow, otherwise gathered."""
        flat = token_rows(x) if self.every_token else None
        if flat is None:
            return gather_rows(x, self.index[t0:t1], dtype)
        return flat[t0:t1].to(dtype).contiguous()

    def plan(self, backward: bool, weight_grad: bool = False) -> TilePlan:
        """The tile plan of a forward or backward pass (``weight_grad``: the backward
        accumulates the head weight's gradient)."""
        return TilePlan(self.heads, self.index.numel(), self.vocab, self.spec.memory_budget, self.spec.extras,
                        backward, weight_grad, self.spec.batch_invariant)

    def targets(self, rows: int):
        """``(labels, weight)`` over ``rows >= n`` rows, the padding rows unread by every kernel:
        an ignored label, or for the divergence alone a zero weight (batch-invariant, the
        divergence alone always carries a weight, 1 where none was given, so that a token's
        kernel path does not depend on whether its call is padded)."""
        if not self.spec.batch_invariant:
            return self.labels, self.weight
        labels, weight = self.labels, self.weight
        if weight is None and labels is None:
            weight = torch.ones(self.index.numel(), dtype=FP32, device=self.index.device)
        return pad_rows(labels, rows, self.spec.op.ignore_index), pad_rows(weight, rows, 0.0)


def backend_rows(tile: torch.Tensor) -> torch.Tensor:
    """The backend interface's ``[B, T, Vs]`` view of a ``[n, Vs]`` tile."""
    return tile.unsqueeze(0)


def _chunk_of(x: Optional[torch.Tensor], t0: int, t1: int) -> Optional[torch.Tensor]:
    return None if x is None else x[t0:t1]


def stats_rows(stats: RowStats, t0: int, t1: int) -> RowStats:
    """The statistics of rows ``[t0, t1)``."""
    return RowStats(**{f.name: _chunk_of(getattr(stats, f.name), t0, t1) for f in fields(RowStats)})


def state_rows(state: row_state.RowState, t0: int, t1: int) -> row_state.RowState:
    """The running state of rows ``[t0, t1)``: contiguous views that a ``fold`` updates in place."""
    return row_state.RowState(**{name: value[t0:t1] for name, value in state.tensors().items()})


def forward_pass(hidden: List[torch.Tensor], call: LinearCall, policy_tiles=None):
    """Fold every tile of every kept row; return their :class:`RowStats` and the extras asked for.

    ``policy_tiles``, when given, is called as ``policy_tiles(t0, t1, v0, a)`` with each projected
    policy tile (rows ``[t0, t1)`` of the plan, columns from ``v0``) after its fold: the sampled
    forward's candidates come from the same projection.
    ``hidden`` holds each head's hidden states. Per tile: one GEMM per head and one ``fold``
    launch, which merges the tile into the rows' running state in place (the first vocabulary
    chunk's fold writes it whole, so it is never filled before); ``mean_logits``
    adds one GEMV, ``log_sum_sq_probs`` a few elementwise ops. The state is finished once
    (merged over the shards' group first, when sharded) by the backend's ``finalize``, one
    launch (a second sweep's sums by its ``finish_sweep``, one more), so the collectives do
    not depend on the tiling.
    """
    op, backend, shard, extras = call.spec.op, call.backend, call.shard, call.spec.extras
    device = hidden[0].device
    plan = call.plan(backward=False)
    has_ref = call.reference is not None
    inv_temperature = 1.0 / op.temperature
    want_sum, want_squares = "mean_logits" in extras, "log_sum_sq_probs" in extras
    n_kept, n_rows = call.index.numel(), plan.rows
    all_labels, all_weight = call.targets(n_rows)
    # No vocabulary chunk (an empty shard): no fold writes the state, which stays empty.
    state = (row_state.unfilled if plan.vocab_ranges else row_state.empty)(n_rows, op, has_ref, device)
    logit_sum = torch.zeros(n_rows, dtype=FP32, device=device) if want_sum else None
    ones = torch.ones(plan.vocab_chunk, dtype=FP32, device=device) if want_sum else None
    square_sum = torch.zeros(n_rows, dtype=FP32, device=device) if want_squares else None

    def chunk_rows(t0, t1):
        return [pad_rows(call.rows(h, t0, t1, head.gemm_dtype), t1 - t0, 0.0) for h, head in zip(hidden, call.heads)]

    def project(rows, v0, v1):
        a = plan.project(call.policy, rows[0], v0, v1, 0)
        b = plan.project(call.reference, rows[1], v0, v1, 1) if has_ref else None
        return a, b

    for t0, t1 in plan.token_ranges:
        labels, weight = _chunk_of(all_labels, t0, t1), _chunk_of(all_weight, t0, t1)
        rows = chunk_rows(t0, t1)
        chunk = state_rows(state, t0, t1)
        for v0, v1 in plan.vocab_ranges:
            a, b = project(rows, v0, v1)
            # Before the first fold the running max is -inf, whatever the unfilled state holds.
            previous_max = chunk.max.clone() if want_squares and v0 > 0 else None
            backend.fold(chunk, backend_rows(a), labels, None if b is None else backend_rows(b), weight, op,
                         shard.v0 + v0, first_slice=v0 == 0)
            if policy_tiles is not None:
                policy_tiles(t0, t1, v0, a)
            if want_sum:
                logit_sum[t0:t1].addmv_(a, ones[:v1 - v0])
            if want_squares:
                square_sum[t0:t1] = _fold_square_sum(square_sum[t0:t1], previous_max, chunk.max, a,
                                                     inv_temperature)
    if shard.group is not None:
        # The extras travel with the state only when asked for.
        extra = ((logit_sum,) if want_sum else ()) + ((state.max, square_sum) if want_squares else ())
        state, gathered = distributed.merge_across(state, op, shard.group, extra=extra)
        if want_sum:
            logit_sum = gathered.pop(0).sum(0)
        if want_squares:
            local_maxima, square_sums = gathered
            square_sum = (square_sums * _rescale(local_maxima, state.max, 2.0 * inv_temperature)).sum(0)
    # The kept rows are the rows read; only padding rows are not.
    every_row_read = n_rows == n_kept
    stats = backend.finalize(state, all_labels, all_weight, op, every_row_read)
    if op.member and op.member.second_sweep:
        # Each token chunk's first sweep writes its rows' sums and the later ones add into them,
        # so the sums are zero-filled only when no chunk runs (an empty shard).
        allocate = torch.empty if plan.vocab_ranges else torch.zeros
        value_sum = allocate(n_rows, dtype=FP32, device=device)
        centred_sum = allocate(n_rows, dtype=FP32, device=device)
        for t0, t1 in plan.token_ranges:
            labels, weight = _chunk_of(all_labels, t0, t1), _chunk_of(all_weight, t0, t1)
            rows = chunk_rows(t0, t1)
            chunk_stats = stats_rows(stats, t0, t1)
            for v0, v1 in plan.vocab_ranges:
                a, b = project(rows, v0, v1)
                backend.sweep(chunk_stats, backend_rows(a), backend_rows(b), labels, weight, op, shard.v0 + v0,
                              value_sum[t0:t1], centred_sum[t0:t1], first_slice=v0 == 0)
        stats = distributed.finish_second_pass(backend, stats, value_sum, centred_sum, all_labels, all_weight, op,
                                               shard.group, every_row_read)
    extra_values = {}
    if want_sum:
        extra_values["mean_logits"] = logit_sum * (inv_temperature / shard.vocab)
    if "is_top1" in extras:
        extra_values["is_top1"] = state.argmax == all_labels
    if want_squares:
        # log sum p^2 = log sum exp(2 (a - m) / T) - 2 log Z, both relative to the final max m.
        extra_values["log_sum_sq_probs"] = torch.log(square_sum) - 2.0 * stats.log_norm
    if n_rows == n_kept:
        return stats, extra_values
    # The kept rows lead the padded ones.
    return stats_rows(stats, 0, n_kept), {name: value[:n_kept] for name, value in extra_values.items()}


def _rescale(old_max: torch.Tensor, new_max: torch.Tensor, factor: float) -> torch.Tensor:
    """``exp(factor (old_max - new_max))``, 0 where ``old_max`` is ``-inf`` (nothing folded there yet)."""
    live = (old_max > -float("inf")) & (new_max > -float("inf"))
    return torch.where(live, torch.exp((old_max - new_max) * factor), 0.0)


def _fold_square_sum(acc, previous_max, new_max, tile, inv_temperature):
    """``sum exp(2 (a - m) / T)`` carried from the running max ``previous_max`` to ``new_max``, plus
    this tile; ``previous_max`` ``None``: the first tile, nothing to carry (``acc`` is 0)."""
    shift = torch.where(new_max > -float("inf"), new_max, 0.0)
    # One fp32 copy of the tile, exponentiated in place: the only temporary tile_costs counts.
    powers = tile.to(FP32, copy=True).sub_(shift[:, None]).mul_(2.0 * inv_temperature).exp_()
    tile_sum = powers.sum(-1)
    if previous_max is None:
        return tile_sum
    return acc * _rescale(previous_max, new_max, 2.0 * inv_temperature) + tile_sum


def backward_pass(hidden: List[torch.Tensor], call: LinearCall, stats: RowStats, upstream: dict, needs,
                  kept: Optional[list] = None):
    """Re-project every tile, turn it into ``dL/d(h W^T + c)`` and accumulate the three gradients.

    ``needs`` flags the gradients of the policy's hidden states, head weight and bias; returns
    them (``None`` where not asked for); ``kept``, the kept set's statistics of a sampled call,
    makes ``logp``'s term the kept set's (:func:`~prefopt_kernels.linear.sampled.kept_tile_gradient`).
    The loop runs over vocabulary chunks, and inside over
    token chunks: a chunk's weight gradient ``sum_t dz_t^T h_t`` is complete when its token
    loop ends, so a bf16/fp16 head accumulates it in one fp32 ``[vocab chunk, H]`` buffer of
    the plan and casts it into its rows of the output once, never in an fp32 ``[V, H]``
    (an fp32 head accumulates straight into its output). Each accumulator's rows are written,
    not added to, by the first GEMM that reaches them, so none is zero-filled first (unless
    no tile runs: no kept token or an empty vocabulary shard). Per tile: one GEMM per head, one
    ``slice_backward`` launch and the two gradient GEMMs, and the logit transform's
    derivative only where a softcap or scale asks for it. Workspace besides the plan's tiles
    (:func:`~prefopt_kernels.linear.tiles.tile_costs`): the kept rows of each head's hidden
    states in the GEMM dtype (and widened to fp32 for a widened head's weight gradient), and
    the fp32 ``[n, H]`` gradient of the kept rows, at most ``16 n H`` bytes with equal hidden
    sizes.
    """
    op, backend, shard = call.spec.op, call.backend, call.shard
    policy, reference = call.policy, call.reference
    policy_hidden = hidden[0]
    device = policy_hidden.device
    needs_hidden, needs_weight, needs_bias = needs
    plan = call.plan(backward=True, weight_grad=needs_weight)
    has_ref = reference is not None
    separate_grad = fp32_tile_count(call.heads, True) > len(call.heads)
    n_kept, n_rows = call.index.numel(), plan.rows
    all_labels, all_weight = call.targets(n_rows)
    # Padding rows: zero hidden states, zero upstream gradients and statistics; no kernel reads them.
    stats = RowStats(**{f.name: pad_rows(getattr(stats, f.name), n_rows, 0.0) for f in fields(RowStats)})
    upstream = {k: pad_rows(v, n_rows, 0.0) for k, v in upstream.items()}
    kept = None if kept is None else [pad_rows(k, n_rows, 0.0) for k in kept]
    h = pad_rows(call.rows(policy_hidden, 0, n_kept, policy.gemm_dtype), n_rows, 0.0)
    h_ref = pad_rows(call.rows(hidden[1], 0, n_kept, reference.gemm_dtype), n_rows, 0.0) if has_ref else None
    # A widened head's GEMMs run in fp32: its rows are widened once, not per tile.
    h_weight_grad = h.float() if policy.widened and needs_weight else h
    # Every token kept and none padded: the kept rows' gradient has the layout of ``hidden`` itself.
    hidden_layout = call.every_token and n_rows == n_kept
    # The tiles cover every row and every vocabulary column of the accumulators, or there are none.
    vocab_ranges = plan.vocab_ranges if plan.token_ranges else []
    make = torch.empty if vocab_ranges else torch.zeros
    grad_h = grad_rows = None
    if needs_hidden:
        hidden_size = policy_hidden.shape[-1]
        grad_h = make(policy_hidden.shape if hidden_layout else (n_rows, hidden_size), dtype=FP32, device=device)
        grad_rows = grad_h.view(-1, hidden_size)
    # The weight gradient of an fp32 head is its own accumulator; a half one's rows are cast into it.
    grad_weight = make(policy.weight.shape, dtype=policy.weight.dtype, device=device) if needs_weight else None
    grad_bias = torch.zeros(policy.bias.shape, dtype=FP32, device=device) if needs_bias else None
    ones = torch.ones(plan.token_chunk, dtype=FP32, device=device) if needs_bias else None
    for v0, v1 in vocab_ranges:
        width = v1 - v0
        w_gemm = policy.weight_chunk(v0, v1)
        w_hidden_grad = w_gemm.float() if policy.widened and needs_hidden else w_gemm
        w_ref = reference.weight_chunk(v0, v1) if has_ref else None
        weight_acc = None
        if needs_weight:
            weight_acc = grad_weight[v0:v1] if grad_weight.dtype == FP32 else plan.weight_grad(width)
        for t0, t1 in plan.token_ranges:
            n = t1 - t0
            labels, weight = _chunk_of(all_labels, t0, t1), _chunk_of(all_weight, t0, t1)
            g = {k: v[t0:t1] for k, v in upstream.items()}
            a = plan.project(policy, h[t0:t1], v0, v1, 0, w_gemm)
            b = plan.project(reference, h_ref[t0:t1], v0, v1, 1, w_ref) if has_ref else None
            dz = plan.tile(1 + has_ref, n, width) if separate_grad else a
            if kept is None:
                backend.slice_backward(backend_rows(a), labels, None if b is None else backend_rows(b), weight, op,
                                       stats_rows(stats, t0, t1), g.get("logp"), g.get("entropy"), g.get("div"),
                                       backend_rows(dz), shard.v0 + v0)
            else:
                kept_tile_gradient(backend, a, b, labels, weight, op, stats_rows(stats, t0, t1),
                                   [k[t0:t1] for k in kept], g, dz, shard.v0 + v0)
            dz = policy.pre_transform_grad(dz, a)
            dz_gemm = policy.gemm_operand(dz)
            if policy.widened:
                dz_gemm = dz_gemm.float()  # the rounded gradient, widened once for both fp32 GEMMs
            if grad_rows is not None:
                accumulate(grad_rows[t0:t1], dz_gemm, w_hidden_grad, first=v0 == 0)
            if weight_acc is not None:
                accumulate(weight_acc, dz_gemm.t(), h_weight_grad[t0:t1], first=t0 == 0)
            if grad_bias is not None:
                grad_bias[v0:v1].addmv_(dz.t(), ones[:n])
        if weight_acc is not None and grad_weight.dtype != FP32:
            grad_weight[v0:v1].copy_(weight_acc)
    grad_hidden = grad_h
    if grad_h is not None and not hidden_layout:
        grad_hidden = torch.zeros(policy_hidden.shape, dtype=policy_hidden.dtype if shard.group is None else FP32,
                                  device=device)
        scatter_rows(grad_hidden, call.index, grad_h[:n_kept])
    if grad_hidden is not None:
        # Sharded, the hidden states' gradient is a sum over the ranks: reduced once, in fp32.
        if shard.group is not None:
            distributed.all_reduce_sum(grad_hidden, process_group=shard.group)
        grad_hidden = grad_hidden.to(policy_hidden.dtype)
    return (
        grad_hidden,
        grad_weight,
        None if grad_bias is None else grad_bias.to(policy.bias.dtype),
    )
