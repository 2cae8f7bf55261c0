"""The kept tokens of a fused linear call: one program walks the flat tokens in blocks,
compacting the kept ones' indices in order (an exclusive ``tl.cumsum`` of the kept flags plus
the running count of the blocks before) and tracking the kept labels' least and greatest
value; then it writes -1 after the last kept index and stores ``[count, low, high]``."""

import triton
import triton.language as tl

INT64_MAX = tl.constexpr(2 ** 63 - 1)
INT64_MIN = tl.constexpr(-2 ** 63)


@triton.jit
def kept_tokens_kernel(labels_ptr, weight_ptr, index_ptr, summary_ptr, n_tokens, ignore_index,
                       HAS_LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    count = tl.full([], 0, tl.int64)
    low = tl.full([], INT64_MAX, tl.int64)
    high = tl.full([], INT64_MIN, tl.int64)
    for start in range(0, n_tokens, BLOCK):
        n = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = n < n_tokens
        if HAS_LABELS:
            label = tl.load(labels_ptr + n, mask=inside, other=0)
            kept = inside & (label != ignore_index)
            low = tl.minimum(low, tl.min(tl.where(kept, label, INT64_MAX), axis=0))
            high = tl.maximum(high, tl.max(tl.where(kept, label, INT64_MIN), axis=0))
        elif HAS_WEIGHT:
            kept = inside & (tl.load(weight_ptr + n, mask=inside, other=0.0) != 0.0)
        else:
            kept = inside
        flags = kept.to(tl.int64)
        tl.store(index_ptr + count + tl.cumsum(flags, axis=0) - flags, n, mask=kept)
        count += tl.sum(flags, axis=0)
    for start in range(count, n_tokens, BLOCK):
        n = start + tl.arange(0, BLOCK).to(tl.int64)
        tl.store(index_ptr + n, tl.full([BLOCK], -1, tl.int64), mask=n < n_tokens)
    tl.store(summary_ptr, count)
    tl.store(summary_ptr + 1, low)
    tl.store(summary_ptr + 2, high)
