"""Triton backend: launches the kernels of the ``kernels`` package, one program per token row.

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` Triton's interpreter runs the same
kernels on CPU tensors, which is how they are tested without a GPU. js and alpha receive
their parameters derived here in float64 (``_divergence_params``); the NaN policy and the
``expm1``/``log1p`` forms are described in ``kernels.row_math``.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields

import torch
import triton

from .. import SAVED_STATS, SWEEP_STATS, OpSpec, RowStats, present_stats, row_state
from .config import launch_config, row_alignment

NAME = "triton"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    """True when Triton imports and can run: on a CUDA device, or under its interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return _interpreted() or torch.cuda.is_available()


def supports(device: torch.device) -> bool:
    """CUDA tensors, and CPU tensors under the interpreter (``TRITON_INTERPRET=1``)."""
    return device.type == "cuda" or (_interpreted() and device.type == "cpu")


# The most candidates per row the forward gathers: its buffer row holds them and one whole tile.
MAX_CANDIDATES = 2048
# Interpreted, each compaction's tl.topk over the buffer takes seconds: the ops gather only this
# many there (top_k < 64) and read the rows again beyond; forward_with_candidates takes any count.
INTERPRETED_CANDIDATES = 64


def forward(logits, labels, ref_logits, weight, spec: OpSpec) -> RowStats:
    """Per-row statistics of one read of every row (``prefopt_kernels.backends`` has the contract)."""
    return _forward(logits, labels, ref_logits, weight, spec, 0)[0]


def max_candidates(device: torch.device, entry: str = "forward_with_candidates") -> int:
    """The most candidates per row the ops have ``entry`` (:func:`forward_with_candidates` or
    :func:`fold_with_candidates`, the same for both) gather on ``device``."""
    return INTERPRETED_CANDIDATES if _interpreted() else MAX_CANDIDATES


def forward_with_candidates(logits, labels, ref_logits, weight, spec: OpSpec, count: int):
    """:func:`forward` and, from the same read of each row, its ``count`` largest policy logits.

    Returns ``(RowStats, values)``, ``values`` fp32 ``[N, count]`` (the first columns of the
    kernel's ``[N, CAP]`` buffer of the logits' dtype, ``CAP = next_power_of_2(count + BLOCK_V)``,
    widened): each row's largest raw logits in descending order, the multiset ``torch.topk``
    gives, ``-inf`` padded past ``V`` and on skipped rows; NaN never enters.
    ``1 <= count <= MAX_CANDIDATES``.
    """
    return _forward(logits, labels, ref_logits, weight, spec, count)


def _forward(logits, labels, ref_logits, weight, spec: OpSpec, count: int):
    from .kernels import token_forward_kernel

    batches, tokens, vocab = logits.shape
    n = batches * tokens
    stats = RowStats.empty(n, present_stats(spec, labels is not None, ref_logits is not None), logits.device)
    placeholder = stats.log_norm
    ref = ref_logits if ref_logits is not None else logits
    block_v, num_warps = launch_config(vocab, logits.element_size(), two_rows=ref_logits is not None)
    top, cap = _candidate_buffer(n, count, block_v, logits)
    token_forward_kernel[(n,)](
        **_rows(logits, ref, labels, weight, placeholder),
        **_pointers(stats, [f.name for f in fields(RowStats)], placeholder), top_ptr=_or_placeholder(top, placeholder),
        vocab=vocab, inv_temperature=1.0 / spec.temperature, ignore_index=spec.ignore_index,
        **_divergence_params(spec),
        HAS_LABELS=labels is not None, HAS_REF=ref_logits is not None, HAS_WEIGHT=weight is not None,
        WANT_LOGP=stats.logp is not None, WANT_ENTROPY=stats.entropy is not None,
        WANT_REF_LOGP=stats.ref_logp is not None,
        DIVERGENCE=spec.divergence if ref_logits is not None else 0,
        BLOCK_V=block_v, ALIGN=row_alignment(block_v, logits, ref), num_warps=num_warps,
        **(dict(CANDIDATES=count, CAP=cap) if count else {}),
    )
    return stats, _gathered(top, count)


