"""One LM head as a fused linear call applies it: the GEMM into fp32 tiles, the logit
transform, its derivative and the fp32 gradient accumulation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..spec import HeadSpec

FP32 = torch.float32
_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
# CUDA writes a bf16/fp16 GEMM's result in fp32 (``mm(..., out_dtype=)``) from torch 2.8; ``addmm``
# takes an fp32 accumulator beside half matrices from 2.10 (before, it wants the matrices' dtype).
_GEMM_OUT_DTYPE = _TORCH_VERSION >= (2, 8)
_ADDMM_OUT_DTYPE = _TORCH_VERSION >= (2, 10)


@dataclass
class Head:
    """One model's LM head in a call: weight ``[V, H]``, bias ``[V]`` and its :class:`HeadSpec`."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    spec: HeadSpec

    @property
    def gemm_dtype(self) -> torch.dtype:
        """The dtype of the GEMM's inputs."""
        return self.spec.compute_dtype

    @property
    def widened(self) -> bool:
        """The GEMM writes its result in ``gemm_dtype``, widened to the fp32 tile after: a
        half-precision GEMM on a device that cannot write it in fp32 (a CPU; CUDA before torch 2.8)."""
        return self.gemm_dtype != FP32 and not (self.weight.device.type == "cuda" and _GEMM_OUT_DTYPE)

    def weight_chunk(self, v0: int, v1: int) -> torch.Tensor:
        """``W[v0:v1]`` in ``gemm_dtype`` (a view when the weight already has it)."""
        return self.weight[v0:v1].to(self.gemm_dtype)

    def project(self, hidden: torch.Tensor, v0: int, v1: int, out: torch.Tensor,
                gemm_out: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``out = transform(hidden @ W[v0:v1]^T + c[v0:v1])`` in fp32: ``hidden`` ``[n, H]`` in ``gemm_dtype``.

        ``out`` is an fp32 ``[n, v1 - v0]`` tile; ``gemm_out`` a tile of the same shape in
        ``gemm_dtype`` when the head is ``widened``; ``weight`` the :meth:`weight_chunk` when
        the caller holds it already. Bias, scale and softcap act on fp32 values whatever the
        GEMM's dtype.
        """
        weight = self.weight_chunk(v0, v1) if weight is None else weight
        if self.gemm_dtype == FP32:
            torch.mm(hidden, weight.t(), out=out)
        elif self.widened:
            out.copy_(torch.mm(hidden, weight.t(), out=gemm_out))
        else:
            # Half-precision inputs, fp32 result: no rounding of the logits to bf16/fp16.
            torch.mm(hidden, weight.t(), out_dtype=FP32, out=out)
        if self.bias is not None:
            out.add_(self.bias[v0:v1].to(FP32))
        if self.spec.scale != 1.0:
            out.mul_(self.spec.scale)
        if self.spec.softcap is not None:
            out.div_(self.spec.softcap).tanh_().mul_(self.spec.softcap)
        return out

    def pre_transform_grad(self, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``dL/d(h W^T + c)`` in place from ``grad = dL/dz``: ``grad * scale * (1 - (z / softcap)^2)``."""
        if self.spec.softcap is not None:
            tanh = z / self.spec.softcap
            grad.mul_(tanh.mul_(tanh).neg_().add_(1.0))
        if self.spec.scale != 1.0:
            grad.mul_(self.spec.scale)
        return grad

    def gemm_operand(self, grad: torch.Tensor) -> torch.Tensor:
        """The fp32 ``grad`` tile as the backward GEMMs take it: rounded once to the GEMM dtype,
        on every device (so CPU and CUDA, and TRL's head, round the same gradient alike)."""
        return grad if self.gemm_dtype == FP32 else grad.to(self.gemm_dtype)


def accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool = False) -> None:
    """``acc += a @ b`` in fp32 (``acc`` fp32), without rounding the product to ``a``'s dtype;
    ``first``: ``acc = a @ b``, the first product into ``acc``, which needs no zero fill before.

    One GEMM: half operands go to an fp32-output GEMM where the device has one (CUDA), and
    are otherwise passed here already widened to fp32 by the caller. ``first`` leaves ``acc``
    bit-identical to a zero fill and an accumulation: ``0 + x`` is ``x`` for every ``x`` but
    ``-0.0``, which a GEMM summing two or more products from ``+0`` does not give (a test
    checks the GEMMs at hand); a one-term product (inner size 1) can, so it is still
    accumulated into zeros.
    """
    if first and a.shape[1] == 1:
        acc.zero_()
        first = False
    if a.dtype == FP32 and b.dtype == FP32:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif acc.device.type == "cuda" and _GEMM_OUT_DTYPE and a.dtype == b.dtype:
        if first:
            torch.mm(a, b, out_dtype=FP32, out=acc)
        elif _ADDMM_OUT_DTYPE:
            torch.addmm(acc, a, b, out_dtype=FP32, out=acc)
        else:
            acc.add_(torch.mm(a, b, out_dtype=FP32))
    else:
        accumulate(acc, a.float(), b.float(), first)


def gather_rows(x: torch.Tensor, index: torch.Tensor, dtype) -> torch.Tensor:
    """Rows ``index`` (flat token order) of ``x`` ``[..., H]`` as ``[n, H]`` in ``dtype``; no full copy."""
    if x.dim() == 2:
        rows = x.index_select(0, index)
    elif x.dim() == 1:
        rows = x.reshape(1, -1).expand(index.numel(), -1)
    else:
        rows = x[torch.unravel_index(index, x.shape[:-1])]
    return rows.to(dtype).contiguous()


def token_rows(x: torch.Tensor) -> Optional[torch.Tensor]:
    """``x`` ``[..., H]`` as a ``[N, H]`` view in flat token order, or ``None`` where its strides
    do not allow one (a gather then reads the rows without a copy of the whole)."""
    lead = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    if any(outer != inner_size * inner for (_, outer), (inner_size, inner) in zip(lead, lead[1:])):
        return None
    return x.view(-1, x.shape[-1])


def pad_rows(x: Optional[torch.Tensor], rows: int, value) -> Optional[torch.Tensor]:
    """``x`` ``[n, ...]`` followed by ``rows - n`` rows filled with ``value`` (``x`` itself when ``rows == n``)."""
    if x is None or x.shape[0] == rows:
        return x
    out = x.new_full((rows,) + tuple(x.shape[1:]), value)
    out[: x.shape[0]] = x
    return out


def scatter_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``out[token index] = rows`` for ``out`` ``[..., H]`` (contiguous) and ``rows`` ``[n, H]``."""
    out.view(-1, out.shape[-1]).index_copy_(0, index, rows.to(out.dtype))
