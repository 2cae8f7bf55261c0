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
  scale and softcap act on fp32 values; the backend's ``fold`` kernel then merges the tile
  into the rows' running states in place (:mod:`prefopt_kernels.backends.row_state`): per
  tile, one GEMM per head and one launch; the backend's ``finalize`` turns the states into
  the statistics in one more launch per call. The tile shape comes from ``memory_budget``.
  Divergences with a second sweep (js, tv, hellinger, chi2, alpha) project every tile once
  more, after the normalisers are known, and one ``sweep`` launch adds its partial sums into
  the rows' in place.
* **Backward.** Vocabulary chunks outside, token chunks inside: each tile is projected
  again and turned into ``dL/dz`` in place by the backend's ``slice_backward`` (from the
  saved per-row statistics alone), then into the gradient of ``h W^T + c``; ``d h = dz W``
  and ``d W = dz^T h`` accumulate in fp32, a bf16/fp16 head's weight gradient one vocabulary
  chunk at a time (cast into the output when the chunk is done), so the workspace stays
  within ``memory_budget + 16 N H`` bytes. Gradients reach the policy's ``hidden``,
  ``head_weight`` and ``head_bias`` only.

Head weights that FSDP2 shards by rows (``fully_shard``: a ``DTensor`` placed ``Shard(0)`` on a
1-D mesh) are used where they lie: every rank's tokens are all-gathered and the call runs
vocabulary-sharded over the mesh's group, each rank keeping its own tokens' outputs and
receiving its rows of the head's gradient averaged over the ranks, as FSDP2's reduce-scatter
leaves them; a rank holds ``N_total H`` gathered hidden states instead of the ``V H`` head. A
reference head may be sharded alike or whole (its rows are then sliced).
Other ``DTensor`` heads are gathered with ``full_tensor()`` (the gradient averaged alike);
DeepSpeed ZeRO-3 partitioned weights are gathered for the checks and the forward, and again
for the backward (:mod:`.sharded_heads`).

