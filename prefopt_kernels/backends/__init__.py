"""Backend interface shared by every implementation of the fused token ops.

A backend is a module with

    NAME: str
    is_available() -> bool
    supports(device: torch.device) -> bool
    forward(logits, labels, ref_logits, weight, spec) -> RowStats
    backward(logits, labels, ref_logits, weight, spec, stats,
             grad_logp, grad_entropy, grad_div, grad_out) -> None
    kept_tokens(labels, weight, ignore_index, n_tokens, device)
        -> (int64 [N] kept token indices in increasing order then -1,
            int64 [3] on the device: their count, least and greatest kept label)

and, for the row states of vocabulary slices (``row_state``: the fused linear path and the
sharded ops), ``fold``, ``sweep`` and ``slice_backward``, and the finish of a whole row's
state, one launch each:

    finalize(state, labels, weight, spec, every_row_read) -> RowStats
    finish_sweep(stats, value_sum, centred_sum, labels, weight, spec, every_row_read) -> RowStats

and optionally, for the sampler-matched forward's one read of the row,

    max_candidates(device, entry) -> int   (0 where ``entry``, one of the two below, does not run)
    forward_with_candidates(logits, labels, ref_logits, weight, spec, count)
        -> (RowStats, fp32 [N, count] largest raw policy logits per row, descending, -inf padded)
    fold_with_candidates(state, logits, labels, ref_logits, weight, spec, v0, count)
        -> (RowState, fp32 [N, count] the slice's largest raw policy logits, as above)

All tensors reaching a backend are already checked by ``prefopt_kernels.ops``:

* ``logits`` / ``ref_logits``: ``[B, T, V]`` views of the caller's tensors (never copies),
  same dtype (fp32, bf16 or fp16), same device, ``stride(2) == 1``; ``stride(0)`` and
  ``stride(1)`` are arbitrary, so a sliced ``logits[:, :-1, :]`` is legal. Token ``n`` of the
  flat ``N = B * T`` order lives at ``(n // T) * stride(0) + (n % T) * stride(1)``; offsets
  must be computed in int64. Outputs and the other per-token tensors are flat ``[N]``.
* ``labels``: ``[N]`` int64, every entry in ``[0, V)`` or equal to ``spec.ignore_index``.
* ``weight``: ``[N]`` contiguous fp32 or ``None``.
* ``grad_*``: ``[N]`` contiguous fp32 or ``None`` (``None`` means zero).
* ``grad_out``: ``[B, T, V]`` in the logits' dtype, ``stride(2) == 1``; it may be the logits
  tensor itself (``inplace_backward``), so a backend reads each element of a row before
  it writes that element, and writes every element (0 on skipped rows).

Row skipping: a row whose label is ``ignore_index`` is skipped entirely (all outputs 0,
gradient row 0, no loads of either logits row). With ``weight`` given, a row whose weight is
0 gets ``div = 0`` and no divergence gradient; when the op has no labels such a row is
skipped entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from ..divergences import Divergence
from ..spec import OpSpec

# Public name -> code, for callers that build an OpSpec by name.
DIVERGENCE_CODES = {d.key: d.value for d in Divergence}


@dataclass
class RowStats:
    """Per-row fp32 ``[N]`` results of a forward pass. Fields not asked for are ``None``.

    The log-sum-exp of a row is kept in two parts, ``lse(a / T) = row_max / T + log_norm``
    with ``row_max = max_i a_i`` (raw logits, ``-inf``-safe: 0 for an all ``-inf`` row) and
    ``log_norm = log sum_i exp((a_i - row_max) / T)``. The backward recomputes
    ``log p_i = (a_i - row_max) / T - log_norm``: ``a_i - row_max`` is exact where ``p_i``
    is large, so ``p`` keeps full fp32 accuracy even for logits of large magnitude, where a
    single rounded ``lse`` would cost ``eps * |a| / T`` in every ``log p_i``.

    ``row_max`` and ``log_norm`` are always present; ``ref_row_max`` and ``ref_log_norm``
    whenever a reference is given; ``div_s = S = sum_i p_i f'(t_i)`` whenever a divergence
    is asked for; ``entropy`` when asked for (the backward needs it). Skipped rows hold 0 in
    every field.

    ``div_s`` is centred for every divergence but forward KL (where ``S = -1`` exactly and
    the gradient is ``p - q``): an unbounded ``f'`` (reverse KL's ``log t + 1``, chi2's
    ``2(t - 1)``, alpha's powers) makes ``f'(t_j) - S`` cancel two large numbers when a
    peaked policy is far from the reference. With ``k`` the policy's argmax, the forward
    stores ``ref_at_argmax = b_k`` (raw, ``-inf`` where the reference excludes ``k``) and ``div_s = S - f'(t_k) = sum_i p_i (f'(t_i) -
    f'(t_k))``; the backward forms ``p_j ((f'(t_j) - f'(t_k)) - div_s)``, which is exactly
    ``-p_k div_s`` at ``j = k`` because ``log p_k = -log_norm`` exactly. Reverse KL forms
    ``f'(t_j) - f'(t_k) = (a_j - a_k) / T - (b_j - b_k) / T`` from raw differences.
    """

    row_max: torch.Tensor
    log_norm: torch.Tensor
    logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    div: Optional[torch.Tensor] = None
    ref_row_max: Optional[torch.Tensor] = None
    ref_log_norm: Optional[torch.Tensor] = None
    div_s: Optional[torch.Tensor] = None
    ref_at_argmax: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, n: int, names, device) -> "RowStats":
        """Uninitialised fp32 ``[n]`` tensors for the fields ``names`` (those of
        :func:`present_stats`, for a forward to write), ``None`` elsewhere."""
        return cls(**{f.name: torch.empty(n, dtype=torch.float32, device=device) if f.name in names else None
                      for f in fields(cls)})

    def saved(self, spec: OpSpec, has_ref: bool) -> list:
        """The fields a backward pass reads: :func:`saved_names` of the call, in that order."""
        names = saved_names(spec, has_ref)
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise RuntimeError(f"a forward pass left out the saved statistics {missing}")
        return [getattr(self, name) for name in names]

    @classmethod
    def from_saved(cls, values, spec: OpSpec, has_ref: bool) -> "RowStats":
        """The inverse of :meth:`saved`: the statistics a backward pass is handed."""
        return cls(**dict(zip(saved_names(spec, has_ref), values, strict=True)))


# The one list of per-row statistics that cross from a forward to its backward (and, all
# but ``entropy`` and ``div_s``, to a second sweep): ctx.save_for_backward, every backend's
# backward and the C++ bindings follow this order.
SAVED_STATS = ("row_max", "log_norm", "ref_row_max", "ref_log_norm", "entropy", "div_s", "ref_at_argmax")
SWEEP_STATS = ("row_max", "log_norm", "ref_row_max", "ref_log_norm", "ref_at_argmax")


def present_stats(spec: OpSpec, has_labels: bool, has_ref: bool) -> tuple:
    """The :class:`RowStats` fields a forward of ``spec`` produces, in field order: the one rule
    every backend allocates by and :func:`saved_names` selects from.

    ``row_max`` and ``log_norm`` always; ``logp`` when asked for with labels, ``ref_logp``
    when asked for with labels and a reference; ``entropy`` when asked for; with a reference,
    ``ref_row_max`` and ``ref_log_norm``, and for a divergence ``div`` and ``div_s``, with
    ``ref_at_argmax`` where the registry calls the divergence centred. An unknown divergence
    code raises ``ValueError``.
    """
    member = spec.member if has_ref else None
    present = {
        "row_max": True, "log_norm": True,
        "logp": spec.want_logp and has_labels,
        "ref_logp": spec.want_ref_logp and has_labels and has_ref,
        "entropy": spec.want_entropy,
        "div": member is not None,
        "ref_row_max": has_ref, "ref_log_norm": has_ref,
        "div_s": member is not None,
        "ref_at_argmax": member is not None and member.centred,
    }
    return tuple(f.name for f in fields(RowStats) if present[f.name])


def saved_names(spec: OpSpec, has_ref: bool) -> tuple:
    """The :data:`SAVED_STATS` that a forward of ``spec`` produces (with a reference or not), in order.

    The saved statistics of :func:`present_stats`, which labels never change. Every backend
    follows this rule; the registered ops' fake implementations rely on it to know their
    outputs without running a kernel.
    """
    present = present_stats(spec, has_labels=False, has_ref=has_ref)
    return tuple(name for name in SAVED_STATS if name in present)


def kept_rows(labels: Optional[torch.Tensor], weight: Optional[torch.Tensor], ignore_index: int, n: int,
              device) -> torch.Tensor:
    """bool ``[N]``: the rows a pass reads (the backend interface's rule). With labels, those whose
    label is not ``ignore_index`` (a zero weight only drops the divergence term); without,
    those whose weight is non-zero (NaN counts as non-zero, ``-0.0`` does not); without
    either, every row."""
    if labels is not None:
        return labels != ignore_index
    return torch.ones(n, dtype=torch.bool, device=device) if weight is None else weight != 0


# The summary of kept_tokens where no label is kept (none kept, or no labels): the identities
# of min and max, which no range check rejects.
NO_KEPT_LABEL = (2 ** 63 - 1, -2 ** 63)


def rows_read(labels: Optional[torch.Tensor], weight: Optional[torch.Tensor], spec: OpSpec, n: int, device):
    """``(read, div_on)``, bool ``[N]``: the rows a pass reads (:func:`kept_rows`), and those with
    the divergence term: a zero weight drops it."""
    read = kept_rows(labels, weight, spec.ignore_index, n, device)
    return read, (read if labels is None or weight is None else read & (weight != 0))


def nan_guard(log_norm: torch.Tensor) -> torch.Tensor:
    """0 per row, NaN where ``log_norm`` is not finite: the row holds a NaN or ``+inf`` logit.

    Added to every output (and gradient) that depends on the row: the NaN policy of
    ``prefopt_kernels.ops`` at the cost of one add per row. Detached: it carries no gradient.
    """
    log_norm = log_norm.detach()
    return log_norm - log_norm
