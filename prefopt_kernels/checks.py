"""Argument checks of the public ops, and the specs built from the checked arguments.

Every check raises a ``TypeError`` or ``ValueError`` naming the public argument before any
kernel runs. None branches on tensor values (the labels' range needs the values, so the
registered ops check it when they run: :func:`check_label_range`), so the public functions
hold no data-dependent branch under ``torch.compile``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .divergences import real_number, resolve
from .layout import has_distinct_elements
from .spec import DEFAULT_MEMORY_BUDGET, EXTRAS, HeadSpec, OpSpec

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp32 limits a temperature (and a softcap) must respect: the kernels scale by 1/T in fp32,
# so both T and 1/T must be normal fp32 numbers.
FP32_TINY = float(torch.finfo(torch.float32).tiny)
FP32_MAX = float(torch.finfo(torch.float32).max)
_INT64_MIN, _INT64_MAX = -2 ** 63, 2 ** 63 - 1


# --------------------------------------------------------------------------- tensors


def check_logits(x, argument: str, sharded: bool = False) -> None:
    """Type, dtype, shape, device and vocabulary stride; a vocabulary shard may be empty."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{argument} must be float32, bfloat16 or float16; got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < (0 if sharded else 1):
        raise ValueError(f"{argument} must have shape [..., V] with V >= 1; got {tuple(x.shape)}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{argument} must be on a CPU or CUDA device; got {x.device}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{argument} must have a contiguous vocabulary dimension (stride(-1) == 1); "
            f"got strides {tuple(x.stride())}"
        )


def check_pair(logits: torch.Tensor, ref_logits: torch.Tensor) -> None:
    """``ref_logits`` has the shape, device and dtype of ``logits``."""
    check_same(ref_logits, "ref_logits", logits.shape, logits)
    if ref_logits.dtype != logits.dtype:
        raise TypeError(f"ref_logits must have the logits' dtype {logits.dtype}; got {ref_logits.dtype}")


def check_same(x: torch.Tensor, argument: str, shape, owner: torch.Tensor, owner_name: str = "logits") -> None:
    """``x`` has ``shape`` and lives on the device of ``owner`` (the op's main input)."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{argument} must have shape {tuple(shape)}; got {tuple(x.shape)}")
    if x.device != owner.device:
        raise ValueError(f"{argument} must be on the device of {owner_name} ({owner.device}); got {x.device}")


def check_labels(labels, owner: torch.Tensor, ignore_index, owner_name: str = "logits") -> torch.Tensor:
    """Flat int64 labels of the tokens of ``owner`` (``[..., V]`` logits or ``[..., H]`` hidden).

    Type and shape only: the range needs the labels' values (:func:`check_label_range`).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor; got {labels.dtype}")
    check_ignore_index(ignore_index)
    check_same(labels, "labels", owner.shape[:-1], owner, owner_name)
    return labels.reshape(-1).to(torch.int64).contiguous()


def capturing() -> bool:
    """Whether the current CUDA stream captures a graph: a read back to the host would fail."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise unless every flat label lies in ``[0, vocab)`` or equals ``ignore_index``.

    The check reads a reduction back to the host: a sync, which a CUDA stream capturing a
    graph (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``) refuses. While
    the current stream captures, the check is skipped, and a captured graph's replays run
    no Python at all, so labels are then checked only by the eager (warm-up) calls. An
    out-of-range label that reaches a kernel never causes an out-of-bounds read: the Triton
    kernels clamp the label they load into ``[0, V)`` and read a slice's label only where
    the slice holds it; the native CPU and CUDA kernels read the label's logit only when it
    lies in ``[0, V)`` (its log-probs are NaN for a label ``>= V`` and 0 for a negative
    one) and give the gradient a label term only then; the reference backend clamps the
    index it gathers at. That token's outputs are unspecified; the other tokens' are exact.
    """
    if capturing():
        return
    out_of_range = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.numel() and bool(out_of_range.any()):
        bad = labels[out_of_range][0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {bad}"
        )


