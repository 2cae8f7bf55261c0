"""TDPO: token-level direct preference optimisation (Zeng et al. 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    check_pair_count,
    check_positive,
    check_reduction,
    compute_dtype,
    masked_sequence_sum,
    preference_metrics,
    reduce,
)


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

    Layouts: padded ``[B, T]`` tensors with ``[B, T]`` 0/1 (or bool) masks (None = all valid),
    or packed ``[N]`` tensors with ``chosen_cu_seqlens``/``rejected_cu_seqlens`` ``[B + 1]`` and
    optional ``[N]`` masks. Chosen and rejected may have different ``T``/``N`` but the same
    number of sequences. Any float dtype, computed in at least fp32. A sequence with no valid
    token contributes 0 to its sums.

    Returns ``(loss, metrics)``: ``rewards/*`` are ``β Σ_t l_t``, plus ``kl/chosen``,
    ``kl/rejected`` (``D(y)``). There are no ``logps/*`` here: the log-probs themselves are not
    an input (``PreferenceLoss`` adds them).
    """
    beta = check_positive("beta", beta)
    if variant not in (1, 2):
        raise ValueError(f"variant must be 1 or 2, got {variant!r}")
    if variant == 2:
        alpha = check_positive("alpha", alpha)
    check_reduction(reduction)
    dtype = compute_dtype(chosen_logratios, rejected_logratios, chosen_kl, rejected_kl)
    sum_w = masked_sequence_sum(chosen_logratios, "chosen_logratios", {"chosen_mask": chosen_mask}, chosen_cu_seqlens, dtype)
    sum_l = masked_sequence_sum(rejected_logratios, "rejected_logratios", {"rejected_mask": rejected_mask}, rejected_cu_seqlens, dtype)
    kl_w = masked_sequence_sum(chosen_kl, "chosen_kl", {"chosen_mask": chosen_mask}, chosen_cu_seqlens, dtype)
    kl_l = masked_sequence_sum(rejected_kl, "rejected_kl", {"rejected_mask": rejected_mask}, rejected_cu_seqlens, dtype)
    check_pair_count(sum_w, sum_l)
    u = sum_w - sum_l
    if variant == 1:
        logits = u - (kl_l - kl_w)
    else:
        logits = u - alpha * (kl_l - kl_w.detach())
    losses = -F.logsigmoid(beta * logits)
    metrics = preference_metrics(beta * sum_w, beta * sum_l, kl__chosen=kl_w, kl__rejected=kl_l)
    return reduce(losses, reduction), metrics
