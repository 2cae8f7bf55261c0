"""``PrefOptDistillationConfig``: TRL's ``DistillationConfig`` plus the choice among this package's
divergences, and the mapping of TRL's ``beta`` onto them.

Needs ``trl`` (the ``[trl]`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from trl import DistillationConfig

from ..divergences import DIVERGENCES, resolve


def trl_beta_divergence(beta: float) -> Tuple[str, float]:
    """``(divergence, beta)`` of this package for TRL's distillation ``beta``, student as policy ``p``.

    TRL's loss is ``KL(p_t || p_s)`` at ``beta = 0`` (our ``forward_kl``: ``KL(q || p)`` with
    the teacher as the reference ``q``), ``KL(p_s || p_t)`` at ``beta = 1`` (``reverse_kl``),
    and otherwise ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with
    ``m = (1 - beta) p_s + beta p_t``, which is our ``js`` at the same ``beta``.
    """
    if beta == 0.0:
        return "forward_kl", 0.5
    if beta == 1.0:
        return "reverse_kl", 0.5
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in [0, 1]; got {beta!r}")
    return "js", beta


@dataclass
class PrefOptDistillationConfig(DistillationConfig):
    r"""``DistillationConfig`` plus ``divergence`` and ``divergence_alpha``.

    ``divergence=None`` (the default) keeps TRL's semantics of ``beta`` exactly
    (:func:`trl_beta_divergence`). Otherwise the loss is the per-token
    ``D_f(p_student, p_teacher)`` of :func:`prefopt_kernels.token_divergence`, the teacher as
    the reference: ``forward_kl`` (``KL(p_t || p_s)``), ``reverse_kl`` (``KL(p_s || p_t)``),
    ``js`` (with ``beta`` as its ``β``, in ``(0, 1)``), ``tv``, ``hellinger``, ``chi2`` or
    ``alpha`` (with ``divergence_alpha`` as its ``α``, neither 0 nor 1). The loss is the sum
    over completion tokens divided by their count, as TRL's.
    """

    divergence: Optional[str] = field(
        default=None,
        metadata={"help": "None: TRL's beta semantics. Else one of " + ", ".join(DIVERGENCES) + ".",
                  "choices": [None, *DIVERGENCES]},
    )
    divergence_alpha: float = field(default=0.5, metadata={"help": "alpha of the 'alpha' divergence."})

    def __post_init__(self):
        super().__post_init__()
        self.loss_divergence()

    def loss_divergence(self) -> Tuple[str, float, float]:
        """``(divergence, beta, alpha)`` the trainer passes to the fused op; raises naming the field."""
        if self.divergence is None:
            name, beta = trl_beta_divergence(self.beta)
            return name, beta, self.divergence_alpha
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be None or one of {', '.join(DIVERGENCES)}; got {self.divergence!r}")
        try:
            _, beta, alpha = resolve(self.divergence, self.beta, self.divergence_alpha)
        except ValueError as error:
            raise ValueError(str(error).replace("alpha must", "divergence_alpha must", 1)) from None
        return self.divergence, beta, alpha
