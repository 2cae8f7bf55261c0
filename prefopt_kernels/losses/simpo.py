"""SimPO: reference-free, length-normalised preference loss (Meng et al. 2024)."""

from __future__ import annotations

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


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths,
    rejected_lengths,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
):
    r"""SimPO loss over ``B`` pairs; no reference model.

    With the average log-probabilities ``a_w = log pi(y_w) / |y_w|`` and ``a_l`` likewise and
    ``z = β (a_w - a_l) - γ`` (``γ`` = ``gamma``, the target reward margin itself, not the
    ``γ/β`` ratio some code takes), the per-pair loss is
    ``-(1-ε) log σ(z) - ε log σ(-z)`` with ``ε = label_smoothing`` (0 in the paper's main runs).

    Inputs: summed log-probs ``[B]``, ``B >= 1`` (an empty batch is a ValueError), any float
    dtype, computed in at least fp32, and token counts ``[B]`` (finite, > 0). ``beta`` > 0,
    ``gamma`` and ``label_smoothing`` in [0, 0.5) are finite real scalars (Python or numpy
    numbers, 0-d tensors; not bools). Returns ``(loss, metrics)``; ``rewards/*`` are ``β a_w``
    and ``β a_l``, ``logps/*`` the summed log-probs as given.
    """
    check_per_sequence(
        "pair", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps
    )
    beta = check_positive("beta", beta)
    gamma = real_scalar("gamma", gamma)
    eps = real_scalar("label_smoothing", label_smoothing, 0.0, 0.5, high_open=True)
    check_reduction(reduction)
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    avg_w = pc / check_lengths("chosen_lengths", chosen_lengths, pc)
    avg_l = pr / check_lengths("rejected_lengths", rejected_lengths, pc)
    z = beta * (avg_w - avg_l) - gamma
    losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return reduce(losses, reduction), preference_metrics(beta * avg_w, beta * avg_l, pc, pr)
