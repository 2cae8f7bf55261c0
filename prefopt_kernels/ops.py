"""Public fused token ops: input checks, backend dispatch and the registered (custom) ops.

Notation for every op: policy logits ``a`` and reference logits ``b`` over V entries,
temperature ``T``; ``p = softmax(a / T)``, ``q = softmax(b / T)``, label ``y``.

Policies shared by every op and backend:

* ``-inf`` logits are legal (masked entries); a NaN or ``+inf`` in a row's policy logits
  makes that row's outputs and gradient row NaN; one in its reference logits makes
  ``ref_logp`` and ``div`` NaN, and the gradient row NaN where the divergence term is used.
  A divergence that is ``+inf`` (the supports disagree where ``f`` is unbounded) has a NaN
  gradient row where it is used. Skipped rows are never read: 0 whatever they hold.
* The ops are once-differentiable: differentiating their backward (``create_graph=True``)
  raises. ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``) are not supported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
import os
import threading
from typing import List, NamedTuple, Optional

import torch

from . import distributed
from .backends import OpSpec, RowStats, saved_names
from .divergences import real_number, resolve

BACKEND_NAMES = ("triton", "native", "reference")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_selection = threading.local()


class TokenTerms(NamedTuple):
    """Per-token results of :func:`token_terms`, each fp32 with the labels' shape."""

    logp: torch.Tensor
    ref_logp: torch.Tensor
    div: torch.Tensor
    entropy: Optional[torch.Tensor]


# --------------------------------------------------------------------------- dispatch


def _backend_module(name: str):
    return importlib.import_module(f"prefopt_kernels.backends.{name}")


def available_backends() -> list:
    """Names of the backends usable in this process, in dispatch preference order.

    ``triton`` needs Triton and a CUDA device (or ``TRITON_INTERPRET=1``, which runs its
    kernels on CPU tensors); ``native`` needs the compiled extension; ``reference`` is
    always there.
    """
    names = []
    for name in BACKEND_NAMES:
        try:
            if _backend_module(name).is_available():
                names.append(name)
        except ImportError:
            continue
    return names


class use_backend(contextlib.AbstractContextManager):
    """Select the backend of the calling thread: ``"auto" | "triton" | "native" | "reference"``.

    Call it to set this thread's choice, or use it as a context manager to set it for a
    block (the previous choice is restored on exit, so blocks nest). The choice is
    thread-local: other threads keep theirs, and a new thread starts at ``"auto"``.
    ``"auto"`` sends CUDA tensors to Triton and CPU tensors to the native extension when
    built, else to the reference; the environment variable ``PREFOPT_BACKEND`` overrides
    ``"auto"``. The backward pass always runs on the backend its forward ran on.
    """

    def __init__(self, name: str):
        _check_backend_name(name, "name")
        self._previous = _selected_backend()
        _selection.name = name

    def __exit__(self, *exc_info):
        _selection.name = self._previous
        return False


def _selected_backend() -> str:
    return getattr(_selection, "name", "auto")


def _check_backend_name(name, argument: str) -> None:
    if name not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"{argument} must be one of auto, {', '.join(BACKEND_NAMES)}; got {name!r}")


def _backend_selection() -> str:
    """The calling thread's choice, ``PREFOPT_BACKEND`` standing in for ``"auto"``; checked."""
    name = _selected_backend()
    if name == "auto":
        name = os.environ.get("PREFOPT_BACKEND", "auto") or "auto"
        _check_backend_name(name, "PREFOPT_BACKEND")
    return name


def _pick_backend(device: torch.device, name: Optional[str] = None):
    """The backend module that runs on ``device`` for the selection ``name`` (default: the caller's)."""
    name = _backend_selection() if name is None else name
    if name != "auto":
        module = _backend_module(name)
        if not (module.is_available() and module.supports(device)):
            raise ValueError(
                f"backend {name!r} cannot run on {device.type} tensors here "
                f"(available: {', '.join(available_backends())})"
            )
        return module
    preference = ("triton", "native") if device.type == "cuda" else ("native",)
    for candidate in preference:
        try:
            module = _backend_module(candidate)
        except ImportError:
            continue
        if module.is_available() and module.supports(device):
            return module
    return _backend_module("reference")


