"""The tile plan of a fused linear pass: ``[token chunk, vocab chunk]`` from a memory budget (or,
batch-invariant, one fixed shape), and the reused fp32 tile buffers."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .heads import FP32, Head

MAX_TOKEN_CHUNK = 4096
# A vocabulary chunk narrower than this makes the GEMMs inefficient: the planner shrinks
# the token chunk first.
MIN_VOCAB_CHUNK = 256
# Vocabulary chunks narrower than the vocabulary are a multiple of this: every tile row then
# starts 64-byte aligned in fp32, so the kernels stream it with full-width vector loads.
VOCAB_CHUNK_ALIGN = 16
# The one tile shape of a batch-invariant call: every GEMM sees [1024, H] x [H, 4096] (the last
# vocabulary chunk V mod 4096 wide), whatever the number of tokens or the budget. 1024 rows bound
# the padding; a CPU's GEMM runs 1024 x 2048 tiles about 25% below its 4096 x 4096 rate, 1024 x 4096
# about 12%. Workspace (TilePlan.workspace_bytes): 16 MiB per fp32 tile, and in the backward of a
# bf16/fp16 head the fp32 [4096, H] weight-gradient rows (64 MiB at H = 4096).
INVARIANT_TOKEN_CHUNK = 1024
INVARIANT_VOCAB_CHUNK = 4096


def plan_tiles(rows: int, vocab: int, bytes_per_entry: int, bytes_per_column: int, budget: int):
    """``(token_chunk, vocab_chunk)`` whose tiles and temporaries fit ``budget`` bytes.

    A tile of ``t x v`` costs ``t * v * bytes_per_entry`` (every ``[t, v]`` buffer and
    temporary the call keeps at once) plus ``v * bytes_per_column`` (the head weight's
    chunk converted to the GEMM dtype). Token chunks hold at most 4096 rows; the token chunk
    shrinks before the vocabulary chunk drops below 256 entries. A vocabulary chunk narrower
    than ``vocab`` is a multiple of 16 entries where the budget allows one. Both are at least 1.
    """
    token_chunk = max(1, min(rows, MAX_TOKEN_CHUNK))
    while True:
        vocab_chunk = budget // (token_chunk * bytes_per_entry + bytes_per_column)
        if vocab_chunk >= min(vocab, MIN_VOCAB_CHUNK) or token_chunk == 1:
            if VOCAB_CHUNK_ALIGN <= vocab_chunk < vocab:
                vocab_chunk -= vocab_chunk % VOCAB_CHUNK_ALIGN
            return token_chunk, max(1, min(vocab, vocab_chunk))
        token_chunk = max(1, token_chunk // 2)


def padded_row_count(rows: int, batch_invariant: bool) -> int:
    """The rows a pass runs: ``rows``, or batch-invariant, ``rows`` rounded up to whole
    :data:`INVARIANT_TOKEN_CHUNK` chunks (the padding rows are zero hidden states with an
    ignored label, which no kernel reads)."""
    if not batch_invariant:
        return rows
    return -(-rows // INVARIANT_TOKEN_CHUNK) * INVARIANT_TOKEN_CHUNK


def fp32_tile_count(heads: Sequence[Head], backward: bool) -> int:
    """One fp32 logits tile per head, and in the backward a gradient tile of its own when the
    softcap's derivative reads the logits after the kernel has written the gradient."""
    return len(heads) + (backward and heads[0].spec.softcap is not None)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tile_costs(heads: Sequence[Head], extras: tuple, backward: bool, weight_grad: bool = False) -> Tuple[int, int]:
    """``(bytes per tile entry, bytes per vocabulary column)`` of one pass's buffers and temporaries.

    ``heads`` are the call's (policy first); ``extras`` the extra outputs the forward computes;
    ``weight_grad``: the backward accumulates the policy weight's gradient, which costs a
    bf16/fp16 head an fp32 row per vocabulary column (an fp32 head accumulates in its output).
    """
    entry = 4 * fp32_tile_count(heads, backward)
    entry += sum(_size(dtype) for dtype in {h.gemm_dtype for h in heads if h.widened})
    policy = heads[0]
    if backward:
        if policy.spec.softcap is not None:
            entry += 4  # the tanh temporary
        if policy.gemm_dtype != FP32:
            entry += _size(policy.gemm_dtype)  # the gradient rounded for a half-precision GEMM
        if policy.widened:
            entry += 4  # that gradient widened again for the fp32 GEMMs
    elif "log_sum_sq_probs" in extras:
        entry += 4  # the fp32 copy of the tile that the square sum exponentiates
    column = 0
    for head in heads:
        if head.weight.dtype != head.gemm_dtype:
            column += head.weight.shape[1] * _size(head.gemm_dtype)
    if backward and policy.widened:
        column += policy.weight.shape[1] * 4  # the head's chunk widened for the fp32 accumulation
    if backward and weight_grad and policy.weight.dtype != FP32:
        column += policy.weight.shape[1] * 4  # the chunk's fp32 weight-gradient accumulator
    return entry, column