Modules: :mod:`.heads` (a head's GEMM and transform), :mod:`.tiles` (the tile plan),
:mod:`.passes` (forward and backward over the tiles), :mod:`.registered` (the registered ops
and their autograd), :mod:`.sharded_heads` (FSDP2 / ZeRO-3 heads); the public functions here.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import distributed
from ..checks import (check_budget, check_extras, check_flag, check_head, check_hidden, check_labels,
                      check_weight, head_spec, op_spec)
from ..dispatch import backend_selection
from ..ops import TokenTerms
from ..spec import LinearSpec
from .registered import flat_head_tensors
from .sharded_heads import TokensOfAllRanks, gathered, local_rows, partitioned, unsharded, vocab_shard_group


def _run(hidden, head_weight, head_bias, labels, ref_hidden, ref_head_weight, ref_head_bias, **options):
    """Run an FSDP2 head by vocabulary, or gather sharded heads, check everything, run the registered
    op: ``(outputs, extras)`` by name."""
    group = None if options.get("process_group") is not None else \
        vocab_shard_group(head_weight, head_bias, (ref_head_weight, ref_head_bias))
    if group is not None:
        return _run_fsdp_vocab_sharded(group, hidden, head_weight, head_bias, labels, ref_hidden, ref_head_weight,
                                       ref_head_bias, **options)
    head_weight, head_bias = unsharded(head_weight, head_bias)
    if ref_hidden is not None:
        ref_head_weight, ref_head_bias = unsharded(ref_head_weight, ref_head_bias, differentiable=False)
    if torch.compiler.is_compiling() and partitioned(head_weight, head_bias, ref_head_weight, ref_head_bias):
        # A compiled backward is traced without the parameters' ZeRO-3 state, so it could not gather them.
        raise ValueError("ZeRO-3 partitioned head weights are gathered by eager calls only: call the op "
                         "outside torch.compile, or gather the head first")
    with gathered(head_weight, head_bias, ref_head_weight, ref_head_bias):
        return _run_gathered(hidden, head_weight, head_bias, labels, ref_hidden, ref_head_weight,
                             ref_head_bias, **options)


def _run_fsdp_vocab_sharded(group, hidden, head_weight, head_bias, labels, ref_hidden, ref_head_weight, ref_head_bias,
                            div_weight=None, process_group=None, **options):
    """``_run`` on FSDP2 heads without gathering them: every rank's tokens gathered, this rank's rows
    of the heads (of a whole reference head too), the call sharded by vocabulary over ``group``, this
    rank's tokens' outputs kept."""
    check_hidden(hidden, "hidden")
    tokens = TokensOfAllRanks(hidden.shape[:-1], head_weight, group, hidden.device)
    rows = tokens.vocab_rows
    result, extras = _run_gathered(
        tokens.rows(hidden, 1), local_rows(head_weight), local_rows(head_bias), tokens.rows(labels, 0),
        tokens.rows(ref_hidden, 1), local_rows(ref_head_weight, False, rows), local_rows(ref_head_bias, False, rows),
        div_weight=tokens.rows(div_weight, 0), process_group=group, **options)
    return tokens.own(result), tokens.own(extras)


def _run_gathered(hidden, head_weight, head_bias, labels, ref_hidden, ref_head_weight, ref_head_bias, *,
                  op_options: dict, div_weight=None, ignore_index=-100, logit_scale=1.0, ref_logit_scale=1.0,
                  softcap=None, ref_softcap=None, extras=(), memory_budget=None, batch_invariant=False,
                  process_group=None):
    """Check every input once, build the call's :class:`LinearSpec` and run ``linear_forward``.

    No data-dependent branch: the registered op checks the labels' range.
    """
    sharded = process_group is not None
    check_hidden(hidden, "hidden")
    check_head(hidden, head_weight, head_bias, "", None, sharded)
    has_ref = ref_hidden is not None or op_options.get("divergence") or op_options.get("want_ref_logp")
    if has_ref:
        check_hidden(ref_hidden, "ref_hidden")  # None too, where the op needs the reference
        if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"ref_hidden must have the leading shape of hidden {tuple(hidden.shape[:-1])}; "
                f"got {tuple(ref_hidden.shape[:-1])}"
            )
        if ref_hidden.device != hidden.device:
            raise ValueError(f"ref_hidden must be on the device of hidden ({hidden.device}); got {ref_hidden.device}")
        check_head(ref_hidden, ref_head_weight, ref_head_bias, "ref_", head_weight.shape[0], sharded)
    op = op_spec(ignore_index=ignore_index if labels is not None else -100, **op_options)
    if labels is not None or op.want_logp:
        labels = check_labels(labels, hidden, ignore_index, owner_name="hidden")
    div_weight = check_weight(div_weight, hidden, "div_weight", owner_name="hidden")
    heads = (head_spec(hidden, head_bias, logit_scale, softcap, ""),)
    per_head = [(hidden, head_weight, head_bias)]
    if has_ref:
        heads += (head_spec(ref_hidden, ref_head_bias, ref_logit_scale, ref_softcap, "ref_"),)
        per_head.append((ref_hidden, ref_head_weight, ref_head_bias))
    linear = LinearSpec(op=op, heads=heads, extras=check_extras(extras), memory_budget=check_budget(memory_budget),
                        batch_invariant=check_flag(batch_invariant, "batch_invariant"),
                        hidden_needs_grad=torch.is_grad_enabled() and hidden.requires_grad)
    group = distributed.group_name(process_group, hidden.device)
    outputs = torch.ops.prefopt_kernels.linear_forward(flat_head_tensors(per_head), labels, div_weight,
                                                       linear.encode(), backend_selection(), group)
    wanted = op.outputs()
    result = dict(zip(wanted, outputs))
    extra_values = dict(zip(linear.extras, outputs[len(wanted):len(wanted) + len(linear.extras)]))
    return result, extra_values


