r"""Sampler-matched log-probs: the label's log-prob over the kept set of vLLM's sampler.

With ``z = x / T`` (``x`` the logits as the op sees them: after scale and softcap in the fused
linear ops) the kept set ``K`` is built in vLLM's order: min-p keeps ``z_i >= max z +
log(min_p)``; top-k keeps the ``z_i`` at least the k-th largest (ties kept); top-p then keeps,
over the distribution renormalised on what is left, the smallest set of largest tokens whose
mass reaches ``top_p`` (every token tied with the last one kept). Every filter is a
threshold, so ``K = {i : u_i >= t}`` for one per-row ``t``, where ``u = (x - max x) / T`` is
the row relative to its raw maximum (the backends' saved ``row_max``), formed in fp32 the same
way everywhere, so that forward and backward agree on ``K`` element by element. Outputs
``logp = u_y - lse_K(u)`` (``-inf`` when ``y`` is not in ``K``) and ``log_kept_mass =
lse_K(u) - lse_V(u)``; gradient of ``logp``: ``(1[i = y] - p_K(i)) / T`` on ``K``, 0 outside.

Mechanism. The backend's own first pass gives ``row_max`` and ``lse_V`` (every backend runs
the option). One more read of the row (in row blocks for the logits ops, in projected tiles
for the fused linear ops) keeps the ``C`` largest ``u`` per row (:class:`Candidates`; a
``topk`` over the concatenation merges two slices, so vocabulary tiles and tensor-parallel
shards merge like the row states), the label's ``u`` and, with ``min_p``, the mass above the
min-p threshold (known before the read: ``log(min_p)`` in ``u``). :func:`decide` then finds
``t`` in float64 from the candidates; the set is *settled* when ``{u >= t}`` provably lies
within them (``t`` above the smallest candidate, that candidate ``-inf``, or ``C >= V``).
Rows that are not settled are read again with ``2 C`` candidates, and so on: at most
``ceil(log2(V / C))`` further reads of those rows only. ``C`` is ``top_k + 1`` with ``top_k``,
else :data:`DEFAULT_CANDIDATES`: one further read whenever ``top_k <= V`` or the nucleus fits
in 1024 tokens. ``log_kept_mass`` is not differentiable (the set is held fixed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .backends import nan_guard
from .spec import OpSpec

DEFAULT_CANDIDATES = 1024  # candidates per row without top_k: nuclei up to this size settle in one read
# The per-row statistics a sampled forward adds to what its backward reads, in this order.
KEPT_STATS = ("kept_threshold", "kept_log_norm")
NEG_INF = float("-inf")


def kept_stat_count(op: OpSpec) -> int:
    """How many ``[N]`` statistics a forward of ``op`` saves for its kept set."""
    return len(KEPT_STATS) if op.samples else 0


def candidate_count(op: OpSpec, vocab: int) -> int:
    """The first number of candidates per row: ``top_k + 1`` (to see past the k-th), else the default."""
    return max(1, min(op.top_k + 1 if op.top_k else DEFAULT_CANDIDATES, vocab))


def minp_threshold(op: OpSpec) -> float:
    """``log(min_p)`` as the fp32 value every comparison ``u >= t`` uses (``-inf`` without min-p)."""
    if op.min_p <= 0.0:
        return NEG_INF
    return float(torch.tensor(math.log(op.min_p), dtype=torch.float32))


def relative_logits(x: torch.Tensor, row_max: torch.Tensor, temperature: float) -> torch.Tensor:
    """``u = (x - row_max) / T`` of a ``[n, Vs]`` slice, fp32, a new tensor: the one formula of ``K``."""
    return torch.sub(x.float(), row_max[:, None]).div_(temperature)


@dataclass
class Candidates:
    """The running candidates of ``n`` rows over the slices read so far; merges by :meth:`fold`.

    ``values`` ``[n, C]`` fp32, the largest ``u`` in descending order (``-inf`` padded);
    ``label_u`` ``[n]`` fp32, ``u`` at the label (``-inf`` until the slice holding it is read);
    ``minp_mass`` ``[n]`` float64, ``sum exp(u_i)`` over ``u_i >= log(min_p)`` (``None``
    without min-p).
    """

    values: torch.Tensor
    label_u: torch.Tensor
    minp_mass: Optional[torch.Tensor]

    @classmethod
    def empty(cls, n: int, count: int, op: OpSpec, device) -> "Candidates":
        mass = torch.zeros(n, dtype=torch.float64, device=device) if op.min_p > 0 else None
        return cls(torch.full((n, count), NEG_INF, device=device), torch.full((n,), NEG_INF, device=device), mass)

    def fold(self, u: torch.Tensor, labels_local: torch.Tensor, op: OpSpec) -> None:
        """Merge the slice ``u`` ``[n, Vs]`` (``labels_local``: the labels less the slice's offset)."""
        count, width = self.values.shape[1], u.shape[1]
        if width == 0:
            return
        top = u.topk(min(count, width), dim=1).values
        self.values = torch.cat([self.values, top], 1).topk(count, dim=1).values
        inside = (labels_local >= 0) & (labels_local < width)
        at_label = u.gather(1, labels_local.clamp(0, width - 1)[:, None]).squeeze(1)
        self.label_u = torch.maximum(self.label_u, torch.where(inside, at_label, NEG_INF))
        if self.minp_mass is not None:
            kept = torch.where(u >= minp_threshold(op), u, NEG_INF)
            self.minp_mass += kept.exp_().sum(1, dtype=torch.float64)

    def merge_across(self, group) -> None:
        """Merge every rank's candidates of the same rows (all ranks end with the same values)."""
        if group is None:
            return
        dist = torch.distributed
        parts = [torch.empty_like(self.values) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, self.values.contiguous(), group=group)
        self.values = torch.cat(parts, 1).topk(self.values.shape[1], dim=1).values
        dist.all_reduce(self.label_u, op=dist.ReduceOp.MAX, group=group)
        if self.minp_mass is not None:
            dist.all_reduce(self.minp_mass, group=group)


@dataclass
class KeptSet:
    """Per row (``[n]`` each): ``threshold`` ``t`` (fp32, ``K = {u >= t}``), ``log_norm`` ``lse_K(u)``
    (fp32) and ``settled`` (bool: ``K`` was certified within the candidates)."""

    threshold: torch.Tensor
    log_norm: torch.Tensor
    settled: torch.Tensor


def decide(candidates: Candidates, log_norm: torch.Tensor, op: OpSpec, vocab: int) -> KeptSet:
    """The kept set of each row from its candidates, in float64.

    ``log_norm`` is ``lse_V(u)`` of the backend's first pass, ``vocab`` the global V. Where
    the set reaches past the candidates (ties at the last one, a nucleus or top-k set larger
    than ``C``) the row is not settled and its ``threshold`` is a lower bound only.
    """
    values = candidates.values.double()
    n, count = values.shape
    device = values.device
    complete = count >= vocab
    smallest = values[:, -1]

    def within(t):  # {u >= t} lies among the candidates
        return torch.full_like(t, complete, dtype=torch.bool) | (t > smallest) | (smallest == NEG_INF)

    def lse_above(t):
        return torch.logsumexp(torch.where(values >= t[:, None], values, NEG_INF), 1)

    full_lse = log_norm.double()
    threshold = torch.full((n,), NEG_INF, dtype=torch.float64, device=device)
    left_lse = full_lse
    settled = torch.ones(n, dtype=torch.bool, device=device)
    if op.min_p > 0:
        threshold = torch.full_like(threshold, minp_threshold(op))
        left_lse = candidates.minp_mass.log()
    if 0 < op.top_k < vocab:
        kth = values[:, op.top_k - 1]
        tighter = kth > threshold
        threshold = torch.where(tighter, kth, threshold)
        left_lse = torch.where(tighter, lse_above(threshold), left_lse)
        settled &= ~tighter | within(kth)
    if op.top_p < 1.0:
        mass = torch.where(values >= threshold[:, None], (values - left_lse[:, None]).exp(), 0.0)
        reached = mass.cumsum(1) >= op.top_p
        found = reached.any(1)
        cutoff = values.gather(1, reached.byte().argmax(1, keepdim=True)).squeeze(1)
        # Not reached only by rounding when everything left is among the candidates: keep it all.
        settled &= torch.where(found, within(cutoff), within(threshold))
        threshold = torch.where(found, torch.maximum(cutoff, threshold), threshold)
    # Beyond the candidates only a settled min-p set can be: its mass was summed in the read.
    kept_lse = torch.where(within(threshold), lse_above(threshold), left_lse)
    # The whole row kept: its normaliser is the backend's own, and log_kept_mass exactly 0.
    whole = (threshold == NEG_INF) | (complete & ((values >= threshold[:, None]).sum(1) >= vocab))
    # NaN on a row holding a NaN or +inf: a backend's backward fed lse_K then keeps the NaN policy.
    kept_lse = torch.where(whole, full_lse, kept_lse) + nan_guard(full_lse)
    settled |= full_lse.isnan()
    return KeptSet(threshold.float(), kept_lse.float(), settled)


def find_kept_set(sweep: Callable[[torch.Tensor, int], Candidates], log_norm: torch.Tensor, op: OpSpec,
                  vocab: int):
    """``(KeptSet, label_u)`` of ``n`` rows, reading them again only where the set is not settled.

    ``sweep(positions, count)`` reads the rows ``positions`` (int64 into the ``n``) and returns
    their :class:`Candidates` with ``count`` per row, merged over every slice (and rank). The
    loop's condition is a host sync, identical on every rank of a sharded call (the merged
    candidates are).
    """
    count = candidate_count(op, vocab)
    n = log_norm.numel()
    first = sweep(torch.arange(n, device=log_norm.device), count)
    kept = decide(first, log_norm, op, vocab)
    pending = ~kept.settled
    while count < vocab and bool(pending.any()):
        count = min(2 * count, vocab)
        positions = pending.nonzero().reshape(-1)
        again = decide(sweep(positions, count), log_norm[positions], op, vocab)
        kept.threshold[positions] = again.threshold
        kept.log_norm[positions] = again.log_norm
        pending = torch.zeros_like(pending)
        pending[positions] = ~again.settled
    return kept, first.label_u


def kept_outputs(threshold: torch.Tensor, kept_log_norm: torch.Tensor, label_u: torch.Tensor,
                 log_norm: torch.Tensor):
    """``(logp, log_kept_mass)`` fp32 ``[n]``: ``u_y - lse_K`` (``-inf`` off ``K``) and ``lse_K - lse_V``,
    NaN on rows holding a NaN or ``+inf``."""
    guard = nan_guard(log_norm)
    logp = torch.where(label_u >= threshold, (label_u.double() - kept_log_norm.double()), NEG_INF).float()
    mass = (kept_log_norm.double() - log_norm.double()).float()
    return logp + guard, mass + guard


def kept_statistics(stats, kept_log_norm: torch.Tensor):
    """``stats`` with ``log_norm`` replaced by ``lse_K`` (relative to the same ``row_max``): a backend's
    logp gradient from them is ``(1[i = y] - p_K(i)) g / T`` at every ``i``, right on ``K``."""
    return dataclasses.replace(stats, log_norm=kept_log_norm)


def outside_kept_set(x: torch.Tensor, row_max: torch.Tensor, log_norm: torch.Tensor, threshold: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Bool ``[n, Vs]``: the entries of raw logits ``x`` outside ``K`` (none on a NaN row, whose
    gradient stays NaN as a whole)."""
    return (relative_logits(x, row_max, temperature) < threshold[:, None]) & (log_norm == log_norm)[:, None]


def logp_gradient_(u: torch.Tensor, threshold: torch.Tensor, kept_log_norm: torch.Tensor,
                   labels_local: torch.Tensor, grad_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Turn ``u`` ``[n, Vs]`` (fp32, :func:`relative_logits`) in place into ``g (1[i = y] 1[y in K] - p_K(i)
    1[i in K]) / T``; ``labels_local`` are the labels less the slice's offset (the label term lands
    only where the slice holds it). Five elementwise passes and one scatter."""
    width = u.shape[1]
    in_set = u >= threshold[:, None]
    label_column = labels_local.clamp(0, max(width - 1, 0))[:, None]
    label_kept = (labels_local >= 0) & (labels_local < width) & (u.gather(1, label_column).squeeze(1) >= threshold)
    scale = grad_logp / temperature
    u.sub_(kept_log_norm[:, None]).exp_().mul_(in_set).mul_(-scale[:, None])
    u.scatter_add_(1, label_column, torch.where(label_kept, scale, 0.0)[:, None])
    return u
