"""The fused token ops on logits: the two registered (custom) ops and the public functions.

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

from typing import List, NamedTuple, Optional

import torch

from . import distributed, sampled_rows, spec as specs
from .backends import RowStats, saved_names
from .checks import check_inplace, check_labels, check_logits, check_pair, check_weight, op_spec
from .custom_ops import (GRADIENT_OUTPUTS, LIBRARY, mark_outputs, named_arguments, on_device,
                        refuse_double_backward, shard_checking_labels, upstream_gradients)
from .dispatch import backend_selection, pick_backend
from .layout import RowLayout, token_count
from .sampling import KEPT_STATS, kept_stat_count
from .spec import OpSpec


class TokenTerms(NamedTuple):
    """Per-token results of :func:`token_terms`, each fp32 with the labels' shape."""

    logp: torch.Tensor
    ref_logp: torch.Tensor
    div: torch.Tensor
    entropy: Optional[torch.Tensor]
    log_kept_mass: Optional[torch.Tensor] = None  # with return_kept_mass: lse_K(z) - lse_V(z)


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op(f"{LIBRARY}::token_forward", mutates_args=())
def _token_forward(logits: torch.Tensor, ref_logits: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                   weight: Optional[torch.Tensor], spec: specs.Encoded, inplace_backward: bool, backend: str,
                   group: str) -> List[torch.Tensor]:
    """The fused read of the policy (and reference) rows of ``[..., V]`` logits.

    ``spec`` is an encoded :class:`~prefopt_kernels.spec.OpSpec`. Returns the fp32 ``[N]``
    outputs it asks for (``OpSpec.outputs`` order), then the saved statistics that are not
    outputs already (:func:`saved_only`), then, with a ``group``, the shard's ``[v0, V]``
    int64. Checks the labels' range (every rank's, sharded) as it runs. ``inplace_backward``
    is carried for the backward only.
    """
    op = OpSpec.decode(spec)
    has_ref = ref_logits is not None
    shard = shard_checking_labels(group, op, has_ref, logits.shape[-1], token_count(logits), logits.device,
                                  labels, weight)
    module = pick_backend(logits.device, backend)
    rows, ref_rows = RowLayout.of(logits, ref_logits).rows(logits, ref_logits)
    with on_device(logits.device):
        largest = None  # the sampled forward's candidates, where the backend gathers them in its read
        if shard.group is None:
            stats, largest = sampled_rows.first_read(module, rows, labels, ref_rows, weight, op)
        else:
            count = sampled_rows.gathered_count(module, op, shard.vocab, logits.device, "fold_with_candidates")
            stats, largest = distributed.sharded_stats(module, rows, labels, ref_rows, weight, op, shard, count)
    found = {k: getattr(stats, k) for k in op.outputs() if k != "log_kept_mass"}
    kept = []
    if op.samples:
        with on_device(logits.device):
            sampled = sampled_rows.forward(rows, labels, stats, op, shard, largest)
        found.update(logp=sampled["logp"], log_kept_mass=sampled["log_kept_mass"])
        kept = [sampled[name] for name in KEPT_STATS]
    elif op.want_kept_mass:
        found["log_kept_mass"] = torch.zeros_like(stats.log_norm)
    saved = dict(zip(saved_names(op, has_ref), stats.saved(op, has_ref)))
    tail = [distributed.shard_to_tensor(shard)] if group else []
    return [found[k] for k in op.outputs()] + [saved[name] for name in saved_only(op, has_ref)] + kept + tail


@_token_forward.register_fake
def _token_forward_fake(*values):
    arguments = named_arguments("token_forward", values)
    op, logits = OpSpec.decode(arguments["spec"]), arguments["logits"]
    n = token_count(logits)
    count = len(op.outputs()) + len(saved_only(op, arguments["ref_logits"] is not None)) + kept_stat_count(op)
    tail = [torch.empty(2, dtype=torch.int64)] if arguments["group"] else []
    return [logits.new_empty(n, dtype=torch.float32) for _ in range(count)] + tail