def linear_token_logprobs(hidden, head_weight, labels, *, head_bias=None, ignore_index: int = -100,
                          temperature: float = 1.0, logit_scale: float = 1.0, softcap=None,
                          return_entropy: bool = False, top_k=None, top_p=None, min_p=None,
                          return_kept_mass: bool = False, extras=(), memory_budget: Optional[int] = None,
                          batch_invariant: bool = False, process_group=None):
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
            runs vocabulary-sharded over its mesh, see the module's docstring; a ZeRO-3
            partitioned parameter is gathered for the call).
        labels: ``[...]`` integer in ``[0, V)`` or ``ignore_index``; ignored tokens are dropped
            before any matmul and get 0.
        head_bias: optional ``[V]``.
        temperature: ``T``, as in :func:`prefopt_kernels.token_logprobs`.
        logit_scale: finite multiplier of the projection (Cohere, Granite, ...); 0 gives
            the uniform distribution, as TRL does.
        softcap: ``None`` or a positive final-logit soft cap (Gemma).
        return_entropy: also return ``H(p)`` (always the full distribution's).
        top_k, top_p, min_p, return_kept_mass: the sampler's kept set, as in
            :func:`prefopt_kernels.token_logprobs`, on ``z / T`` with ``z`` after the scale and
            softcap; gradients reach the head through the kept set only.
        extras: names among ``"mean_logits"`` (``mean_i z_i / T``), ``"is_top1"`` (the label
            is the first maximum of ``z``, bool) and ``"log_sum_sq_probs"``
            (``log sum_i p_i^2``): TRL's ``FusedCausalLMOutput`` fields, not differentiable,
            0 (``False``) at ignored tokens.
        memory_budget: bytes for the tiles and their temporaries (default 64 MiB); sets the
            token and vocabulary chunk sizes.
        batch_invariant: a token's outputs and its row of ``hidden``'s gradient are then
            bit-identical whatever else the call holds (number of tokens, the token's position,
            ignored neighbours, ``memory_budget``): every GEMM runs on one fixed tile,
            ``[1024, H] x [H, 4096]``, the kept rows padded to whole 1024-row chunks with rows
            no kernel reads, and each row's reductions fold the same vocabulary chunks in the
            same order. ``memory_budget`` then does not change the tiles: their workspace is
            16 MiB per fp32 tile (one per head, and one more in the backward with ``softcap``).
            The weight and bias gradients are sums over tokens and are not batch-invariant.
        process_group: a ``torch.distributed`` group over which the head is sharded by
            vocabulary (tensor parallelism): each rank passes its rows ``head_weight[V_r, H]``
            (and ``head_bias[V_r]``), shards in rank order, any sizes (0 included), and the
            replicated ``hidden``; labels are global ids. Every rank gets the global outputs,
            its shard's weight and bias gradients, and the full ``hidden`` gradient (summed
            over the ranks in the backward). Bytes per kept token:
            :func:`prefopt_kernels.distributed.exchange_bytes_per_token`.

    Compute dtype: the autocast dtype when autocast is on for ``hidden``'s device, else
    ``hidden.dtype``. Logit tiles are fp32: a half-precision GEMM on a CPU rounds its result to
    the compute dtype (as PyTorch's own CPU matmul does) before it is widened; the bias, scale
    and softcap then act in fp32 on every device.

    Returns:
        ``logp`` fp32 ``[...]``, or ``(logp, entropy)``; with ``extras``, a further element: a
        dict from each name asked for to its ``[...]`` tensor; with ``return_kept_mass``,
        ``log_kept_mass`` last.
    """
    out, extra = _run(hidden, head_weight, head_bias, labels, None, None, None,
                      op_options=dict(temperature=temperature, want_logp=True, return_entropy=return_entropy,
                                      top_k=top_k, top_p=top_p, min_p=min_p, return_kept_mass=return_kept_mass),
                      ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap, extras=extras,
                      memory_budget=memory_budget, batch_invariant=batch_invariant, process_group=process_group)
    result = (out["logp"], out["entropy"]) if return_entropy else (out["logp"],)
    if extras:
        result = result + (extra,)
    if return_kept_mass:
        result = result + (out["log_kept_mass"],)
    return result if len(result) > 1 else result[0]


def linear_token_divergence(hidden, head_weight, ref_hidden, ref_head_weight, *, head_bias=None,
                            ref_head_bias=None, divergence: str = "forward_kl", beta: float = 0.5,
                            alpha: float = 0.5, div_weight=None, temperature: float = 1.0,
                            logit_scale: float = 1.0, ref_logit_scale: float = 1.0, softcap=None,
                            ref_softcap=None, memory_budget: Optional[int] = None, batch_invariant: bool = False,
                            process_group=None):
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
        logit_scale, ref_logit_scale, softcap, ref_softcap, memory_budget, batch_invariant: as in
            :func:`linear_token_logprobs`, per side.
        process_group: as in :func:`linear_token_logprobs`, both heads sharded alike (``F`` as
            :func:`prefopt_kernels.token_divergence` states).

    Returns:
        fp32 ``[...]`` per-token divergence.
    """
    out, _ = _run(hidden, head_weight, head_bias, None, ref_hidden, ref_head_weight, ref_head_bias,
                  op_options=dict(temperature=temperature, divergence=divergence, beta=beta, alpha=alpha),
                  div_weight=div_weight, logit_scale=logit_scale, ref_logit_scale=ref_logit_scale,
                  softcap=softcap, ref_softcap=ref_softcap, memory_budget=memory_budget,
                  batch_invariant=batch_invariant, process_group=process_group)
    return out["div"]


def linear_token_terms(hidden, head_weight, labels, ref_hidden, ref_head_weight, *, head_bias=None,
                       ref_head_bias=None, divergence: str = "forward_kl", div_weight=None,
                       ignore_index: int = -100, temperature: float = 1.0, beta: float = 0.5,
                       alpha: float = 0.5, return_entropy: bool = False, top_k=None, top_p=None, min_p=None,
                       return_kept_mass: bool = False, logit_scale: float = 1.0,
                       ref_logit_scale: float = 1.0, softcap=None, ref_softcap=None, extras=(),
                       memory_budget: Optional[int] = None, batch_invariant: bool = False, process_group=None):
    r"""Everything a token-level preference loss needs, from one tiled pass over both heads.

    :func:`prefopt_kernels.token_terms` on ``z`` and ``z_ref`` (see
    :func:`linear_token_divergence`): ``logp``, ``ref_logp``, ``div`` (0 where
    ``div_weight`` is 0) and optionally ``entropy``, each fp32 ``[...]``, 0 at ignored
    tokens, which are dropped before any matmul. Gradients reach the policy's ``hidden``,
    ``head_weight`` and ``head_bias``; ``ref_logp`` is not differentiable.

    Args: as :func:`linear_token_logprobs` and :func:`linear_token_divergence`; ``extras``
        are the policy's; ``top_k``, ``top_p``, ``min_p`` and ``return_kept_mass`` act on the
        policy's ``logp`` only.

    Returns:
        :class:`~prefopt_kernels.TokenTerms` (``log_kept_mass`` set with ``return_kept_mass``);
        with ``extras``, ``(TokenTerms, dict)``.
    """
    out, extra = _run(hidden, head_weight, head_bias, labels, ref_hidden, ref_head_weight, ref_head_bias,
                      op_options=dict(temperature=temperature, divergence=divergence, beta=beta, alpha=alpha,
                                      want_logp=True, want_ref_logp=True, return_entropy=return_entropy,
                                      top_k=top_k, top_p=top_p, min_p=min_p, return_kept_mass=return_kept_mass),
                      div_weight=div_weight, ignore_index=ignore_index, logit_scale=logit_scale,
                      ref_logit_scale=ref_logit_scale, softcap=softcap, ref_softcap=ref_softcap, extras=extras,
                      memory_budget=memory_budget, batch_invariant=batch_invariant, process_group=process_group)
    terms = TokenTerms(out["logp"], out["ref_logp"], out["div"], out.get("entropy"), out.get("log_kept_mass"))
    return (terms, extra) if extras else terms