class TilePlan:
    """The token and vocabulary ranges of one pass over ``rows`` kept tokens, and its reused
    buffers: contiguous ``[n, v]`` views of flat storage (``fp32_tile_count`` fp32 tiles,
    and one tile per GEMM dtype of the heads whose GEMM result is widened to fp32 after), and
    in a backward with ``weight_grad`` for a bf16/fp16 head, the fp32 ``[vocab chunk, H]``
    weight-gradient accumulator. Every buffer and temporary of a pass fits ``budget`` bytes
    (:func:`tile_costs`, :func:`plan_tiles`): :meth:`workspace_bytes` of them.

    ``batch_invariant``: the tile is :data:`INVARIANT_TOKEN_CHUNK` x
    :data:`INVARIANT_VOCAB_CHUNK` whatever ``rows`` and ``budget``, and the token ranges cover
    :func:`padded_row_count` rows in whole chunks, so every GEMM and kernel launch of the call
    has a shape fixed by the model alone. :attr:`rows` is the count the passes run (padded)."""

    def __init__(self, heads: Sequence[Head], rows: int, vocab: int, budget: int, extras: tuple, backward: bool,
                 weight_grad: bool = False, batch_invariant: bool = False):
        self.entry_bytes, self.column_bytes = tile_costs(heads, extras, backward, weight_grad)
        if batch_invariant:
            self.token_chunk, self.vocab_chunk = INVARIANT_TOKEN_CHUNK, max(1, min(vocab, INVARIANT_VOCAB_CHUNK))
        else:
            self.token_chunk, self.vocab_chunk = plan_tiles(rows, vocab, self.entry_bytes, self.column_bytes, budget)
        self.rows = padded_row_count(rows, batch_invariant)
        self.token_ranges: List[Tuple[int, int]] = [(t0, min(t0 + self.token_chunk, self.rows))
                                                    for t0 in range(0, self.rows, self.token_chunk)]
        self.vocab_ranges: List[Tuple[int, int]] = [(v0, min(v0 + self.vocab_chunk, vocab))
                                                    for v0 in range(0, vocab, self.vocab_chunk)]
        device = heads[0].weight.device
        size = self.token_chunk * self.vocab_chunk
        self._fp32 = [torch.empty(size, dtype=FP32, device=device) for _ in range(fp32_tile_count(heads, backward))]
        self._gemm = {h.gemm_dtype: torch.empty(size, dtype=h.gemm_dtype, device=device) for h in heads if h.widened}
        policy = heads[0]
        self._hidden_size = policy.weight.shape[1]
        self._weight_grad = None
        if backward and weight_grad and policy.weight.dtype != FP32:
            self._weight_grad = torch.empty(self.vocab_chunk * self._hidden_size, dtype=FP32, device=device)

    def workspace_bytes(self) -> int:
        """The bytes of the plan's buffers and temporaries at their largest tile: at most the budget
        (unless even a ``1 x 1`` tile does not fit)."""
        return self.token_chunk * self.vocab_chunk * self.entry_bytes + self.vocab_chunk * self.column_bytes

    def tile(self, i: int, n: int, v: int) -> torch.Tensor:
        """fp32 tile ``i`` as a contiguous ``[n, v]`` view."""
        return self._fp32[i][: n * v].view(n, v)

    def weight_grad(self, v: int) -> torch.Tensor:
        """The fp32 weight-gradient accumulator of a ``v``-row vocabulary chunk, ``[v, H]`` (uninitialised)."""
        return self._weight_grad[: v * self._hidden_size].view(v, self._hidden_size)

    def project(self, head: Head, hidden: torch.Tensor, v0: int, v1: int, i: int,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``head``'s fp32 logits of ``hidden`` ``[n, H]`` over ``[v0, v1)``, in fp32 tile ``i``
        (``weight``: the head's :meth:`~Head.weight_chunk`, when the caller holds it)."""
        n, v = hidden.shape[0], v1 - v0
        gemm_out = self._gemm[head.gemm_dtype][: n * v].view(n, v) if head.widened else None
        return head.project(hidden, v0, v1, self.tile(i, n, v), gemm_out, weight)
