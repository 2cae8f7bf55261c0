"""The Triton kernels, one family per module over shared row math (``row_math``) and row sweeps
(``passes``); see ``row_math`` for the arithmetic, the NaN policy and the divergence codes."""

from .backward import token_backward_kernel
from .finish import finalize_kernel, finish_sweep_kernel
from .forward import token_forward_kernel
from .kept_tokens import kept_tokens_kernel
from .slices import slice_state_kernel, slice_sweep_kernel

__all__ = ["finalize_kernel", "finish_sweep_kernel", "kept_tokens_kernel", "slice_state_kernel", "slice_sweep_kernel",
           "token_backward_kernel", "token_forward_kernel"]
