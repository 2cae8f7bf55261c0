"""SparsePO: preference optimisation with sparse token masks (Christopoulou et al. 2024)."""

from __future__ import annotations

from typing import Optional

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
    token_count,
    token_mask,
)


def kl_row_selector(kl_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The KL mask as the fused ops' ``div_weight`` (rows where it is 0 are not read), or None.

    Skipping a row reports ``KL_t = 0`` there, exact only for a mask that needs no gradient:
    the loss's gradient with respect to ``m_d`` is ``±c KL_t`` even where ``m_d`` is 0. A mask
    that requires grad is therefore not a selector (None: the KL of every token).
    """
    return None if kl_mask is None or kl_mask.requires_grad else kl_mask


def sparse_po_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_kl: torch.Tensor,
    rejected_kl: torch.Tensor,
    chosen_reward_mask=None,
    rejected_reward_mask=None,
    chosen_kl_mask=None,
    rejected_kl_mask=None,
    *,
    chosen_mask=None,
    rejected_mask=None,
    beta: float = 0.1,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    chosen_cu_seqlens=None,
    rejected_cu_seqlens=None,
    reduction: str = "mean",
):
    r"""SparsePO loss: token-masked rewards and token-masked KL.

    Per token ``t``: ``l_t = log π(y_t|·) - log π_ref(y_t|·)``, ``KL_t = KL(π_ref ‖ π)`` at that
    position (``pk.token_terms(..., divergence="forward_kl").div``), reward mask ``m_u`` and KL
    mask ``m_d`` (real, >= 0; learned, activation-based or fixed). Over the valid tokens
    (``chosen_mask``/``rejected_mask``), ``U(y) = Σ_t m_u l_t`` and ``D(y) = Σ_t m_d KL_t``;
    the per-pair loss (no length normalisation) is

    .. math::
        -\log σ\big(β[(U(y_w) - U(y_l)) - (D(y_l) - D(y_w))]\big)
        + λ_u (‖m_u(y_w)‖_1 + ‖m_u(y_l)‖_1) + λ_d (‖m_d(y_w)‖_1 + ‖m_d(y_l)‖_1)

    with ``λ_u = l1_reward``, ``λ_d = l1_kl`` (finite, >= 0) and the L1 norms over valid tokens.
    Gradients reach the log-ratios, the KL terms and the masks. A mask given as None is all
    ones; with unit masks the loss is TDPO1.

    Padding is the validity mask's business, not the weights': a token whose validity mask is 0
    is dropped (``torch.where``, not a product), contributing nothing even if its values or
    masks hold inf/NaN, and every input's gradient there is exactly 0 (no validity mask: every
    token is valid). At a valid token the terms ``m_u l_t`` and ``m_d KL_t`` are always formed,
    a zero mask included (so a non-finite ``l_t`` or ``KL_t`` there is not hidden), and with
    ``c = β σ(-β[(U(y_w) - U(y_l)) - (D(y_l) - D(y_w))])`` for the pair (divided by the number
    of pairs under ``reduction="mean"``)

    .. math::
        ∂L/∂m_u(y_w)_t = -c\, l_t, \quad ∂L/∂m_u(y_l)_t = c\, l_t, \quad
        ∂L/∂m_d(y_w)_t = -c\, KL_t, \quad ∂L/∂m_d(y_l)_t = c\, KL_t

    plus the L1 terms' ``λ sign(m)`` (0 at ``m = 0``, as ``abs``'s subgradient there), also where
    the mask is exactly 0. ``KL_t`` must then be the token's KL: the fused ops return 0 where
    their ``div_weight`` is 0 (the row is skipped), so pass the KL mask as ``div_weight`` only
    when it carries no gradient (detached masks, or ``no_grad``); a mask that requires grad needs
    ``KL_t`` at every valid token (``PreferenceLoss`` and ``PrefOptDPOTrainer`` do this).

    Layouts as in :func:`tdpo_loss`: padded ``[B, T]`` with ``[B, T]`` masks, or packed ``[N]``
    with ``*_cu_seqlens`` ``[B + 1]`` and ``[N]`` masks; each side's log-ratios, KL and masks
    share one shape, and ``B >= 1`` (an empty batch is a ValueError). Masks are bool, integer
    or real tensors. Any float dtype; computed in at least fp32.

    Returns ``(loss, metrics)``: ``rewards/*`` ``β U(y)``; ``kl/chosen``, ``kl/rejected``
    ``D(y)``; ``mask/density`` the fraction of valid tokens whose reward mask is > 0,
    ``mask/kl_density`` the same for the KL mask, ``mask/reward_mean`` and ``mask/kl_mean``
    the mean mask value over valid tokens.
    """
    beta = check_positive("beta", beta)
    l1_reward = real_scalar("l1_reward", l1_reward, 0.0)
    l1_kl = real_scalar("l1_kl", l1_kl, 0.0)
    check_reduction(reduction)
    cu_w, cu_l, dtype = check_token_pairs(chosen_logratios, chosen_kl, chosen_cu_seqlens,
                                          rejected_logratios, rejected_kl, rejected_cu_seqlens)

    def side(prefix, logratios, kl, reward_mask, kl_mask, valid, cu):
        lr_name = f"{prefix}_logratios"
        v = token_mask(f"{prefix}_mask", valid, logratios, lr_name, dtype)
        ones = torch.ones_like(logratios, dtype=dtype)
        m_u = token_mask(f"{prefix}_reward_mask", reward_mask, logratios, lr_name, dtype)
        m_d = token_mask(f"{prefix}_kl_mask", kl_mask, logratios, lr_name, dtype)
        u = sequence_sum(logratios.to(dtype), v, m_u, cu_seqlens=cu)
        d = sequence_sum(kl.to(dtype), v, m_d, cu_seqlens=cu)
        m_u = ones if m_u is None else m_u.to(dtype)
        m_d = ones if m_d is None else m_d.to(dtype)
        stats = {
            "l1_u": sequence_sum(m_u.abs(), v, cu_seqlens=cu),
            "l1_d": sequence_sum(m_d.abs(), v, cu_seqlens=cu),
            "nz_u": sequence_sum((m_u > 0).to(dtype), v, cu_seqlens=cu),
            "nz_d": sequence_sum((m_d > 0).to(dtype), v, cu_seqlens=cu),
            "count": token_count(ones, v, cu),
        }
        return u, d, stats

    u_w, d_w, s_w = side("chosen", chosen_logratios, chosen_kl, chosen_reward_mask, chosen_kl_mask,
                         chosen_mask, cu_w)
    u_l, d_l, s_l = side("rejected", rejected_logratios, rejected_kl, rejected_reward_mask,
                         rejected_kl_mask, rejected_mask, cu_l)
    losses = -F.logsigmoid(beta * ((u_w - u_l) - (d_l - d_w)))
    if l1_reward:
        losses = losses + l1_reward * (s_w["l1_u"] + s_l["l1_u"])
    if l1_kl:
        losses = losses + l1_kl * (s_w["l1_d"] + s_l["l1_d"])

    n_tokens = (s_w["count"].sum() + s_l["count"].sum()).clamp(min=1.0)
    metrics = preference_metrics(beta * u_w, beta * u_l, kl__chosen=d_w, kl__rejected=d_l)
    metrics["mask/density"] = ((s_w["nz_u"].sum() + s_l["nz_u"].sum()) / n_tokens).detach()
    metrics["mask/kl_density"] = ((s_w["nz_d"].sum() + s_l["nz_d"].sum()) / n_tokens).detach()
    metrics["mask/reward_mean"] = ((s_w["l1_u"].sum() + s_l["l1_u"].sum()) / n_tokens).detach()
    metrics["mask/kl_mean"] = ((s_w["l1_d"].sum() + s_l["l1_d"].sum()) / n_tokens).detach()
    return reduce(losses, reduction), metrics
