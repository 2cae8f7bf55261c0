"""Launch configuration of the Triton kernels, chosen from the vocabulary size.

A program streams its row in ``BLOCK_V``-wide tiles. Wider tiles mean fewer loop trips and
more bytes in flight per program; they are capped so that the lane accumulators (up to
four fp32 vectors) and two loaded tiles stay in registers. The interpreter runs tiles as
numpy arrays, where narrower tiles keep multi-tile paths exercised at test sizes.
"""

from __future__ import annotations

import os

import triton

_INTERPRETER_BLOCK = 1024


def launch_config(vocab: int, element_size: int, two_rows: bool):
    """Return ``(BLOCK_V, num_warps)`` for a row of ``vocab`` entries of ``element_size`` bytes."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return min(triton.next_power_of_2(vocab), _INTERPRETER_BLOCK), 1
    # 16-byte loads per thread: 8 lanes of a 16-bit dtype or 4 of fp32 per thread and tile.
    cap = 4096 if (two_rows or element_size == 4) else 8192
    block = min(triton.next_power_of_2(vocab), cap)
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps
