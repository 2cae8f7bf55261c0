"""The fused linear path's registered ops, ``linear_forward`` and ``linear_backward``, and the
autograd formula that joins them.

Both take the heads' tensors as one list, ``heads``: per head (policy first, then the
reference when there is one) its hidden states ``[..., H]``, its weight ``[V, H]`` and, when
its :class:`~prefopt_kernels.spec.HeadSpec` says ``has_bias``, its bias ``[V]``. The
encoded :class:`~prefopt_kernels.spec.LinearSpec` says how to read the list.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .. import checks, distributed, spec as specs
from ..backends import NO_KEPT_LABEL, RowStats, kept_rows, saved_names
from ..custom_ops import (GRADIENT_OUTPUTS, LIBRARY, mark_outputs, named_arguments, on_device,
                          refuse_double_backward, shard_checking_labels, upstream_gradients)
from ..dispatch import pick_backend
from ..layout import token_count
from ..spec import LinearSpec
from .heads import FP32, Head
from ..sampling import KEPT_STATS, kept_stat_count, raw_threshold
from . import sampled
from .passes import LinearCall, backward_pass, forward_pass
from .sharded_heads import gathered

def head_tensors(heads: List[torch.Tensor], spec: LinearSpec) -> list:
    """``[(hidden, weight, bias or None)]`` per head, from the flat ``heads`` list."""
    out, i = [], 0
    for head in spec.heads:
        bias = heads[i + 2] if head.has_bias else None
        out.append((heads[i], heads[i + 1], bias))
        i += 2 + head.has_bias
    return out


def flat_head_tensors(per_head) -> list:
    """The inverse of :func:`head_tensors`: hidden, weight and bias (where present) of each head."""
    return [t for hidden, weight, bias in per_head for t in (hidden, weight, bias) if t is not None]


class KeptTokens(NamedTuple):
    """The tokens a call computes (:func:`_kept_tokens`).

    ``index``: their flat int64 indices ``[n]``, increasing. ``saved``: the two tensors the
    backward reuses them from, ``[N]`` int64 on their device (``index`` then -1) and ``n``, an
    int64 scalar on the CPU: a size found from the data cannot be an output's shape without a
    graph break under ``torch.compile``, and a CPU count is read by the backward without a
    device sync. ``low``, ``high``: the kept labels' least and greatest value
    (``NO_KEPT_LABEL`` where none is kept or read). ``dropped``: ``None``, or while a graph is
    captured, bool ``[N]``, the tokens computed only to be zeroed.
    """

    index: torch.Tensor
    saved: List[torch.Tensor]
    low: int
    high: int
    dropped: Optional[torch.Tensor]


def _kept_tokens(labels, div_weight, spec: LinearSpec, n_tokens: int, backend: str, device) -> KeptTokens:
    """The :class:`KeptTokens` of a call: an ignored label drops its token, and without labels
    (the divergence alone) so does a zero ``div_weight``.

    One backend launch writes the indices, -1 padded (saved as they are, ``index`` a view of
    them), and ``[n, low, high]``, read back to the host once. Without labels or weights every
    token is kept: ``arange``, nothing read back. While a CUDA stream captures a graph nothing
    can be read back, so every token is computed: the kernels skip the dropped ones' rows
    (gradient rows 0), the forward zeroes their outputs (the empty row state would finalize
    to NaN) and the labels' range goes unchecked
    (:func:`~prefopt_kernels.checks.check_label_range`).
    """
    if (labels is None and div_weight is None) or checks.capturing():
        index = torch.arange(n_tokens, device=device)
        dropped = None
        if labels is not None or div_weight is not None:
            dropped = kept_rows(labels, div_weight, spec.op.ignore_index, n_tokens, device).logical_not()
        return KeptTokens(index, [index, torch.tensor(n_tokens, dtype=torch.int64)], *NO_KEPT_LABEL, dropped)
    padded, summary = pick_backend(device, backend).kept_tokens(labels, div_weight, spec.op.ignore_index,
                                                                 n_tokens, device)
    count, low, high = summary.tolist()
    return KeptTokens(padded[:count], [padded, torch.tensor(count, dtype=torch.int64)], low, high, None)


def _reused_kept_tokens(kept_tokens: torch.Tensor, kept_count: torch.Tensor) -> torch.Tensor:
    """The ``[n]`` kept tokens of the two tensors of :attr:`KeptTokens.saved` (a view)."""
    return kept_tokens[:kept_count.tolist()]


def _call(per_head, labels, weight, spec: LinearSpec, index, shard, backend: str) -> LinearCall:
    """The :class:`LinearCall` of the kept tokens ``index`` (flat, of ``labels``' and ``weight``'s
    ``N`` tokens); where ``index`` holds all ``N``, the per-token tensors are used as they are."""
    heads = [Head(w, b, head_spec) for (_, w, b), head_spec in zip(per_head, spec.heads)]
    weight_of_head = per_head[0][1]
    every_token = index.numel() == token_count(per_head[0][0])

    def kept(x):
        return x if x is None or every_token else x[index]
    return LinearCall(spec=spec, heads=heads, index=index, every_token=every_token, labels=kept(labels),
                      weight=kept(weight), vocab=weight_of_head.shape[0],
                      backend=pick_backend(weight_of_head.device, backend), shard=shard)


def _token_outputs(values, call: LinearCall, shapes) -> List[torch.Tensor]:
    """Each kept-token ``value`` as an output of its ``shape``, 0 at dropped tokens: a tensor of its
    own (an op's output that is a view could not be modified in place by the caller, and no two
    outputs may share memory), so where every token is kept a fresh ``value`` of that shape is
    returned as it is, and otherwise copied."""
    outputs, storages = [], set()
    for value, shape in zip(values, shapes, strict=True):
        storage = value.untyped_storage().data_ptr()
        if call.every_token and value._base is None and value.shape == shape and storage not in storages:
            out = value
        elif call.every_token:
            out = value.reshape(shape).clone()
        else:
            out = torch.zeros(shape, dtype=value.dtype, device=value.device)
            out.view(-1).index_copy_(0, call.index, value)
        storages.add(out.untyped_storage().data_ptr())
        outputs.append(out)
    return outputs


@torch.library.custom_op(f"{LIBRARY}::linear_forward", mutates_args=())
def _linear_forward(heads: List[torch.Tensor], labels: Optional[torch.Tensor], div_weight: Optional[torch.Tensor],
                    spec: specs.Encoded, backend: str, group: str) -> List[torch.Tensor]:
    """Fold projected tiles of the kept tokens into row states.

    Returns the ``[...]`` outputs the spec asks for (``OpSpec.outputs`` order), its extras,
    the saved statistics (flat ``[N]`` each: every output has a shape known without the data),
    the kept tokens (:attr:`KeptTokens.saved`) and, with a ``group``, the shard's ``[v0, V]``
    int64; dropped tokens hold 0. Checks the labels' range (every rank's, sharded) as it runs.
    """
    linear = LinearSpec.decode(spec)
    per_head = head_tensors(heads, linear)
    hidden, head_weight = per_head[0][0], per_head[0][1]
    has_ref = linear.reference is not None
    n_tokens, device = token_count(hidden), hidden.device
    # Unsharded, the kept labels' range is checked below: they exclude the ignored ones.
    shard = shard_checking_labels(group, linear, has_ref, head_weight.shape[0], n_tokens, device,
                                  labels if group else None, div_weight, [h.shape[-1] for h, _, _ in per_head])
    kept_tokens = _kept_tokens(labels, div_weight, linear, n_tokens, backend, device)
    if not group and labels is not None:
        checks.check_kept_label_range(kept_tokens.low, kept_tokens.high, labels, head_weight.shape[0],
                                      linear.op.ignore_index)
    call = _call(per_head, labels, div_weight, linear, kept_tokens.index, shard, backend)
    # Autocast stays on inside a registered op: the tiles choose their dtypes themselves.
    with torch.autocast(device.type, enabled=False), on_device(device):
        tile_candidates = sampled.TileCandidates(call) if linear.op.samples else None
        stats, extra_values = forward_pass([h for h, _, _ in per_head], call, tile_candidates)
        found = {k: getattr(stats, k) for k in linear.op.outputs() if k != "log_kept_mass"}
        kept = []
        if linear.op.samples:
            sampled_values = sampled.forward([h for h, _, _ in per_head], call, stats, tile_candidates)
            found.update(logp=sampled_values["logp"], log_kept_mass=sampled_values["log_kept_mass"])
            kept = [sampled_values[name] for name in KEPT_STATS]
        elif linear.op.want_kept_mass:
            found["log_kept_mass"] = torch.zeros_like(stats.log_norm)
    values = [found[k] for k in linear.op.outputs()] + [extra_values[k] for k in linear.extras]
    saved = stats.saved(linear.op, has_ref) + kept
    shapes = [hidden.shape[:-1]] * len(values) + [(n_tokens,)] * len(saved)
    tail = [distributed.shard_to_tensor(shard)] if group else []
    if kept_tokens.dropped is not None:
        values = [value.masked_fill(kept_tokens.dropped, 0) for value in values]
    return _token_outputs(values + saved, call, shapes) + kept_tokens.saved + tail


@_linear_forward.register_fake
def _linear_forward_fake(*values):
    arguments = named_arguments("linear_forward", values)
    linear = LinearSpec.decode(arguments["spec"])
    hidden = arguments["heads"][0]
    lead = hidden.shape[:-1]
    outputs = [hidden.new_empty(lead, dtype=FP32) for _ in linear.op.outputs()]
    outputs += [hidden.new_empty(lead, dtype=torch.bool if k == "is_top1" else FP32) for k in linear.extras]
    n_tokens = token_count(hidden)
    n_saved = len(saved_names(linear.op, linear.reference is not None)) + kept_stat_count(linear.op)
    saved = [hidden.new_empty(n_tokens, dtype=FP32) for _ in range(n_saved)]
    kept_tokens = [hidden.new_empty(n_tokens, dtype=torch.int64), torch.empty((), dtype=torch.int64)]
    tail = [torch.empty(2, dtype=torch.int64)] if arguments["group"] else []
    return outputs + saved + kept_tokens + tail


@torch.library.custom_op(f"{LIBRARY}::linear_backward", mutates_args=())
def _linear_backward(heads: List[torch.Tensor], labels: Optional[torch.Tensor], div_weight: Optional[torch.Tensor],
                     saved: List[torch.Tensor], kept_tokens: torch.Tensor, kept_count: torch.Tensor,
                     upstream: List[Optional[torch.Tensor]], needs: List[bool], spec: specs.Encoded, backend: str,
                     group: str, shard_offsets: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """Re-project every tile of the kept tokens and accumulate the gradients asked for.

    ``saved`` are the forward's ``[N]`` statistics, ``kept_tokens`` and ``kept_count`` its kept
    tokens (:attr:`KeptTokens.saved`); ``upstream`` holds ``(g_logp, g_entropy, g_div)``,
    fp32 ``[...]`` or ``None`` (zero); ``needs`` flags the gradients of the policy's hidden
    states, weight and bias. Returns those three gradients, each empty where not asked for.
    """
    linear = LinearSpec.decode(spec)
    per_head = head_tensors(heads, linear)
    hidden, head_weight = per_head[0][0], per_head[0][1]
    shard = distributed.shard_from_tensor(group, shard_offsets, head_weight.shape[0])
    index = _reused_kept_tokens(kept_tokens, kept_count)
    call = _call(per_head, labels, div_weight, linear, index, shard, backend)
    # reshape: Inductor may hand the upstream gradients over in their outputs' [...] shape.
    grads = {k: g.reshape(-1) for k, g in zip(GRADIENT_OUTPUTS, upstream) if g is not None}
    if not call.every_token:
        grads = {k: g.index_select(0, index) for k, g in grads.items()}
        saved = [x.index_select(0, index) for x in saved]
    n_stats = len(saved_names(linear.op, linear.reference is not None))
    stats = RowStats.from_saved(saved[:n_stats], linear.op, linear.reference is not None)
    kept = None
    if linear.op.samples:
        threshold, kept_log_norm = saved[n_stats:]
        kept = [threshold, kept_log_norm, raw_threshold(threshold, stats.row_max, linear.op.temperature)]
    with torch.autocast(hidden.device.type, enabled=False), on_device(hidden.device):
        result = backward_pass([h for h, _, _ in per_head], call, stats, grads, needs, kept)
    return [hidden.new_empty(0) if g is None else g for g in result]


@_linear_backward.register_fake
def _linear_backward_fake(*values):
    arguments = named_arguments("linear_backward", values)
    hidden, weight, bias = head_tensors(arguments["heads"], LinearSpec.decode(arguments["spec"]))[0]
    return [x.new_empty(x.shape) if need else hidden.new_empty(0)
            for x, need in zip((hidden, weight, bias), arguments["needs"])]


def _linear_setup_context(ctx, inputs, output):
    arguments = named_arguments("linear_forward", inputs)
    linear = LinearSpec.decode(arguments["spec"])
    wanted = linear.op.outputs()
    first_saved = len(wanted) + len(linear.extras)
    n_saved = len(saved_names(linear.op, linear.reference is not None)) + kept_stat_count(linear.op)
    ctx.spec, ctx.backend, ctx.group = arguments["spec"], arguments["backend"], arguments["group"]
    ctx.wanted, ctx.n_heads, ctx.has_bias = wanted, len(arguments["heads"]), linear.policy.has_bias
    # The statistics, then the kept tokens and their count.
    ctx.save_for_backward(*arguments["heads"], arguments["labels"], arguments["div_weight"],
                          *output[first_saved:first_saved + n_saved + 2], output[-1] if ctx.group else None)
    mark_outputs(ctx, wanted, output)


def _linear_autograd(ctx, grads):
    refuse_double_backward()
    # Read once: non-reentrant checkpointing unpacks each saved tensor a single time.
    saved_tensors = ctx.saved_tensors
    heads = list(saved_tensors[:ctx.n_heads])
    labels, div_weight = saved_tensors[ctx.n_heads:ctx.n_heads + 2]
    saved, shard_offsets = list(saved_tensors[ctx.n_heads + 2:-3]), saved_tensors[-1]
    kept_tokens, kept_count = saved_tensors[-3:-1]
    upstream = upstream_gradients(ctx.wanted, grads)
    # The policy's hidden states, weight and bias lead the heads' list.
    needs = list(ctx.needs_input_grad[0][:2]) + [ctx.has_bias and ctx.needs_input_grad[0][2]]
    head_grads = [None] * ctx.n_heads
    no_grads = (None,) * 5
    if not upstream or not any(needs):
        return (head_grads,) + no_grads
    with gathered(*heads):
        result = torch.ops.prefopt_kernels.linear_backward(
            heads, labels, div_weight, saved, kept_tokens, kept_count, [upstream.get(k) for k in GRADIENT_OUTPUTS],
            needs, ctx.spec, ctx.backend, ctx.group, shard_offsets)
    for i, (gradient, need) in enumerate(zip(result, needs)):
        if need:
            head_grads[i] = gradient
    return (head_grads,) + no_grads


_linear_forward.register_autograd(_linear_autograd, setup_context=_linear_setup_context)
