"""f-DPG: distributional policy gradients for any f-divergence (Go et al. 2023, arXiv 2302.08215)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .common import check_per_sequence, real_scalar

FDPG_DIVERGENCES = ("forward_kl", "reverse_kl", "js", "tv", "chi2")


class FDPGState:
    """Running estimates of f-DPG, kept across steps (one instance per context/target).

    * ``log_z``: log of the importance-sampling estimate of the target's partition function,
      ``Z ≈ (1/n) Σ_x P(x)/q(x)`` over every sample ``x ~ q`` seen so far, accumulated in log
      space (``log Σ`` by logsumexp), so huge or tiny scores neither overflow nor underflow.
    * ``baseline``: exponential moving average (weight ``baseline_decay`` in [0, 1) on the old
      value) of the batch mean of ``w·R``, an estimate of ``E_π[R]``; it starts at the first
      batch's mean.
    * ``skipped``: the number of batches left out of both estimates because a batch statistic
      was not finite — ``log Σ_x P(x)/q(x)`` NaN or +inf, or ``mean(w·R)`` NaN or ±inf. Such a
      batch changes neither ``log_z`` nor ``baseline`` (nor the sample count), much as
      GradScaler skips a step with non-finite gradients: one bad batch would otherwise poison
      the estimates for the rest of training. Its own loss is still returned.
      Samples with ``P(x) = 0`` (``log P = -inf``) are legal and count towards ``Z``.

    Host-side Python floats; ``state_dict()``/``load_state_dict()`` checkpoint them.
    """

    def __init__(self, baseline_decay: float = 0.99, use_baseline: bool = True):
        self.baseline_decay = real_scalar("baseline_decay", baseline_decay, 0.0, 1.0, high_open=True)
        self.use_baseline = bool(use_baseline)
        self.log_sum = -math.inf
        self.count = 0
        self.baseline: Optional[float] = None
        self.skipped = 0

    @property
    def log_z(self) -> float:
        if self.count == 0:
            raise RuntimeError("FDPGState.log_z is undefined before the first update")
        return self.log_sum - math.log(self.count)

    def _log_sum_with(self, log_importance: torch.Tensor) -> float:
        """``log Σ`` with this batch's ``log P - log q`` folded in; the state is unchanged."""
        batch = torch.logsumexp(log_importance.detach().double(), dim=0)
        # logaddexp keeps -inf + -inf at -inf and propagates NaN/+inf for _commit to see.
        return float(torch.logaddexp(batch, batch.new_tensor(self.log_sum)))

    def _commit(self, log_sum: float, n: int, batch_mean: float) -> None:
        """Adopt a batch's statistics, or count it in ``skipped`` if one is not finite."""
        if math.isnan(log_sum) or log_sum == math.inf or not math.isfinite(batch_mean):
            self.skipped += 1
            return
        self.log_sum, self.count = log_sum, self.count + n
        if not self.use_baseline:
            return
        if self.baseline is None:
            self.baseline = batch_mean
        else:
            self.baseline = self.baseline_decay * self.baseline + (1.0 - self.baseline_decay) * batch_mean

    def state_dict(self) -> dict:
        return {"log_sum": self.log_sum, "count": self.count, "baseline": self.baseline,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.log_sum, self.count = float(state["log_sum"]), int(state["count"])
        self.baseline = state["baseline"]
        # Checkpoints written before ``skipped`` existed lack the key.
        self.skipped = int(state.get("skipped", 0))


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
    All floating, one shape and device, ``B >= 1`` (an empty batch is a ValueError).

    Steps: ``Z`` is estimated with this batch's ``log P - log q`` folded in,
    ``log p = log P - log Z``, ``log t = log π_θ - log p``, ``R = -f'(t)``
    (:func:`fdpg_pseudo_rewards`), ``w = π_θ/q`` and

    .. math:: \mathcal{L} = -\frac1B \sum_x \mathrm{sg}[w]\,\mathrm{sg}[R - B_{\rm base}]\,\log π_θ(x)

    with ``B_base`` the state's moving-average baseline from before this batch (the first
    batch uses its own mean), which keeps the gradient estimate unbiased: ``E_q[w ∇ log π_θ] = 0``.
    The state then adopts this batch's partition sum and ``mean(w R)`` — unless either is not
    finite: then the state is left as it was and ``state.skipped`` counts the batch (see
    :class:`FDPGState`); the loss is still returned, computed from the bad batch, for the
    trainer to skip. Everything but ``log π_θ`` in the product is detached. Computed in at
    least fp32 (partition in fp64).

    Returns ``(loss, metrics)`` with ``fdpg/log_z``, ``fdpg/baseline``, ``fdpg/pseudo_reward``
    (mean R), ``fdpg/importance_weight`` (mean w), ``fdpg/log_ratio`` (mean ``log t``) and
    ``fdpg/skipped`` (the state's count of skipped batches).
    """
    if not isinstance(divergence, str) or divergence not in FDPG_DIVERGENCES:
        raise ValueError(f"divergence {divergence!r} is unknown; expected one of {FDPG_DIVERGENCES}")
    if not isinstance(state, FDPGState):
        raise TypeError(f"state must be an FDPGState, got {type(state).__name__}")
    tensors = {"policy_logps": policy_logps, "target_log_scores": target_log_scores}
    if proposal_logps is not None:
        tensors["proposal_logps"] = proposal_logps
    check_per_sequence("sample", **tensors)

    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    logp_pi = policy_logps.to(dtype)
    with torch.no_grad():
        log_target = target_log_scores.to(dtype)
        log_q = logp_pi.detach() if proposal_logps is None else proposal_logps.to(dtype)
        log_sum = state._log_sum_with(log_target - log_q)
        log_z = log_sum - math.log(state.count + log_target.numel())
        log_t = logp_pi - (log_target - log_z)
        rewards = fdpg_pseudo_rewards(log_t, divergence)
        w = torch.exp(logp_pi - log_q)
        batch_mean = float((w * rewards).mean())
        if state.use_baseline:
            base = batch_mean if state.baseline is None else state.baseline
        else:
            base = 0.0
        state._commit(log_sum, log_target.numel(), batch_mean)
        advantage = w * (rewards - base)
    loss = -(advantage * logp_pi).mean()
    metrics = {
        "fdpg/log_z": torch.tensor(log_z, dtype=torch.float64),
        "fdpg/baseline": torch.tensor(base, dtype=torch.float64),
        "fdpg/pseudo_reward": rewards.mean(),
        "fdpg/importance_weight": w.mean(),
        "fdpg/log_ratio": log_t.mean(),
        "fdpg/skipped": torch.tensor(float(state.skipped), dtype=torch.float64),
    }
    return loss, metrics
