"""The sampler-matched forward's candidates, gathered by the first pass's own read of the row.

Each row keeps its ``CANDIDATES`` largest policy logits (fp32) in a buffer of ``CAP`` slots in
global memory (its row of the launch's ``[N, CAP]`` output), with ``CAP >= CANDIDATES + BLOCK_V``
so that a whole tile always fits after a compaction. Per tile (:func:`offer`): one max, and only
where it beats the running ``threshold`` a compare, a prefix sum of the lanes that enter and a
scattered store of them. When fewer than ``BLOCK_V`` slots are left, :func:`compact` keeps the
``CANDIDATES`` largest (``tl.topk``) and raises ``threshold`` to the smallest of them: a logit
equal to it cannot change the multiset of the largest, so only larger ones enter afterwards.
``-inf`` (the masked lanes too) and NaN never enter; :func:`store_largest` writes the row's
``CANDIDATES`` largest in descending order, ``-inf`` padded. The buffer is written and read
back by different threads of the program, hence the barriers.
"""

import triton
import triton.language as tl


@triton.jit
def offer(x, top_ptr, size, threshold, CANDIDATES: tl.constexpr, CAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Offer one fp32 tile ``x``; returns the new ``(size, threshold)`` of the row's buffer ``top_ptr``."""
    if tl.max(x, axis=0) > threshold:
        take = x > threshold
        slot = size + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(top_ptr + slot, x, mask=take)
        size += tl.sum(take.to(tl.int32), axis=0)
        if size > CAP - BLOCK_V:
            size, threshold = compact(top_ptr, size, CANDIDATES, CAP)
    return size, threshold


@triton.jit(noinline=True)
def compact(top_ptr, size, CANDIDATES: tl.constexpr, CAP: tl.constexpr):
    """Keep the ``CANDIDATES`` largest of the ``size`` values at ``top_ptr`` in its first slots;
    returns ``(CANDIDATES, the smallest of them)``."""
    KEEP: tl.constexpr = triton.next_power_of_2(CANDIDATES)
    tl.debug_barrier()
    slots = tl.arange(0, CAP)
    largest = tl.topk(tl.load(top_ptr + slots, mask=slots < size, other=float("-inf")), KEEP)
    kept = tl.arange(0, KEEP)
    threshold = tl.max(tl.where(kept == CANDIDATES - 1, largest, float("-inf")), axis=0)
    tl.debug_barrier()
    tl.store(top_ptr + kept, largest, mask=kept < CANDIDATES)
    tl.debug_barrier()
    return size * 0 + CANDIDATES, threshold


@triton.jit
def store_largest(top_ptr, size, CANDIDATES: tl.constexpr, CAP: tl.constexpr):
    """Write the row's ``CANDIDATES`` largest values, descending and ``-inf`` padded, to the first
    slots of its buffer."""
    KEEP: tl.constexpr = triton.next_power_of_2(CANDIDATES)
    tl.debug_barrier()
    slots = tl.arange(0, CAP)
    largest = tl.topk(tl.load(top_ptr + slots, mask=slots < size, other=float("-inf")), KEEP)
    kept = tl.arange(0, KEEP)
    tl.debug_barrier()
    tl.store(top_ptr + kept, largest, mask=kept < CANDIDATES)
