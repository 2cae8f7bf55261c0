"""Launch configuration of the Triton kernels, chosen from the vocabulary size.

A program streams its row in ``BLOCK_V``-wide tiles with four warps; each thread holds 32
bytes of every row it reads per tile (two 16-byte vector loads: 16 lanes of a 16-bit dtype,
8 of fp32). Four warps keep two programs per SM even at 255 registers a thread (65536
registers / (255 x 128 threads)), so a second program's loads cover the cross-warp
reductions of the first; 16 lanes a thread amortise those reductions over enough elements.
The interpreter runs tiles as numpy arrays, where narrower tiles keep multi-tile paths
exercised at test sizes.
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
