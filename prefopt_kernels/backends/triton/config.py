"""Launch configuration of the Triton kernels, chosen from the vocabulary size.

A program streams its row in ``BLOCK_V``-wide tiles with four warps; each thread holds 32
bytes of every row it reads per tile (two 16-byte vector loads: 16 lanes of a 16-bit dtype,
8 of fp32). Four warps keep two programs per SM even at 255 registers a thread (65536
registers / (255 x 128 threads)), so a second program's loads cover the cross-warp
reductions of the first; 16 lanes a thread amortise those reductions over enough elements.
The interpreter runs tiles as numpy arrays, where narrower tiles keep multi-tile paths
exercised at test sizes.

Rows whose starts are not 16-byte aligned (a vocabulary or stride that is not a multiple of 8
16-bit or 4 fp32 elements, e.g. GPT-2's V = 50257) are still read as aligned vectors: the kernels
start each row's tiles at the aligned element before it (``row_math.aligned_row``), which needs
every row a program reads or writes to sit at the same offset from alignment.
"""

from __future__ import annotations

import os

import triton

_INTERPRETER_BLOCK = 1024
_NUM_WARPS = 4
_BYTES_PER_THREAD = 32


def launch_config(vocab: int, element_size: int, two_rows: bool):
    """Return ``(BLOCK_V, num_warps)`` for a row of ``vocab`` entries of ``element_size`` bytes
    (``two_rows``: a reference row is read alongside; the tile is the same)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return min(triton.next_power_of_2(vocab), _INTERPRETER_BLOCK), 1
    block = 32 * _NUM_WARPS * (_BYTES_PER_THREAD // element_size)
    return min(triton.next_power_of_2(vocab), block), _NUM_WARPS


def row_alignment(block: int, *rows) -> int:
    """``ALIGN`` of a launch with tiles of ``block`` over the ``[B, T, V]`` views ``rows``
    (logits, reference, gradient): the elements per 16 bytes when every row of every view
    starts at the same offset from a 16-byte boundary as the same row of the others (aligned
    bases, strides congruent modulo it, one element size) and a tile holds that many, else 1
    (each row read from its own start, as Triton aligns it)."""
    size = rows[0].element_size()
    vector = 16 // size
    if vector == 1 or block < vector or any(r.element_size() != size or r.data_ptr() % 16 for r in rows):
        return 1
    strides = {(r.stride(0) % vector, r.stride(1) % vector) for r in rows}
    return vector if len(strides) == 1 else 1
