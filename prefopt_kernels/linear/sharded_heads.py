"""Head weights that a training framework shards across ranks by parameter (not by vocabulary):
FSDP2 ``DTensor``\\ s and DeepSpeed ZeRO-3 partitioned parameters, gathered for a call.
Neither library is imported unless such a weight is passed."""

from __future__ import annotations

import contextlib


def unsharded(weight, bias, differentiable: bool = True):
    """FSDP2 ``DTensor`` head parameters as plain tensors; the gather's backward reduces the gradient.

    A reference head (``differentiable=False``) is gathered outside autograd: it receives no
    gradient, and a gather in the graph would expect one in the backward.
    """
    def full(t):
        if t is None or not (hasattr(t, "full_tensor") and hasattr(t, "placements")):
            return t
        return (t if differentiable else t.detach()).full_tensor()
    return full(weight), full(bias)


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
