"""TDPO: token-level direct preference optimisation (Zeng et al. 2024)."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .common import (
    check_positive,
    check_reduction,
    check_token_pairs,
    preference_metrics,
    real_scalar,
    reduce,
    sequence_sum,
    token_mask,
)

TDPO_VARIANTS = (1, 2)


def tdpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_kl: torch.Tensor,
    rejected_kl: torch.Tensor,
    chosen_mask=None,
    rejected_mask=None,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: int = 1,
    chosen_cu_seqlens=None,
    rejected_cu_seqlens=None,
    reduction: str = "mean",
):
    r"""TDPO loss from per-token log-ratios and per-token KL.

    Per token ``t`` of a response: ``l_t = log π(y_t|·) - log π_ref(y_t|·)`` and
    ``KL_t = KL(π_ref(·|ctx_t) ‖ π(·|ctx_t))`` (``pk.token_terms(..., divergence="forward_kl").div``).
    With the sequential KL ``D(y) = Σ_t KL_t`` and ``u = Σ_t l_t(y_w) - Σ_t l_t(y_l)``:

    * TDPO1 (``variant=1``): ``-log σ(β (u - (D(y_l) - D(y_w))))``
    * TDPO2 (``variant=2``): ``-log σ(β (u - α (D(y_l) - sg[D(y_w)])))``, ``sg`` = stop-gradient.

    ``variant`` is the int 1 or 2 (a bool is rejected); ``beta`` is a finite real scalar > 0
    and ``alpha`` one >= 0 (Python or numpy numbers, 0-d tensors; ``alpha = 0`` drops TDPO2's
    KL margin).

    Layouts: padded ``[B, T]`` tensors with ``[B, T]`` 0/1 (or bool) masks (None = all valid),
    or packed ``[N]`` tensors with ``chosen_cu_seqlens``/``rejected_cu_seqlens`` ``[B + 1]``
    (int, from 0, non-decreasing, ending at ``N``) and optional ``[N]`` masks. A side's
    log-ratios, KL and mask share one shape; chosen and rejected may have different ``T``/``N``
    but the same number of sequences, ``B >= 1`` (an empty batch is a ValueError). Any float
    dtype, computed in at least fp32. A token whose mask is 0 contributes nothing, even if its
    values are inf/NaN (padding), and gets a gradient of exactly 0; a sequence with no valid
    token contributes 0 to its sums.

    Returns ``(loss, metrics)``: ``rewards/*`` are ``β Σ_t l_t``, plus ``kl/chosen``,
    ``kl/rejected`` (``D(y)``). There are no ``logps/*`` here: the log-probs themselves are not
    an input (``PreferenceLoss`` adds them).
    """
    beta = check_positive("beta", beta)
    # bool is an int subclass: True would silently select TDPO1.
    if isinstance(variant, bool) or not isinstance(variant, numbers.Integral) or variant not in TDPO_VARIANTS:
        raise ValueError(f"variant must be the int 1 (TDPO1) or 2 (TDPO2), got {variant!r}")
    alpha = real_scalar("alpha", alpha, 0.0)
    check_reduction(reduction)
    cu_w, cu_l, dtype = check_token_pairs(chosen_logratios, chosen_kl, chosen_cu_seqlens,
                                          rejected_logratios, rejected_kl, rejected_cu_seqlens)
    m_w = token_mask("chosen_mask", chosen_mask, chosen_logratios, "chosen_logratios", dtype)
    m_l = token_mask("rejected_mask", rejected_mask, rejected_logratios, "rejected_logratios", dtype)
    sum_w = sequence_sum(chosen_logratios.to(dtype), m_w, cu_seqlens=cu_w)
    sum_l = sequence_sum(rejected_logratios.to(dtype), m_l, cu_seqlens=cu_l)
    kl_w = sequence_sum(chosen_kl.to(dtype), m_w, cu_seqlens=cu_w)
    kl_l = sequence_sum(rejected_kl.to(dtype), m_l, cu_seqlens=cu_l)
    u = sum_w - sum_l
    if variant == 1:
        logits = u - (kl_l - kl_w)
    else:
        logits = u - alpha * (kl_l - kl_w.detach())
    losses = -F.logsigmoid(beta * logits)
    metrics = preference_metrics(beta * sum_w, beta * sum_l, kl__chosen=kl_w, kl__rejected=kl_l)
    return reduce(losses, reduction), metrics