def backward(logits, labels, ref_logits, weight, spec: OpSpec, stats: RowStats,
             grad_logp, grad_entropy, grad_div, grad_out) -> None:
    """The gradient wrt ``logits`` into ``grad_out``: the whole row is the slice ``v0 = 0``, and
    an fp32 gradient's argmax entry comes from the row's zero sum (``token_backward_kernel``)."""
    _backward(logits, labels, ref_logits, weight, spec, stats, grad_logp, grad_entropy, grad_div, grad_out, 0,
              whole_row=True)


def slice_backward(logits, labels, ref_logits, weight, spec: OpSpec, stats: RowStats,
                   grad_logp, grad_entropy, grad_div, grad_out, v0: int) -> None:
    """The gradient of the slice ``[v0, v0 + Vs)`` (``logits`` ``[B, T, Vs]``) from the whole
    row's statistics, into ``grad_out``; a whole row is ``v0 = 0``. See ``row_state``."""
    _backward(logits, labels, ref_logits, weight, spec, stats, grad_logp, grad_entropy, grad_div, grad_out, v0,
              whole_row=False)


def _backward(logits, labels, ref_logits, weight, spec: OpSpec, stats: RowStats,
              grad_logp, grad_entropy, grad_div, grad_out, v0: int, whole_row: bool) -> None:
    from .kernels import token_backward_kernel
    from .kernels.backward import ZERO_SUM_MAX_VOCAB

    batches, tokens, vocab = logits.shape
    n = batches * tokens
    if vocab == 0:  # an empty slice has no gradient to write
        return
    has_div = bool(spec.divergence) and grad_div is not None
    ref = ref_logits if ref_logits is not None else logits
    placeholder = stats.log_norm
    block_v, num_warps = launch_config(vocab, logits.element_size(), two_rows=has_div)
    token_backward_kernel[(n,)](
        **_rows(logits, ref, labels, weight, placeholder),
        **_pointers(stats, SAVED_STATS, placeholder),
        grad_logp_ptr=_or_placeholder(grad_logp, placeholder),
        grad_entropy_ptr=_or_placeholder(grad_entropy, placeholder),
        grad_div_ptr=_or_placeholder(grad_div, placeholder),
        grad_ptr=grad_out, stride_gb=grad_out.stride(0), stride_gt=grad_out.stride(1),
        vocab=vocab, v0=v0, inv_temperature=1.0 / spec.temperature, ignore_index=spec.ignore_index,
        **_divergence_params(spec),
        HAS_LABELS=labels is not None, HAS_WEIGHT=weight is not None,
        GRAD_LOGP=grad_logp is not None, GRAD_ENTROPY=grad_entropy is not None,
        DIVERGENCE=spec.divergence if has_div else 0,
        BLOCK_V=block_v, ALIGN=row_alignment(block_v, logits, ref, grad_out), num_warps=num_warps,
        ZERO_SUM=whole_row and grad_out.dtype == torch.float32 and vocab < ZERO_SUM_MAX_VOCAB,
    )


def fold(state: row_state.RowState, logits, labels, ref_logits, weight, spec: OpSpec, v0: int,
         first_slice: bool = False):
    """Merge the first-pass state of the slice ``[v0, v0 + Vs)`` (``logits`` ``[B, T, Vs]``,
    labels global ids) into ``state`` in place, and return ``state``: the whole-row forward's
    first pass, left unfinished, with :func:`row_state.merge` as the kernel's epilogue.

    ``state``'s fields are contiguous ``[N]`` tensors (fp32, ``argmax`` int64): one launch.
    ``first_slice``: the kernel merges into the empty state instead of reading ``state``
    (which may come from :func:`row_state.unfilled`) and writes every row.
    """
    return _fold(state, logits, labels, ref_logits, weight, spec, v0, 0, first_slice)[0]


