"""``PrefOptGRPOConfig``: TRL's ``GRPOConfig`` plus the KL estimator and the sampler-matched
log-probs of :class:`~prefopt_kernels.integrations.trl_grpo.PrefOptGRPOTrainer`.

Needs ``trl`` (the ``[trl]`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

KL_ESTIMATORS = ("k3", "full")


@dataclass
class PrefOptGRPOConfig(GRPOConfig):
    r"""``GRPOConfig`` plus ``kl_estimator`` and ``sampler_matched_logprobs``.

    * ``kl_estimator``: the per-token KL term that ``beta`` weights.
      ``"k3"`` (default) is TRL's estimator on the sampled token ``y_t``,
      ``exp(r_t) - r_t - 1`` with ``r_t = log π_ref(y_t) - log π(y_t)``: the stock trainer.
      ``"full"`` is the exact ``KL(π(·|ctx_t) ‖ π_ref(·|ctx_t)) = Σ_v π(v) (log π(v) - log π_ref(v))``
      over the whole vocabulary at the trainer's temperature, with its exact gradient, from one
      :func:`~prefopt_kernels.linear_token_terms` pass over the policy's and the reference's
      last hidden states (never ``[B, T, V]`` logits). It enters the loss and the ``kl`` metric
      exactly where TRL's k3 term does (weighted by the importance ratio when
      ``use_bias_correction_kl``). It needs ``beta != 0``.
    * ``sampler_matched_logprobs``: score the policy's log-probs (the ones the importance-sampling
      correction and the clipped ratio compare) under the sampler's processed distribution: the
      ``temperature``-scaled softmax renormalised on the tokens that ``top_k``, ``top_p`` and
      ``min_p`` keep, as vLLM's ``logprobs_mode="processed_logprobs"`` reports them. Off
      (default): TRL's full tempered softmax, the stock trainer. The reference's log-probs and
      the entropy stay the full distribution's.
    """

    kl_estimator: str = field(
        default="k3",
        metadata={"help": "Per-token KL term weighted by beta: 'k3' (TRL's sampled-token estimator) or "
                          "'full' (exact KL over the whole vocabulary).",
                  "choices": list(KL_ESTIMATORS)},
    )
    sampler_matched_logprobs: bool = field(
        default=False,
        metadata={"help": "Score the policy's log-probs with the sampler's temperature, top_k, top_p and min_p."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}; got {self.kl_estimator!r}")
        if not isinstance(self.sampler_matched_logprobs, bool):
            raise TypeError(f"sampler_matched_logprobs must be a bool; got {self.sampler_matched_logprobs!r}")
        if self.kl_estimator == "full" and self.beta == 0.0:
            raise ValueError("kl_estimator='full' is the KL term that beta weights: set beta != 0")
