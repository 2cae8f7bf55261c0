"""The sampler-matched forward's candidates, gathered by the first pass's own read of the row.

Each row keeps candidates for its ``CANDIDATES`` largest logits in a buffer of ``CAP`` slots in
global memory (its row of the launch's ``[N, CAP]`` output) of the dtype the tiles are loaded
in, so a logit is stored as it was loaded; ``CAP`` is a power of two ``>= CANDIDATES + BLOCK_V``.
Its first ``size`` slots are taken, ``size`` a multiple of ``CHUNK``: the values of the tile one
thread holds as one chunk. On aligned tiles that is one 16-byte vector (8 of a 16-bit dtype, 4 of
fp32); on tiles read element by element (``UNALIGNED``) it is every value the thread holds,
elements ``l, l + LANES, ...`` (:func:`lane_count`), 16 of a 16-bit dtype.

Per tile (:func:`offer`): the tile's max, which the first pass has already reduced, against the
running ``threshold``; only where it beats it, each chunk whose max beats it is appended whole to
consecutive slots, vector stores, placed by a prefix sum over the tile's chunks. The chunk's other
values are genuine logits of the row, so keeping them never changes the row's largest; storing
whole chunks keeps the tile in the registers it was loaded into (a scatter of single values would
need a prefix sum and an address per value, or have the compiler move the tile, its addresses and
its mask across threads through shared memory).
When fewer than ``BLOCK_V`` slots are left, :func:`settle` raises the threshold by bisection to
a value at least ``CANDIDATES`` buffered logits reach (chunks of more than one value), drops what
is below it (and ``-inf``, NaN) and packs the rest; only when that fills more than three quarters
of the room (``CAP - BLOCK_V``: ties) does it keep the ``CANDIDATES`` largest (``tl.topk``) and
raise ``threshold`` to the smallest of them. A logit equal to the threshold cannot change the
multiset of the largest, so only chunks holding a larger one enter afterwards, and the values
equal to it stay.
:func:`store_largest` writes the row's ``CANDIDATES`` largest in descending order, ``-inf``
padded; NaN never enters them. The buffer is written and read back by different threads of the
program, hence the barriers.
"""

import triton
import triton.language as tl


