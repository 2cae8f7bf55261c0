r"""The token ops from hidden states and the LM head: no ``[N, V]`` tensor is ever allocated.

For a model with hidden states ``h`` (``[..., H]``), LM head ``W`` (``[V, H]``) and bias
``c``, the logits the ops of :mod:`prefopt_kernels.ops` read are

    z = logit_scale * (h W^T + c),   then   z <- softcap * tanh(z / softcap)   (when set),

and the ops divide by the temperature ``T`` as always: exactly the transform TRL's fused
LM head applies, so results match it. Outputs and semantics are those of the logits ops.

How a call runs (the same for every op and divergence):

* **Compact rows.** Tokens whose label is ``ignore_index`` (and, for
  :func:`linear_token_divergence`, whose ``div_weight`` is 0) are dropped before any
  matmul: prompt and padding tokens cost nothing.
* **Tiles.** The kept rows go in token chunks; each chunk's logits are produced one
  vocabulary chunk at a time by ``torch.mm`` into one reused fp32 buffer (a half-precision
  GEMM writes fp32 directly on CUDA; on a CPU its half result is widened) and the bias,
  scale and softcap act on fp32 values; the tile is then folded into mergeable per-row
  states by the backend's ``fold`` kernel (:mod:`prefopt_kernels.backends.row_state`).
  The tile shape comes from ``memory_budget``. Divergences with a second sweep (js, tv,
  hellinger, chi2, alpha) project every tile once more, after the normalisers are known.
* **Backward.** Each tile is projected again and turned into ``dL/dz`` in place by the
  backend's ``slice_backward`` (from the saved per-row statistics alone), then into the
  gradient of ``h W^T + c``; ``d h = dz W`` and ``d W = dz^T h`` accumulate in fp32 and are
  cast once at the end. Gradients reach the policy's ``hidden``, ``head_weight`` and
  ``head_bias`` only.

Head weights that are FSDP2 ``DTensor``\ s are gathered with ``full_tensor()`` before the
call (its backward reduces the gradient); DeepSpeed ZeRO-3 partitioned weights are gathered
for the checks and the forward, and again for the backward. Neither library is imported unless such a
weight is passed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence

import torch

from . import distributed, ops
from .backends import OpSpec, RowStats, row_state, rows_read, saved_names
from .divergences import Divergence, real_number, resolve

EXTRAS = ("mean_logits", "is_top1", "log_sum_sq_probs")
DEFAULT_MEMORY_BUDGET = 64 * 2**20  # bytes of tiles and per-tile temporaries
_MAX_TOKEN_CHUNK = 4096
# A vocabulary chunk narrower than this makes the GEMMs inefficient: the planner shrinks
# the token chunk first.
_MIN_VOCAB_CHUNK = 256
_FP32 = torch.float32
_FP32_MAX = float(torch.finfo(_FP32).max)
_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
# CUDA writes a bf16/fp16 GEMM's result in fp32 (``mm(..., out_dtype=)``) from torch 2.8; ``addmm``
# takes an fp32 accumulator beside half matrices from 2.10 (before, it wants the matrices' dtype).
_GEMM_OUT_DTYPE = _TORCH_VERSION >= (2, 8)
_ADDMM_OUT_DTYPE = _TORCH_VERSION >= (2, 10)


# --------------------------------------------------------------------------- heads


@dataclass
class _Head:
    """One model's LM head as a call sees it: weight, bias and the logit transform."""

    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]  # [V]
    scale: float
    softcap: Optional[float]
    gemm_dtype: torch.dtype  # dtype of the GEMM's inputs
    # The GEMM writes its result in gemm_dtype (half on a CPU), widened to the fp32 tile after.
    widened: bool

    def project(self, hidden: torch.Tensor, v0: int, v1: int, out: torch.Tensor,
                gemm_out: Optional[torch.Tensor]) -> torch.Tensor:
        """``out = transform(hidden @ W[v0:v1]^T + c[v0:v1])`` in fp32: ``hidden`` ``[n, H]`` in ``gemm_dtype``.

        ``out`` is an fp32 ``[n, v1 - v0]`` tile; ``gemm_out`` a tile of the same shape in
        ``gemm_dtype`` when the head is ``widened``. Bias, scale and softcap act on fp32
        values whatever the GEMM's dtype.
        """
        weight = self.weight[v0:v1].to(self.gemm_dtype)
        if self.gemm_dtype == _FP32:
            torch.mm(hidden, weight.t(), out=out)
        elif self.widened:
            out.copy_(torch.mm(hidden, weight.t(), out=gemm_out))
        else:
            # Half-precision inputs, fp32 result: no rounding of the logits to bf16/fp16.
            torch.mm(hidden, weight.t(), out_dtype=_FP32, out=out)
        if self.bias is not None:
            out.add_(self.bias[v0:v1].to(_FP32))
        if self.scale != 1.0:
            out.mul_(self.scale)
        if self.softcap is not None:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def pre_transform_grad(self, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``dL/d(h W^T + c)`` in place from ``grad = dL/dz``: ``grad * scale * (1 - (z / softcap)^2)``."""
        if self.softcap is not None:
            tanh = z / self.softcap
            grad.mul_(tanh.mul_(tanh).neg_().add_(1.0))
        if self.scale != 1.0:
            grad.mul_(self.scale)
        return grad

    def gemm_operand(self, grad: torch.Tensor) -> torch.Tensor:
        """The fp32 ``grad`` tile as the backward GEMMs take it: rounded once to the GEMM dtype,
        on every device (so CPU and CUDA, and TRL's head, round the same gradient alike)."""
        return grad if self.gemm_dtype == _FP32 else grad.to(self.gemm_dtype)


def _widened(gemm_dtype: torch.dtype, device: torch.device) -> bool:
    """Half-precision GEMMs whose result the device cannot write in fp32 (a CPU; CUDA before torch 2.8)."""
    return gemm_dtype != _FP32 and not (device.type == "cuda" and _GEMM_OUT_DTYPE)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in fp32 (``acc`` fp32), without rounding the product to ``a``'s dtype."""
    if a.dtype == _FP32 and b.dtype == _FP32:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and _GEMM_OUT_DTYPE and a.dtype == b.dtype:
        if _ADDMM_OUT_DTYPE:
            torch.addmm(acc, a, b, out_dtype=_FP32, out=acc)
        else:
            acc.add_(torch.mm(a, b, out_dtype=_FP32))
    else:
        acc.addmm_(a.float(), b.float())


# --------------------------------------------------------------------------- tiles


def plan_tiles(rows: int, vocab: int, bytes_per_entry: int, bytes_per_column: int, budget: int):
    """``(token_chunk, vocab_chunk)`` whose tiles and temporaries fit ``budget`` bytes.

    A tile of ``t x v`` costs ``t * v * bytes_per_entry`` (every ``[t, v]`` buffer and
    temporary the call keeps at once) plus ``v * bytes_per_column`` (the head weight's
    chunk converted to the GEMM dtype). Token chunks hold at most 4096 rows; the token chunk
    shrinks before the vocabulary chunk drops below 256 entries. Both are at least 1.
    """
    token_chunk = max(1, min(rows, _MAX_TOKEN_CHUNK))
    while True:
        vocab_chunk = budget // (token_chunk * bytes_per_entry + bytes_per_column)
        if vocab_chunk >= min(vocab, _MIN_VOCAB_CHUNK) or token_chunk == 1:
            return token_chunk, max(1, min(vocab, vocab_chunk))
        token_chunk = max(1, token_chunk // 2)


class _Tiles:
    """Reused tile buffers of one pass: contiguous ``[n, v]`` views of flat storage.

    ``count`` fp32 tiles, and one tile per GEMM dtype of the ``heads`` whose GEMM result is
    widened to fp32 after it is written.
    """

    def __init__(self, count: int, heads: Sequence[_Head], token_chunk: int, vocab_chunk: int, device):
        size = token_chunk * vocab_chunk
        self._flat = [torch.empty(size, dtype=_FP32, device=device) for _ in range(count)]
        self._gemm = {h.gemm_dtype: torch.empty(size, dtype=h.gemm_dtype, device=device) for h in heads if h.widened}

    def get(self, i: int, n: int, v: int) -> torch.Tensor:
        return self._flat[i][: n * v].view(n, v)

    def project(self, head: _Head, hidden: torch.Tensor, v0: int, v1: int, i: int) -> torch.Tensor:
        """``head``'s fp32 logits of ``hidden`` ``[n, H]`` over ``[v0, v1)``, in fp32 tile ``i``."""
        n, v = hidden.shape[0], v1 - v0
        gemm_out = self._gemm[head.gemm_dtype][: n * v].view(n, v) if head.widened else None
        return head.project(hidden, v0, v1, self.get(i, n, v), gemm_out)


def _rows3(tile: torch.Tensor) -> torch.Tensor:
    """The backend interface's ``[B, T, Vs]`` view of a ``[n, Vs]`` tile."""
    return tile.unsqueeze(0)


# --------------------------------------------------------------------------- inputs


@dataclass
class _Call:
    """Everything one pass over the tiles needs; each registered op rebuilds it from its arguments."""

    spec: OpSpec
    policy: _Head
    ref: Optional[_Head]
    index: torch.Tensor  # [n] int64: the kept tokens, in flat order
    labels: Optional[torch.Tensor]  # [n] int64 of the kept tokens
    weight: Optional[torch.Tensor]  # [n] fp32 of the kept tokens
    vocab: int
    budget: int
    extras: tuple
    backend: object
    shard: distributed.Shard  # the vocabulary shard of this rank (the whole vocabulary unsharded)


def _check_hidden(x, argument: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{argument} must be float32, bfloat16 or float16; got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{argument} must have shape [..., H] with H >= 1; got {tuple(x.shape)}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{argument} must be on a CPU or CUDA device; got {x.device}")


def _check_head(hidden: torch.Tensor, weight, bias, name: str, hidden_name: str, vocab: Optional[int],
                sharded: bool):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}_weight must be a torch.Tensor; got {type(weight).__name__}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
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


def _check_scale(value, argument: str) -> float:
    # Comparisons, not math.isfinite: dynamo traces them without a graph break under dynamic shapes.
    value = real_number(value, argument)
    if not (-_FP32_MAX <= value <= _FP32_MAX):
        raise ValueError(f"{argument} must be a finite number within the fp32 range; got {value!r}")
    return value


def _check_softcap(value, argument: str) -> Optional[float]:
    if value is None:
        return None
    value = real_number(value, argument)
    # The tiles divide and multiply by it in fp32: it must be a normal fp32 number.
    if not (ops._FP32_TINY <= value <= _FP32_MAX):
        raise ValueError(f"{argument} must be None or a positive number in [{ops._FP32_TINY:.4g}, {_FP32_MAX:.4g}] "
                         f"(normal fp32); got {value!r}")
    return value


def _check_extras(extras) -> tuple:
    if isinstance(extras, str) or not isinstance(extras, (tuple, list)):
        raise TypeError(f"extras must be a tuple of names among {', '.join(EXTRAS)}; got {extras!r}")
    for name in extras:
        if name not in EXTRAS:
            raise ValueError(f"extras must name only {', '.join(EXTRAS)}; got {name!r}")
    return tuple(name for name in EXTRAS if name in extras)


def _check_budget(memory_budget) -> int:
    if memory_budget is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive int of bytes or None; got {memory_budget!r}")
    return memory_budget


def _unsharded(weight, bias, differentiable: bool = True):
    """FSDP2 ``DTensor`` head parameters as plain tensors; the gather's backward reduces the gradient.

    A reference head (``differentiable=False``) is gathered outside autograd: it receives no
    gradient, and a gather in the graph would expect one in the backward.
    """
    def full(t):
        if t is None or not (hasattr(t, "full_tensor") and hasattr(t, "placements")):
            return t
        return (t if differentiable else t.detach()).full_tensor()
    return full(weight), full(bias)


def _gathered(*params):
    """DeepSpeed ZeRO-3 partitioned parameters gathered for the block; a null context otherwise."""
    partitioned = _partitioned(*params)
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed  # only reachable with a ZeRO-3 partitioned parameter

    return deepspeed.zero.GatheredParameters(partitioned)


def _partitioned(*params) -> list:
    """The DeepSpeed ZeRO-3 parameters among ``params`` whose data is not gathered now."""
    partitioned = {id(p): p for p in params
                   if p is not None and getattr(p, "ds_status", None) is not None
                   and getattr(p.ds_status, "name", "") != "AVAILABLE"}
    return list(partitioned.values())


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _gather_rows(x: torch.Tensor, index: torch.Tensor, dtype) -> torch.Tensor:
    """Rows ``index`` (flat token order) of ``x`` ``[..., H]`` as ``[n, H]`` in ``dtype``; no full copy."""
    if x.dim() == 2:
        rows = x.index_select(0, index)
    elif x.dim() == 1:
        rows = x.reshape(1, -1).expand(index.numel(), -1)
    else:
        rows = x[torch.unravel_index(index, x.shape[:-1])]
    return rows.to(dtype).contiguous()


def _check_inputs(hidden, head_weight, head_bias, labels, ref_hidden, ref_head_weight, ref_head_bias, *,
                  spec_kwargs: dict, div_weight, ignore_index, temperature, logit_scale, ref_logit_scale,
                  softcap, ref_softcap, extras, memory_budget, process_group) -> dict:
    """Check every input once (no data-dependent branch: the registered op checks the labels' range)."""
    sharded = process_group is not None
    _check_hidden(hidden, "hidden")
    _check_head(hidden, head_weight, head_bias, "head", "hidden", None, sharded)
    vocab = head_weight.shape[0]
    if ref_hidden is not None or spec_kwargs.get("divergence") or spec_kwargs.get("want_ref_logp"):
        _check_hidden(ref_hidden, "ref_hidden")  # None too, where the op needs the reference
        if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"ref_hidden must have the leading shape of hidden {tuple(hidden.shape[:-1])}; "
                f"got {tuple(ref_hidden.shape[:-1])}"
            )
        if ref_hidden.device != hidden.device:
            raise ValueError(f"ref_hidden must be on the device of hidden ({hidden.device}); got {ref_hidden.device}")
        _check_head(ref_hidden, ref_head_weight, ref_head_bias, "ref_head", "ref_hidden", vocab, sharded)
    spec = OpSpec(temperature=ops._check_temperature(temperature),
                  ignore_index=ignore_index if labels is not None else -100, **spec_kwargs)
    return dict(
        labels=(ops._check_labels(labels, hidden, ignore_index, owner_name="hidden")
                if labels is not None or spec.want_logp else None),
        div_weight=ops._check_weight(div_weight, hidden, "div_weight", owner_name="hidden"),
        spec=spec,
        logit_scale=_check_scale(logit_scale, "logit_scale"),
        ref_logit_scale=_check_scale(ref_logit_scale, "ref_logit_scale"),
        softcap=_check_softcap(softcap, "softcap"),
        ref_softcap=_check_softcap(ref_softcap, "ref_softcap"),
        extras=[name in _check_extras(extras) for name in EXTRAS],
        memory_budget=_check_budget(memory_budget),
        group=distributed.group_name(process_group, hidden.device),
    )


def _make_call(arguments: dict, spec: OpSpec, index: torch.Tensor, shard: distributed.Shard, extras=()) -> _Call:
    """The ``_Call`` of the kept tokens ``index`` from a registered op's named ``arguments``."""
    hidden, ref_hidden, labels, weight = (arguments[k] for k in ("hidden", "ref_hidden", "labels", "div_weight"))
    device = hidden.device
    policy_dtype, ref_dtype = arguments["compute_dtype"], arguments["ref_compute_dtype"]
    policy = _Head(arguments["head_weight"], arguments["head_bias"], arguments["logit_scale"], arguments["softcap"],
                   policy_dtype, _widened(policy_dtype, device))
    ref = None
    if ref_hidden is not None:
        ref = _Head(arguments["ref_head_weight"], arguments["ref_head_bias"], arguments["ref_logit_scale"],
                    arguments["ref_softcap"], ref_dtype, _widened(ref_dtype, device))
    return _Call(spec=spec, policy=policy, ref=ref, index=index,
                 labels=None if labels is None else labels[index], weight=None if weight is None else weight[index],
                 vocab=arguments["head_weight"].shape[0], budget=arguments["memory_budget"], extras=tuple(extras),
                 backend=ops._pick_backend(device, arguments["backend"]), shard=shard)


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op(f"{ops.LIBRARY}::linear_forward", mutates_args=())
def _linear_forward(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: Optional[torch.Tensor],
                    ref_hidden: Optional[torch.Tensor], ref_head_weight: Optional[torch.Tensor],
                    ref_head_bias: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                    div_weight: Optional[torch.Tensor], temperature: float, ignore_index: int, divergence: int,
                    beta: float, alpha: float, want_logp: bool, want_ref_logp: bool, want_entropy: bool,
                    logit_scale: float, ref_logit_scale: float, softcap: Optional[float],
                    ref_softcap: Optional[float], compute_dtype: torch.dtype, ref_compute_dtype: torch.dtype,
                    extras: List[bool], memory_budget: int, keep_zero_weight: bool, hidden_needs_grad: bool,
                    backend: str, group: str) -> List[torch.Tensor]:
    """Fold projected tiles of the kept tokens into row states.

    Returns the ``[...]`` outputs the spec asks for (``_OUTPUTS`` order), the extras
    (``extras`` flags ``EXTRAS``), the saved statistics (flat ``[N]`` each: every output
    has a shape known without the data) and, with a ``group``, the shard's ``[v0, V]``
    int64; dropped tokens hold 0. Checks the labels' range (every rank's, sharded) as it runs.
    ``hidden_needs_grad`` (the caller's ``hidden.requires_grad`` under grad mode) only enters the
    ranks' call check: the backward all-reduces the hidden gradient exactly where it is set.
    """
    arguments = dict(locals())
    spec = ops.spec_from(arguments)
    has_ref = ref_hidden is not None
    extras = _extra_names(extras)
    n_tokens, vocab, device = ops.token_count(hidden), head_weight.shape[0], hidden.device
    shard = ops.checked_shard(group, vocab, n_tokens, spec, has_ref, device, labels, div_weight,
                              _call_options(arguments))
    index = _kept_tokens(labels, div_weight, spec, keep_zero_weight, n_tokens, device)
    call = _make_call(arguments, spec, index, shard, extras)
    # Autocast stays on inside a registered op: the tiles choose their dtypes themselves.
    with torch.autocast(device.type, enabled=False), ops.on_device(device):
        stats, extra_values = _forward_pass(hidden, ref_hidden, call)
    values = [getattr(stats, k) for k in ops.wanted_outputs(spec)] + [extra_values[k] for k in extras]
    outputs = [_scatter_tokens(value, index, hidden.shape[:-1]) for value in values]
    saved = [_scatter_tokens(value, index, (n_tokens,)) for value in stats.saved(spec, has_ref)]
    tail = [distributed.shard_to_tensor(shard)] if group else []
    return outputs + saved + tail


def _call_options(arguments: dict) -> list:
    """The linear op's own parameters, for the ranks' call check: ``(name, int64)`` pairs.

    They include what the backward's collective depends on (whether the hidden states need a
    gradient, their width), so ranks that disagree fail in the forward's check instead of
    waiting in the backward's all-reduce.
    """
    def bits(x):
        return -1 if x is None else distributed.float_bits(x)

    def width(x):
        return -1 if x is None else x.shape[-1]
    extras = sum(1 << i for i, wanted in enumerate(arguments["extras"]) if wanted)
    return [("extras", extras), ("hidden_needs_grad", int(arguments["hidden_needs_grad"])),
            ("hidden_size", width(arguments["hidden"])), ("ref_hidden_size", width(arguments["ref_hidden"])),
            ("logit_scale", bits(arguments["logit_scale"])),
            ("ref_logit_scale", bits(arguments["ref_logit_scale"])), ("softcap", bits(arguments["softcap"])),
            ("ref_softcap", bits(arguments["ref_softcap"])), ("head_bias", int(arguments["head_bias"] is not None)),
            ("ref_head_bias", int(arguments["ref_head_bias"] is not None))]


def _kept_tokens(labels, div_weight, spec: OpSpec, keep_zero_weight: bool, n_tokens: int, device) -> torch.Tensor:
    """Flat int64 indices of the tokens a call computes (see the module's *compact rows*)."""
    keep, _ = rows_read(labels, None if keep_zero_weight else div_weight, spec, n_tokens, device)
    return keep.nonzero().reshape(-1)


def _scatter_tokens(value: torch.Tensor, index: torch.Tensor, shape) -> torch.Tensor:
    """Zeros of ``shape`` holding the kept tokens' ``value`` at flat ``index``: a tensor of its own
    (an op's output that is a view could not be modified in place by the caller)."""
    out = torch.zeros(shape, dtype=value.dtype, device=value.device)
    out.view(-1).index_copy_(0, index, value)
    return out


@_linear_forward.register_fake
def _linear_forward_fake(*values):
    named = ops.named_arguments("linear_forward", values)
    spec, hidden = ops.spec_from(named), named["hidden"]
    lead = hidden.shape[:-1]
    outputs = [hidden.new_empty(lead, dtype=_FP32) for _ in ops.wanted_outputs(spec)]
    outputs += [hidden.new_empty(lead, dtype=torch.bool if k == "is_top1" else _FP32)
                for k in _extra_names(named["extras"])]
    n_tokens = ops.token_count(hidden)
    saved = [hidden.new_empty(n_tokens, dtype=_FP32) for _ in saved_names(spec, named["ref_hidden"] is not None)]
    tail = [torch.empty(2, dtype=torch.int64)] if named["group"] else []
    return outputs + saved + tail


@torch.library.custom_op(f"{ops.LIBRARY}::linear_backward", mutates_args=())
def _linear_backward(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: Optional[torch.Tensor],
                     ref_hidden: Optional[torch.Tensor], ref_head_weight: Optional[torch.Tensor],
                     ref_head_bias: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                     div_weight: Optional[torch.Tensor], saved: List[torch.Tensor],
                     grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                     grad_div: Optional[torch.Tensor], temperature: float, ignore_index: int, divergence: int,
                     beta: float, alpha: float, want_logp: bool, want_ref_logp: bool, want_entropy: bool,
                     logit_scale: float, ref_logit_scale: float, softcap: Optional[float],
                     ref_softcap: Optional[float], compute_dtype: torch.dtype, ref_compute_dtype: torch.dtype,
                     memory_budget: int, keep_zero_weight: bool, needs_hidden: bool, needs_weight: bool,
                     needs_bias: bool, backend: str, group: str,
                     shard_offsets: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """Re-project every tile of the kept tokens and accumulate the gradients asked for.

    ``saved`` are the forward's ``[N]`` statistics; ``grad_*`` fp32 ``[...]`` or ``None``
    (zero). Returns the gradients of ``hidden``,
    ``head_weight`` and ``head_bias``, each empty where not asked for.
    """
    arguments = dict(locals())
    spec = ops.spec_from(arguments)
    shard = distributed.shard_from_tensor(group, shard_offsets, head_weight.shape[0])
    index = _kept_tokens(labels, div_weight, spec, keep_zero_weight, ops.token_count(hidden), hidden.device)
    call = _make_call(arguments, spec, index, shard)
    # reshape: Inductor may hand the upstream gradients over in their outputs' [...] shape.
    upstream = {k: g.reshape(-1).index_select(0, index) for k, g in
                (("logp", grad_logp), ("entropy", grad_entropy), ("div", grad_div)) if g is not None}
    stats = RowStats.from_saved([x.index_select(0, index) for x in saved], spec, ref_hidden is not None)
    with torch.autocast(hidden.device.type, enabled=False), ops.on_device(hidden.device):
        grads = _backward_pass(hidden, ref_hidden, call, stats, upstream, (needs_hidden, needs_weight, needs_bias))
    return [hidden.new_empty(0) if g is None else g for g in grads]


@_linear_backward.register_fake
def _linear_backward_fake(*values):
    named = ops.named_arguments("linear_backward", values)
    return [named[x].new_empty(named[x].shape) if named[flag] else named["hidden"].new_empty(0)
            for x, flag in _GRADIENT_INPUTS.items()]


def _extra_names(flags) -> tuple:
    """The names of :data:`EXTRAS` that ``flags`` (one bool per name) ask for."""
    return tuple(name for name, wanted in zip(EXTRAS, flags) if wanted)


# The inputs that can receive a gradient (first among the op's inputs), each with the backward
# op's flag that asks for it; and the tensors the backward reads.
_GRADIENT_INPUTS = {"hidden": "needs_hidden", "head_weight": "needs_weight", "head_bias": "needs_bias"}
_SAVED_INPUTS = tuple(_GRADIENT_INPUTS) + ("ref_hidden", "ref_head_weight", "ref_head_bias", "labels", "div_weight")


def _linear_setup_context(ctx, inputs, output):
    arguments = ops.named_arguments("linear_forward", inputs)
    spec = ops.spec_from(arguments)
    wanted = ops.wanted_outputs(spec)
    head = len(wanted) + sum(arguments["extras"])
    n_saved = len(saved_names(spec, arguments["ref_hidden"] is not None))
    # The scalars the backward op shares with the forward, by name.
    ctx.options = {k: v for k, v in arguments.items() if k not in _SAVED_INPUTS}
    ctx.wanted, ctx.n_inputs = wanted, len(inputs)
    ctx.save_for_backward(*(arguments[k] for k in _SAVED_INPUTS), *output[head:head + n_saved],
                          output[-1] if arguments["group"] else None)
    ops.mark_outputs(ctx, wanted, output)


def _linear_autograd(ctx, grads):
    ops._refuse_double_backward()
    # Read once: non-reentrant checkpointing unpacks each saved tensor a single time.
    saved_tensors = ctx.saved_tensors
    tensors = dict(zip(_SAVED_INPUTS, saved_tensors))
    saved, shard_offsets = saved_tensors[len(_SAVED_INPUTS):-1], saved_tensors[-1]
    upstream = ops.upstream_gradients(ctx.wanted, grads)
    needs = ctx.needs_input_grad[:len(_GRADIENT_INPUTS)]
    no_grads = (None,) * (ctx.n_inputs - len(_GRADIENT_INPUTS))
    if not upstream or not any(needs):
        return (None,) * len(_GRADIENT_INPUTS) + no_grads
    arguments = dict(ctx.options, **tensors, saved=list(saved), shard_offsets=shard_offsets,
                     **{f"grad_{k}": upstream.get(k) for k in ("logp", "entropy", "div")},
                     **dict(zip(_GRADIENT_INPUTS.values(), needs)))
    with _gathered(tensors["head_weight"], tensors["head_bias"], tensors["ref_head_weight"], tensors["ref_head_bias"]):
        grads = torch.ops.prefopt_kernels.linear_backward(
            *(arguments[name] for name in ops.argument_names("linear_backward")))
    return tuple(g if need else None for g, need in zip(grads, needs)) + no_grads


_linear_forward.register_autograd(_linear_autograd, setup_context=_linear_setup_context)


def _heads(call: _Call) -> list:
    return [call.policy] + ([call.ref] if call.ref is not None else [])


def _fp32_tile_count(call: _Call, backward: bool) -> int:
    """One fp32 logits tile per head, and in the backward a gradient tile of its own when the
    softcap's derivative reads the logits after the kernel has written the gradient."""
    return len(_heads(call)) + (backward and call.policy.softcap is not None)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _tile_costs(call: _Call, backward: bool):
    """``(bytes per tile entry, bytes per vocabulary column)`` of one pass's buffers and temporaries."""
    heads = _heads(call)
    entry = 4 * _fp32_tile_count(call, backward)
    entry += sum(_size(dtype) for dtype in {h.gemm_dtype for h in heads if h.widened})
    policy = call.policy
    if backward:
        if policy.softcap is not None:
            entry += 4  # the tanh temporary
        if policy.gemm_dtype != _FP32:
            entry += _size(policy.gemm_dtype)  # the gradient rounded for a half-precision GEMM
        if policy.widened:
            entry += 4  # that gradient widened again for the fp32 GEMM
    elif "log_sum_sq_probs" in call.extras:
        entry += 4  # the fp32 copy of the tile that _fold_square_sum exponentiates
    column = 0
    for head in heads:
        if head.weight.dtype != head.gemm_dtype:
            column += head.weight.shape[1] * _size(head.gemm_dtype)
    if backward and policy.widened:
        column += policy.weight.shape[1] * 4  # the head's chunk widened for the fp32 accumulation
    return entry, column


def _chunks(call: _Call, backward: bool):
    n = call.index.numel()
    entry, column = _tile_costs(call, backward)
    token_chunk, vocab_chunk = plan_tiles(n, call.vocab, entry, column, call.budget)
    token_ranges = [(t0, min(t0 + token_chunk, n)) for t0 in range(0, n, token_chunk)]
    vocab_ranges = [(v0, min(v0 + vocab_chunk, call.vocab)) for v0 in range(0, call.vocab, vocab_chunk)]
    return token_chunk, vocab_chunk, token_ranges, vocab_ranges


def _chunk_of(x: Optional[torch.Tensor], t0: int, t1: int) -> Optional[torch.Tensor]:
    return None if x is None else x[t0:t1]


def _forward_pass(hidden, ref_hidden, call: _Call):
    """Fold every tile of every kept row; return their :class:`RowStats` and the extras asked for.

    The per-chunk states are concatenated and finished once (merged over the shards' group
    first, when sharded), so the collectives do not depend on the tiling.
    """
    spec, backend, device, shard = call.spec, call.backend, hidden.device, call.shard
    token_chunk, vocab_chunk, token_ranges, vocab_ranges = _chunks(call, backward=False)
    has_ref = call.ref is not None
    tiles = _Tiles(_fp32_tile_count(call, False), _heads(call), token_chunk, vocab_chunk, device)
    inv_temperature = 1.0 / spec.temperature
    want_sum, want_squares = "mean_logits" in call.extras, "log_sum_sq_probs" in call.extras
    n_rows = call.index.numel()
    state = row_state.empty(n_rows, spec, has_ref, device)
    logit_sum = torch.zeros(n_rows, dtype=_FP32, device=device)
    square_sum = torch.zeros(n_rows, dtype=_FP32, device=device)

    def chunk_rows(t0, t1):
        index = call.index[t0:t1]
        h = _gather_rows(hidden, index, call.policy.gemm_dtype)
        h_ref = _gather_rows(ref_hidden, index, call.ref.gemm_dtype) if has_ref else None
        return h, h_ref

    def project(h, h_ref, v0, v1):
        a = tiles.project(call.policy, h, v0, v1, 0)
        b = tiles.project(call.ref, h_ref, v0, v1, 1) if has_ref else None
        return a, b

    for t0, t1 in token_ranges:
        labels, weight = _chunk_of(call.labels, t0, t1), _chunk_of(call.weight, t0, t1)
        h, h_ref = chunk_rows(t0, t1)
        chunk = row_state.empty(t1 - t0, spec, has_ref, device)
        for v0, v1 in vocab_ranges:
            a, b = project(h, h_ref, v0, v1)
            previous_max = chunk.max
            chunk = backend.fold(chunk, _rows3(a), labels, None if b is None else _rows3(b), weight, spec,
                                 shard.v0 + v0)
            if want_sum:
                logit_sum[t0:t1] += a.sum(-1, dtype=_FP32)
            if want_squares:
                square_sum[t0:t1] = _fold_square_sum(square_sum[t0:t1], previous_max, chunk.max, a,
                                                     inv_temperature)
        for name, value in chunk.tensors().items():
            getattr(state, name)[t0:t1] = value
    if shard.group is not None:
        # The extras travel with the state only when asked for.
        extra = ((logit_sum,) if want_sum else ()) + ((state.max, square_sum) if want_squares else ())
        state, gathered = distributed.merge_across(state, spec, shard.group, extra=extra)
        if want_sum:
            logit_sum = gathered.pop(0).sum(0)
        if want_squares:
            local_maxima, square_sums = gathered
            square_sum = (square_sums * _rescale(local_maxima, state.max, 2.0 * inv_temperature)).sum(0)
    stats = row_state.finalize(state, call.labels, call.weight, spec)
    if spec.divergence and Divergence(spec.divergence).second_sweep:
        value_sum = torch.zeros(n_rows, dtype=_FP32, device=device)
        centred_sum = torch.zeros(n_rows, dtype=_FP32, device=device)
        for t0, t1 in token_ranges:
            labels, weight = _chunk_of(call.labels, t0, t1), _chunk_of(call.weight, t0, t1)
            h, h_ref = chunk_rows(t0, t1)
            chunk_stats = _stats_rows(stats, t0, t1)
            for v0, v1 in vocab_ranges:
                a, b = project(h, h_ref, v0, v1)
                value, centred = backend.sweep(chunk_stats, _rows3(a), _rows3(b), labels, weight, spec,
                                               shard.v0 + v0)
                value_sum[t0:t1] += value
                centred_sum[t0:t1] += centred
        stats = distributed.finish_second_pass(stats, value_sum, centred_sum, call.labels, call.weight, spec,
                                               shard.group)
    extras = {}
    if want_sum:
        extras["mean_logits"] = logit_sum * (inv_temperature / shard.vocab)
    if "is_top1" in call.extras:
        extras["is_top1"] = state.argmax == call.labels
    if want_squares:
        # log sum p^2 = log sum exp(2 (a - m) / T) - 2 log Z, both relative to the final max m.
        extras["log_sum_sq_probs"] = torch.log(square_sum) - 2.0 * stats.log_norm
    return stats, extras


def _rescale(old_max: torch.Tensor, new_max: torch.Tensor, factor: float) -> torch.Tensor:
    """``exp(factor (old_max - new_max))``, 0 where ``old_max`` is ``-inf`` (nothing folded there yet)."""
    live = (old_max > -float("inf")) & (new_max > -float("inf"))
    return torch.where(live, torch.exp((old_max - new_max) * factor), 0.0)


def _fold_square_sum(acc, previous_max, new_max, tile, inv_temperature):
    """``sum exp(2 (a - m) / T)`` carried from the running max ``previous_max`` to ``new_max``, plus this tile."""
    shift = torch.where(new_max > -float("inf"), new_max, 0.0)
    # One fp32 copy of the tile, exponentiated in place: the only temporary _tile_costs counts.
    powers = tile.to(_FP32, copy=True).sub_(shift[:, None]).mul_(2.0 * inv_temperature).exp_()
    tile_sum = powers.sum(-1)
    return acc * _rescale(previous_max, new_max, 2.0 * inv_temperature) + tile_sum


def _stats_rows(stats: RowStats, t0: int, t1: int) -> RowStats:
    """The statistics of rows ``[t0, t1)``."""
    return RowStats(**{f.name: _chunk_of(getattr(stats, f.name), t0, t1) for f in fields(RowStats)})


def _backward_pass(hidden, ref_hidden, call: _Call, stats: RowStats, upstream: dict, needs):
    """Re-project every tile, turn it into ``dL/d(h W^T + c)`` and accumulate the three gradients."""
    spec, backend, device, shard = call.spec, call.backend, hidden.device, call.shard
    policy = call.policy
    needs_hidden, needs_weight, needs_bias = needs
    token_chunk, vocab_chunk, token_ranges, vocab_ranges = _chunks(call, backward=True)
    has_ref = call.ref is not None
    separate_grad = _fp32_tile_count(call, True) > len(_heads(call))
    tiles = _Tiles(_fp32_tile_count(call, True), _heads(call), token_chunk, vocab_chunk, device)
    weight_param = policy.weight
    # Sharded, the hidden states' gradient is a sum over the ranks: reduced once, in fp32.
    hidden_grad_dtype = hidden.dtype if shard.group is None else _FP32
    grad_hidden = torch.zeros(hidden.shape, dtype=hidden_grad_dtype, device=device) if needs_hidden else None
    grad_weight = None
    if needs_weight:
        grad_weight = torch.zeros(weight_param.shape, dtype=_FP32, device=device)
    grad_bias = torch.zeros(policy.bias.shape, dtype=_FP32, device=device) if needs_bias else None
    for t0, t1 in token_ranges:
        index = call.index[t0:t1]
        labels, weight = _chunk_of(call.labels, t0, t1), _chunk_of(call.weight, t0, t1)
        chunk_stats = _stats_rows(stats, t0, t1)
        g = {k: v[t0:t1] for k, v in upstream.items()}
        h = _gather_rows(hidden, index, policy.gemm_dtype)
        h_ref = _gather_rows(ref_hidden, index, call.ref.gemm_dtype) if has_ref else None
        # A widened head's GEMMs run in fp32: its rows are widened once per chunk, not per tile.
        h_weight_grad = h.float() if policy.widened and needs_weight else h
        n = t1 - t0
        grad_h = torch.zeros((n, hidden.shape[-1]), dtype=_FP32, device=device) if needs_hidden else None
        for v0, v1 in vocab_ranges:
            width = v1 - v0
            a = tiles.project(policy, h, v0, v1, 0)
            b = tiles.project(call.ref, h_ref, v0, v1, 1) if has_ref else None
            dz = tiles.get(1 + has_ref, n, width) if separate_grad else a
            backend.slice_backward(_rows3(a), labels, None if b is None else _rows3(b), weight, spec, chunk_stats,
                                   g.get("logp"), g.get("entropy"), g.get("div"), _rows3(dz), shard.v0 + v0)
            dz = policy.pre_transform_grad(dz, a)
            dz_gemm = policy.gemm_operand(dz)
            if grad_h is not None:
                _accumulate(grad_h, dz_gemm, weight_param[v0:v1].to(policy.gemm_dtype))
            if grad_weight is not None:
                _accumulate(grad_weight[v0:v1], dz_gemm.t(), h_weight_grad)
            if grad_bias is not None:
                grad_bias[v0:v1] += dz.sum(0, dtype=_FP32)
        if grad_h is not None:
            _scatter_rows(grad_hidden, index, grad_h)
    if grad_hidden is not None and shard.group is not None:
        distributed.all_reduce_sum(grad_hidden, process_group=shard.group)
        grad_hidden = grad_hidden.to(hidden.dtype)
    return (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight_param.dtype),
        None if grad_bias is None else grad_bias.to(policy.bias.dtype),
    )


def _scatter_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``out[token index] = rows`` for ``out`` ``[..., H]`` (contiguous) and ``rows`` ``[n, H]``."""
    out.view(-1, out.shape[-1]).index_copy_(0, index, rows.to(out.dtype))


# --------------------------------------------------------------------------- public ops


def _run(hidden, head_weight, head_bias, labels, ref_hidden, ref_head_weight, ref_head_bias, **options):
    """Gather sharded heads, check everything, run the registered op: ``(outputs, extras)`` by name."""
    head_weight, head_bias = _unsharded(head_weight, head_bias)
    if ref_hidden is not None:
        ref_head_weight, ref_head_bias = _unsharded(ref_head_weight, ref_head_bias, differentiable=False)
    if torch.compiler.is_compiling() and _partitioned(head_weight, head_bias, ref_head_weight, ref_head_bias):
        # A compiled backward is traced without the parameters' ZeRO-3 state, so it could not gather them.
        raise ValueError("ZeRO-3 partitioned head weights are gathered by eager calls only: call the op "
                         "outside torch.compile, or gather the head first")
    with _gathered(head_weight, head_bias, ref_head_weight, ref_head_bias):
        return _run_gathered(hidden, head_weight, head_bias, labels, ref_hidden, ref_head_weight,
                             ref_head_bias, **options)


def _run_gathered(hidden, head_weight, head_bias, labels, ref_hidden, ref_head_weight, ref_head_bias, *,
                  spec_kwargs, div_weight=None, ignore_index=-100, temperature=1.0, logit_scale=1.0,
                  ref_logit_scale=1.0, softcap=None, ref_softcap=None, extras=(), memory_budget=None,
                  keep_zero_weight=True, process_group=None):
    checked = _check_inputs(hidden, head_weight, head_bias, labels, ref_hidden, ref_head_weight, ref_head_bias,
                            spec_kwargs=spec_kwargs, div_weight=div_weight, ignore_index=ignore_index,
                            temperature=temperature, logit_scale=logit_scale, ref_logit_scale=ref_logit_scale,
                            softcap=softcap, ref_softcap=ref_softcap, extras=extras, memory_budget=memory_budget,
                            process_group=process_group)
    spec, extras = checked["spec"], _extra_names(checked["extras"])
    compute = _compute_dtype(hidden)
    ref_compute = _compute_dtype(ref_hidden) if ref_hidden is not None else compute
    outputs = torch.ops.prefopt_kernels.linear_forward(
        hidden, head_weight, head_bias, ref_hidden, ref_head_weight, ref_head_bias, checked["labels"],
        checked["div_weight"], *ops.spec_arguments(spec), checked["logit_scale"], checked["ref_logit_scale"],
        checked["softcap"], checked["ref_softcap"], compute, ref_compute, checked["extras"], checked["memory_budget"],
        keep_zero_weight, torch.is_grad_enabled() and hidden.requires_grad, ops._backend_selection(),
        checked["group"])
    wanted = ops.wanted_outputs(spec)
    result = dict(zip(wanted, outputs))
    extra_values = dict(zip(extras, outputs[len(wanted):len(wanted) + len(extras)]))
    return result, extra_values


def linear_token_logprobs(hidden, head_weight, labels, *, head_bias=None, ignore_index: int = -100,
                          temperature: float = 1.0, logit_scale: float = 1.0, softcap=None,
                          return_entropy: bool = False, extras=(), memory_budget: Optional[int] = None,
                          process_group=None):
    r"""Label log-probabilities (and entropies) of ``softmax(z / T)`` with ``z`` from the LM head, in tiles.

    ``z = logit_scale (h W^T + c)``, then ``softcap tanh(z / softcap)`` when ``softcap`` is
    set; ``logp = z_y / T - lse(z / T)`` and ``H = lse(z / T) - sum_i p_i z_i / T`` exactly as
    :func:`prefopt_kernels.token_logprobs` on ``z``, which is never materialised beyond one
    ``[token chunk, vocab chunk]`` tile. Gradients flow to ``hidden``, ``head_weight`` and
    ``head_bias``.

    Args:
        hidden: ``[..., H]`` fp32, bf16 or fp16 (any strides: a ``[B, T - 1, H]`` slice of the
            last hidden state is read row by row, without a copy of the whole).
        head_weight: ``[V, H]`` fp32, bf16 or fp16 on ``hidden``'s device (an FSDP2 ``DTensor``
            or a ZeRO-3 partitioned parameter is gathered for the call).
        labels: ``[...]`` integer in ``[0, V)`` or ``ignore_index``; ignored tokens are dropped
            before any matmul and get 0.
        head_bias: optional ``[V]``.
        temperature: ``T``, as in :func:`prefopt_kernels.token_logprobs`.
        logit_scale: finite multiplier of the projection (Cohere, Granite, ...); 0 gives
            the uniform distribution, as TRL does.
        softcap: ``None`` or a positive final-logit soft cap (Gemma).
        return_entropy: also return ``H(p)``.
        extras: names among ``"mean_logits"`` (``mean_i z_i / T``), ``"is_top1"`` (the label
            is the first maximum of ``z``, bool) and ``"log_sum_sq_probs"``
            (``log sum_i p_i^2``): TRL's ``FusedCausalLMOutput`` fields, not differentiable,
            0 (``False``) at ignored tokens.
        memory_budget: bytes for the tiles and their temporaries (default 64 MiB); sets the
            token and vocabulary chunk sizes.
        process_group: a ``torch.distributed`` group over which the head is sharded by
            vocabulary (tensor parallelism): each rank passes its rows ``head_weight[V_r, H]``
            (and ``head_bias[V_r]``), shards in rank order, any sizes (0 included), and the
            replicated ``hidden``; labels are global ids. Every rank gets the global outputs,
            its shard's weight and bias gradients, and the full ``hidden`` gradient (summed
            over the ranks in the backward). Bytes per kept token: ``4 R F`` in the forward's
            all-gather (``F`` as :func:`prefopt_kernels.token_logprobs` states, plus 1 for
            ``mean_logits`` and 2 for ``log_sum_sq_probs``), ``4 H`` in the backward's
            all-reduce, and the 29 int64 per rank of the call check.

    Compute dtype: the autocast dtype when autocast is on for ``hidden``'s device, else
    ``hidden.dtype``. Logit tiles are fp32: a half-precision GEMM on a CPU rounds its result to
    the compute dtype (as PyTorch's own CPU matmul does) before it is widened; the bias, scale
    and softcap then act in fp32 on every device.

    Returns:
        ``logp`` fp32 ``[...]``, or ``(logp, entropy)``; with ``extras``, a further last
        element: a dict from each name asked for to its ``[...]`` tensor.
    """
    out, extra = _run(hidden, head_weight, head_bias, labels, None, None, None,
                      spec_kwargs=dict(want_logp=True, want_entropy=ops.check_flag(return_entropy, "return_entropy")),
                      ignore_index=ignore_index, temperature=temperature, logit_scale=logit_scale,
                      softcap=softcap, extras=extras, memory_budget=memory_budget,
                      process_group=process_group)
    result = (out["logp"], out["entropy"]) if return_entropy else (out["logp"],)
    if extras:
        result = result + (extra,)
    return result if len(result) > 1 else result[0]


def linear_token_divergence(hidden, head_weight, ref_hidden, ref_head_weight, *, head_bias=None,
                            ref_head_bias=None, divergence: str = "forward_kl", beta: float = 0.5,
                            alpha: float = 0.5, div_weight=None, temperature: float = 1.0,
                            logit_scale: float = 1.0, ref_logit_scale: float = 1.0, softcap=None,
                            ref_softcap=None, memory_budget: Optional[int] = None, process_group=None):
    r"""Per-token ``D_f(p, q)`` between the policy's and the reference's heads, in tiles.

    ``p = softmax(z / T)`` and ``q = softmax(z_ref / T)`` with each side's ``z`` formed from
    its own hidden states, head, ``logit_scale`` and ``softcap``; the divergences and their
    gradient are those of :func:`prefopt_kernels.token_divergence`. Tokens where
    ``div_weight`` is 0 are dropped before any matmul and get 0.

    Args:
        hidden, head_weight, head_bias: the policy's ``[..., H]``, ``[V, H]``, ``[V]``.
        ref_hidden, ref_head_weight, ref_head_bias: the reference's ``[..., H_ref]`` (same
            leading shape; ``H_ref`` may differ), ``[V, H_ref]``, ``[V]``; no gradient.
        divergence, beta, alpha, div_weight, temperature: as in
            :func:`prefopt_kernels.token_divergence`.
        logit_scale, ref_logit_scale, softcap, ref_softcap, memory_budget: as in
            :func:`linear_token_logprobs`, per side.
        process_group: as in :func:`linear_token_logprobs`, both heads sharded alike (``F`` as
            :func:`prefopt_kernels.token_divergence` states).

    Returns:
        fp32 ``[...]`` per-token divergence.
    """
    member, beta, alpha = resolve(divergence, beta, alpha)
    out, _ = _run(hidden, head_weight, head_bias, None, ref_hidden, ref_head_weight, ref_head_bias,
                  spec_kwargs=dict(divergence=int(member), beta=beta, alpha=alpha),
                  div_weight=div_weight, temperature=temperature, logit_scale=logit_scale,
                  ref_logit_scale=ref_logit_scale, softcap=softcap, ref_softcap=ref_softcap,
                  memory_budget=memory_budget, keep_zero_weight=False, process_group=process_group)
    return out["div"]


def linear_token_terms(hidden, head_weight, labels, ref_hidden, ref_head_weight, *, head_bias=None,
                       ref_head_bias=None, divergence: str = "forward_kl", div_weight=None,
                       ignore_index: int = -100, temperature: float = 1.0, beta: float = 0.5,
                       alpha: float = 0.5, return_entropy: bool = False, logit_scale: float = 1.0,
                       ref_logit_scale: float = 1.0, softcap=None, ref_softcap=None, extras=(),
                       memory_budget: Optional[int] = None, process_group=None):
    r"""Everything a token-level preference loss needs, from one tiled pass over both heads.

    :func:`prefopt_kernels.token_terms` on ``z`` and ``z_ref`` (see
    :func:`linear_token_divergence`): ``logp``, ``ref_logp``, ``div`` (0 where
    ``div_weight`` is 0) and optionally ``entropy``, each fp32 ``[...]``, 0 at ignored
    tokens, which are dropped before any matmul. Gradients reach the policy's ``hidden``,
    ``head_weight`` and ``head_bias``; ``ref_logp`` is not differentiable.

    Args: as :func:`linear_token_logprobs` and :func:`linear_token_divergence`; ``extras``
        are the policy's.

    Returns:
        :class:`~prefopt_kernels.TokenTerms`; with ``extras``, ``(TokenTerms, dict)``.
    """
    member, beta, alpha = resolve(divergence, beta, alpha)
    out, extra = _run(hidden, head_weight, head_bias, labels, ref_hidden, ref_head_weight, ref_head_bias,
                      spec_kwargs=dict(divergence=int(member), beta=beta, alpha=alpha, want_logp=True,
                                       want_ref_logp=True, want_entropy=ops.check_flag(return_entropy, "return_entropy")),
                      div_weight=div_weight, ignore_index=ignore_index, temperature=temperature,
                      logit_scale=logit_scale, ref_logit_scale=ref_logit_scale, softcap=softcap,
                      ref_softcap=ref_softcap, extras=extras, memory_budget=memory_budget,
                      process_group=process_group)
    terms = ops.TokenTerms(out["logp"], out["ref_logp"], out["div"], out.get("entropy"))
    return (terms, extra) if extras else terms
