"""CPO: contrastive preference optimisation, reference-free (Xu et al. 2024), and its SimPO variant."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .common import (
    check_lengths,
    check_per_sequence,
    check_positive,
    check_reduction,
    compute_dtype,
    preference_metrics,
    real_scalar,
    reduce,
)
from .orpo import check_chosen_nll, chosen_token_nll

CPO_VARIANTS = ("sigmoid", "hinge", "ipo", "simpo")
# The variants whose rewards are length-averaged log-probs (TRL's average_log_prob).
_AVERAGED = frozenset({"ipo", "simpo"})


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths,
    rejected_lengths,
    *,
    beta: float = 0.1,
    variant: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    chosen_nll: Optional[torch.Tensor] = None,
    reduction: str = "mean",
):
    r"""CPO loss over ``B`` pairs (TRL 1.16's ``CPOTrainer``); no reference model.

    ``r_w = log π(y_w)`` (summed) for ``variant`` ``"sigmoid"``/``"hinge"``, the length average
    ``log π(y_w) / |y_w|`` for ``"ipo"``/``"simpo"``; ``r_l`` likewise; ``u = r_w - r_l``,
    ``ε = label_smoothing``, ``γ = simpo_gamma``, ``α = cpo_alpha``. The preference term per pair:

    ======== ==================================================================
    sigmoid  ``-(1-ε) log σ(βu) - ε log σ(-βu)`` (the CPO paper's eq. 3 at ε = 0)
    hinge    ``relu(1 - βu)``
    ipo      ``(u - 1/(2β))²``
    simpo    ``-(1-ε) log σ(βu - γ) - ε log σ(-(βu - γ))`` (CPO-SimPO)
    ======== ==================================================================

    plus ``α NLL_w``, the batch's chosen negative log-likelihood: ``chosen_nll`` if given (a 0-d
    tensor), else :func:`~prefopt_kernels.losses.orpo.chosen_token_nll` of the completions
    (TRL's token mean over the chosen completions), the same for every pair; ``α = 0`` drops it.

    Inputs: summed log-probs ``[B]`` (``B >= 1``, any float dtype, computed in at least fp32)
    and token counts ``[B]`` (finite, > 0). ``beta`` > 0, ``label_smoothing`` in [0, 1],
    ``cpo_alpha`` >= 0, ``simpo_gamma`` finite (``"simpo"`` only). TRL's AlphaPO reward
    transform (``CPOConfig.alpha``) is not offered. Returns ``(loss, metrics)`` with TRL's names:
    ``rewards/*`` ``β r``, ``logps/*`` the ``r`` used, ``nll_loss``.
    """
    check_per_sequence(
        "pair", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps
    )
    beta = check_positive("beta", beta)
    if not isinstance(variant, str) or variant not in CPO_VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; expected one of {CPO_VARIANTS}")
    eps = real_scalar("label_smoothing", label_smoothing, 0.0, 1.0)
    gamma = real_scalar("simpo_gamma", simpo_gamma)
    alpha = real_scalar("cpo_alpha", cpo_alpha, 0.0)
    check_reduction(reduction)
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    len_w = check_lengths("chosen_lengths", chosen_lengths, pc)
    len_l = check_lengths("rejected_lengths", rejected_lengths, pc)
    r_w, r_l = (pc / len_w, pr / len_l) if variant in _AVERAGED else (pc, pr)
    z = beta * (r_w - r_l)
    if variant == "hinge":
        losses = torch.relu(1.0 - z)
    elif variant == "ipo":
        losses = (r_w - r_l - 1.0 / (2.0 * beta)) ** 2
    else:
        z = z - gamma if variant == "simpo" else z
        losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if alpha == 0.0:
        nll = torch.zeros((), dtype=dtype, device=pc.device)
    else:
        nll = chosen_token_nll(pc, len_w) if chosen_nll is None else check_chosen_nll(chosen_nll, pc).to(dtype)
        losses = losses + alpha * nll
    metrics = preference_metrics(beta * r_w, beta * r_l, r_w, r_l, nll_loss=nll)
    return reduce(losses, reduction), metrics