@triton.jit
def offer(x, top_ptr, size, threshold, CANDIDATES: tl.constexpr, CAP: tl.constexpr, BLOCK_V: tl.constexpr,
          UNALIGNED: tl.constexpr = False):
    """Offer one tile ``x`` as loaded (the buffer's dtype, ``[BLOCK_V]``); returns the new
    ``(size, threshold)`` of the row's buffer ``top_ptr``. ``UNALIGNED``: the tile was loaded
    element by element (a row not aligned to 16 bytes), so a chunk is all a thread holds."""
    BITS: tl.constexpr = x.dtype.primitive_bitwidth
    CHUNK: tl.constexpr = BLOCK_V // lane_count(BITS, BLOCK_V) if UNALIGNED else chunk_size(BITS, BLOCK_V)
    values = x.to(tl.float32)
    if tl.max(values, axis=0) > threshold:
        if UNALIGNED:
            # Chunk l, thread l's columns l, l + LANES, ... (LANES = BLOCK_V // CHUNK), is
            # column l of the tile seen as [CHUNK, LANES], here split into 16-byte vectors: the
            # store's coalesced layout then gives each vector to the thread that loaded it.
            VECTOR: tl.constexpr = chunk_size(BITS, CHUNK)
            SHAPE: tl.constexpr = [CHUNK // VECTOR, VECTOR, BLOCK_V // CHUNK]
            enters = tl.max(tl.max(tl.reshape(values, SHAPE), axis=1), axis=0) > threshold
            count = enters.to(tl.int32)
            chunk_slot = size // CHUNK + tl.cumsum(count, axis=0) - count
            within = tl.arange(0, CHUNK // VECTOR)[:, None, None] * VECTOR + tl.arange(0, VECTOR)[None, :, None]
            tl.store(top_ptr + chunk_slot[None, None, :] * CHUNK + within, tl.reshape(x, SHAPE),
                     mask=enters[None, None, :])
        else:
            enters = tl.max(tl.reshape(values, [BLOCK_V // CHUNK, CHUNK]), axis=1) > threshold
            count = enters.to(tl.int32)
            chunk_slot = size // CHUNK + tl.cumsum(count, axis=0) - count
            slots = chunk_slot[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
            tl.store(top_ptr + slots, tl.reshape(x, [BLOCK_V // CHUNK, CHUNK]), mask=enters[:, None])
        size += tl.sum(count, axis=0) * CHUNK
        if size > CAP - BLOCK_V:
            size, threshold = settle(top_ptr, size, threshold, CANDIDATES, CAP, BLOCK_V, CHUNK)
    return size, threshold


@triton.constexpr_function
def chunk_size(bits, block):
    """The elements of a 16-byte vector of ``bits``-wide values, at most the tile's ``block``."""
    return min(128 // bits, block)


@triton.constexpr_function
def lane_count(bits, block):
    """The threads sharing a ``block``-wide tile of ``bits``-wide values, each holding 32 bytes of
    it (``config.launch_config``); a layout assumption only, never a correctness one."""
    return max(1, block * bits // 256)


@triton.jit(noinline=True)
def settle(top_ptr, size, threshold, CANDIDATES: tl.constexpr, CAP: tl.constexpr, BLOCK_V: tl.constexpr,
           CHUNK: tl.constexpr):
    """Make room for a whole tile in the buffer ``top_ptr`` holding ``size`` values: keep those
    at least ``threshold``, raised by bisection when ``CHUNK > 1`` (none ``-inf`` or NaN), packed
    in order into its first slots, or, when they would fill more than three quarters of the room,
    only the ``CANDIDATES`` largest. Returns the new ``(size, threshold)``, ``size`` rounded up to
    a whole chunk with ``-inf``."""
    ROOM: tl.constexpr = (CAP - BLOCK_V) * 3 // 4 // CHUNK * CHUNK
    BISECTIONS: tl.constexpr = 8
    KEEP: tl.constexpr = triton.next_power_of_2(CANDIDATES)
    tl.debug_barrier()
    slots = tl.arange(0, CAP)
    values = tl.load(top_ptr + slots, mask=slots < size, other=float("-inf")).to(tl.float32)
    keep = (values >= threshold) & (values > float("-inf"))  # NaN fails both
    values = tl.where(keep, values, float("-inf"))  # from here on, what is dropped reads as -inf
    kept_count = tl.sum(keep.to(tl.int32), axis=0)
    if CHUNK > 1 and kept_count >= CANDIDATES:
        # Chunks bring values below the threshold along, so the room fills faster than the
        # largest change: raise the threshold toward the CANDIDATES-th largest by bisection. It
        # moves only to a value that at least CANDIDATES kept ones reach, so dropping what is
        # below stays exact.
        low = tl.min(tl.where(keep, values, float("inf")), axis=0)
        high = tl.max(values, axis=0)
        for _ in range(BISECTIONS):
            middle = low + (high - low) * 0.5
            enough = tl.sum((values >= middle).to(tl.int32), axis=0) >= CANDIDATES
            low = tl.where(enough, middle, low)
            high = tl.where(enough, high, middle)
        threshold = tl.maximum(threshold, low)
        keep = values >= threshold
        kept_count = tl.sum(keep.to(tl.int32), axis=0)
    if kept_count <= ROOM:
        # Packed in order, a half at a time (a scan over the whole buffer holds too many
        # registers); each value moves to a slot at or before its own, so the second half is
        # still intact when it is read.
        packed = 0
        for half in tl.static_range(2):
            part = half * (CAP // 2) + tl.arange(0, CAP // 2)
            part_raw = tl.load(top_ptr + part, mask=part < size, other=float("-inf"))
            part_values = part_raw.to(tl.float32)
            part_keep = (part_values >= threshold) & (part_values > float("-inf"))
            tl.debug_barrier()
            tl.store(top_ptr + packed + tl.cumsum(part_keep.to(tl.int32), axis=0) - 1, part_raw, mask=part_keep)
            packed += tl.sum(part_keep.to(tl.int32), axis=0)
        size = kept_count
    else:
        largest = tl.topk(tl.where(keep, values, float("-inf")), KEEP)
        kept = tl.arange(0, KEEP)
        threshold = tl.max(tl.where(kept == CANDIDATES - 1, largest, float("-inf")), axis=0)
        tl.debug_barrier()
        tl.store(top_ptr + kept, largest, mask=kept < CANDIDATES)
        size = kept_count * 0 + CANDIDATES
    pad = size + tl.arange(0, CHUNK)
    tl.store(top_ptr + pad, float("-inf"), mask=pad < (size + CHUNK - 1) // CHUNK * CHUNK)
    tl.debug_barrier()
    return size + (CHUNK - 1) - (size + CHUNK - 1) % CHUNK, threshold


@triton.jit
def store_largest(top_ptr, size, CANDIDATES: tl.constexpr, CAP: tl.constexpr):
    """Write the row's ``CANDIDATES`` largest values, descending and ``-inf`` padded (NaN never
    among them), to the first slots of its buffer."""
    KEEP: tl.constexpr = triton.next_power_of_2(CANDIDATES)
    tl.debug_barrier()
    slots = tl.arange(0, CAP)
    values = tl.load(top_ptr + slots, mask=slots < size, other=float("-inf")).to(tl.float32)
    largest = tl.topk(tl.where(values == values, values, float("-inf")), KEEP)
    kept = tl.arange(0, KEEP)
    tl.debug_barrier()
    tl.store(top_ptr + kept, largest, mask=kept < CANDIDATES)
