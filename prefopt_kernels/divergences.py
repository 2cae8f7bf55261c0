r"""The divergences every backend implements, as f-divergences of the policy from the reference.

With policy ``p = softmax(a / T)``, reference ``q = softmax(b / T)`` and the ratio
``t_i = p_i / q_i``, a divergence is ``D_f(p, q) = sum_i q_i f(t_i)`` and its gradient with
respect to the policy logits is, for every f,

    dD_f / da_j = p_j (f'(t_j) - S) / T,        S = sum_i p_i f'(t_i).

=============  ==========================================  =================================
name           D                                           f(t)
=============  ==========================================  =================================
forward_kl     KL(q || p), mass-covering (TDPO, SparsePO)  -log t
reverse_kl     KL(p || q), mode-seeking (RLHF penalty)      t log t
js (beta)      beta KL(q || m) + (1 - beta) KL(p || m),     see ``js_terms``
               m = beta q + (1 - beta) p
tv             1/2 sum |p - q|                              1/2 |t - 1|
hellinger      sum (sqrt p - sqrt q)^2                      (sqrt t - 1)^2
chi2           sum (p - q)^2 / q (Pearson)                  (t - 1)^2
alpha (alpha)  Amari alpha-divergence                       (t^a - a t - (1 - a)) / (a (a - 1))
=============  ==========================================  =================================

Every term is evaluated in log space from ``lp = log p_i`` and ``lq = log q_i`` with
``0 log 0 = 0``, so ``-inf`` logits (masked vocabulary entries) are legal. The functions
here are the float64 PyTorch form used by the reference backend; the Triton and native
kernels implement the same formulas.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch

from .backends import DIVERGENCE_CODES

DIVERGENCES: Tuple[str, ...] = tuple(DIVERGENCE_CODES)


def resolve(divergence: str, beta: float, alpha: float) -> int:
    """Validate a divergence name and its parameters; return its integer code.

    Raises ``ValueError`` naming the argument for an unknown name, ``beta`` outside (0, 1)
    (js) or ``alpha`` in {0, 1} or not finite (alpha).
    """
    if not isinstance(divergence, str) or divergence not in DIVERGENCE_CODES:
        raise ValueError(
            f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}"
        )
    if divergence == "js" and not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise ValueError(f"beta must lie strictly between 0 and 1 for 'js'; got {beta!r}")
    if divergence == "alpha":
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)) or alpha in (0.0, 1.0):
            raise ValueError(
                f"alpha must be a finite number other than 0 and 1 for 'alpha'; got {alpha!r}"
            )
    return DIVERGENCE_CODES[divergence]


# Each generator maps (lp, lq) -> (q f(t), p f'(t)) elementwise. Masked branches are fed
# finite stand-ins so that autograd through ``torch.where`` never meets inf * 0.
Generator = Callable[[torch.Tensor, torch.Tensor, float, float], Tuple[torch.Tensor, torch.Tensor]]


def _support(lp: torch.Tensor, lq: torch.Tensor):
    has_p = lp > -math.inf
    has_q = lq > -math.inf
    lp_safe = torch.where(has_p, lp, torch.zeros_like(lp))
    lq_safe = torch.where(has_q, lq, torch.zeros_like(lq))
    return has_p, has_q, lp_safe, lq_safe


def forward_kl_terms(lp, lq, beta, alpha):
    """KL(q || p): q f(t) = q (lq - lp); p f'(t) = -q."""
    has_p, has_q, lp_safe, lq_safe = _support(lp, lq)
    q = torch.exp(lq)
    # p = 0 under q > 0 makes the divergence +inf; keep it, without a NaN gradient.
    log_ratio = torch.where(has_p, lq_safe - lp_safe, torch.full_like(lp, math.inf))
    value = torch.where(has_q, q * log_ratio, torch.zeros_like(lp))
    return value, -q


def reverse_kl_terms(lp, lq, beta, alpha):
    """KL(p || q): q f(t) = p (lp - lq); p f'(t) = p (lp - lq + 1)."""
    has_p, has_q, lp_safe, lq_safe = _support(lp, lq)
    p = torch.exp(lp)
    log_ratio = torch.where(has_q, lp_safe - lq_safe, torch.full_like(lp, math.inf))
    log_ratio = torch.where(has_p, log_ratio, torch.zeros_like(lp))
    value = torch.where(has_p, p * log_ratio, torch.zeros_like(lp))
    slope = torch.where(has_p, p * (log_ratio + 1.0), torch.zeros_like(lp))
    return value, slope