# --------------------------------------------------------------------------- checks


def _check_logits(x, argument: str, sharded: bool = False) -> None:
    """Type, dtype, shape, device and vocabulary stride; a vocabulary shard may be empty."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
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


def _check_same(x: torch.Tensor, argument: str, shape, owner: torch.Tensor, owner_name: str = "logits") -> None:
    """``x`` has ``shape`` and lives on the device of ``owner`` (the op's main input)."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{argument} must have shape {tuple(shape)}; got {tuple(x.shape)}")
    if x.device != owner.device:
        raise ValueError(f"{argument} must be on the device of {owner_name} ({owner.device}); got {x.device}")


def _check_labels(labels, owner: torch.Tensor, ignore_index, owner_name: str = "logits") -> torch.Tensor:
    """Flat int64 labels of the tokens of ``owner`` (``[..., V]`` logits or ``[..., H]`` hidden).

    Type and shape only: the range needs the labels' values, so the registered ops check it
    when they run (:func:`check_label_range`), which keeps this function free of
    data-dependent branches under ``torch.compile``.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor; got {labels.dtype}")
    check_ignore_index(ignore_index)
    _check_same(labels, "labels", owner.shape[:-1], owner, owner_name)
    return labels.reshape(-1).to(torch.int64).contiguous()


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
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    out_of_range = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.numel() and bool(out_of_range.any()):
        bad = labels[out_of_range][0].item()
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {bad}"
        )


_INT64_MIN, _INT64_MAX = -2 ** 63, 2 ** 63 - 1


def check_ignore_index(ignore_index) -> None:
    """A Python int in the int64 range: the registered ops carry it as an int64 argument."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {ignore_index!r}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must lie in the int64 range [-2**63, 2**63 - 1]; got {ignore_index}")


def _check_weight(weight, owner: torch.Tensor, argument: str, owner_name: str = "logits") -> Optional[torch.Tensor]:
    """Flat fp32 per-token weights of the tokens of ``owner``, or ``None``."""
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor or None; got {type(weight).__name__}")
    if weight.dtype.is_complex:
        raise TypeError(f"{argument} must be a real tensor; got {weight.dtype}")
    _check_same(weight, argument, owner.shape[:-1], owner, owner_name)
    return weight.detach().reshape(-1).to(torch.float32).contiguous()


# fp32 limits a temperature must respect: the kernels scale by 1/T in fp32, so both T and
# 1/T must be normal fp32 numbers.
_FP32_TINY = float(torch.finfo(torch.float32).tiny)


def _check_temperature(temperature) -> float:
    temperature = real_number(temperature, "temperature")
    if not (_FP32_TINY <= temperature <= 1.0 / _FP32_TINY):
        raise ValueError(
            f"temperature must lie in [{_FP32_TINY:.4g}, {1.0 / _FP32_TINY:.4g}] (T and 1/T "
            f"normal fp32 numbers); got {temperature!r}"
        )
    return temperature


def check_flag(value, argument: str) -> bool:
    """``value`` if it is a bool, else a TypeError naming ``argument`` (a string such as "no" is not false)."""
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be a bool; got {value!r:.60}")
    return value


def _check_inplace(inplace_backward, logits: torch.Tensor) -> bool:
    """``inplace_backward`` writes every element of ``logits`` once: each must have its own storage."""
    if check_flag(inplace_backward, "inplace_backward") and not _has_distinct_elements(logits):
        raise ValueError(
            "inplace_backward=True needs logits whose elements do not share memory; got shape "
            f"{tuple(logits.shape)} with strides {tuple(logits.stride())} (an expanded or "
            "overlapping view): pass inplace_backward=False or a materialised tensor"
        )
    return inplace_backward


def _has_distinct_elements(x: torch.Tensor) -> bool:
    """True when no two indices of ``x`` address the same element (no stride 0, no overlap)."""
    dims = sorted((x.stride(d), x.shape[d]) for d in range(x.dim()) if x.shape[d] > 1)
    extent = 1  # elements spanned by the dimensions of smaller stride
    for stride, size in dims:
        if stride < extent:
            return False
        extent = stride * (size - 1) + extent
    return True


