"""KTO: unpaired preference loss with a prospect-theoretic value function (Ethayarajh et al. 2024)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .common import (
    check_reduction,
    check_same_device,
    check_same_shape,
    check_tensor,
    compute_dtype,
    real_scalar,
    reduce,
)

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
# The loss types whose reference point is the estimated KL(π ‖ π_ref); the others take 0.
KL_LOSS_TYPES = ("kto",)


def kto_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    policy_kl_logps: Optional[torch.Tensor] = None,
    ref_kl_logps: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    kl_gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    reduction: str = "mean",
):
    r"""KTO loss over ``Bd`` desirable and ``Bu`` undesirable completions, unpaired.

    With the implied rewards ``r = log π(y|x) - log π_ref(y|x)`` (per completion, summed
    log-probs) and the reference point ``z`` below, each completion's loss is, for
    ``loss_type="kto"`` (the paper's Eq. 7, ``λ_y - v(x, y)``):

    * desirable: ``λ_D (1 - σ(β (r - z)))``,
    * undesirable: ``λ_U (1 - σ(β (z - r)))``;

    for ``loss_type="apo_zero_unpaired"`` (the unpaired APO-zero of D'Oosterlinck et al. 2024),
    ``z`` is absent: ``λ_D (1 - σ(β r))`` and ``λ_U σ(β r)``. ``λ_D = desirable_weight``,
    ``λ_U = undesirable_weight``.

    ``z`` is KTO's estimate of ``KL(π ‖ π_ref)`` as TRL 1.16's ``KTOTrainer`` forms it: over
    ``M`` mismatched (prompt, completion) pairs of the batch (TRL shifts the completions by one
    within the batch), ``z = max(0, mean_j(policy_kl_logps_j - ref_kl_logps_j))``,
    detached (no gradient flows through it), averaged over processes by ``kl_gather`` first
    (``accelerator.gather_for_metrics`` in TRL: a function from the local 0-d mean to the
    gathered values; ``None`` for one process). The clamp comes after the gather.

    Inputs: summed log-probs, floating ``[Bd]`` (chosen = desirable) and ``[Bu]`` (rejected =
    undesirable) on one device, one side may be empty but not both; ``[M]``, ``M >= 1``, for the
    KL pairs, required by ``"kto"`` and refused by ``"apo_zero_unpaired"``. Computed in at
    least fp32. ``beta`` > 0 and the weights >= 0 are finite real scalars. A NaN log-prob gives a
    NaN loss (TRL's ``nanmean`` would drop that completion instead).

    Returns ``(loss, metrics)``. ``loss``: the mean (``reduction="mean"``), sum (``"sum"``) or
    the ``[Bd + Bu]`` per-completion losses, desirable first (``"none"``), as TRL concatenates
    them. ``metrics`` (detached), under TRL's names: ``kl`` (``z``; 0 without it),
    ``rewards/chosen`` and ``logps/chosen`` (the means of ``β r`` and ``log π`` over the
    desirable completions, present when ``Bd > 0``), ``rewards/rejected`` and
    ``logps/rejected`` likewise, ``rewards/margins`` (their difference, when both are present).
    """
    if not isinstance(loss_type, str) or loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}; got {loss_type!r}")
    beta = real_scalar("beta", beta, 0.0, low_open=True)
    desirable_weight = real_scalar("desirable_weight", desirable_weight, 0.0)
    undesirable_weight = real_scalar("undesirable_weight", undesirable_weight, 0.0)
    check_reduction(reduction)
    sides = dict(policy_chosen_logps=policy_chosen_logps, ref_chosen_logps=ref_chosen_logps,
                 policy_rejected_logps=policy_rejected_logps, ref_rejected_logps=ref_rejected_logps)
    for name, t in sides.items():
        check_tensor(name, t, ndim=1)
    check_same_shape(policy_chosen_logps=policy_chosen_logps, ref_chosen_logps=ref_chosen_logps)
    check_same_shape(policy_rejected_logps=policy_rejected_logps, ref_rejected_logps=ref_rejected_logps)
    check_same_device(**sides)
    if policy_chosen_logps.shape[0] + policy_rejected_logps.shape[0] == 0:
        raise ValueError("policy_chosen_logps and policy_rejected_logps are both empty: "
                         "the batch must hold at least one completion")
    dtype = compute_dtype(*sides.values())
    kl = _reference_point(loss_type, policy_kl_logps, ref_kl_logps, kl_gather, policy_chosen_logps, dtype)

    chosen_logps, rejected_logps = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    chosen_ratios = chosen_logps - ref_chosen_logps.to(dtype)
    rejected_ratios = rejected_logps - ref_rejected_logps.to(dtype)
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_ratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_ratios))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * chosen_ratios)
        rejected_losses = torch.sigmoid(beta * rejected_ratios)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))

    metrics = {"kl": kl}
    for side, ratios, logps in (("chosen", chosen_ratios, chosen_logps), ("rejected", rejected_ratios, rejected_logps)):
        if ratios.shape[0] > 0:
            metrics[f"rewards/{side}"] = (beta * ratios.detach()).mean()
            metrics[f"logps/{side}"] = logps.detach().mean()
    if chosen_ratios.shape[0] > 0 and rejected_ratios.shape[0] > 0:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return reduce(losses, reduction), metrics


def _reference_point(loss_type, policy_kl_logps, ref_kl_logps, kl_gather, like, dtype) -> torch.Tensor:
    """KTO's ``z``: the detached, gathered, clamped mean log-ratio of the KL pairs (0-d); 0 without a KL."""
    if loss_type not in KL_LOSS_TYPES:
        for name, value in (("policy_kl_logps", policy_kl_logps), ("ref_kl_logps", ref_kl_logps),
                            ("kl_gather", kl_gather)):
            if value is not None:
                raise ValueError(f"{name} must be None for loss_type {loss_type!r}, which has no KL term")
        return torch.zeros((), dtype=dtype, device=like.device)
    for name, value in (("policy_kl_logps", policy_kl_logps), ("ref_kl_logps", ref_kl_logps)):
        if value is None:
            raise ValueError(f"{name} is required for loss_type {loss_type!r}: it estimates the KL reference point")
        check_tensor(name, value, ndim=1)
    check_same_shape(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    check_same_device(policy_kl_logps=policy_kl_logps, policy_chosen_logps=like)
    if policy_kl_logps.shape[0] == 0:
        raise ValueError("policy_kl_logps must hold at least one KL pair; got shape (0,)")
    if kl_gather is not None and not callable(kl_gather):
        raise TypeError(f"kl_gather must be a callable (e.g. accelerator.gather_for_metrics); got {kl_gather!r}")
    kl = (policy_kl_logps.detach().to(dtype) - ref_kl_logps.detach().to(dtype)).mean()
    if kl_gather is not None:
        kl = kl_gather(kl).to(dtype).mean()
    return kl.clamp(min=0)
