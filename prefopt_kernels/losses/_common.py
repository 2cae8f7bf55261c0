"""Shared helpers of the loss library: argument checks, sequence reductions, metrics.

Per-token tensors come in one of two layouts:

* padded: ``[B, T]`` values with a ``[B, T]`` 0/1 (or bool) validity ``mask``;
* packed: ``[N]`` values with ``cu_seqlens`` (``[S + 1]`` integer offsets, ``cu_seqlens[0] == 0``,
  non-decreasing, ``cu_seqlens[-1] == N``) and an optional ``[N]`` validity mask
  (e.g. 0 on prompt tokens).

Every reduction returns one value per sequence (``[B]`` or ``[S]``) and keeps the autograd graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_positive(name: str, value: float) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is finite and > 0."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
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


def check_same_shape(**tensors: torch.Tensor) -> None:
    """ValueError naming the first argument whose shape differs from the first one's."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}"
            )


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32: the losses never do arithmetic in bf16/fp16."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_lengths(name: str, lengths, like: torch.Tensor) -> torch.Tensor:
    """Per-sequence token counts as a float tensor shaped like ``like``; every entry must be > 0."""
    if lengths is None:
        raise ValueError(f"{name} is required for this loss (the number of tokens of each sequence)")
    lengths = torch.as_tensor(lengths, device=like.device)
    if lengths.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(lengths.shape)}, expected {tuple(like.shape)}")
    lengths = lengths.to(like.dtype)
    if bool((lengths <= 0).any()):
        raise ValueError(f"{name} must be > 0 for every sequence, got {lengths.tolist()}")
    return lengths


def _check_cu_seqlens(name: str, cu_seqlens, n: int, device) -> torch.Tensor:
    cu = torch.as_tensor(cu_seqlens, device=device)
    if cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point():
        raise ValueError(f"{name} must be a 1-D integer tensor of S + 1 offsets, got {cu!r}")
    cu = cu.long()
    if int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"{name} must start at 0, be non-decreasing and end at the number of tokens ({n}), "
            f"got {cu.tolist()}"
        )
    return cu


def token_mask(name: str, mask, values: torch.Tensor, values_name: str, dtype) -> Optional[torch.Tensor]:
    """``mask`` (0/1, bool or real weights) cast to ``dtype``; ValueError if its shape differs."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != values.shape:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but {values_name} has shape {tuple(values.shape)}"
        )
    return mask.to(dtype)


def sequence_sum(
    values: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    cu_seqlens=None,
    *,
    name: str = "values",
) -> torch.Tensor:
    """Sum of ``values * mask`` over the tokens of each sequence.

    ``values`` ``[B, T]`` -> ``[B]`` (``mask`` ``[B, T]`` or None for all-valid), or ``[N]`` with
    ``cu_seqlens`` ``[S + 1]`` -> ``[S]``. ``mask`` must already have ``values``' dtype. A
    sequence with no valid token sums to 0. Differentiable in ``values`` and ``mask``.
    """
    x = values if mask is None else values * mask
    if cu_seqlens is None:
        if values.dim() != 2:
            raise ValueError(
                f"{name} must be [B, T] (or [N] with cu_seqlens), got shape {tuple(values.shape)}"
            )
        return x.sum(dim=1)
    if values.dim() != 1:
        raise ValueError(f"{name} must be [N] when cu_seqlens is given, got shape {tuple(values.shape)}")
    cu = _check_cu_seqlens("cu_seqlens", cu_seqlens, values.shape[0], values.device)
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=values.device), cu.diff())
    return x.new_zeros(cu.numel() - 1).index_add(0, seg, x)


def token_count(values: torch.Tensor, mask: Optional[torch.Tensor], cu_seqlens) -> torch.Tensor:
    """Number of valid tokens per sequence (``mask > 0``), in ``values``' dtype."""
    valid = torch.ones_like(values) if mask is None else (mask > 0).to(values.dtype)
    return sequence_sum(valid, None, cu_seqlens)


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


def masked_sequence_sum(
    values: torch.Tensor,
    values_name: str,
    masks: dict,
    cu_seqlens,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``sequence_sum`` of ``values`` times the product of ``masks`` (name -> tensor or None)."""
    check_tensor(values_name, values)
    combined = None
    for mask_name, mask in masks.items():
        m = token_mask(mask_name, mask, values, values_name, dtype)
        if m is not None:
            combined = m if combined is None else combined * m
    return sequence_sum(values.to(dtype), combined, cu_seqlens, name=values_name)


def check_pair_count(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen and rejected hold a different number of sequences "
            f"({chosen.shape[0]} vs {rejected.shape[0]}); check the masks / cu_seqlens"
        )