class _RowLayout(NamedTuple):
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
    def of(cls, *tensors: Optional[torch.Tensor]) -> "_RowLayout":
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


# --------------------------------------------------------------------------- autograd


_OUTPUTS = ("logp", "ref_logp", "entropy", "div")
LIBRARY = "prefopt_kernels"


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(OpSpec))


def spec_arguments(spec: OpSpec) -> tuple:
    """The fields of ``spec`` in declaration order: how the registered ops receive a spec."""
    return tuple(getattr(spec, name) for name in _SPEC_FIELDS)


def spec_from(arguments: dict) -> OpSpec:
    """The inverse of :func:`spec_arguments`: the spec among a registered op's named arguments."""
    return OpSpec(**{name: arguments[name] for name in _SPEC_FIELDS})


@functools.lru_cache(maxsize=None)
def argument_names(op_name: str) -> tuple:
    """The argument names of the registered op ``op_name``, from its schema."""
    return tuple(a.name for a in getattr(torch.ops.prefopt_kernels, op_name).default._schema.arguments)


def named_arguments(op_name: str, values) -> dict:
    """A registered op's positional ``values`` by argument name."""
    return dict(zip(argument_names(op_name), values, strict=True))


def checked_shard(group: str, vocab: int, rows: int, spec: OpSpec, has_ref: bool, device, labels, weight,
                  options=()):
    """The call's :class:`~prefopt_kernels.distributed.Shard`, its labels' range checked.

    Sharded, every rank checks against the global vocabulary at once (the call check, which
    also compares the op's ``options``); unsharded, against ``vocab`` here.
    """
    shard = distributed.shard_of_name(group, vocab, rows, spec, has_ref, device, labels, weight, options)
    if labels is not None and shard.group is None:
        check_label_range(labels, vocab, spec.ignore_index)
    return shard


def mark_outputs(ctx, wanted: list, output) -> None:
    """Only the wanted outputs but ``ref_logp`` carry gradient; the rest (extras, statistics) do not."""
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*(o for k, o in zip(wanted, output) if k == "ref_logp"), *output[len(wanted):])


def upstream_gradients(wanted: list, grads) -> dict:
    """Flat fp32 upstream gradients of the differentiable outputs that received one."""
    return {k: g.reshape(-1).to(torch.float32).contiguous()
            for k, g in zip(wanted, grads) if g is not None and k != "ref_logp"}


def token_count(x: torch.Tensor):
    """The number of tokens of a ``[..., V]`` (or ``[..., H]``) tensor, ``prod(x.shape[:-1])``.

    A product of the sizes rather than ``torch.Size.numel()``, which turns symbolic sizes into
    constants: under ``torch.compile(dynamic=True)`` one graph then serves every batch and
    sequence length.
    """
    return math.prod(x.shape[:-1])


