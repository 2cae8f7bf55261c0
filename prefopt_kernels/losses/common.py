"""Shared helpers of the loss library: argument checks, sequence reductions, metrics.

Per-token tensors come in one of two layouts:

* padded: ``[B, T]`` values with a ``[B, T]`` 0/1 (or bool) validity ``mask``;
* packed: ``[N]`` values with ``cu_seqlens`` (``[S + 1]`` integer offsets, ``cu_seqlens[0] == 0``,
  non-decreasing, ``cu_seqlens[-1] == N``) and an optional ``[N]`` validity mask
  (e.g. 0 on prompt tokens).

Every reduction returns one value per sequence (``[B]`` or ``[S]``) and keeps the autograd graph.
Tokens whose validity mask is 0 are dropped with ``torch.where``, never multiplied by 0: padding
often holds garbage (inf, NaN), and ``0 * inf`` would turn the whole sum, and its gradient, into
NaN. Weights (SparsePO's token masks) are factors, not validity: a valid token whose weight is 0
still contributes ``value * 0``, so the weight's gradient there is the value.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch

REDUCTIONS = ("mean", "sum", "none")


def real_scalar(
    name: str,
    value,
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite Python float in the given range, or an error naming ``name``.

    Accepted: Python ints and floats, numpy scalars and 0-d arrays, 0-d tensors. Rejected with
    TypeError: bools (``True`` is not a coefficient), strings, complex values, tensors with
    more than one element, and tensors that require grad (the losses use the value as a
    constant: a learned coefficient would silently get no gradient). ValueError for NaN, ±inf
    and values outside ``[low, high]`` (``low_open``/``high_open`` exclude that bound; ``high``
    only together with ``low``).
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise TypeError(f"{name} must be a real scalar; got a tensor of shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number; got a {value.dtype} tensor")
        if value.requires_grad:
            raise TypeError(f"{name} is used as a constant and must not require grad; detach it")
    elif isinstance(value, (np.ndarray, np.generic)):
        if value.ndim != 0 or value.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be a real scalar; got a numpy {value.dtype} of shape {value.shape}")
    elif isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, not a bool; got {value!r}")
    elif not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number (int, float, numpy scalar or 0-d tensor); got {value!r}"
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if high is None:
            wanted = f"{'>' if low_open else '>='} {low:g}"
        else:
            wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {wanted}; got {value}")
    return value


def check_positive(name: str, value) -> float:
    """``value`` as a float; an error naming ``name`` unless it is a finite real number > 0."""
    return real_scalar(name, value, 0.0, low_open=True)


def check_reduction(reduction) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_tensor(name: str, x, *, ndim: Optional[int] = None) -> torch.Tensor:
    """A floating tensor (or TypeError naming ``name``), optionally of rank ``ndim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    return x


def check_same_device(**tensors: torch.Tensor) -> None:
    """ValueError naming the first argument whose device differs from the first one's."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_same_shape(**tensors: torch.Tensor) -> None:
    """ValueError naming the first argument whose shape or device differs from the first one's."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}"
            )
    check_same_device(**tensors)


def check_per_sequence(unit: str, **tensors: torch.Tensor) -> None:
    """Per-sequence inputs: floating ``[B]`` tensors of one shape and device, ``B >= 1``.

    An empty batch is an error, not a NaN mean: ``unit`` (``"pair"``, ``"sample"``) names
    what the first tensor must hold at least one of.
    """
    for name, t in tensors.items():
        check_tensor(name, t, ndim=1)
    check_same_shape(**tensors)
    first_name, first = next(iter(tensors.items()))
    if first.shape[0] == 0:
        raise ValueError(f"{first_name} must hold at least one {unit}; got shape {tuple(first.shape)}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32: the losses never do arithmetic in bf16/fp16."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_lengths(name: str, lengths, like: torch.Tensor, *, allow_zero: bool = False) -> torch.Tensor:
    """Per-sequence token counts as a tensor of ``like``'s dtype, device and shape.

    ``lengths``: a real tensor or sequence of numbers; every entry must be finite and > 0
    (``>= 0`` with ``allow_zero``: a completion truncated to nothing has no token).
    """
    if lengths is None:
        raise ValueError(f"{name} is required for this loss (the number of tokens of each sequence)")
    if not isinstance(lengths, torch.Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"{name} must be a tensor or a sequence of token counts; got {lengths!r}"
            ) from err
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"{name} must hold real token counts, got dtype {lengths.dtype}")
    if lengths.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(lengths.shape)}, expected {tuple(like.shape)}")
    lengths = lengths.to(device=like.device, dtype=like.dtype)
    in_range = lengths >= 0 if allow_zero else lengths > 0
    if not bool((torch.isfinite(lengths) & in_range).all()):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound} for every sequence, got {lengths.tolist()}")
    return lengths