@torch.library.custom_op(f"{LIBRARY}::token_backward", mutates_args=("grad_out",))
def _token_backward(logits: torch.Tensor, ref_logits: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                    weight: Optional[torch.Tensor], saved: List[torch.Tensor],
                    upstream: List[Optional[torch.Tensor]], grad_out: torch.Tensor, spec: specs.Encoded,
                    backend: str, group: str, shard_offsets: Optional[torch.Tensor]) -> None:
    """Write the gradient of ``sum g_logp logp + g_entropy H + g_div div`` into ``grad_out``.

    ``grad_out`` has the logits' shape and dtype: a fresh contiguous tensor, or the logits
    themselves (``inplace_backward``, when their rows need no copy). ``saved`` and
    ``shard_offsets`` are what :func:`_token_forward` returned (``saved``: the statistics, then
    the kept set's with ``top_k`` / ``top_p`` / ``min_p``); ``upstream`` holds
    ``(g_logp, g_entropy, g_div)``, each fp32 ``[N]`` or ``None`` (zero). Sharded, each rank
    writes its own shard from the global statistics: no communication.
    """
    op = OpSpec.decode(spec)
    n_stats = len(saved_names(op, ref_logits is not None))
    stats, kept = RowStats.from_saved(saved[:n_stats], op, ref_logits is not None), saved[n_stats:]
    shard = distributed.shard_from_tensor(group, shard_offsets, logits.shape[-1])
    module = pick_backend(logits.device, backend)
    # A fresh gradient is contiguous, so it adds no break to the logits' layout; the logits
    # themselves are passed only when their rows need no copy.
    layout = RowLayout.of(logits, ref_logits, grad_out)
    rows, ref_rows, grad_rows = layout.rows(logits, ref_logits, grad_out)
    # contiguous [N]: Inductor may hand the upstream gradients over in their outputs' [...] shape.
    grads = tuple(None if g is None else g.reshape(-1).contiguous() for g in upstream) + (grad_rows,)
    with on_device(logits.device):
        if op.samples:
            if shard.group is None or rows.shape[2]:
                sampled_rows.backward(module, rows, labels, ref_rows, weight, op, stats, kept, *grads, shard)
        elif shard.group is None:
            module.backward(rows, labels, ref_rows, weight, op, stats, *grads)
        elif rows.shape[2]:
            module.slice_backward(rows, labels, ref_rows, weight, op, stats, *grads, shard.v0)


@_token_backward.register_fake
def _token_backward_fake(*values):
    return None


def _token_setup_context(ctx, inputs, output):
    arguments = named_arguments("token_forward", inputs)
    op, ref_logits = OpSpec.decode(arguments["spec"]), arguments["ref_logits"]
    has_ref = ref_logits is not None
    wanted = op.outputs()
    kept_names = KEPT_STATS if op.samples else ()
    by_name = dict(zip(wanted + saved_only(op, has_ref) + kept_names, output))
    saved = [by_name[name] for name in saved_names(op, has_ref) + kept_names]
    ctx.spec, ctx.wanted, ctx.n_saved, ctx.n_inputs = arguments["spec"], wanted, len(saved), len(inputs)
    ctx.inplace, ctx.backend, ctx.group = arguments["inplace_backward"], arguments["backend"], arguments["group"]
    ctx.save_for_backward(arguments["logits"], ref_logits, arguments["labels"], arguments["weight"], *saved,
                          output[-1] if ctx.group else None)
    mark_outputs(ctx, wanted, output)


def saved_only(op: OpSpec, has_ref: bool) -> tuple:
    """The saved statistics that are not also outputs (an op returns each tensor once)."""
    wanted = op.outputs()
    return tuple(name for name in saved_names(op, has_ref) if name not in wanted)


def _token_autograd(ctx, grads):
    refuse_double_backward()
    logits, ref_logits, labels, weight, *saved = ctx.saved_tensors
    saved, shard_offsets = saved[:ctx.n_saved], saved[ctx.n_saved]
    upstream = upstream_gradients(ctx.wanted, grads)
    no_grads = (None,) * (ctx.n_inputs - 1)
    if not upstream or not ctx.needs_input_grad[0]:
        return (None,) + no_grads
    if ctx.inplace and not RowLayout.of(logits, ref_logits).copied:
        grad = logits
    else:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    # Writing into the logits bumps their version (the op declares the mutation): anything that
    # saved them, this op included if its backward runs again, then fails PyTorch's version check.
    torch.ops.prefopt_kernels.token_backward(logits, ref_logits, labels, weight, saved,
                                             [upstream.get(k) for k in GRADIENT_OUTPUTS], grad, ctx.spec,
                                             ctx.backend, ctx.group, shard_offsets)
    return (grad,) + no_grads


_token_forward.register_autograd(_token_autograd, setup_context=_token_setup_context)


def _run(logits, labels, ref_logits, weight, op: OpSpec, inplace_backward: bool, process_group) -> dict:
    """The outputs of ``op`` by name, each fp32 with the logits' leading shape."""
    inplace_backward = check_inplace(inplace_backward, logits)
    group = distributed.group_name(process_group, logits.device)
    lead = logits.shape[:-1]
    keys = op.outputs()
    if token_count(logits) == 0:
        if process_group is not None:
            # The ranks still agree on the call: a rank with tokens waits in the call check.
            distributed.shard_for_call(process_group, op, ref_logits is not None, logits.shape[-1], 0,
                                       logits.device, labels, weight)
        # No tokens: zeros that still belong to the logits' graph (ref_logp never does).
        zeros = logits.sum(-1).float() * 0.0
        return {k: zeros.detach() if k == "ref_logp" else zeros for k in keys}
    outputs = torch.ops.prefopt_kernels.token_forward(logits, ref_logits, labels, weight, op.encode(),
                                                      inplace_backward, backend_selection(), group)
    return {k: v.view(lead) for k, v in zip(keys, outputs)}


# --------------------------------------------------------------------------- public ops