def on_device(device: torch.device):
    """Make ``device`` the current CUDA device for the kernels a call launches (no-op elsewhere).

    Triton and the native backend launch on the current device's stream, and a model spread
    over GPUs (``device_map="auto"``) hands over tensors on a GPU that is not the current one.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op(f"{LIBRARY}::token_forward", mutates_args=())
def _token_forward(logits: torch.Tensor, ref_logits: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                   weight: Optional[torch.Tensor], temperature: float, ignore_index: int, divergence: int,
                   beta: float, alpha: float, want_logp: bool, want_ref_logp: bool, want_entropy: bool,
                   inplace_backward: bool, backend: str, group: str) -> List[torch.Tensor]:
    """The fused read of the policy (and reference) rows of ``[..., V]`` logits.

    Returns the fp32 ``[N]`` outputs the spec asks for (``_OUTPUTS`` order), then the saved
    statistics that are not outputs already (:func:`_saved_only`), then, with a ``group``, the
    shard's ``[v0, V]`` int64. Checks the labels' range (every rank's, sharded) as it runs.
    ``inplace_backward`` is carried for the backward only.
    """
    spec = spec_from(locals())
    has_ref = ref_logits is not None
    shard = checked_shard(group, logits.shape[-1], token_count(logits), spec, has_ref, logits.device,
                          labels, weight)
    module = _pick_backend(logits.device, backend)
    rows, ref_rows = _RowLayout.of(logits, ref_logits).rows(logits, ref_logits)
    with on_device(logits.device):
        if shard.group is None:
            stats = module.forward(rows, labels, ref_rows, weight, spec)
        else:
            stats = distributed.sharded_stats(module, rows, labels, ref_rows, weight, spec, shard)
    outputs = [getattr(stats, k) for k in wanted_outputs(spec)]
    saved = dict(zip(saved_names(spec, has_ref), stats.saved(spec, has_ref)))
    tail = [distributed.shard_to_tensor(shard)] if group else []
    return outputs + [saved[name] for name in _saved_only(spec, has_ref)] + tail


@_token_forward.register_fake
def _token_forward_fake(*values):
    arguments = named_arguments("token_forward", values)
    spec, logits = spec_from(arguments), arguments["logits"]
    n = token_count(logits)
    count = len(wanted_outputs(spec)) + len(_saved_only(spec, arguments["ref_logits"] is not None))
    tail = [torch.empty(2, dtype=torch.int64)] if arguments["group"] else []
    return [logits.new_empty(n, dtype=torch.float32) for _ in range(count)] + tail


@torch.library.custom_op(f"{LIBRARY}::token_backward", mutates_args=("grad_out",))
def _token_backward(logits: torch.Tensor, ref_logits: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                    weight: Optional[torch.Tensor], saved: List[torch.Tensor], grad_logp: Optional[torch.Tensor],
                    grad_entropy: Optional[torch.Tensor], grad_div: Optional[torch.Tensor],
                    grad_out: torch.Tensor, temperature: float, ignore_index: int, divergence: int, beta: float,
                    alpha: float, want_logp: bool, want_ref_logp: bool, want_entropy: bool, backend: str,
                    group: str, shard_offsets: Optional[torch.Tensor]) -> None:
    """Write the gradient of ``sum g_logp logp + g_entropy H + g_div div`` into ``grad_out``.

    ``grad_out`` has the logits' shape and dtype: a fresh contiguous tensor, or the logits
    themselves (``inplace_backward``, when their rows need no copy). ``saved`` and
    ``shard_offsets`` are what :func:`_token_forward` returned; the gradients are fp32 ``[N]``
    or ``None`` (zero). Sharded, each rank writes its own shard from the global statistics:
    no communication.
    """
    spec = spec_from(locals())
    stats = RowStats.from_saved(saved, spec, ref_logits is not None)
    shard = distributed.shard_from_tensor(group, shard_offsets, logits.shape[-1])
    module = _pick_backend(logits.device, backend)
    # A fresh gradient is contiguous, so it adds no break to the logits' layout; the logits
    # themselves are passed only when their rows need no copy.
    layout = _RowLayout.of(logits, ref_logits, grad_out)
    rows, ref_rows, grad_rows = layout.rows(logits, ref_logits, grad_out)
    # contiguous [N]: Inductor may hand the upstream gradients over in their outputs' [...] shape.
    grads = tuple(None if g is None else g.reshape(-1).contiguous() for g in (grad_logp, grad_entropy, grad_div))
    grads += (grad_rows,)
    with on_device(logits.device):
        if shard.group is None:
            module.backward(rows, labels, ref_rows, weight, spec, stats, *grads)
        elif rows.shape[2]:
            module.slice_backward(rows, labels, ref_rows, weight, spec, stats, *grads, shard.v0)


@_token_backward.register_fake
def _token_backward_fake(*values):
    return None


def _token_setup_context(ctx, inputs, output):
    arguments = named_arguments("token_forward", inputs)
    spec, ref_logits = spec_from(arguments), arguments["ref_logits"]
    has_ref = ref_logits is not None
    wanted = wanted_outputs(spec)
    by_name = dict(zip(wanted + list(_saved_only(spec, has_ref)), output))
    saved = [by_name[name] for name in saved_names(spec, has_ref)]
    ctx.spec, ctx.wanted, ctx.n_saved, ctx.n_inputs = spec, wanted, len(saved), len(inputs)
    ctx.inplace, ctx.backend, ctx.group = arguments["inplace_backward"], arguments["backend"], arguments["group"]
    ctx.save_for_backward(arguments["logits"], ref_logits, arguments["labels"], arguments["weight"], *saved,
                          output[-1] if ctx.group else None)
    mark_outputs(ctx, wanted, output)


def _saved_only(spec: OpSpec, has_ref: bool) -> tuple:
    """The saved statistics that are not also outputs (an op returns each tensor once)."""
    wanted = wanted_outputs(spec)
    return tuple(name for name in saved_names(spec, has_ref) if name not in wanted)


def _token_autograd(ctx, grads):
    _refuse_double_backward()
    logits, ref_logits, labels, weight, *saved = ctx.saved_tensors
    saved, shard_offsets = saved[:ctx.n_saved], saved[ctx.n_saved]
    upstream = upstream_gradients(ctx.wanted, grads)
    no_grads = (None,) * (ctx.n_inputs - 1)
    if not upstream or not ctx.needs_input_grad[0]:
        return (None,) + no_grads
    if ctx.inplace and not _RowLayout.of(logits, ref_logits).copied:
        grad = logits
    else:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    # Writing into the logits bumps their version (the op declares the mutation): anything that
    # saved them, this op included if its backward runs again, then fails PyTorch's version check.
    torch.ops.prefopt_kernels.token_backward(logits, ref_logits, labels, weight, saved, upstream.get("logp"),
                                             upstream.get("entropy"), upstream.get("div"), grad,
                                             *spec_arguments(ctx.spec), ctx.backend, ctx.group, shard_offsets)
    return (grad,) + no_grads


_token_forward.register_autograd(_token_autograd, setup_context=_token_setup_context)


def _refuse_double_backward() -> None:
    """Raise when a backward runs with grad mode on: the ops' backward is not differentiable."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "prefopt_kernels ops are once-differentiable: their backward cannot be "
            "differentiated again (create_graph=True, double backward, gradient penalties)"
        )


