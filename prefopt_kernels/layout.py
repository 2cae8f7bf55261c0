"""How ``[..., V]`` (or ``[..., H]``) tensors are seen as rows of tokens, without copies."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


def token_count(x: torch.Tensor):
    """The number of tokens of a ``[..., V]`` (or ``[..., H]``) tensor, ``prod(x.shape[:-1])``.

    A product of the sizes rather than ``torch.Size.numel()``, which turns symbolic sizes into
    constants: under ``torch.compile(dynamic=True)`` one graph then serves every batch and
    sequence length.
    """
    return math.prod(x.shape[:-1])


def has_distinct_elements(x: torch.Tensor) -> bool:
    """True when no two indices of ``x`` address the same element (no stride 0, no overlap)."""
    dims = sorted((x.stride(d), x.shape[d]) for d in range(x.dim()) if x.shape[d] > 1)
    extent = 1  # elements spanned by the dimensions of smaller stride
    for stride, size in dims:
        if stride < extent:
            return False
        extent = stride * (size - 1) + extent
    return True


class RowLayout(NamedTuple):
    """How same-shaped ``[..., V]`` tensors are seen as ``[B, T, V]``: computed once per call.

    Leading dimensions laid out one inside the other (in every tensor) merge into one, so a
    contiguous tensor becomes ``[1, N, V]`` and a sliced ``logits[:, :-1, :]`` stays
    ``[B, T - 1, V]``: no copy. Layouts that no two-level stride describe are copied
    (``copied``). The backward recomputes the layout from the same tensors, so it sees the
    rows the forward saw.
    """

    size: tuple  # (B, T, V)
    strides: tuple  # per tensor: (batch stride, token stride)
    copied: bool

    @classmethod
    def of(cls, *tensors: Optional[torch.Tensor]) -> "RowLayout":
        present = [x for x in tensors if x is not None]
        shape = present[0].shape
        vocab = shape[-1]
        groups = []  # [size, stride per tensor]
        for dim, size in enumerate(shape[:-1]):
            if size == 1:
                continue
            strides = [x.stride(dim) for x in present]
            if groups and all(g == s * size for g, s in zip(groups[-1][1], strides)):
                groups[-1] = [groups[-1][0] * size, strides]
            else:
                groups.append([size, strides])
        copied = len(groups) > 2
        if copied:
            groups = [[shape[:-1].numel(), [vocab] * len(present)]]
        while len(groups) < 2:
            groups.insert(0, [1, [0] * len(present)])
        per_tensor = iter(zip(groups[0][1], groups[1][1]))
        strides = tuple(next(per_tensor) if x is not None else None for x in tensors)
        return cls((groups[0][0], groups[1][0], vocab), strides, copied)

    def rows(self, *tensors: Optional[torch.Tensor]) -> list:
        """The ``[B, T, V]`` views of the tensors this layout was made of (``None`` passes)."""
        return [
            None if x is None else
            (x.reshape(-1, self.size[2]) if self.copied else x).as_strided(self.size, strides + (1,))
            for x, strides in zip(tensors, self.strides)
        ]
