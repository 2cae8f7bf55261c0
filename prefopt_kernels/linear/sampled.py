"""The sampled (``top_k`` / ``top_p`` / ``min_p``) forward and tile gradient of the fused linear ops.

The forward runs after :func:`~prefopt_kernels.linear.passes.forward_pass` has the global
``row_max`` and ``lse_V``: it projects the policy's tiles once more and folds each into the
rows' :class:`~prefopt_kernels.sampling.Candidates` (one GEMM and one candidate fold per tile),
merges them over the shards, and re-reads only the rows whose kept set is not settled
(:func:`~prefopt_kernels.sampling.find_kept_set`). The backward turns each re-projected tile
into ``dz`` with :func:`kept_tile_gradient`. The math is :mod:`prefopt_kernels.sampling`'s.

Host ops per tile of the candidate read: the GEMM (and the transform), the ``topk`` of the
tile and the candidates' merge (two for ``u``, ``cat``, ``topk``), about eight for the label's
``u``.
"""

from __future__ import annotations

from typing import List

import torch

from ..backends import RowStats, nan_guard
from ..sampling import (Candidates, find_kept_set, kept_outputs, kept_statistics, logp_gradient_, outside_kept_set,
                        relative_logits)
from .heads import gather_rows, pad_rows


def forward(hidden: List[torch.Tensor], call, stats: RowStats) -> dict:
    """``logp``, ``log_kept_mass`` and the kept set's statistics, fp32 ``[n]`` over the call's kept rows.

    ``call`` is the :class:`~prefopt_kernels.linear.passes.LinearCall` of the forward, ``stats``
    its finished (global) statistics.
    """
    op, shard, policy = call.spec.op, call.shard, call.policy
    plan = call.plan(backward=False)
    device = hidden[0].device

    def sweep(positions: torch.Tensor, count: int) -> Candidates:
        out = Candidates.empty(positions.numel(), count, device)
        for s in range(0, positions.numel(), plan.token_chunk):
            at = positions[s:s + plan.token_chunk]
            # Batch-invariant, the GEMM keeps its fixed shape: padding rows, projected and left out.
            rows = pad_rows(gather_rows(hidden[0], call.index[at], policy.gemm_dtype),
                            plan.token_chunk if call.spec.batch_invariant else at.numel(), 0.0)
            block = Candidates.empty(at.numel(), count, device)
            labels, row_max = call.labels[at], stats.row_max[at]
            for v0, v1 in plan.vocab_ranges:
                tile = plan.project(policy, rows, v0, v1, 0)[: at.numel()]
                block.fold(tile, row_max, op.temperature, labels - (shard.v0 + v0))
            out.values[s:s + plan.token_chunk], out.label_u[s:s + plan.token_chunk] = block.values, block.label_u
        out.merge_across(shard.group)
        return out

    kept, label_u = find_kept_set(sweep, stats.log_norm, op, shard.vocab)
    logp, log_kept_mass = kept_outputs(kept.threshold, kept.log_norm, label_u, stats.log_norm)
    return {"logp": logp, "log_kept_mass": log_kept_mass, "kept_threshold": kept.threshold,
            "kept_log_norm": kept.log_norm}


def kept_tile_gradient(backend, a, b, labels, weight, op, stats: RowStats, kept: list, upstream: dict,
                       dz: torch.Tensor, v0: int) -> None:
    """Write ``dL/dz`` of one ``[n, Vs]`` tile (offset ``v0`` in the global vocabulary) into ``dz``.

    With ``logp``'s upstream gradient alone (the RL case): the backend's ``slice_backward``
    from :func:`~prefopt_kernels.sampling.kept_statistics`, then the entries outside ``K``
    zeroed (3 host ops per tile besides the kernel: the compare with the raw threshold, the
    NaN-row mask, the fill).
    With the entropy or divergence too: ``logp``'s term formed in fp32 from ``a``
    (:func:`~prefopt_kernels.sampling.logp_gradient_`, about 15 host ops), the others by the
    backend's ``slice_backward`` with no ``logp`` term, added in fp32. ``dz`` may be ``a``.
    """
    grad_logp = upstream.get("logp")
    if upstream.get("entropy") is None and upstream.get("div") is None:
        # The backend's own tile gradient from lse_K, zeroed outside K: four host ops and the kernel.
        outside = outside_kept_set(a, kept[2], stats.log_norm)
        backend.slice_backward(a.unsqueeze(0), labels, None if b is None else b.unsqueeze(0), weight, op,
                               kept_statistics(stats, kept[1]), grad_logp, None, None, dz.unsqueeze(0), v0)
        dz.masked_fill_(outside, 0.0)
        return
    part = None
    if grad_logp is not None:
        part = logp_gradient_(relative_logits(a, stats.row_max, op.temperature), kept[0], kept[1], labels - v0,
                              grad_logp, op.temperature)
        part.add_(nan_guard(stats.log_norm)[:, None])
    backend.slice_backward(a.unsqueeze(0), labels, None if b is None else b.unsqueeze(0), weight, op, stats, None,
                           upstream.get("entropy"), upstream.get("div"), dz.unsqueeze(0), v0)
    if part is not None:
        dz.add_(part)
