"""f-DPG: distributional policy gradients for any f-divergence (Go et al. 2023, arXiv 2302.08215)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import check_same_shape, check_tensor

FDPG_DIVERGENCES = ("forward_kl", "reverse_kl", "js", "tv", "chi2")


class FDPGState:
    """Running estimates of f-DPG, kept across steps (one instance per context/target).

    * ``log_z``: log of the importance-sampling estimate of the target's partition function,
      ``Z ≈ (1/n) Σ_x P(x)/q(x)`` over every sample ``x ~ q`` seen so far, accumulated in log
      space (``log Σ`` by logsumexp), so huge or tiny scores neither overflow nor underflow.
    * ``baseline``: exponential moving average (weight ``baseline_decay`` on the old value) of
      the batch mean of ``w·R``, an estimate of ``E_π[R]``; it starts at the first batch's mean.

    Host-side Python floats; ``state_dict()``/``load_state_dict()`` checkpoint them.
    """

    def __init__(self, baseline_decay: float = 0.99, use_baseline: bool = True):
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
        self.baseline_decay = float(baseline_decay)
        self.use_baseline = bool(use_baseline)
        self.log_sum = -math.inf
        self.count = 0
        self.baseline: Optional[float] = None

    @property
    def log_z(self) -> float:
        if self.count == 0:
            raise RuntimeError("FDPGState.log_z is undefined before the first update")
        return self.log_sum - math.log(self.count)

    def update_partition(self, log_importance: torch.Tensor) -> float:
        """Fold ``log P(x) - log q(x)`` of a batch of samples into ``log_z``; returns it."""
        batch = float(torch.logsumexp(log_importance.detach().double(), dim=0))
        hi = max(self.log_sum, batch)
        if hi != -math.inf:
            self.log_sum = hi + math.log(math.exp(self.log_sum - hi) + math.exp(batch - hi))
        self.count += log_importance.numel()
        return self.log_z

    def update_baseline(self, batch_mean: float) -> None:
        if self.baseline is None:
            self.baseline = batch_mean
        else:
            self.baseline = self.baseline_decay * self.baseline + (1.0 - self.baseline_decay) * batch_mean

    def state_dict(self) -> dict:
        return {"log_sum": self.log_sum, "count": self.count, "baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        self.log_sum, self.count = float(state["log_sum"]), int(state["count"])
        self.baseline = state["baseline"]


def fdpg_pseudo_rewards(log_t: torch.Tensor, divergence: str) -> torch.Tensor:
    r"""Pseudo-reward ``R = -f'(t)`` at ``t = π_θ(x)/p(x)``, from ``log t``.

    ``D_f(π_θ ‖ p) = E_p[f(π_θ/p)]`` and ``∇_θ D_f = E_{π_θ}[f'(π_θ/p) ∇_θ log π_θ]``, so f-DPG
    ascends ``E[R ∇ log π_θ]``. Generators (``p`` the normalised target):

    ============ ================================ =============================
    forward_kl   KL(p ‖ π_θ), f = -log t          R = 1/t = p/π_θ (DPG)
    reverse_kl   KL(π_θ ‖ p), f = t log t         R = -log t - 1
    js           f = t log(2t/(1+t)) + log(2/(1+t)) (twice Jensen-Shannon)
                                                  R = log(1 + 1/t) - log 2 = softplus(-log t) - log 2
    tv           f = ½|t - 1|                     R = -½ sign(t - 1)
    chi2         Pearson χ²(π_θ ‖ p), f = (t-1)²   R = -2(t - 1)
    ============ ================================ =============================
    """
    if divergence == "forward_kl":
        return torch.exp(-log_t)
    if divergence == "reverse_kl":
        return -log_t - 1.0
    if divergence == "js":
        return F.softplus(-log_t) - math.log(2.0)
    if divergence == "tv":
        return -0.5 * torch.sign(log_t)
    if divergence == "chi2":
        return -2.0 * torch.expm1(log_t)
    raise ValueError(f"divergence {divergence!r} is unknown; expected one of {FDPG_DIVERGENCES}")


def fdpg_loss(
    policy_logps: torch.Tensor,
    target_log_scores: torch.Tensor,
    *,
    divergence: str = "js",
    proposal_logps: Optional[torch.Tensor] = None,
    state: FDPGState,
):
    r"""f-DPG surrogate loss on ``B`` samples ``x ~ q`` for one target ``P``.

    ``policy_logps`` ``[B]``: ``log π_θ(x)`` (sequence sums, with gradient).
    ``target_log_scores`` ``[B]``: ``log P(x)`` of the unnormalised target (e.g.
    ``log a(x) + r(x)/β`` for the RLHF target ``p ∝ a·exp(r/β)``).
    ``proposal_logps`` ``[B]``: ``log q(x)`` of the sampling policy; None means on-policy
    (``q = π_θ``, detached).

    Steps: ``Z`` is updated with this batch (``state.update_partition(log P - log q)``),
    ``log p = log P - log Z``, ``log t = log π_θ - log p``, ``R = -f'(t)``
    (:func:`fdpg_pseudo_rewards`), ``w = π_θ/q`` and

    .. math:: \mathcal{L} = -\frac1B \sum_x \mathrm{sg}[w]\,\mathrm{sg}[R - B_{\rm base}]\,\log π_θ(x)

    with ``B_base`` the state's moving-average baseline from before this batch (the first
    batch uses its own mean), which keeps the gradient estimate unbiased: ``E_q[w ∇ log π_θ] = 0``.
    The state is then updated with ``mean(w R)``. Everything but ``log π_θ`` in the product is
    detached. Computed in at least fp32 (partition in fp64).

    Returns ``(loss, metrics)`` with ``fdpg/log_z``, ``fdpg/baseline``, ``fdpg/pseudo_reward``
    (mean R), ``fdpg/importance_weight`` (mean w) and ``fdpg/log_ratio`` (mean ``log t``).
    """
    if divergence not in FDPG_DIVERGENCES:
        raise ValueError(f"divergence {divergence!r} is unknown; expected one of {FDPG_DIVERGENCES}")
    if not isinstance(state, FDPGState):
        raise TypeError(f"state must be an FDPGState, got {type(state).__name__}")
    check_tensor("policy_logps", policy_logps, ndim=1)
    check_tensor("target_log_scores", target_log_scores, ndim=1)
    check_same_shape(policy_logps=policy_logps, target_log_scores=target_log_scores)
    if proposal_logps is not None:
        check_tensor("proposal_logps", proposal_logps, ndim=1)
        check_same_shape(policy_logps=policy_logps, proposal_logps=proposal_logps)
    if policy_logps.numel() == 0:
        raise ValueError("policy_logps must hold at least one sample")

    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    logp_pi = policy_logps.to(dtype)
    with torch.no_grad():
        log_target = target_log_scores.to(dtype)
        log_q = logp_pi.detach() if proposal_logps is None else proposal_logps.to(dtype)
        log_z = state.update_partition(log_target - log_q)
        log_t = logp_pi - (log_target - log_z)
        rewards = fdpg_pseudo_rewards(log_t, divergence)
        w = torch.exp(logp_pi - log_q)
        batch_mean = float((w * rewards).mean())
        if state.use_baseline:
            base = batch_mean if state.baseline is None else state.baseline
            state.update_baseline(batch_mean)
        else:
            base = 0.0
        advantage = w * (rewards - base)
    loss = -(advantage * logp_pi).mean()
    metrics = {
        "fdpg/log_z": torch.tensor(log_z, dtype=torch.float64),
        "fdpg/baseline": torch.tensor(base, dtype=torch.float64),
        "fdpg/pseudo_reward": rewards.mean(),
        "fdpg/importance_weight": w.mean(),
        "fdpg/log_ratio": log_t.mean(),
    }
    return loss, metrics
