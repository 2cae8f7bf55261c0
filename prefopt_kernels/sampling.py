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
the option). Where the backend gathers them in that same read (its forward on whole rows, its
fold on a vocabulary shard; the fused linear ops from their projected tiles), and otherwise in
one more read of the row (in row blocks), the ``C`` largest logits per row become ``u`` (:class:`Candidates`;
a ``topk`` over the concatenation merges two slices, so vocabulary tiles and tensor-parallel
shards merge like the row states) and the label's ``u``. :func:`decide` then finds ``t`` in
float64 from the candidates (top-p's masses normalised by ``lse_V`` without min-p or top-k, by
the candidates otherwise); the set is *settled* when ``{u >= t}`` (and what min-p and top-k
leave for top-p) provably lies among them: ``t`` above the smallest candidate, that candidate
``-inf``, or ``C >= V``. Rows that are not settled are read again with ``2 C`` candidates, and
so on: at most ``ceil(log2(V / C))`` further reads of those rows only. ``C`` is ``top_k + 1``
with ``top_k``, else :data:`DEFAULT_CANDIDATES`: no further read whenever ``top_k < C`` or the
nucleus and the min-p set fit in 1024 tokens. ``log_kept_mass`` is not differentiable (the set
is held fixed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .backends import nan_guard
from .spec import OpSpec

DEFAULT_CANDIDATES = 1024  # candidates per row without top_k: nuclei up to this size settle in one read
# The per-row statistics a sampled forward adds to what its backward reads, in this order.
KEPT_STATS = ("kept_threshold", "kept_log_norm")
NEG_INF = float("-inf")
DECIDE_BLOCK_BYTES = 32 * 2**20  # one float64 [rows, C] temporary of the decision


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
    ``label_u`` ``[n]`` fp32, ``u`` at the label (``-inf`` until the slice holding it is read).
    """

    values: torch.Tensor
    label_u: torch.Tensor

    @classmethod
    def empty(cls, n: int, count: int, device) -> "Candidates":
        return cls(torch.full((n, count), NEG_INF, device=device), torch.full((n,), NEG_INF, device=device))

    @classmethod
    def of_largest(cls, largest: torch.Tensor, at_label: torch.Tensor, row_max: torch.Tensor,
                   temperature: float) -> "Candidates":
        """The candidates of rows from their ``C`` largest raw logits ``largest`` ``[n, C]`` read so
        far (descending, ``-inf`` padded: a backend's ``forward_with_candidates``, or the fused
        linear forward's tiles) and the raw logits at the labels ``at_label`` ``[n]`` (``-inf``
        where not read): the values :meth:`fold` gives for the same slices, since ``u`` never
        decreases as ``x`` grows, with no read of the rows."""
        return cls(relative_logits(largest, row_max, temperature),
                   relative_logits(at_label[:, None], row_max, temperature)[:, 0])

    def fold(self, x: torch.Tensor, row_max: torch.Tensor, temperature: float, labels_local: torch.Tensor) -> None:
        """Merge the slice of raw logits ``x`` ``[n, Vs]`` (``labels_local``: the labels less the slice's
        offset). ``u`` never decreases as ``x`` grows, so the ``topk`` runs on ``x`` itself and only the
        ``C`` values it keeps (and the label's) are turned into ``u``: one read of the slice."""
        count, width = self.values.shape[1], x.shape[1]
        if width == 0:
            return
        top = relative_logits(x.topk(min(count, width), dim=1).values, row_max, temperature)
        self.values = torch.cat([self.values, top], 1).topk(count, dim=1).values
        inside = (labels_local >= 0) & (labels_local < width)
        at_label = relative_logits(x.gather(1, labels_local.clamp(0, width - 1)[:, None]), row_max, temperature)
        self.label_u = torch.maximum(self.label_u, torch.where(inside, at_label[:, 0], NEG_INF))

    def merge_across(self, group) -> None:
        """Merge every rank's candidates of the same rows (all ranks end with the same values)."""
        if group is None:
            return
        dist = torch.distributed
        parts = [torch.empty_like(self.values) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, self.values.contiguous(), group=group)
        self.values = torch.cat(parts, 1).topk(self.values.shape[1], dim=1).values
        dist.all_reduce(self.label_u, op=dist.ReduceOp.MAX, group=group)


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
    threshold = torch.full((n,), minp_threshold(op), dtype=torch.float64, device=device)
    if 0 < op.top_k < vocab:
        threshold = torch.maximum(threshold, values[:, op.top_k - 1])
    # What min-p and top-k leave: all of the row, or a set that must lie among the candidates.
    unfiltered = threshold == NEG_INF
    settled = unfiltered | within(threshold)
    left_lse = torch.where(unfiltered, full_lse, lse_above(threshold))
    if op.top_p < 1.0:
        mass = torch.where(values >= threshold[:, None], (values - left_lse[:, None]).exp(), 0.0)
        reached = mass.cumsum(1) >= op.top_p
        found = reached.any(1)
        cutoff = values.gather(1, reached.byte().argmax(1, keepdim=True)).squeeze(1)
        # Not reached only by rounding when everything left is among the candidates: keep it all.
        settled &= torch.where(found, within(cutoff), within(threshold))
        threshold = torch.where(found, torch.maximum(cutoff, threshold), threshold)
    kept_lse = torch.where(within(threshold), lse_above(threshold), left_lse)
    # The whole row kept: its normaliser is the backend's own, and log_kept_mass exactly 0.
    whole = (threshold == NEG_INF) | (complete & ((values >= threshold[:, None]).sum(1) >= vocab))
    # NaN on a row holding a NaN or +inf: a backend's backward fed lse_K then keeps the NaN policy.
    kept_lse = torch.where(whole, full_lse, kept_lse) + nan_guard(full_lse)
    settled |= full_lse.isnan()
    return KeptSet(threshold.float(), kept_lse.float(), settled)


def decide_in_blocks(candidates: Candidates, log_norm: torch.Tensor, op: OpSpec, vocab: int) -> KeptSet:
    """:func:`decide` over blocks of rows, so that its float64 ``[rows, C]`` temporaries stay within
    :data:`DECIDE_BLOCK_BYTES` each."""
    n, count = candidates.values.shape
    step = max(1, DECIDE_BLOCK_BYTES // (8 * count))
    parts = []
    for s in range(0, n, step):
        rows = slice(s, s + step)
        parts.append(decide(Candidates(candidates.values[rows], candidates.label_u[rows]), log_norm[rows], op,
                            vocab))
    if not parts:
        return decide(candidates, log_norm, op, vocab)
    return KeptSet(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(KeptSet)))


def find_kept_set(sweep: Callable[[torch.Tensor, int], Candidates], log_norm: torch.Tensor, op: OpSpec,
                  vocab: int, first: Candidates = None):
    """``(KeptSet, label_u)`` of ``n`` rows, reading them again only where the set is not settled.

    ``sweep(positions, count)`` reads the rows ``positions`` (int64 into the ``n``) and returns
    their :class:`Candidates` with ``count`` per row, merged over every slice (and rank). The
    loop's condition is a host sync, identical on every rank of a sharded call (the merged
    candidates are). ``first``, when given, holds the :func:`candidate_count` candidates of
    every row already (gathered by the backend's own forward): no row is read unless it is
    not settled.
    """
    count = candidate_count(op, vocab)
    n = log_norm.numel()
    if first is None:
        first = sweep(torch.arange(n, device=log_norm.device), count)
    kept = decide_in_blocks(first, log_norm, op, vocab)
    pending = ~kept.settled
    while count < vocab and bool(pending.any()):
        count = min(2 * count, vocab)
        positions = pending.nonzero().reshape(-1)
        again = decide_in_blocks(sweep(positions, count), log_norm[positions], op, vocab)
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


def _ordered(bits: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns (int32) mapped to ints in the floats' order, and back (the map is its own inverse)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def raw_threshold(threshold: torch.Tensor, row_max: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row the smallest fp32 ``x_t`` with ``relative_logits(x_t) >= t``, so that ``K = {x >= x_t}``.

    ``u(x) = fl(fl(x - row_max) / T)`` never decreases as ``x`` grows, so the set is a threshold
    on the raw logits too: a bisection over the fp32 values in their order (32 steps on ``[n]``
    tensors, once per call) finds it, and the backward compares raw logits without forming
    ``u``. ``-inf`` where ``t`` is (the whole row kept).
    """
    def value(key):  # int64 keys, so that the gap between two of them never overflows
        return _ordered(key.to(torch.int32)).view(torch.float32)

    def kept(key):
        return relative_logits(value(key)[:, None], row_max, temperature)[:, 0] >= threshold

    infinity = torch.tensor([math.inf], dtype=torch.float32, device=threshold.device)
    lo = _ordered((-infinity).view(torch.int32)).to(torch.int64).expand_as(threshold).clone()
    hi = _ordered(infinity.view(torch.int32)).to(torch.int64).expand_as(threshold).clone()
    for _ in range(32):  # hi is kept, lo is not (where t > -inf): halve the gap
        mid = lo + (hi - lo) // 2
        take = kept(mid)
        hi, lo = torch.where(take, mid, hi), torch.where(take, lo, mid)
    return torch.where(threshold == NEG_INF, NEG_INF, value(hi))


def outside_kept_set(x: torch.Tensor, raw: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
    """Bool ``[n, Vs]``: the entries of raw logits ``x`` below ``raw`` (:func:`raw_threshold`), that is
    outside ``K``; none on a NaN row, whose gradient stays NaN as a whole."""
    return (x < raw[:, None]) & (log_norm == log_norm)[:, None]


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