def _run(logits, labels, ref_logits, weight, spec: OpSpec, inplace_backward: bool, process_group):
    inplace_backward = _check_inplace(inplace_backward, logits)
    if inplace_backward and torch.compiler.is_compiling():
        raise ValueError("inplace_backward=True is an eager-mode option: pass False under torch.compile")
    group = distributed.group_name(process_group, logits.device)
    lead = logits.shape[:-1]
    keys = wanted_outputs(spec)
    if token_count(logits) == 0:
        if process_group is not None:
            # The ranks still agree on the call: a rank with tokens waits in the call check.
            distributed.shard_of(process_group, logits.shape[-1], 0, spec, ref_logits is not None, logits.device,
                                 labels, weight)
        # No tokens: zeros that still belong to the logits' graph (ref_logp never does).
        zeros = logits.sum(-1).float() * 0.0
        return {k: zeros.detach() if k == "ref_logp" else zeros for k in keys}
    outputs = torch.ops.prefopt_kernels.token_forward(logits, ref_logits, labels, weight, *spec_arguments(spec),
                                                      inplace_backward, _backend_selection(), group)
    return {k: v.view(lead) for k, v in zip(keys, outputs)}


def wanted_outputs(spec: OpSpec) -> list:
    """The per-token outputs a call of ``spec`` returns, in :data:`_OUTPUTS` order."""
    return [key for key in _OUTPUTS if _wants(spec, key)]


def _wants(spec: OpSpec, key: str) -> bool:
    return {
        "logp": spec.want_logp,
        "ref_logp": spec.want_ref_logp,
        "entropy": spec.want_entropy,
        "div": bool(spec.divergence),
    }[key]


# --------------------------------------------------------------------------- public ops