def token_logprobs(logits, labels, *, ignore_index: int = -100, temperature: float = 1.0,
                   return_entropy: bool = False, top_k=None, top_p=None, min_p=None,
                   return_kept_mass: bool = False, inplace_backward: bool = False, process_group=None):
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
        return_entropy: also return ``H(p)`` per token (always the full distribution's).
        top_k, top_p, min_p: score the label under the sampler's distribution instead (vLLM's
            ``processed_logprobs``): with ``z = a / T`` the kept set ``K`` is built by min-p
            (keep ``z_i >= max z + log(min_p)``), then top-k (keep ``z_i`` at least the k-th
            largest, ties kept), then top-p (over what is left, renormalised, the smallest set
            of largest tokens whose mass reaches ``top_p``, ties of the last one kept), and
            ``logp = z_y - lse_K(z)``: ``-inf`` when ``y`` is not in ``K`` (never NaN; count
            them with ``torch.isinf(logp).sum()``). Gradient ``(1[j = y] - p_K(j)) / T`` on
            ``K``, 0 outside (the set held fixed). ``None``, ``top_k=0``, ``top_p=1`` and
            ``min_p=0`` keep the whole vocabulary (the plain path, bit for bit). ``top_k`` a
            non-bool int ``>= 0``, ``top_p`` in ``(0, 1]``, ``min_p`` in ``[0, 1]``. Cost and
            mechanism: :mod:`prefopt_kernels.sampling`.
        return_kept_mass: also return ``log_kept_mass = lse_K(z) - lse_V(z)`` (0 without a
            filter and at ignored tokens); not differentiable.
        inplace_backward: write the logits' gradient into the logits' own storage (the
            logits are consumed; backward then allocates nothing of size ``[N, V]``). The
            logits' version counter is bumped, so PyTorch raises its usual in-place error if
            anything that saved them runs its backward later (or this backward runs twice);
            expanded or overlapping logits are refused.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded
            (tensor parallelism): each rank passes its contiguous shard ``logits[..., V_r]``,
            shards in rank order, any sizes (0 included); ``labels`` are global ids and every
            rank gets the global per-token results; the gradient is the rank's shard. The
            ranks first check that they agree on the call, then exchange their per-row states;
            the backward communicates nothing. Bytes per token:
            :func:`prefopt_kernels.distributed.exchange_bytes_per_token`.

    Returns:
        ``logp`` fp32 ``[...]`` (0 at ignored tokens), or the tuple ``(logp, entropy,
        log_kept_mass)`` of those asked for, in that order.
    """
    check_logits(logits, "logits", sharded=process_group is not None)
    labels = check_labels(labels, logits, ignore_index)
    op = op_spec(temperature=temperature, ignore_index=ignore_index, want_logp=True, return_entropy=return_entropy,
                 top_k=top_k, top_p=top_p, min_p=min_p, return_kept_mass=return_kept_mass)
    out = _run(logits, labels, None, None, op, inplace_backward, process_group)
    result = tuple(out[k] for k in op.outputs())
    return result if len(result) > 1 else result[0]


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
        process_group: as in :func:`token_logprobs`, both logits sharded alike.

    Returns:
        fp32 ``[...]`` per-token divergence.
    """
    check_logits(logits, "logits", sharded=process_group is not None)
    check_logits(ref_logits, "ref_logits", sharded=process_group is not None)
    check_pair(logits, ref_logits)
    weight = check_weight(weight, logits, "weight")
    op = op_spec(temperature=temperature, divergence=divergence, beta=beta, alpha=alpha)
    return _run(logits, None, ref_logits, weight, op, inplace_backward, process_group)["div"]


def token_terms(logits, labels, ref_logits, *, divergence: str = "forward_kl", div_weight=None,
                ignore_index: int = -100, temperature: float = 1.0, beta: float = 0.5,
                alpha: float = 0.5, return_entropy: bool = False, top_k=None, top_p=None, min_p=None,
                return_kept_mass: bool = False, inplace_backward: bool = False, process_group=None) -> TokenTerms:
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
        top_k, top_p, min_p, return_kept_mass: as in :func:`token_logprobs`, for the policy's
            ``logp`` only (``ref_logp``, ``div`` and ``entropy`` stay the full distributions').
        divergence, beta, alpha, temperature, inplace_backward, process_group: as in
            :func:`token_divergence` (``F`` one more with the entropy).

    Returns:
        :class:`TokenTerms` ``(logp, ref_logp, div, entropy | None, log_kept_mass | None)``,
        fp32 ``[...]`` each.
    """
    sharded = process_group is not None
    check_logits(logits, "logits", sharded=sharded)
    check_logits(ref_logits, "ref_logits", sharded=sharded)
    check_pair(logits, ref_logits)
    labels = check_labels(labels, logits, ignore_index)
    weight = check_weight(div_weight, logits, "div_weight")
    op = op_spec(temperature=temperature, ignore_index=ignore_index, divergence=divergence, beta=beta,
                 alpha=alpha, want_logp=True, want_ref_logp=True, return_entropy=return_entropy, top_k=top_k,
                 top_p=top_p, min_p=min_p, return_kept_mass=return_kept_mass)
    out = _run(logits, labels, ref_logits, weight, op, inplace_backward, process_group)
    return TokenTerms(out["logp"], out["ref_logp"], out["div"], out.get("entropy"), out.get("log_kept_mass"))

