"""The sampled (``top_k`` / ``top_p`` / ``min_p``) forward and tile gradient of the fused linear ops.

The first candidates come from :func:`~prefopt_kernels.linear.passes.forward_pass`'s own
projection of each policy tile (:class:`TileCandidates`: each tile's largest raw logits merged
into the rows' running ones, and the label's raw logit), so the forward projects and reads each
tile once, as the plain op does. Once the pass has the global ``row_max`` and ``lse_V``,
:func:`forward` turns them into the rows' :class:`~prefopt_kernels.sampling.Candidates`, merges
them over the shards, and projects again only the rows whose kept set is not settled
(:func:`~prefopt_kernels.sampling.find_kept_set`: the growth reads). The backward turns each
re-projected tile into ``dz`` with :func:`kept_tile_gradient`. The math is
:mod:`prefopt_kernels.sampling`'s.

Host ops per tile for the candidates: the ``topk`` of the tile and the merge (``cat``,
``topk``), about five for the label's logit.
"""

from __future__ import annotations

from typing import List

import torch

from ..backends import RowStats, nan_guard
from ..sampling import (NEG_INF, Candidates, candidate_count, find_kept_set, kept_outputs, kept_statistics,
                        logp_gradient_, outside_kept_set, relative_logits)
from .heads import gather_rows, pad_rows


class TileCandidates:
    """The rows' first candidates, gathered from the forward pass's projected policy tiles.

    Called as ``(t0, t1, v0, a)`` per tile (rows ``[t0, t1)`` of the plan, ``a`` ``[t1 - t0, Vs]``
    the raw logits of columns ``[v0, v0 + Vs)`` of this rank's shard). Keeps ``largest``, fp32
    ``[rows, C]``, each row's ``C`` largest raw logits so far (descending, ``-inf`` padded; ``C``
    of :func:`~prefopt_kernels.sampling.candidate_count`), and ``at_label`` ``[rows]``, the raw
    logit at the label once a tile holds it (``-inf`` before).
    """

    def __init__(self, call):
        plan = call.plan(backward=False)
        device = call.index.device
        self.count = candidate_count(call.spec.op, call.shard.vocab)
        self.labels = call.targets(plan.rows)[0]
        self.offset = call.shard.v0
        self.largest = torch.full((plan.rows, self.count), NEG_INF, device=device)
        self.at_label = torch.full((plan.rows,), NEG_INF, device=device)

    def __call__(self, t0: int, t1: int, v0: int, a: torch.Tensor) -> None:
        width = a.shape[1]
        if width == 0:
            return
        top = a.topk(min(self.count, width), dim=1).values.float()
        self.largest[t0:t1] = torch.cat([self.largest[t0:t1], top], 1).topk(self.count, dim=1).values
        local = self.labels[t0:t1] - (self.offset + v0)
        inside = (local >= 0) & (local < width)
        value = a.gather(1, local.clamp(0, width - 1)[:, None])[:, 0].float()
        self.at_label[t0:t1] = torch.where(inside, value, self.at_label[t0:t1])


def forward(hidden: List[torch.Tensor], call, stats: RowStats, gathered: TileCandidates = None) -> dict:
    """``logp``, ``log_kept_mass`` and the kept set's statistics, fp32 ``[n]`` over the call's kept rows.

    ``call`` is the :class:`~prefopt_kernels.linear.passes.LinearCall` of the forward, ``stats``
    its finished (global) statistics, ``gathered`` the candidates its pass gathered (``None``:
    the tiles are projected once more for them).
    """
    op, shard, policy = call.spec.op, call.shard, call.policy
    plan = call.plan(backward=False)
    device = hidden[0].device
    first = None
    if gathered is not None:
        n = stats.row_max.numel()
        first = Candidates.of_largest(gathered.largest[:n], gathered.at_label[:n], stats.row_max, op.temperature)
        first.merge_across(shard.group)

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

    kept, label_u = find_kept_set(sweep, stats.log_norm, op, shard.vocab, first)
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
