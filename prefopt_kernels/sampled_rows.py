"""The sampled (``top_k`` / ``top_p`` / ``min_p``) forward and backward of the logits ops, in row blocks.

Both run after (forward) or beside (backward) the backend's own kernels, on ``[B, T, Vs]``
rows as the backends see them (a vocabulary shard when sharded) and in blocks of rows, so
their fp32 temporaries stay within :data:`ROW_BLOCK_BYTES` whatever N is. The math is
:mod:`prefopt_kernels.sampling`'s.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from .backends import RowStats, nan_guard
from .sampling import (NEG_INF, Candidates, candidate_count, find_kept_set, kept_outputs, kept_statistics,
                       logp_gradient_, outside_kept_set, raw_threshold, relative_logits)
from .spec import OpSpec

ROW_BLOCK_BYTES = 32 * 2**20  # fp32 temporaries of one block of rows
# fp32 temporaries per element: the sampled forward's and backward's; the backward's with the
# backend's entropy or divergence term beside a half-precision logp term (the rows and the
# reference widened to fp32, the backend's term, the logp term).
BLOCK_FLOATS, WIDENED_BLOCK_FLOATS = 2, 4


def rows_per_block(width: int, floats: int = BLOCK_FLOATS) -> int:
    """Rows of ``width`` entries whose ``floats`` fp32 temporaries per entry fit :data:`ROW_BLOCK_BYTES`."""
    return max(1, ROW_BLOCK_BYTES // (4 * floats * max(width, 1)))


def gathered_count(backend, op: OpSpec, vocab: int, device, entry: str) -> int:
    """The first :func:`~prefopt_kernels.sampling.candidate_count` candidates of a call over ``vocab``
    entries (global: a shard's rows gather as many), when the call samples and ``backend`` gathers
    that many in the read of its ``entry`` (``forward_with_candidates`` or ``fold_with_candidates``)
    on ``device``; else 0, and :func:`forward` reads the rows once more."""
    count = candidate_count(op, vocab) if op.samples else 0
    max_candidates = getattr(backend, "max_candidates", None)
    if count and hasattr(backend, entry) and max_candidates is not None and count <= max_candidates(device, entry):
        return count
    return 0


def first_read(backend, rows: torch.Tensor, labels, ref_rows, weight, op: OpSpec):
    """``(RowStats, largest)``: the backend's forward of whole rows and, where :func:`gathered_count`
    allows, each row's largest raw logits ``[N, C]`` from that same read; else ``(RowStats, None)``."""
    count = gathered_count(backend, op, rows.shape[2], rows.device, "forward_with_candidates")
    if count:
        return backend.forward_with_candidates(rows, labels, ref_rows, weight, op, count)
    return backend.forward(rows, labels, ref_rows, weight, op), None


def forward(rows: torch.Tensor, labels: torch.Tensor, stats: RowStats, op: OpSpec, shard,
            largest: torch.Tensor = None) -> dict:
    """``logp``, ``log_kept_mass`` and the :data:`~prefopt_kernels.sampling.KEPT_STATS`, fp32 ``[N]`` each.

    ``rows`` ``[B, T, Vs]`` (this rank's shard ``[v0, v0 + Vs)`` of ``shard.vocab``), ``stats``
    the backend's forward (global when sharded), ``largest`` the candidates of the rows as this
    rank read them (:func:`first_read`, or the shard's from
    :func:`~prefopt_kernels.distributed.sharded_stats`, merged across the ranks here) or ``None``.
    Ignored rows are never read and hold 0; with ``largest`` the others are read again only where
    their kept set is not settled (growth).
    """
    n_tokens, width, device = labels.numel(), rows.shape[2], rows.device
    read = (labels != op.ignore_index).nonzero().reshape(-1)
    row_max, log_norm = stats.row_max[read], stats.log_norm[read]
    labels_local = labels[read] - shard.v0
    step = rows_per_block(width)
    first = None
    if largest is not None and read.numel():
        first = Candidates.of_largest(largest[read], _at_labels(rows, read, labels_local), row_max, op.temperature)
        first.merge_across(shard.group)

    def sweep(positions: torch.Tensor, count: int) -> Candidates:
        out = Candidates.empty(positions.numel(), count, device)
        for s in range(0, positions.numel(), step):
            at = positions[s:s + step]
            block = Candidates.empty(at.numel(), count, device)
            block.fold(_gather_rows(rows, read[at]), row_max[at], op.temperature, labels_local[at])
            out.values[s:s + step], out.label_u[s:s + step] = block.values, block.label_u
        out.merge_across(shard.group)
        return out

    kept, label_u = find_kept_set(sweep, log_norm, op, shard.vocab, first)
    logp, log_kept_mass = kept_outputs(kept.threshold, kept.log_norm, label_u, log_norm)
    values = {"logp": logp, "log_kept_mass": log_kept_mass, "kept_threshold": kept.threshold,
              "kept_log_norm": kept.log_norm}
    out = {}
    for name, value in values.items():
        out[name] = torch.zeros(n_tokens, dtype=torch.float32, device=device)
        out[name][read] = value
    return out


def _at_labels(rows: torch.Tensor, flat: torch.Tensor, labels_local: torch.Tensor) -> torch.Tensor:
    """The raw logits of rows ``flat`` of ``[B, T, Vs]`` at ``labels_local`` (one element per row),
    ``-inf`` where the label lies outside this slice of the vocabulary."""
    per_row, width = rows.shape[1], rows.shape[2]
    if width == 0:
        return torch.full(labels_local.shape, NEG_INF, device=rows.device)
    at = rows[flat // per_row, flat % per_row, labels_local.clamp(0, width - 1)].float()
    return torch.where((labels_local >= 0) & (labels_local < width), at, NEG_INF)


def _gather_rows(rows: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Rows ``flat`` (flat token order) of ``[B, T, Vs]`` as ``[n, Vs]``: a view when they are
    consecutive within one sequence, a copy otherwise."""
    per_row = rows.shape[1]
    first, last = int(flat[0]), int(flat[-1])
    if last - first == flat.numel() - 1 and first // per_row == last // per_row:
        return rows[first // per_row, first % per_row:last % per_row + 1]
    return rows[flat // per_row, flat % per_row]


def _stats_rows(stats: RowStats, f0: int, f1: int) -> RowStats:
    return RowStats(**{f.name: None if getattr(stats, f.name) is None else getattr(stats, f.name)[f0:f1]
                       for f in fields(RowStats)})


def backward(backend, rows, labels, ref_rows, weight, op: OpSpec, stats: RowStats, kept: list, grad_logp,
             grad_entropy, grad_div, grad_rows, shard) -> None:
    """Write the gradient of ``sum g_logp logp + g_entropy H + g_div div`` into ``grad_rows``.

    ``logp`` is the kept set's (``kept`` = the saved ``[threshold, log_norm]``): its term is
    formed here in fp32, block by block; the entropy and divergence terms are the backend's
    (``backward``, or ``slice_backward`` on a shard), run on the same block and added in fp32.
    Half-precision logits are widened to fp32 for that call, so that the backend writes its
    terms in fp32 and the sum is rounded to the logits' dtype once. With the logp term alone
    the backend's ``slice_backward`` writes it from :func:`~prefopt_kernels.sampling.kept_statistics`
    and the entries outside ``K`` are zeroed (one kernel, one compare, one fill per block).
    Each block is read before it is written, so ``grad_rows`` may be the logits
    (``inplace_backward``).
    """
    threshold, kept_log_norm = kept
    raw = raw_threshold(threshold, stats.row_max, op.temperature)
    read = labels != op.ignore_index
    others = grad_entropy is not None or grad_div is not None
    widened = others and grad_logp is not None and grad_rows.dtype != torch.float32
    n_batch, per_row, width = rows.shape
    step = rows_per_block(width, WIDENED_BLOCK_FLOATS if widened else BLOCK_FLOATS)

    def part(x, f0, f1):
        return None if x is None else x[f0:f1]

    for b in range(n_batch):
        for t0 in range(0, per_row, step):
            t1 = min(per_row, t0 + step)
            f0, f1 = b * per_row + t0, b * per_row + t1
            x_block, ref_block = rows[b:b + 1, t0:t1], None if ref_rows is None else ref_rows[b:b + 1, t0:t1]
            block = (x_block, labels[f0:f1], ref_block, part(weight, f0, f1), op)
            if not others:
                outside = outside_kept_set(rows[b, t0:t1], raw[f0:f1], stats.log_norm[f0:f1])
                kept_block = kept_statistics(_stats_rows(stats, f0, f1), kept_log_norm[f0:f1])
                # slice_backward (v0 = 0 for a whole row): the gradient from the statistics alone.
                backend.slice_backward(*block, kept_block, grad_logp[f0:f1], None, None, grad_rows[b:b + 1, t0:t1],
                                       shard.v0)
                grad_rows[b, t0:t1].masked_fill_(outside, 0.0)
                continue
            dz = None
            if grad_logp is not None:
                upstream = torch.where(read[f0:f1], grad_logp[f0:f1], 0.0)
                dz = logp_gradient_(relative_logits(rows[b, t0:t1], stats.row_max[f0:f1], op.temperature),
                                    threshold[f0:f1], kept_log_norm[f0:f1], labels[f0:f1] - shard.v0, upstream,
                                    op.temperature)
                dz.add_(nan_guard(stats.log_norm[f0:f1])[:, None]).masked_fill_(~read[f0:f1, None], 0.0)
            terms = grad_rows[b:b + 1, t0:t1]
            if widened:  # copies taken before grad_rows (which may be the logits) is written
                block = (x_block.float(), labels[f0:f1], None if ref_block is None else ref_block.float(),
                         part(weight, f0, f1), op)
                terms = torch.empty(x_block.shape, dtype=torch.float32, device=rows.device)
            gradients = (None, part(grad_entropy, f0, f1), part(grad_div, f0, f1), terms)
            if shard.group is None:
                backend.backward(*block, _stats_rows(stats, f0, f1), *gradients)
            else:
                backend.slice_backward(*block, _stats_rows(stats, f0, f1), *gradients, shard.v0)
            if dz is not None:
                grad_rows[b, t0:t1].copy_(dz.add_(terms[0]))