def token_logprobs(logits, labels, *, ignore_index: int = -100, temperature: float = 1.0,
                   return_entropy: bool = False, inplace_backward: bool = False, process_group=None):
    r"""Label log-probabilities (and optionally entropies) of the policy, one read of each row.

    ``logp = a_y / T - lse(a / T)``, ``H(p) = lse(a / T) - sum_i p_i a_i / T``, computed
    with an online softmax over the vocabulary; no ``[N, V]`` softmax is ever written.
    Gradients (recomputed in backward from the saved per-row log-sum-exp):
    ``dlogp/da_j = (1[j = y] - p_j) / T``, ``dH/da_j = -p_j (log p_j + H) / T``.

    Args:
        logits: ``[..., V]`` fp32, bf16 or fp16; the vocabulary dimension contiguous, the
            leading ones may be strided (``logits[:, :-1, :]`` is read without a copy).
        labels: ``[...]`` integer, each in ``[0, V)`` or ``ignore_index``.
        ignore_index: label value of tokens to skip (their row is never read); an int in
            the int64 range.
        temperature: ``T`` with ``T`` and ``1/T`` normal fp32 numbers (about
            ``[1.2e-38, 8.5e37]``).
        return_entropy: also return ``H(p)`` per token.
        inplace_backward: write the logits' gradient into the logits' own storage (the
            logits are consumed; backward then allocates nothing of size ``[N, V]``). The
            logits' version counter is bumped, so PyTorch raises its usual in-place error if
            anything that saved them runs its backward later (or this backward runs twice);
            expanded or overlapping logits are refused.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded
            (tensor parallelism): each rank passes its contiguous shard ``logits[..., V_r]``,
            shards in rank order, any sizes (0 included); ``labels`` are global ids and every
            rank gets the global per-token results; the gradient is the rank's shard. The
            ranks exchange their per-row states: ``4 R F`` bytes per token in one all-gather
            (``R`` ranks, ``F`` = 4 here, 5 with the entropy), plus one all-gather of 29 int64
            per rank that checks the ranks agree; the backward communicates nothing. See
            :mod:`prefopt_kernels.distributed`.

    Returns:
        ``logp`` fp32 ``[...]`` (0 at ignored tokens), or ``(logp, entropy)``.
    """
    sharded = process_group is not None
    _check_logits(logits, "logits", sharded=sharded)
    labels = _check_labels(labels, logits, ignore_index)
    spec = OpSpec(temperature=_check_temperature(temperature), ignore_index=ignore_index,
                  want_logp=True, want_entropy=check_flag(return_entropy, "return_entropy"))
    out = _run(logits, labels, None, None, spec, inplace_backward, process_group)
    return (out["logp"], out["entropy"]) if return_entropy else out["logp"]


def token_divergence(logits, ref_logits, *, divergence: str = "forward_kl", beta: float = 0.5,
                     alpha: float = 0.5, weight=None, temperature: float = 1.0,
                     inplace_backward: bool = False, process_group=None):
    r"""Per-token f-divergence ``D_f(p, q) = sum_i q_i f(p_i / q_i)`` of the policy from the reference.

    ``divergence`` is one of ``forward_kl`` (KL(q||p)), ``reverse_kl`` (KL(p||q)), ``js``
    (``beta``-weighted Jensen-Shannon), ``tv``, ``hellinger``, ``chi2``, ``alpha`` (Amari,
    order ``alpha``); see :mod:`prefopt_kernels.divergences`. Gradient, to ``logits`` only:
    ``dD/da_j = p_j (f'(t_j) - sum_i p_i f'(t_i)) / T``.

    Args:
        logits, ref_logits: ``[..., V]``, same shape, dtype (fp32, bf16, fp16) and device.
        weight: optional ``[...]`` selector (SparsePO's divergence mask). Tokens where it is
            0 are skipped entirely (neither row is read) and get divergence 0. The result
            is NOT multiplied by the weight: the caller does that. The gradient of
            ``Σ_t m_t D_t`` with respect to ``m_t`` is ``D_t``, which a skipped token reports
            as 0, so pass a mask here only when it needs no gradient (detached, or under
            ``no_grad``); a mask that requires grad goes in as ``None`` and multiplies after.
        temperature: ``T`` with ``T`` and ``1/T`` normal fp32 numbers (about
            ``[1.2e-38, 8.5e37]``).
        beta: ``js``'s mixing weight, ``1e-30 <= beta <= 1 - 1e-30``.
        alpha: the order of ``alpha``, finite, ``|alpha| <= 1e6``, at least ``1e-30`` from 0
            and 1. Values near the edges stay accurate (``expm1``/``log1p`` forms).
        inplace_backward: as in :func:`token_logprobs`.
        process_group: as in :func:`token_logprobs`, both logits sharded alike. Bytes per
            token: ``4 R F`` with ``F`` = 8 (forward KL, js, tv, hellinger, chi2, alpha) or 9
            (reverse KL), plus 8 bytes (one all-reduce of 2 floats) for the second sweep of
            js, tv, hellinger, chi2 and alpha.

    Returns:
        fp32 ``[...]`` per-token divergence.
    """
    _check_logits(logits, "logits", sharded=process_group is not None)
    _check_logits(ref_logits, "ref_logits", sharded=process_group is not None)
    _check_pair(logits, ref_logits)
    weight = _check_weight(weight, logits, "weight")
    code, beta, alpha = resolve(divergence, beta, alpha)
    spec = OpSpec(temperature=_check_temperature(temperature), divergence=code, beta=beta, alpha=alpha)
    return _run(logits, None, ref_logits, weight, spec, inplace_backward, process_group)["div"]