def check_kept_label_range(low: int, high: int, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """:func:`check_label_range` of the flat ``labels`` given the least and greatest label of the
    kept ones (those not ``ignore_index``), already read back to the host: nothing more is
    read unless ``[low, high]`` leaves ``[0, vocab)``, and then the error names the first label
    out of range. ``low > high`` (no label kept) passes."""
    if low < 0 or high >= vocab:
        check_label_range(labels, vocab, ignore_index)


def check_weight(weight, owner: torch.Tensor, argument: str, owner_name: str = "logits") -> Optional[torch.Tensor]:
    """Flat fp32 per-token weights of the tokens of ``owner``, or ``None``."""
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor or None; got {type(weight).__name__}")
    if weight.dtype.is_complex:
        raise TypeError(f"{argument} must be a real tensor; got {weight.dtype}")
    check_same(weight, argument, owner.shape[:-1], owner, owner_name)
    return weight.detach().reshape(-1).to(torch.float32).contiguous()


def check_inplace(inplace_backward, logits: torch.Tensor) -> bool:
    """``inplace_backward`` writes every element of ``logits`` once: each must have its own storage."""
    if check_flag(inplace_backward, "inplace_backward") and not has_distinct_elements(logits):
        raise ValueError(
            "inplace_backward=True needs logits whose elements do not share memory; got shape "
            f"{tuple(logits.shape)} with strides {tuple(logits.stride())} (an expanded or "
            "overlapping view): pass inplace_backward=False or a materialised tensor"
        )
    if inplace_backward and torch.compiler.is_compiling():
        raise ValueError("inplace_backward=True is an eager-mode option: pass False under torch.compile")
    return inplace_backward


def check_hidden(x, argument: str) -> None:
    """Type, dtype, shape and device of ``[..., H]`` hidden states."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{argument} must be float32, bfloat16 or float16; got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{argument} must have shape [..., H] with H >= 1; got {tuple(x.shape)}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{argument} must be on a CPU or CUDA device; got {x.device}")


def check_head(hidden: torch.Tensor, weight, bias, prefix: str, vocab: Optional[int], sharded: bool) -> None:
    """An LM head ``[V, H]`` (and bias ``[V]``) for ``hidden``; ``prefix`` (``""`` or ``"ref_"``) names
    the arguments, ``vocab`` the V the head must have (the policy's), if any."""
    name, hidden_name = f"{prefix}head", f"{prefix}hidden"
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}_weight must be a torch.Tensor; got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}_weight must be float32, bfloat16 or float16; got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < (0 if sharded else 1):
        raise ValueError(
            f"{name}_weight must have shape [V, H] with H = {hidden_name}.shape[-1] = "
            f"{hidden.shape[-1]} and V >= 1; got {tuple(weight.shape)}"
        )
    if vocab is not None and weight.shape[0] != vocab:
        raise ValueError(f"{name}_weight must have the policy's vocabulary V = {vocab}; got {weight.shape[0]}")
    if weight.device != hidden.device:
        raise ValueError(f"{name}_weight must be on the device of {hidden_name} ({hidden.device}); got {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            raise TypeError(f"{name}_bias must be a floating-point torch.Tensor or None; got {bias!r:.60}")
        if tuple(bias.shape) != (weight.shape[0],) or bias.device != hidden.device:
            raise ValueError(
                f"{name}_bias must have shape ({weight.shape[0]},) on {hidden.device}; "
                f"got {tuple(bias.shape)} on {bias.device}"
            )


# --------------------------------------------------------------------------- scalars


def check_ignore_index(ignore_index) -> None:
    """A Python int in the int64 range: the registered ops carry it as an int64 argument."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {ignore_index!r}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must lie in the int64 range [-2**63, 2**63 - 1]; got {ignore_index}")


def check_temperature(temperature) -> float:
    """``T`` as a float, with ``T`` and ``1/T`` normal fp32 numbers."""
    temperature = real_number(temperature, "temperature")
    if not (FP32_TINY <= temperature <= 1.0 / FP32_TINY):
        raise ValueError(
            f"temperature must lie in [{FP32_TINY:.4g}, {1.0 / FP32_TINY:.4g}] (T and 1/T "
            f"normal fp32 numbers); got {temperature!r}"
        )
    return temperature


def check_flag(value, argument: str) -> bool:
    """``value`` if it is a bool, else a TypeError naming ``argument`` (a string such as "no" is not false)."""
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be a bool; got {value!r:.60}")
    return value


def check_scale(value, argument: str) -> float:
    """A finite multiplier within the fp32 range."""
    # Comparisons, not math.isfinite: dynamo traces them without a graph break under dynamic shapes.
    value = real_number(value, argument)
    if not (-FP32_MAX <= value <= FP32_MAX):
        raise ValueError(f"{argument} must be a finite number within the fp32 range; got {value!r}")
    return value


def check_softcap(value, argument: str) -> Optional[float]:
    """``None``, or a positive normal fp32 number (the tiles divide and multiply by it in fp32)."""
    if value is None:
        return None
    value = real_number(value, argument)
    if not (FP32_TINY <= value <= FP32_MAX):
        raise ValueError(f"{argument} must be None or a positive number in [{FP32_TINY:.4g}, {FP32_MAX:.4g}] "
                         f"(normal fp32); got {value!r}")
    return value


def check_extras(extras) -> tuple:
    """The names asked for among :data:`~prefopt_kernels.spec.EXTRAS`, in that order."""
    if isinstance(extras, str) or not isinstance(extras, (tuple, list)):
        raise TypeError(f"extras must be a tuple of names among {', '.join(EXTRAS)}; got {extras!r}")
    for name in extras:
        if name not in EXTRAS:
            raise ValueError(f"extras must name only {', '.join(EXTRAS)}; got {name!r}")
    return tuple(name for name in EXTRAS if name in extras)


def check_budget(memory_budget) -> int:
    """Bytes for a fused linear call's tiles: a positive int, :data:`DEFAULT_MEMORY_BUDGET` for ``None``."""
    if memory_budget is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive int of bytes or None; got {memory_budget!r}")
    return memory_budget


def check_top_k(top_k) -> int:
    """``None`` or a non-bool int ``>= 0`` (0: no top-k filter), as an int."""
    if top_k is None:
        return 0
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be None or an int >= 0; got {top_k!r:.60}")
    if not 0 <= top_k <= _INT64_MAX:
        raise ValueError(f"top_k must be None or an int >= 0; got {top_k}")
    return top_k


def check_fraction(value, argument: str, neutral: float, open_at_zero: bool) -> float:
    """``None`` (the filter off: ``neutral``) or a real number in ``[0, 1]``, or ``(0, 1]`` when
    ``open_at_zero``, as a float; a ValueError naming ``argument`` otherwise."""
    if value is None:
        return neutral
    value = real_number(value, argument)
    if not (0.0 < value if open_at_zero else 0.0 <= value) or not value <= 1.0:
        interval = "(0, 1]" if open_at_zero else "[0, 1]"
        raise ValueError(f"{argument} must be None or lie in {interval}; got {value!r}")
    return value


def op_spec(*, temperature, ignore_index=-100, divergence: Optional[str] = None, beta=0.5, alpha=0.5,
            want_logp: bool = False, want_ref_logp: bool = False, return_entropy=False, top_k=None,
            top_p=None, min_p=None, return_kept_mass=False) -> OpSpec:
    """The checked :class:`~prefopt_kernels.spec.OpSpec` of a call from its public arguments.

    ``divergence`` is a public name (``None``: the call computes none); ``return_entropy`` and
    ``return_kept_mass`` are the caller's flags, checked to be bools; ``top_k``, ``top_p`` and
    ``min_p`` the sampler's filters (``None``: off).
    """
    code = 0
    if divergence is not None:
        member, beta, alpha = resolve(divergence, beta, alpha)
        code = int(member)
    return OpSpec(temperature=check_temperature(temperature), ignore_index=ignore_index, divergence=code,
                  beta=beta, alpha=alpha, want_logp=want_logp, want_ref_logp=want_ref_logp,
                  want_entropy=check_flag(return_entropy, "return_entropy"), top_k=check_top_k(top_k),
                  top_p=check_fraction(top_p, "top_p", 1.0, True),
                  min_p=check_fraction(min_p, "min_p", 0.0, False),
                  want_kept_mass=check_flag(return_kept_mass, "return_kept_mass"))


def head_spec(hidden: torch.Tensor, bias, logit_scale, softcap, prefix: str) -> HeadSpec:
    """The checked :class:`~prefopt_kernels.spec.HeadSpec` of one head (``prefix`` names its arguments).

    The GEMM's dtype is the autocast dtype when autocast is on for ``hidden``'s device, else
    ``hidden.dtype``.
    """
    kind = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    return HeadSpec(compute_dtype=compute_dtype,
                    scale=check_scale(logit_scale, f"{prefix}logit_scale"),
                    softcap=check_softcap(softcap, f"{prefix}softcap"), has_bias=bias is not None)
