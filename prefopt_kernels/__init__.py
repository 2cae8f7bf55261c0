"""Fused kernels for the token-level terms of LLM preference-optimisation losses.

Each op reads a row of logits once, keeps per-row running statistics only, and never
writes an ``[N, V]`` softmax; gradients are recomputed from the saved statistics. The
``linear_*`` ops start from hidden states and the LM head and never hold ``[N, V]`` logits.
"""

from . import losses, masks
from .divergences import DIVERGENCES
from .linear import linear_token_divergence, linear_token_logprobs, linear_token_terms
from .linear.sparse_teacher import linear_sparse_teacher_divergence
from .dispatch import available_backends, use_backend
from .ops import TokenTerms, token_divergence, token_logprobs, token_terms

__version__ = "0.1.0"

__all__ = [
    "DIVERGENCES",
    "losses",
    "masks",
    "TokenTerms",
    "available_backends",
    "linear_sparse_teacher_divergence",
    "linear_token_divergence",
    "linear_token_logprobs",
    "linear_token_terms",
    "token_divergence",
    "token_logprobs",
    "token_terms",
    "use_backend",
]