def check_cu_seqlens(name: str, cu_seqlens, n: int, values_name: str, device) -> torch.Tensor:
    """``cu_seqlens`` as int64 on ``device``: ``[S + 1]`` offsets, ``S >= 1``, from 0 up to ``n``."""
    if not isinstance(cu_seqlens, torch.Tensor):
        try:
            cu_seqlens = torch.as_tensor(cu_seqlens)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a 1-D integer tensor of offsets; got {cu_seqlens!r}") from err
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{name} must be 1-D with S + 1 >= 2 offsets (at least one pair); "
            f"got shape {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    if int(cu[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {cu.tolist()}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()}")
    if int(cu[-1]) != n:
        raise ValueError(
            f"{name} must end at the number of tokens of {values_name} ({n}), got {cu.tolist()}"
        )
    return cu


def check_token_layout(cu_name: str, cu_seqlens, **tensors: torch.Tensor):
    """Validate one side's per-token tensors; return ``(cu, S)``.

    ``tensors``: floating, one shape and device; ``[B, T]`` (``B >= 1``) when ``cu_seqlens`` is
    None, else ``[N]`` with ``cu_seqlens`` ``[S + 1]`` (checked by :func:`check_cu_seqlens`,
    returned as int64; None in the padded layout). ``S`` is the number of sequences.
    """
    for name, t in tensors.items():
        check_tensor(name, t)
    check_same_shape(**tensors)
    first_name, first = next(iter(tensors.items()))
    if cu_seqlens is None:
        if first.dim() != 2:
            raise ValueError(
                f"{first_name} must be [B, T] (or [N] with {cu_name}), got shape {tuple(first.shape)}"
            )
        if first.shape[0] == 0:
            raise ValueError(f"{first_name} must hold at least one pair; got shape {tuple(first.shape)}")
        return None, first.shape[0]
    if first.dim() != 1:
        raise ValueError(f"{first_name} must be [N] when {cu_name} is given, got shape {tuple(first.shape)}")
    cu = check_cu_seqlens(cu_name, cu_seqlens, first.shape[0], first_name, first.device)
    return cu, cu.numel() - 1


def check_pair_count(chosen_name: str, n_chosen: int, rejected_name: str, n_rejected: int) -> None:
    if n_chosen != n_rejected:
        raise ValueError(
            f"{chosen_name} and {rejected_name} hold a different number of sequences "
            f"({n_chosen} vs {n_rejected}); every chosen sequence needs its rejected partner "
            f"(check the shapes / cu_seqlens)"
        )


