"""INPO: iterative Nash policy optimisation (Zhang et al. 2024, arXiv 2407.00617)."""

from __future__ import annotations

import torch

from .common import (
    check_per_sequence,
    check_positive,
    check_reduction,
    compute_dtype,
    preference_metrics,
    real_scalar,
    reduce,
)


def inpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    prev_chosen_logps: torch.Tensor,
    prev_rejected_logps: torch.Tensor,
    *,
    eta: float,
    tau: float,
    reduction: str = "mean",
):
    r"""INPO loss of iteration ``t`` over ``B`` pairs ``y_w ≻ y_l``.

    .. math::
        h = \log\frac{\pi(y_w)}{\pi(y_l)} - \eta\tau \log\frac{\pi_{ref}(y_w)}{\pi_{ref}(y_l)}
            - (1 - \eta\tau) \log\frac{\pi_t(y_w)}{\pi_t(y_l)},\qquad
        \ell = (h - \eta/2)^2

    ``π`` the policy being trained, ``π_ref`` the reference, ``π_t`` the previous iterate (the
    policy that generated this iteration's pairs); ``eta`` (η > 0) is the online-mirror-descent
    step size and ``tau`` (τ >= 0) the KL-regularisation strength, with ητ <= 1.

    Mapping to the common code form ``(h - 1/(2β))²``: it is this loss with ``β = 1/η``
    (``1/(2β) = η/2``) and the mixing ratio ``ητ`` applied to the reference term. With
    ``ητ = 1`` the previous iterate drops out and the loss is IPO's ``(Δ - 1/(2β))²`` on summed
    log-ratios, ``β = 1/η``.

    Inputs: six per-sequence summed log-probs ``[B]``, ``B >= 1`` (an empty batch is a
    ValueError), one shape and device, any float dtype, computed in at least fp32. ``eta`` and
    ``tau`` are finite real scalars (Python or numpy numbers, 0-d tensors; not bools). Returns ``(loss, metrics)``; ``rewards/*`` are the log-ratios to the reference,
    ``log π(y) - log π_ref(y)``, ``logps/*`` the policy's.
    """
    names = (
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "prev_chosen_logps",
        "prev_rejected_logps",
    )
    inputs = (
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        prev_chosen_logps,
        prev_rejected_logps,
    )
    check_per_sequence("pair", **dict(zip(names, inputs)))
    eta = check_positive("eta", eta)
    tau = real_scalar("tau", tau, 0.0)
    if not eta * tau <= 1.0:
        raise ValueError(f"tau must satisfy 0 <= eta * tau <= 1, got eta={eta}, tau={tau}")
    check_reduction(reduction)
    dtype = compute_dtype(*inputs)
    pc, pr, rc, rr, tc, tr = (t.to(dtype) for t in inputs)
    mix = eta * tau
    h = (pc - pr) - mix * (rc - rr) - (1.0 - mix) * (tc - tr)
    losses = (h - eta / 2.0) ** 2
    return reduce(losses, reduction), preference_metrics(pc - rc, pr - rr, pc, pr)
