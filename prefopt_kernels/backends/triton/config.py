"""Launch configuration of the Triton kernels, chosen from the vocabulary size.

A program streams its row in ``BLOCK_V``-wide tiles with four warps; each thread holds 32
bytes of every row it reads per tile (two 16-byte vector loads: 16 lanes of a 16-bit dtype,
8 of fp32). Four warps keep two programs per SM even at 255 registers a thread (65536
registers / (255 x 128 threads)), so a second program's loads cover the cross-warp
reductions of the first; 16 lanes a thread amortise those reductions over enough elements.
The interpreter runs tiles as numpy arrays, where narrower tiles keep multi-tile paths
exercised at test sizes.

Every row of a launch whose strides are multiples of 16 bytes sits at the offset from
alignment of the tensor's base; the kernels start each row's tiles at the aligned element before
it (``row_math.aligned_row``), so whole tiles load as aligned vectors even from a view whose base
is not aligned. Rows at different offsets (a stride that is not a multiple of 16 bytes, e.g.
GPT-2's V = 50257) are read from their own starts instead: aligning them would give a token's
elements different lanes, and so different rounding, at different positions in the batch.
"""

from __future__ import annotations

import os

import triton

_INTERPRETER_BLOCK = 1024
_NUM_WARPS = 4
_BYTES_PER_THREAD = 32
# The threads of a compiled program (``row_math.tile_pointers`` lays a tile's lanes over them).
PROGRAM_THREADS = 32 * _NUM_WARPS


def launch_config(vocab: int, element_size: int, two_rows: bool):
    """Return ``(BLOCK_V, num_warps)`` for a row of ``vocab`` entries of ``element_size`` bytes
    (``two_rows``: a reference row is read alongside; the tile is the same)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return min(triton.next_power_of_2(vocab), _INTERPRETER_BLOCK), 1
    block = 32 * _NUM_WARPS * (_BYTES_PER_THREAD // element_size)
    return min(triton.next_power_of_2(vocab), block), _NUM_WARPS


def row_alignment(block: int, *rows) -> int:
    """``ALIGN`` of a launch with tiles of ``block`` over the ``[B, T, V]`` views ``rows``
    (logits, reference, gradient): the elements per 16 bytes when every row of every view sits
    at one offset from a 16-byte boundary (one element size, bases at one offset, both strides
    multiples of it) and a tile holds that many, else 1 (each row read from its own start, as
    Triton aligns it). One offset for every row keeps a token's lane sums, and so its bits,
    independent of its position in the batch."""
    size = rows[0].element_size()
    vector = 16 // size
    if vector == 1 or block < vector or any(r.element_size() != size for r in rows):
        return 1
    if len({r.data_ptr() % 16 for r in rows}) != 1:
        return 1
    return vector if all(r.stride(0) % vector == 0 and r.stride(1) % vector == 0 for r in rows) else 1