def js_terms(lp, lq, beta, alpha):
    """Generalised Jensen-Shannon with mixture m = beta q + (1 - beta) p.

    q f(t) = beta q (lq - lm) + (1 - beta) p (lp - lm);  f'(t) = (1 - beta) log(p / m),
    so p f'(t) = (1 - beta) p (lp - lm).
    """
    has_p, has_q, lp_safe, lq_safe = _support(lp, lq)
    log_b, log_1mb = math.log(beta), math.log1p(-beta)
    both = torch.logaddexp(log_b + lq_safe, log_1mb + lp_safe)
    lm = torch.where(has_p & has_q, both, torch.where(has_p, log_1mb + lp_safe, log_b + lq_safe))
    zero = torch.zeros_like(lp)
    q_part = torch.where(has_q, torch.exp(lq) * (lq_safe - lm), zero)
    p_part = torch.where(has_p, torch.exp(lp) * (lp_safe - lm), zero)
    return beta * q_part + (1.0 - beta) * p_part, (1.0 - beta) * p_part


def tv_terms(lp, lq, beta, alpha):
    """Total variation: q f(t) = |p - q| / 2; p f'(t) = p sign(p - q) / 2."""
    p, q = torch.exp(lp), torch.exp(lq)
    return 0.5 * torch.abs(p - q), 0.5 * p * torch.sign(p - q)


def hellinger_terms(lp, lq, beta, alpha):
    """Squared Hellinger: q f(t) = (sqrt p - sqrt q)^2; p f'(t) = p - sqrt(p q)."""
    sqrt_p, sqrt_q = torch.exp(0.5 * lp), torch.exp(0.5 * lq)
    return (sqrt_p - sqrt_q) ** 2, sqrt_p * sqrt_p - sqrt_p * sqrt_q


def chi2_terms(lp, lq, beta, alpha):
    """Pearson chi^2: q f(t) = (p - q)^2 / q; p f'(t) = 2 p (t - 1).

    Evaluated in log space (``p t = exp(2 lp - lq)``), since t can overflow where q underflows.
    """
    has_p, has_q, lp_safe, lq_safe = _support(lp, lq)
    p = torch.exp(lp)
    zero = torch.zeros_like(lp)
    d = lp_safe - lq_safe
    p_t = torch.exp(lp_safe + d)
    # Each branch sees only its own side of d = 0, so neither overflows where it is not taken.
    shrink = -torch.expm1(-torch.clamp(d, min=0.0))
    grow = torch.expm1(torch.clamp(d, max=0.0))
    value = torch.where(d > 0, p_t * shrink**2, torch.exp(lq_safe) * grow**2)
    # p > 0 = q makes the divergence infinite.
    value = torch.where(has_q, value, torch.where(has_p, torch.full_like(lp, math.inf), zero))
    value = torch.where(has_p | has_q, value, zero)
    slope = torch.where(has_p, 2.0 * (torch.where(has_q, p_t, torch.full_like(lp, math.inf)) - p), zero)
    return value, slope


def alpha_terms(lp, lq, beta, alpha):
    """Amari alpha: q f(t) = (p^a q^(1-a) - a p - (1-a) q) / (a (a-1)); p f'(t) = (p^a q^(1-a) - p) / (a - 1)."""
    has_p, has_q, lp_safe, lq_safe = _support(lp, lq)
    p, q = torch.exp(lp), torch.exp(lq)
    # p^a q^(1-a) at the edges of the support: 0 unless an exponent makes it blow up.
    p_only = math.inf if alpha > 1.0 else 0.0
    q_only = math.inf if alpha < 0.0 else 0.0
    mixed = torch.where(
        has_p & has_q,
        torch.exp(alpha * lp_safe + (1.0 - alpha) * lq_safe),
        torch.where(has_p, torch.full_like(lp, p_only), torch.where(has_q, torch.full_like(lp, q_only), torch.zeros_like(lp))),
    )
    value = (mixed - alpha * p - (1.0 - alpha) * q) / (alpha * (alpha - 1.0))
    slope = (mixed - p) / (alpha - 1.0)
    return value, slope


GENERATORS: Dict[int, Generator] = {
    DIVERGENCE_CODES["forward_kl"]: forward_kl_terms,
    DIVERGENCE_CODES["reverse_kl"]: reverse_kl_terms,
    DIVERGENCE_CODES["js"]: js_terms,
    DIVERGENCE_CODES["tv"]: tv_terms,
    DIVERGENCE_CODES["hellinger"]: hellinger_terms,
    DIVERGENCE_CODES["chi2"]: chi2_terms,
    DIVERGENCE_CODES["alpha"]: alpha_terms,
}