def fold_with_candidates(state: row_state.RowState, logits, labels, ref_logits, weight, spec: OpSpec, v0: int,
                         count: int):
    """:func:`fold` and, from the same read of the slice, its ``count`` largest policy logits.

    Returns ``(state, values)``, ``values`` fp32 ``[N, count]`` (the first columns of the
    kernel's ``[N, CAP]`` buffer, widened, as :func:`forward_with_candidates`): each row's largest raw logits of
    this slice alone (not merged with earlier folds), descending, the multiset ``torch.topk``
    gives, ``-inf`` padded past the slice's width and on skipped rows; NaN never enters.
    ``1 <= count <= MAX_CANDIDATES``; a slice of width 0 gives all ``-inf``.
    """
    return _fold(state, logits, labels, ref_logits, weight, spec, v0, count)


def _fold(state: row_state.RowState, logits, labels, ref_logits, weight, spec: OpSpec, v0: int, count: int,
          first_slice: bool = False):
    from .kernels import slice_state_kernel

    batches, tokens, width = logits.shape
    n = batches * tokens
    block_v, num_warps = launch_config(max(width, 1), logits.element_size(), two_rows=ref_logits is not None)
    top, cap = _candidate_buffer(n, count, block_v, logits)
    if width == 0:  # the empty state is merge's identity
        if first_slice:
            row_state.reset(state)
        return state, _gathered(top, count)
    placeholder = state.sum_exp
    ref = ref_logits if ref_logits is not None else logits
    slice_state_kernel[(n,)](
        **_rows(logits, ref, labels, weight, placeholder),
        **_pointers(state, [f.name for f in fields(row_state.RowState)], placeholder),
        top_ptr=_or_placeholder(top, placeholder),
        vocab=width, v0=v0, first_slice=int(first_slice), inv_temperature=1.0 / spec.temperature,
        ignore_index=spec.ignore_index,
        HAS_LABELS=labels is not None, HAS_REF=ref_logits is not None, HAS_WEIGHT=weight is not None,
        WANT_ENTROPY=state.ent_acc is not None,
        DIVERGENCE=spec.divergence if ref_logits is not None else 0,
        BLOCK_V=block_v, ALIGN=row_alignment(block_v, logits, ref), num_warps=num_warps,
        **(dict(CANDIDATES=count, CAP=cap) if count else {}),
    )
    return state, _gathered(top, count)


def _candidate_buffer(n: int, count: int, block_v: int, logits):
    """``(buffer, CAP)`` of a launch that gathers each row's ``count`` largest logits with tiles of
    ``block_v``: ``buffer`` ``[n, CAP]`` of ``-inf`` in the logits' dtype, ``CAP =
    next_power_of_2(count + block_v)`` (the candidates and a whole tile, ``kernels/candidates.py``);
    ``(None, 1)`` when ``count`` is 0. Raises ``ValueError`` unless ``0 <= count <= MAX_CANDIDATES``."""
    if not 0 <= count <= MAX_CANDIDATES:
        raise ValueError(f"candidates: count must be in [0, {MAX_CANDIDATES}], got {count}")
    if not count:
        return None, 1
    cap = triton.next_power_of_2(count + block_v)
    return torch.full((n, cap), float("-inf"), dtype=logits.dtype, device=logits.device), cap


def _gathered(buffer, count: int):
    """The first ``count`` columns of a launch's candidate ``buffer`` widened to fp32 ``[n, count]``
    (the rows' largest, descending); ``None`` without a buffer."""
    return buffer[:, :count].float() if buffer is not None else None


