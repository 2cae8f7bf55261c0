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
from .sampling import (Candidates, candidate_count, find_kept_set, kept_outputs, kept_statistics, logp_gradient_,
                       outside_kept_set, raw_threshold, relative_logits)
from .spec import OpSpec

ROW_BLOCK_BYTES = 32 * 2**20  # fp32 temporaries of one block of rows (about two per element)


def rows_per_block(width: int) -> int:
    """Rows of ``width`` entries whose fp32 temporaries fit :data:`ROW_BLOCK_BYTES`."""
    return max(1, ROW_BLOCK_BYTES // (8 * max(width, 1)))


def first_read(backend, rows: torch.Tensor, labels, ref_rows, weight, op: OpSpec):
    """``(RowStats, largest)``: the backend's forward of whole rows and, when the call samples and the
    backend gathers its first :func:`~prefopt_kernels.sampling.candidate_count` candidates in that
    same read (``forward_with_candidates``), each row's largest raw logits ``[N, C]``; else
    ``(RowStats, None)`` and :func:`forward` reads the rows once more."""
    count = candidate_count(op, rows.shape[2]) if op.samples else 0
    max_candidates = getattr(backend, "max_candidates", None)
    if count and max_candidates is not None and count <= max_candidates(rows.device):
        return backend.forward_with_candidates(rows, labels, ref_rows, weight, op, count)
    return backend.forward(rows, labels, ref_rows, weight, op), None


def forward(rows: torch.Tensor, labels: torch.Tensor, stats: RowStats, op: OpSpec, shard,
            largest: torch.Tensor = None) -> dict:
    """``logp``, ``log_kept_mass`` and the :data:`~prefopt_kernels.sampling.KEPT_STATS`, fp32 ``[N]`` each.

    ``rows`` ``[B, T, Vs]`` (this rank's shard ``[v0, v0 + Vs)`` of ``shard.vocab``), ``stats``
    the backend's forward (global when sharded), ``largest`` the whole rows' candidates from
    :func:`first_read` or ``None``. Ignored rows are never read and hold 0; with ``largest`` the
    others are read again only where their kept set is not settled (growth).
    """
    n_tokens, width, device = labels.numel(), rows.shape[2], rows.device
    read = (labels != op.ignore_index).nonzero().reshape(-1)
    row_max, log_norm = stats.row_max[read], stats.log_norm[read]
    labels_local = labels[read] - shard.v0
    step = rows_per_block(width)
    first = None
    if largest is not None and read.numel():
        per_row = rows.shape[1]
        at_label = rows[read // per_row, read % per_row, labels_local]  # one element per row
        first = Candidates.of_largest(largest[read], at_label, row_max, op.temperature)

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
    (``backward``, or ``slice_backward`` on a shard), run on the same block and added in fp32,
    so with those terms a half-precision gradient is rounded twice. With the logp term alone
    the backend's ``slice_backward`` writes it from :func:`~prefopt_kernels.sampling.kept_statistics`
    and the entries outside ``K`` are zeroed (one kernel, one compare, one fill per block).
    Each block is read before it is written, so ``grad_rows`` may be the logits
    (``inplace_backward``).
    """
    threshold, kept_log_norm = kept
    raw = raw_threshold(threshold, stats.row_max, op.temperature)
    read = labels != op.ignore_index
    others = grad_entropy is not None or grad_div is not None
    n_batch, per_row, width = rows.shape
    step = rows_per_block(width)

    def part(x, f0, f1):
        return None if x is None else x[f0:f1]

    for b in range(n_batch):
        for t0 in range(0, per_row, step):
            t1 = min(per_row, t0 + step)
            f0, f1 = b * per_row + t0, b * per_row + t1
            block = (rows[b:b + 1, t0:t1], labels[f0:f1], None if ref_rows is None else ref_rows[b:b + 1, t0:t1],
                     part(weight, f0, f1), op)
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
                dz = torch.where(read[f0:f1, None], dz + nan_guard(stats.log_norm[f0:f1])[:, None], 0.0)
            gradients = (None, part(grad_entropy, f0, f1), part(grad_div, f0, f1), grad_rows[b:b + 1, t0:t1])
            if shard.group is None:
                backend.backward(*block, _stats_rows(stats, f0, f1), *gradients)
            else:
                backend.slice_backward(*block, _stats_rows(stats, f0, f1), *gradients, shard.v0)
            if dz is not None:
                grad_rows[b, t0:t1].copy_(dz.add_(grad_rows[b, t0:t1].float()))
