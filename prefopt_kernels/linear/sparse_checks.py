"""The checks of :func:`~prefopt_kernels.linear.sparse_teacher.linear_sparse_teacher_divergence`: the
teacher's top-k shapes and values, and, for a vocabulary-sharded student head, the call check that
makes every rank agree on the call (and on the global vocabulary) before any other collective."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import distributed
from ..checks import op_spec
from ..spec import HeadSpec, LinearSpec, float_bits

# Teacher log-probabilities may exceed 0 (and their log-sum 0) by this much: fp32 rounding of a
# log-softmax whose logits reach ~1e3 in magnitude (ulp(1e3) = 6e-5) stays below it.
LOGPROB_TOLERANCE = 1e-4
# The id of an absent entry (TRL's top-1 path drops the sampled token where it is the top-1).
ABSENT_ID = -1


def check_teacher(teacher_ids, teacher_logprobs, hidden: torch.Tensor, teacher_vocab_size) -> None:
    """Shapes, dtypes and devices of the teacher's top-k, and ``teacher_vocab_size``'s type."""
    integer = isinstance(teacher_ids, torch.Tensor) and not teacher_ids.dtype.is_floating_point and \
        not teacher_ids.dtype.is_complex and teacher_ids.dtype != torch.bool
    if not integer:
        got = teacher_ids.dtype if isinstance(teacher_ids, torch.Tensor) else type(teacher_ids).__name__
        raise TypeError(f"teacher_ids must be an integer torch.Tensor; got {got}")
    lead = tuple(hidden.shape[:-1])
    if teacher_ids.dim() != hidden.dim() or tuple(teacher_ids.shape[:-1]) != lead or teacher_ids.shape[-1] < 1:
        raise ValueError(f"teacher_ids must have shape [..., k] with [...] = hidden's {lead} and k >= 1; "
                         f"got {tuple(teacher_ids.shape)}")
    if not isinstance(teacher_logprobs, torch.Tensor) or not teacher_logprobs.dtype.is_floating_point:
        raise TypeError("teacher_logprobs must be a floating-point torch.Tensor")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(f"teacher_logprobs must have teacher_ids' shape {tuple(teacher_ids.shape)}; "
                         f"got {tuple(teacher_logprobs.shape)}")
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if x.device != hidden.device:
            raise ValueError(f"{name} must be on the device of hidden ({hidden.device}); got {x.device}")
    if teacher_vocab_size is not None and (isinstance(teacher_vocab_size, bool)
                                           or not isinstance(teacher_vocab_size, int)):
        raise TypeError(f"teacher_vocab_size must be an int or None; got {teacher_vocab_size!r:.60}")


def check_mask(mask, hidden: torch.Tensor) -> None:
    """``mask``: None, or a tensor of ``hidden``'s leading shape on its device."""
    lead = tuple(hidden.shape[:-1])
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != lead
                             or mask.device != hidden.device):
        raise ValueError(f"mask must be a tensor of shape {lead} on {hidden.device}")


def check_teacher_vocab(teacher_vocab_size: Optional[int], vocab: int) -> None:
    """The teacher's vocabulary, if given, against the student head's (global) ``vocab``."""
    if teacher_vocab_size is not None and teacher_vocab_size != vocab:
        raise ValueError(f"teacher_vocab_size must equal the student head's vocabulary V = {vocab}; "
                         f"got {teacher_vocab_size!r}")


def check_teacher_values(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> None:
    """The kept rows' ids in ``[0, V)`` (or ``-1``, absent), no id twice in a row, log-probs at most
    :data:`LOGPROB_TOLERANCE` (each and their log-sum) and not NaN. One host sync."""
    present = ids != ABSENT_ID
    ordered = ids.sort(dim=1).values
    lp = torch.where(present, logprobs.double(), -math.inf)
    bad = torch.stack([
        ((ids < ABSENT_ID) | (ids >= vocab)).any(),
        ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != ABSENT_ID)).any(),
        torch.isnan(lp).any(),
        (lp > LOGPROB_TOLERANCE).any() | (torch.logsumexp(lp, dim=1) > LOGPROB_TOLERANCE).any(),
    ]).tolist()
    if bad[0]:
        raise ValueError(f"teacher_ids must lie in [0, {vocab}) (or be {ABSENT_ID}, absent) at kept tokens")
    if bad[1]:
        raise ValueError("teacher_ids must not repeat an id within a token's top-k")
    if bad[2]:
        raise ValueError("teacher_logprobs must not be NaN at kept tokens")
    if bad[3]:
        raise ValueError(f"teacher_logprobs must be log-probabilities: each, and their log-sum over a token's "
                         f"top-k, at most {LOGPROB_TOLERANCE:g} (fp32 rounding) at kept tokens")


def _logprob_checksum(logprobs: torch.Tensor) -> int:
    """The bits of ``sum_i (i + 1) x_i`` in float64 over the flat ``logprobs`` (-inf counted as -1e30 so
    that it does not swallow the rest; NaN stays NaN): equal on ranks holding the same values."""
    x = logprobs.double().reshape(-1)
    x = torch.where(x == -math.inf, -1e30, x)
    positions = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device)
    return float_bits(float((x * positions).sum()))


def teacher_shard(process_group, head: HeadSpec, ids: torch.Tensor, logprobs: torch.Tensor, index: torch.Tensor,
                  local_vocab: int, hidden: torch.Tensor, *, divergence, beta, alpha, temperature,
                  return_entropy: bool, add_tail: bool, teacher_vocab_size, budget: int) -> distributed.Shard:
    """This rank's :class:`~prefopt_kernels.distributed.Shard` of the student head (unsharded: the
    whole head, no communication).

    Sharded, one call check (:func:`prefopt_kernels.distributed.agree_on_call`) compares every
    rank's call: the divergence and its parameters, the temperature, the head's transform, whether
    the hidden states need a gradient (the backward all-reduces it), ``k``, ``add_tail``,
    ``teacher_vocab_size``, the kept tokens ``index`` (the mask), and checksums of the kept
    ``ids`` and ``logprobs``; the ids' range is checked against the global vocabulary there. A
    disagreement raises the same ``ValueError`` on every rank, naming the argument.
    """
    if process_group is None:
        return distributed.Shard(None, 0, local_vocab)
    op = op_spec(temperature=temperature, ignore_index=ABSENT_ID, divergence=divergence, beta=beta, alpha=alpha,
                 return_entropy=return_entropy)
    spec = LinearSpec(op=op, heads=(head,), memory_budget=budget,
                      hidden_needs_grad=torch.is_grad_enabled() and hidden.requires_grad)
    extra = [("teacher_ids.k", ids.shape[1]), ("add_tail", int(add_tail)),
             ("teacher_vocab_size", -1 if teacher_vocab_size is None else teacher_vocab_size),
             ("teacher_logprobs", _logprob_checksum(logprobs))]
    return distributed.shard_for_call(process_group, spec, False, local_vocab, index.numel(), hidden.device,
                                      ids.reshape(-1), index.double(), (hidden.shape[-1],),
                                      names=("teacher_ids", "mask"), extra=extra)