def token_mask(name: str, mask, values: torch.Tensor, values_name: str, dtype) -> Optional[torch.Tensor]:
    """``mask`` checked against ``values`` (shape, device) and cast to ``dtype``; bool stays bool.

    A mask is bool, integer or real (weights); anything else is a TypeError naming ``name``.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name} must be a bool, integer or real tensor, got {mask.dtype}")
    if mask.shape != values.shape:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but {values_name} has shape {tuple(values.shape)}"
        )
    if mask.device != values.device:
        raise ValueError(f"{name} is on {mask.device} but {values_name} is on {values.device}")
    return mask if mask.dtype == torch.bool else mask.to(dtype)


def masked_values(
    values: torch.Tensor, valid: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``values * valid * weight`` where ``valid != 0``; exactly 0 where ``valid == 0``.

    A bool ``valid`` only selects (a real one also multiplies, as a 0/1 mask does); None means
    every token is valid. ``torch.where`` on each factor (not a product with a 0/1 mask) keeps an
    inf/NaN at an invalid token out of the result and gives every input a gradient of exactly 0
    there. ``weight`` never drops a valid token: where it is 0 the term is 0 and the weight's
    gradient is ``values * valid`` (e.g. ``∂(Σ_t m_t r_t)/∂m_t = r_t``).
    """
    if valid is None:
        return values if weight is None else values * weight
    keep = valid != 0
    out = torch.where(keep, values, 0.0)
    if valid.dtype != torch.bool:
        out = out * torch.where(keep, valid, 0.0)
    if weight is not None:
        out = out * torch.where(keep, weight, 0.0)
    return out


def sequence_sum(
    values: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    *,
    cu_seqlens=None,
) -> torch.Tensor:
    """Sum over the tokens of each sequence of :func:`masked_values` ``(values, valid, weight)``.

    ``values`` ``[B, T]`` -> ``[B]``, or ``[N]`` with ``cu_seqlens`` (int64 ``[S + 1]``, already
    checked) -> ``[S]``. ``valid`` and ``weight`` have ``values``' shape (and, unless bool, its
    dtype). A sequence with no valid token sums to 0. Differentiable in every input.
    """
    x = masked_values(values, valid, weight)
    if cu_seqlens is None:
        return x.sum(dim=1)
    n_seq = cu_seqlens.numel() - 1
    seg = torch.repeat_interleave(torch.arange(n_seq, device=values.device), cu_seqlens.diff())
    return x.new_zeros(n_seq).index_add(0, seg, x)


def token_count(values: torch.Tensor, mask: Optional[torch.Tensor], cu_seqlens) -> torch.Tensor:
    """Number of valid tokens (``mask != 0``) per sequence, in ``values``' dtype."""
    ones = torch.ones_like(values)
    return sequence_sum(ones, None if mask is None else mask != 0, cu_seqlens=cu_seqlens)


def reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: Optional[torch.Tensor] = None,
    rejected_logps: Optional[torch.Tensor] = None,
    **extra: torch.Tensor,
) -> dict:
    """TRL-named metrics, each the detached batch mean of a per-pair value.

    ``extra`` keys use ``__`` for ``/`` (``kl__chosen`` -> ``kl/chosen``).
    """
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    out = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (cr - rr).mean(),
        "rewards/accuracies": (cr > rr).to(cr.dtype).mean(),
    }
    if chosen_logps is not None:
        out["logps/chosen"] = chosen_logps.detach().mean()
    if rejected_logps is not None:
        out["logps/rejected"] = rejected_logps.detach().mean()
    for key, value in extra.items():
        out[key.replace("__", "/")] = value.detach().mean()
    return out


def check_token_pairs(chosen_logratios, chosen_kl, chosen_cu_seqlens,
                      rejected_logratios, rejected_kl, rejected_cu_seqlens):
    """Check the per-token inputs of a token-level pairwise loss; return ``(cu_w, cu_l, dtype)``.

    Each side is padded ``[B, T]`` (``cu_seqlens`` None) or packed ``[N]`` with its
    ``cu_seqlens``; both sides must hold the same number of sequences, on one device.
    ``dtype`` is the floating dtype the loss computes in.
    """
    cu_w, n_w = check_token_layout("chosen_cu_seqlens", chosen_cu_seqlens,
                                   chosen_logratios=chosen_logratios, chosen_kl=chosen_kl)
    cu_l, n_l = check_token_layout("rejected_cu_seqlens", rejected_cu_seqlens,
                                   rejected_logratios=rejected_logratios, rejected_kl=rejected_kl)
    check_pair_count("chosen_logratios", n_w, "rejected_logratios", n_l)
    check_same_device(chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios)
    return cu_w, cu_l, compute_dtype(chosen_logratios, rejected_logratios, chosen_kl, rejected_kl)
