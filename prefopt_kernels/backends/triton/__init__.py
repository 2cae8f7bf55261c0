"""Triton backend: launches the kernels of ``kernels.py``, one program per token row.

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` Triton's interpreter runs the same
kernels on CPU tensors, which is how they are tested without a GPU. js and alpha receive
their parameters derived here in float64 (``_divergence_params``); the NaN policy and the
``expm1``/``log1p`` forms are described in ``kernels.py``.
"""

from __future__ import annotations

import math
import os

import torch

from .. import DIVERGENCE_CODES, OpSpec, RowStats, row_state
from .config import launch_config

NAME = "triton"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return _interpreted() or torch.cuda.is_available()


def supports(device: torch.device) -> bool:
    return device.type == "cuda" or (_interpreted() and device.type == "cpu")


def forward(logits, labels, ref_logits, weight, spec: OpSpec) -> RowStats:
    from .kernels import token_forward_kernel

    batches, tokens, vocab = logits.shape
    n = batches * tokens
    f32 = dict(dtype=torch.float32, device=logits.device)
    stats = RowStats(row_max=torch.empty(n, **f32), log_norm=torch.empty(n, **f32))
    spare = stats.log_norm
    if labels is not None and spec.want_logp:
        stats.logp = torch.empty(n, **f32)
    if spec.want_entropy:
        stats.entropy = torch.empty(n, **f32)
    if ref_logits is not None:
        stats.ref_row_max = torch.empty(n, **f32)
        stats.ref_log_norm = torch.empty(n, **f32)
        if spec.want_ref_logp:
            stats.ref_logp = torch.empty(n, **f32)
        if spec.divergence:
            stats.div = torch.empty(n, **f32)
            stats.div_s = torch.empty(n, **f32)
        if spec.divergence not in (0, DIVERGENCE_CODES["forward_kl"]):
            stats.ref_at_argmax = torch.empty(n, **f32)
    ref = ref_logits if ref_logits is not None else logits
    block_v, num_warps = launch_config(vocab, logits.element_size(), two_rows=ref_logits is not None)
    # Pointers that a specialisation never touches point at a spare fp32 buffer.
    token_forward_kernel[(n,)](
        logits, ref, _or(labels, spare), _or(weight, spare),
        stats.row_max, stats.log_norm, _or(stats.logp, spare), _or(stats.entropy, spare),
        _or(stats.ref_row_max, spare), _or(stats.ref_log_norm, spare), _or(stats.ref_logp, spare),
        _or(stats.div, spare), _or(stats.div_s, spare), _or(stats.ref_at_argmax, spare),
        tokens, logits.stride(0), logits.stride(1), ref.stride(0), ref.stride(1),
        vocab, 1.0 / spec.temperature, spec.ignore_index, *_divergence_params(spec),
        HAS_LABELS=labels is not None, HAS_REF=ref_logits is not None, HAS_WEIGHT=weight is not None,
        WANT_ENTROPY=spec.want_entropy, WANT_REF_LOGP=stats.ref_logp is not None,
        DIVERGENCE=spec.divergence if ref_logits is not None else 0,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return stats


def backward(logits, labels, ref_logits, weight, spec: OpSpec, stats: RowStats,
             grad_logp, grad_entropy, grad_div, grad_out) -> None:
    slice_backward(logits, labels, ref_logits, weight, spec, stats, grad_logp, grad_entropy, grad_div,
                   grad_out, 0)


def slice_backward(logits, labels, ref_logits, weight, spec: OpSpec, stats: RowStats,
                   grad_logp, grad_entropy, grad_div, grad_out, v0: int) -> None:
    """The gradient of the slice ``[v0, v0 + Vs)`` (``logits`` ``[B, T, Vs]``) from the whole
    row's statistics, into ``grad_out``; a whole row is ``v0 = 0``. See ``row_state``."""
    from .kernels import token_backward_kernel

    batches, tokens, vocab = logits.shape
    n = batches * tokens
    if vocab == 0:  # an empty slice has no gradient to write
        return
    has_div = bool(spec.divergence) and grad_div is not None
    ref = ref_logits if ref_logits is not None else logits
    spare = stats.log_norm
    block_v, num_warps = launch_config(vocab, logits.element_size(), two_rows=has_div)
    token_backward_kernel[(n,)](
        logits, ref, grad_out, _or(labels, spare), _or(weight, spare),
        stats.row_max, stats.log_norm, _or(stats.entropy, spare), _or(stats.ref_row_max, spare),
        _or(stats.ref_log_norm, spare), _or(stats.div_s, spare), _or(stats.ref_at_argmax, spare),
        _or(grad_logp, spare), _or(grad_entropy, spare), _or(grad_div, spare),
        tokens, logits.stride(0), logits.stride(1), ref.stride(0), ref.stride(1),
        grad_out.stride(0), grad_out.stride(1),
        vocab, v0, 1.0 / spec.temperature, spec.ignore_index, *_divergence_params(spec),
        HAS_LABELS=labels is not None, HAS_WEIGHT=weight is not None,
        GRAD_LOGP=grad_logp is not None, GRAD_ENTROPY=grad_entropy is not None,
        DIVERGENCE=spec.divergence if has_div else 0,
        BLOCK_V=block_v, num_warps=num_warps,
    )


def fold(state: row_state.RowState, logits, labels, ref_logits, weight, spec: OpSpec, v0: int):
    """``state`` merged with the first-pass state of the slice ``[v0, v0 + Vs)`` (``logits``
    ``[B, T, Vs]``, labels global ids): the whole-row forward's first pass, left unfinished."""
    from .kernels import slice_state_kernel

    batches, tokens, width = logits.shape
    n = batches * tokens
    if width == 0:  # the empty state is merge's identity
        return state
    piece = row_state.empty(n, spec, ref_logits is not None, logits.device)
    spare = piece.sum_exp
    kl_acc = piece.fkl_acc if piece.fkl_acc is not None else piece.rkl_acc
    ref = ref_logits if ref_logits is not None else logits
    block_v, num_warps = launch_config(width, logits.element_size(), two_rows=ref_logits is not None)
    slice_state_kernel[(n,)](
        logits, ref, _or(labels, spare), _or(weight, spare),
        piece.max, piece.sum_exp, _or(piece.ent_acc, spare), piece.argmax, piece.label_logit,
        _or(piece.ref_max, spare), _or(piece.ref_sum_exp, spare), _or(piece.ref_label_logit, spare),
        _or(piece.ref_at_argmax, spare), _or(kl_acc, spare),
        tokens, logits.stride(0), logits.stride(1), ref.stride(0), ref.stride(1),
        width, v0, 1.0 / spec.temperature, spec.ignore_index,
        HAS_LABELS=labels is not None, HAS_REF=ref_logits is not None, HAS_WEIGHT=weight is not None,
        WANT_ENTROPY=piece.ent_acc is not None,
        DIVERGENCE=spec.divergence if ref_logits is not None else 0,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return row_state.merge(state, piece, spec)


def sweep(stats: RowStats, logits, ref_logits, labels, weight, spec: OpSpec, v0: int):
    """The second-sweep partial sums ``(sum q f(t), sum p (f'(t) - f'(t_k)))`` of one slice,
    fp32 ``[N]``, given the whole row's final statistics."""
    from .kernels import slice_sweep_kernel

    batches, tokens, width = logits.shape
    n = batches * tokens
    value = torch.zeros(n, dtype=torch.float32, device=logits.device)
    centred = torch.zeros_like(value)
    if width == 0:
        return value, centred
    block_v, num_warps = launch_config(width, logits.element_size(), two_rows=True)
    slice_sweep_kernel[(n,)](
        logits, ref_logits, _or(labels, value), _or(weight, value),
        stats.row_max, stats.log_norm, stats.ref_row_max, stats.ref_log_norm, stats.ref_at_argmax,
        value, centred,
        tokens, logits.stride(0), logits.stride(1), ref_logits.stride(0), ref_logits.stride(1),
        width, 1.0 / spec.temperature, spec.ignore_index, *_divergence_params(spec),
        HAS_LABELS=labels is not None, HAS_WEIGHT=weight is not None, DIVERGENCE=spec.divergence,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return value, centred


def _divergence_params(spec: OpSpec) -> tuple:
    """``(beta, 1 - beta, log beta, log(1 - beta), alpha, alpha - 1)`` computed in float64 here,
    rounded to fp32 once at the launch: formed in fp32 from a rounded ``beta`` or ``alpha``,
    ``1 - beta`` and ``alpha - 1`` lose everything near the ends (``1 + 1e-9`` is ``1.0f``)."""
    beta, alpha = float(spec.beta), float(spec.alpha)
    if not 0.0 < beta < 1.0:  # only js reads beta, and validation keeps it inside (0, 1) there
        beta = 0.5
    return beta, 1.0 - beta, math.log(beta), math.log1p(-beta), alpha, alpha - 1.0


def _or(tensor, fallback):
    return tensor if tensor is not None else fallback