def token_terms(logits, labels, ref_logits, *, divergence: str = "forward_kl", div_weight=None,
                ignore_index: int = -100, temperature: float = 1.0, beta: float = 0.5,
                alpha: float = 0.5, return_entropy: bool = False,
                inplace_backward: bool = False, process_group=None) -> TokenTerms:
    r"""Everything a token-level preference loss needs, from ONE read of both logits rows.

    ``logp = a_y/T - lse(a/T)``, ``ref_logp = b_y/T - lse(b/T)``, ``div = D_f(p, q)`` (as in
    :func:`token_divergence`) and optionally ``entropy = H(p)``. Ignored tokens are skipped
    entirely and hold 0 everywhere. Where ``div_weight`` is 0 the divergence is not
    computed (``div`` is 0 there, unweighted elsewhere; multiply by the mask in the loss).
    Gradient flows to ``logits`` only; ``ref_logp`` is not differentiable.

    Args:
        logits, ref_logits: ``[..., V]`` fp32, bf16 or fp16, same shape, dtype and device.
        labels: ``[...]`` integer in ``[0, V)`` or ``ignore_index``.
        div_weight: optional ``[...]`` divergence selector (see :func:`token_divergence`).
        divergence, beta, alpha, temperature, inplace_backward, process_group: as in
            :func:`token_divergence` (``F`` one more with the entropy).

    Returns:
        :class:`TokenTerms` ``(logp, ref_logp, div, entropy | None)``, fp32 ``[...]`` each.
    """
    sharded = process_group is not None
    _check_logits(logits, "logits", sharded=sharded)
    _check_logits(ref_logits, "ref_logits", sharded=sharded)
    _check_pair(logits, ref_logits)
    labels = _check_labels(labels, logits, ignore_index)
    weight = _check_weight(div_weight, logits, "div_weight")
    code, beta, alpha = resolve(divergence, beta, alpha)
    spec = OpSpec(temperature=_check_temperature(temperature), ignore_index=ignore_index,
                  divergence=code, beta=beta, alpha=alpha,
                  want_logp=True, want_ref_logp=True, want_entropy=check_flag(return_entropy, "return_entropy"))
    out = _run(logits, labels, ref_logits, weight, spec, inplace_backward, process_group)
    return TokenTerms(out["logp"], out["ref_logp"], out["div"], out.get("entropy"))


def _check_pair(logits: torch.Tensor, ref_logits: torch.Tensor) -> None:
    _check_same(ref_logits, "ref_logits", logits.shape, logits)
    if ref_logits.dtype != logits.dtype:
        raise TypeError(f"ref_logits must have the logits' dtype {logits.dtype}; got {ref_logits.dtype}")
