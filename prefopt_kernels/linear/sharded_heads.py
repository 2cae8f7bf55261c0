"""Head weights that a training framework shards across ranks: FSDP2 ``DTensor``\\ s and DeepSpeed
ZeRO-3 partitioned parameters.

An FSDP2 head (``fully_shard`` on a ``Linear`` ``[V, H]``: placements ``(Shard(0),)`` on a 1-D
mesh) already holds a vocabulary shard per rank, so a call runs vocabulary-sharded over the mesh's
group instead of gathering the head (:func:`vocab_shard_group`, :class:`TokensOfAllRanks`): every
rank's tokens are all-gathered (``N_total`` rows of ``H``, against the head's ``V H``), each rank
computes with its own rows of the head, keeps its own tokens' outputs, and its rows of the head's
gradient are those FSDP2 would hold after its own reduce-scatter: averaged over the ranks.
Other ``DTensor`` heads are gathered whole (:func:`unsharded`), ZeRO-3 parameters too
(:func:`gathered`). Neither library is imported unless such a weight is passed.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


def _is_dtensor(t) -> bool:
    return t is not None and hasattr(t, "full_tensor") and hasattr(t, "placements")


def unsharded(weight, bias, differentiable: bool = True):
    """``DTensor`` head parameters as plain tensors, gathered whole.

    The gradient flows back as FSDP2's own reduce-scatter would leave it: averaged over the
    mesh (each rank's gradient is of its own tokens). A reference head (``differentiable=False``)
    is gathered outside autograd: it receives no gradient, and a gather in the graph would
    expect one in the backward.
    """
    def full(t):
        if not _is_dtensor(t):
            return t
        if not differentiable:
            return t.detach().full_tensor()
        from torch.distributed.tensor import Partial

        return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)
    return full(weight), full(bias)


def vocab_shard_group(weight, bias, references=()):
    """The process group over which the head ``weight`` is sharded by vocabulary, or None.

    That is an FSDP2 ``DTensor`` ``[V, H]`` with placements ``(Shard(0),)`` on a 1-D mesh, its
    ``bias`` None or placed alike on the same mesh, and each of ``references`` (a reference
    head's weight and bias: no gradient) None, placed alike, or a plain tensor of all ``V``
    rows (:func:`local_rows` slices it). Shards follow ``torch.chunk``: contiguous, in rank
    order, the last ones shorter or empty.
    """
    if not _is_dtensor(weight) or weight.device_mesh.ndim != 1:
        return None
    from torch.distributed.tensor import Shard

    def placed_alike(t):
        return _is_dtensor(t) and t.device_mesh == weight.device_mesh and tuple(t.placements) == (Shard(0),)

    if not placed_alike(weight) or not (bias is None or placed_alike(bias)):
        return None
    for t in references:
        whole = isinstance(t, torch.Tensor) and not _is_dtensor(t) and t.dim() >= 1 and t.shape[0] == weight.shape[0]
        if not (t is None or placed_alike(t) or whole):
            return None
    return weight.device_mesh.get_group()


def local_rows(param, differentiable: bool = True, rows: Optional[slice] = None) -> Optional[torch.Tensor]:
    """This rank's rows of a vocabulary-sharded ``DTensor`` (None stays None), or ``rows`` of a plain
    tensor holding all of them (a reference head, not differentiable).

    A differentiable one's gradient reaches ``param`` divided by the mesh's size: FSDP2 averages
    its reduce-scatter over the ranks by default (``gradient_divide_factor`` None), and each
    rank's rows here receive the gradient of every rank's tokens.
    """
    if param is None:
        return None
    if not _is_dtensor(param):
        return param.detach() if rows is None else param.detach()[rows]
    if not differentiable:
        return param.detach().to_local()
    return _ScaledGradient.apply(param.to_local(), 1.0 / param.device_mesh.size())


class _ScaledGradient(torch.autograd.Function):
    """The identity; its backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _GradientsSummedOverRanks(torch.autograd.Function):
    """The identity on fp32 tensors; its backward sums their gradients over ``group``, in one
    all-reduce (each rank's loss reads its own tokens' outputs, and every rank's backward needs
    all of them)."""

    @staticmethod
    def forward(ctx, group, *values):
        ctx.group = group
        return tuple(x.view_as(x) for x in values)

    @staticmethod
    def backward(ctx, *grads):
        from .. import distributed

        grads = [g.to(torch.float32).contiguous() for g in grads]
        distributed.all_reduce_sum(*grads, process_group=ctx.group)
        return (None,) + tuple(grads)


class _RowsOfAllRanks(torch.autograd.Function):
    """Every rank's ``[n_r, ...]`` rows, in rank order; the backward keeps this rank's rows of the
    gradient (the sharded ops' hidden gradient is already summed over the ranks)."""

    @staticmethod
    def forward(ctx, x, tokens):
        ctx.start, ctx.count = tokens.start, tokens.count
        return tokens.gather(x)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start:ctx.start + ctx.count], None


class TokensOfAllRanks:
    """Where this rank's tokens (of leading shape ``lead``) sit among every rank's on ``group``, and
    its rows ``vocab_rows`` of the head ``weight``: one all-gather of both counts.

    :meth:`rows` gathers a per-token tensor (``[..., *trailing]`` with the call's leading shape,
    differentiable), :meth:`own` takes this rank's tokens of a gathered ``[N_total]`` output back.
    """

    def __init__(self, lead, weight, group, device):
        from .. import distributed

        self.lead, self.group = tuple(lead), group
        self.count = 1
        for size in self.lead:
            self.count *= size
        mine = torch.tensor([self.count, weight.to_local().shape[0]], dtype=torch.int64, device=device)
        counts = distributed.all_gather(mine, group).cpu()
        self.counts = [int(c) for c in counts[:, 0].tolist()]
        rank = torch.distributed.get_rank(group)
        self.start = sum(self.counts[:rank])
        v0 = int(counts[:rank, 1].sum())
        self.vocab_rows = slice(v0, v0 + int(counts[rank, 1]))

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """``[N_total, ...]`` from every rank's ``[n_r, ...]`` (padded to the largest ``n_r`` to travel)."""
        from .. import distributed

        widest = max(self.counts)
        padded = flat.new_zeros((widest,) + tuple(flat.shape[1:]))
        padded[:flat.shape[0]] = flat
        parts = distributed.all_gather(padded, self.group)
        return torch.cat([part[:n] for part, n in zip(parts, self.counts)])

    def rows(self, x: Optional[torch.Tensor], trailing: int) -> Optional[torch.Tensor]:
        """Every rank's ``x`` (``[*lead, *trailing dims]``) as ``[1, N_total, *trailing dims]``;
        a bool tensor travels as uint8."""
        if x is None:
            return None
        shape = tuple(x.shape[x.dim() - trailing:]) if trailing else ()
        flat = x.reshape((self.count,) + shape)
        if x.dtype == torch.bool:
            return self.gather(flat.to(torch.uint8)).to(torch.bool).unsqueeze(0)
        if x.requires_grad:
            return _RowsOfAllRanks.apply(flat, self).unsqueeze(0)
        return self.gather(flat).unsqueeze(0)

    def own(self, values: dict) -> dict:
        """This rank's tokens of gathered ``[1, N_total]`` outputs (by name), in its leading shape; the
        differentiable ones get the gradient of every rank's loss in the backward."""
        names = [name for name, value in values.items() if value.requires_grad]
        values = dict(values)
        if names:
            values.update(zip(names, _GradientsSummedOverRanks.apply(self.group, *(values[n] for n in names))))
        return {name: value.reshape(-1)[self.start:self.start + self.count].reshape(self.lead)
                for name, value in values.items()}


def gathered(*params):
    """DeepSpeed ZeRO-3 partitioned parameters gathered for the block; a null context otherwise."""
    parameters = partitioned(*params)
    if not parameters:
        return contextlib.nullcontext()
    import deepspeed  # only reachable with a ZeRO-3 partitioned parameter

    return deepspeed.zero.GatheredParameters(parameters)


def partitioned(*params) -> list:
    """The DeepSpeed ZeRO-3 parameters among ``params`` whose data is not gathered now."""
    found = {id(p): p for p in params
             if p is not None and getattr(p, "ds_status", None) is not None
             and getattr(p.ds_status, "name", "") != "AVAILABLE"}
    return list(found.values())
