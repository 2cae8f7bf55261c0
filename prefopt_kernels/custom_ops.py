"""What the registered (``torch.library`` custom) ops share: the library, argument lookup,
autograd helpers and the device and shard a call runs on.

A registered op takes tensors and scalars only: a spec crosses as one encoded ``Scalar[]``
argument (:mod:`prefopt_kernels.spec`), the backend as the caller's selection string, a
process group by its name.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import distributed
from .checks import check_label_range
from .spec import op_of

LIBRARY = "prefopt_kernels"
# The outputs a backward op reads an upstream gradient of, in the order it takes them.
GRADIENT_OUTPUTS = ("logp", "entropy", "div")


@functools.lru_cache(maxsize=None)
def argument_names(op_name: str) -> tuple:
    """The argument names of the registered op ``op_name``, from its schema."""
    return tuple(a.name for a in getattr(torch.ops.prefopt_kernels, op_name).default._schema.arguments)


def named_arguments(op_name: str, values) -> dict:
    """A registered op's positional ``values`` by argument name."""
    return dict(zip(argument_names(op_name), values, strict=True))


def shard_checking_labels(group: str, spec, has_ref: bool, local_vocab: int, rows: int, device, labels,
                          weight, hidden_sizes=()) -> distributed.Shard:
    """The call's :class:`~prefopt_kernels.distributed.Shard`, its labels' range checked.

    Sharded, every rank checks against the global vocabulary at once (the call check, which
    compares ``spec``'s fingerprint and the fused linear heads' ``hidden_sizes``); unsharded,
    against ``local_vocab`` here.
    """
    shard = distributed.shard_for_call(distributed.group_named(group), spec, has_ref, local_vocab, rows, device,
                                       labels, weight, hidden_sizes)
    if labels is not None and shard.group is None:
        check_label_range(labels, local_vocab, op_of(spec).ignore_index)
    return shard


# Outputs that never carry a gradient.
NON_DIFFERENTIABLE = ("ref_logp", "log_kept_mass")


def mark_outputs(ctx, wanted: tuple, output) -> None:
    """Only the wanted outputs but :data:`NON_DIFFERENTIABLE` carry gradient; the rest (extras,
    statistics) do not."""
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*(o for k, o in zip(wanted, output) if k in NON_DIFFERENTIABLE),
                                *output[len(wanted):])


def upstream_gradients(wanted: tuple, grads) -> dict:
    """Flat fp32 upstream gradients of the differentiable outputs that received one."""
    return {k: g.reshape(-1).to(torch.float32).contiguous()
            for k, g in zip(wanted, grads) if g is not None and k not in NON_DIFFERENTIABLE}


def refuse_double_backward() -> None:
    """Raise when a backward runs with grad mode on: the ops' backward is not differentiable."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "prefopt_kernels ops are once-differentiable: their backward cannot be "
            "differentiated again (create_graph=True, double backward, gradient penalties)"
        )


def on_device(device: torch.device):
    """Make ``device`` the current CUDA device for the kernels a call launches (no-op elsewhere).

    Triton and the native backend launch on the current device's stream, and a model spread
    over GPUs (``device_map="auto"``) hands over tensors on a GPU that is not the current one.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