def sweep(stats: RowStats, logits, ref_logits, labels, weight, spec: OpSpec, v0: int, value_sum, centred_sum,
          first_slice: bool = False):
    """The second-sweep partial sums ``(sum q f(t), sum p (f'(t) - f'(t_k)))`` of one slice,
    given the whole row's final statistics, added into the fp32 ``[N]`` accumulators
    ``value_sum`` and ``centred_sum`` in place (one launch); returns them. Every row becomes
    ``acc = (first_slice ? 0 : acc) + slice sum`` in fp32 (0 sums on rows without the
    divergence term), as the native :func:`~prefopt_kernels.backends.native.sweep`; with
    ``first_slice`` the accumulators are not read."""
    from .kernels import slice_sweep_kernel

    batches, tokens, width = logits.shape
    n = batches * tokens
    row_state.check_sweep_sums(value_sum, centred_sum, n, logits.device)
    if width == 0:  # every slice sum is 0
        return row_state.add_sweep_sums(value_sum, centred_sum, 0.0, 0.0, first_slice)
    block_v, num_warps = launch_config(width, logits.element_size(), two_rows=True)
    slice_sweep_kernel[(n,)](
        **_rows(logits, ref_logits, labels, weight, value_sum),
        **_pointers(stats, SWEEP_STATS, value_sum),
        value_ptr=value_sum, centred_ptr=centred_sum,
        vocab=width, first_slice=int(first_slice), inv_temperature=1.0 / spec.temperature,
        ignore_index=spec.ignore_index, **_divergence_params(spec),
        HAS_LABELS=labels is not None, HAS_WEIGHT=weight is not None, DIVERGENCE=spec.divergence,
        BLOCK_V=block_v, ALIGN=row_alignment(block_v, logits, ref_logits), num_warps=num_warps,
    )
    return value_sum, centred_sum


# Tokens per step of the kept-tokens program (one program: a step is a block scan).
KEPT_TOKENS_BLOCK = 2048


def kept_tokens(labels, weight, ignore_index: int, n_tokens: int, device) -> tuple:
    """The kept tokens of a fused linear call in one launch of one program: ``(index, summary)``,
    ``index`` int64 ``[N]`` the rows a pass reads (``backends.kept_rows``) in increasing order then
    -1, ``summary`` int64 ``[3]`` their count and least and greatest kept label (``NO_KEPT_LABEL``
    where no label is kept). ``labels`` int64 / ``weight`` fp32 ``[N]`` or ``None``."""
    from .kernels import kept_tokens_kernel

    index = torch.empty(n_tokens, dtype=torch.int64, device=device)
    summary = torch.empty(3, dtype=torch.int64, device=device)
    kept_tokens_kernel[(1,)](
        labels_ptr=_or_placeholder(labels, index), weight_ptr=_or_placeholder(weight, index), index_ptr=index,
        summary_ptr=summary, n_tokens=n_tokens, ignore_index=ignore_index,
        HAS_LABELS=labels is not None, HAS_WEIGHT=weight is not None, BLOCK=KEPT_TOKENS_BLOCK, num_warps=8,
    )
    return index, summary


def _divergence_params(spec: OpSpec) -> dict:
    """``beta, 1 - beta, log beta, log(1 - beta), alpha, alpha - 1`` by kernel argument name,
    computed in float64 here and rounded to fp32 once at the launch: formed in fp32 from a
    rounded ``beta`` or ``alpha``, ``1 - beta`` and ``alpha - 1`` lose everything near the
    ends (``1 + 1e-9`` is ``1.0f``)."""
    beta, alpha = float(spec.beta), float(spec.alpha)
    if not 0.0 < beta < 1.0:  # only js reads beta, and validation keeps it inside (0, 1) there
        beta = 0.5
    return dict(beta=beta, one_minus_beta=1.0 - beta, log_beta=math.log(beta), log_one_minus_beta=math.log1p(-beta),
                alpha=alpha, alpha_minus_one=alpha - 1.0)


def _rows(logits, ref, labels, weight, placeholder) -> dict:
    """The row arguments of every kernel: both ``[B, T, V]`` views with their leading strides,
    the labels and the weights (``placeholder`` where absent)."""
    return dict(a_ptr=logits, b_ptr=ref, labels_ptr=_or_placeholder(labels, placeholder),
                weight_ptr=_or_placeholder(weight, placeholder),
                tokens_per_batch=logits.shape[1], stride_ab=logits.stride(0), stride_at=logits.stride(1),
                stride_bb=ref.stride(0), stride_bt=ref.stride(1))


def _pointers(source, names, placeholder) -> dict:
    """``{name + "_ptr": tensor}`` for the named fields of ``source``, ``placeholder`` where a
    field is ``None``."""
    return {f"{name}_ptr": _or_placeholder(getattr(source, name), placeholder) for name in names}


def _or_placeholder(tensor, placeholder):
    """``tensor``, or ``placeholder`` where it is ``None``: an fp32 buffer of the launch that
    stands in for the pointer of an absent field, which the kernel's constexpr flags keep
    it from using."""
    return tensor if tensor is not None else placeholder


# Rows per program of the finishing kernels (a few floats per row).
FINISH_BLOCK = 1024


def finalize(state: row_state.RowState, labels, weight, spec: OpSpec, every_row_read: bool = False) -> RowStats:
    """The forward's :class:`RowStats` from the state of the whole vocabulary in one launch
    (``kernels/finish.py``), with :func:`row_state.finalize`'s math, NaN guards and masks.

    ``state``: contiguous fp32 ``[N]`` fields; ``labels`` ``[N]`` int64 or ``None``, ``weight``
    ``[N]`` fp32 or ``None``. A centred divergence's ``ref_at_argmax`` statistic is the state's own
    field, masked in place (the state is spent); a second-sweep divergence's ``div`` and ``div_s``
    are left to :func:`finish_sweep`. ``every_row_read``: the caller knows that no row is skipped.
    """
    from .kernels import finalize_kernel

    n, has_ref = state.max.shape[0], state.ref_max is not None
    placeholder = state.sum_exp

    def launch(stats: RowStats) -> None:
        finalize_kernel[(triton.cdiv(n, FINISH_BLOCK),)](
            labels_ptr=_or_placeholder(labels, placeholder), weight_ptr=_or_placeholder(weight, placeholder),
            **_pointers(state, [f.name for f in fields(row_state.RowState) if f.name != "argmax"], placeholder),
            **_pointers(stats, [f.name for f in fields(RowStats) if f.name != "ref_at_argmax"], placeholder),
            n_rows=n, inv_temperature=1.0 / spec.temperature, ignore_index=spec.ignore_index,
            HAS_LABELS=labels is not None, HAS_WEIGHT=weight is not None, EVERY_ROW_READ=every_row_read,
            WANT_LOGP=stats.logp is not None, WANT_ENTROPY=stats.entropy is not None, HAS_REF=has_ref,
            WANT_REF_LOGP=stats.ref_logp is not None,
            DIVERGENCE=spec.divergence if has_ref else 0,
            BLOCK=FINISH_BLOCK,
        )

    return row_state.finalize_launch(state, labels is not None, spec, launch)


def finish_sweep(stats: RowStats, value_sum, centred_sum, labels, weight, spec: OpSpec,
                 every_row_read: bool = False) -> RowStats:
    """A second-sweep divergence completed from the summed sweeps (fp32 ``[N]``) in one launch:
    :func:`row_state.finish_sweep`'s ``div`` and ``div_s``, set on ``stats`` and returned."""
    from .kernels import finish_sweep_kernel

    n = value_sum.shape[0]
    stats.div = torch.empty(n, dtype=torch.float32, device=value_sum.device)
    stats.div_s = torch.empty_like(stats.div)
    if n:
        finish_sweep_kernel[(triton.cdiv(n, FINISH_BLOCK),)](
            labels_ptr=_or_placeholder(labels, value_sum), weight_ptr=_or_placeholder(weight, value_sum),
            log_norm_ptr=stats.log_norm, ref_log_norm_ptr=stats.ref_log_norm, value_sum_ptr=value_sum,
            centred_sum_ptr=centred_sum, div_ptr=stats.div, div_s_ptr=stats.div_s,
            n_rows=n, ignore_index=spec.ignore_index,
            HAS_LABELS=labels is not None, HAS_WEIGHT=weight is not None, EVERY_ROW_READ=every_row_read,
            BLOCK=FINISH_BLOCK,
        )
    return stats
