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

import enum
import math
import numbers
from typing import Callable, Dict, Optional, Tuple

import torch


class Divergence(enum.IntEnum):
    """The registry: one member per divergence, with every property a kernel branches on.

    The integer is the code every kernel specialises on (0 is "no divergence" and no
    member). ``second_sweep``: non-linear in the normalised probabilities, so the forward
    needs both log-sum-exps before it can sum (a second sweep over the row). ``centred``:
    the forward saves ``S`` centred at the policy's argmax and the reference logit there
    (``RowStats.div_s``, ``ref_at_argmax``); forward KL alone has ``S = -1`` exactly.
    ``parameter``: the keyword argument the divergence reads, if any. ``accumulator``: for
    a divergence that finishes in the first sweep, the field of the first-pass state
    (``backends.row_state.RowState``) that holds its sum. The Triton constexprs are taken
    from these members, and the C++ enum and its traits are checked against them
    (tests/test_registry.py). Every rule that follows from a divergence reads these
    properties, never the order of the codes.
    """

    def __new__(cls, code: int, second_sweep: bool, centred: bool, parameter: Optional[str],
                accumulator: Optional[str]):
        member = int.__new__(cls, code)
        member._value_ = code
        member.second_sweep = second_sweep
        member.centred = centred
        member.parameter = parameter
        member.accumulator = accumulator
        return member

    @classmethod
    def _missing_(cls, value):
        raise ValueError(f"unknown divergence code {value!r}")

    FORWARD_KL = (1, False, False, None, "fkl_acc")
    REVERSE_KL = (2, False, True, None, "rkl_acc")
    JS = (3, True, True, "beta", None)
    TV = (4, True, True, None, None)
    HELLINGER = (5, True, True, None, None)
    CHI2 = (6, True, True, None, None)
    ALPHA = (7, True, True, "alpha", None)

    @property
    def key(self) -> str:
        """The public name, as ``divergence=`` takes it."""
        return self.name.lower()


DIVERGENCES: Tuple[str, ...] = tuple(d.key for d in Divergence)


# How close beta may come to 0 or 1, and alpha to 0 or 1: the kernels receive 1 - beta,
# log beta, log(1 - beta) and alpha - 1 formed in float64 and rounded once to fp32, which
# keeps every accepted value accurate as long as these stay normal fp32 numbers.
PARAMETER_EDGE = 1e-30
# Beyond this |alpha|, alpha (alpha - 1) leaves fp32's range.
ALPHA_MAX = 1e6


def real_number(value, argument: str) -> float:
    """``value`` as a float: any real number (numpy scalars included), not a bool; a
    ``TypeError`` naming ``argument`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argument} must be a real number; got {value!r}")
    return float(value)


def resolve(divergence: str, beta, alpha) -> Tuple[Divergence, float, float]:
    """Validate a divergence name and its parameters; return ``(member, beta, alpha)``.

    ``beta`` and ``alpha`` must be real numbers (numpy scalars included) whatever the
    divergence. Raises ``ValueError`` naming the argument for an unknown name, for ``js``
    unless ``1e-30 <= beta <= 1 - 1e-30``, and for ``alpha`` unless it is finite with
    ``|alpha|, |alpha - 1| >= 1e-30`` and ``|alpha| <= 1e6``.
    """
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(
            f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}"
        )
    member = Divergence[divergence.upper()]
    beta, alpha = real_number(beta, "beta"), real_number(alpha, "alpha")
    if member.parameter == "beta" and not (PARAMETER_EDGE <= beta and PARAMETER_EDGE <= 1.0 - beta):
        raise ValueError(
            f"beta must lie in [{PARAMETER_EDGE:g}, 1 - {PARAMETER_EDGE:g}] for {divergence!r}; got {beta!r}"
        )
    if member.parameter == "alpha" and not (
        math.isfinite(alpha) and abs(alpha) <= ALPHA_MAX
        and abs(alpha) >= PARAMETER_EDGE and abs(alpha - 1.0) >= PARAMETER_EDGE
    ):
        raise ValueError(
            f"alpha must be finite with |alpha| <= {ALPHA_MAX:g} and at least {PARAMETER_EDGE:g} "
            f"away from 0 and 1 for {divergence!r}; got {alpha!r}"
        )
    return member, beta, alpha


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


def log_mixture_gap(lp, lq, beta):
    """``w = log(m / p)`` with ``m = beta q + (1 - beta) p``, where both ``p, q > 0``, without cancellation.

    With ``x = lq - lp``: ``w = log1p(beta expm1(x))`` while that argument stays above
    -1/2; ``log((1 - beta) + beta e^x)`` (a sum of positives) below; and
    ``log beta + x + log1p((1 - beta)/beta e^-x)`` for large ``x``, where ``e^x`` overflows.
    Accurate as beta -> 0 or 1, where ``lp - log m`` formed from two logs cancels.
    """
    x = lq - lp
    small = beta * -torch.expm1(torch.clamp(x, max=0.0)) < 0.5
    large = x > 30.0
    x_mid = torch.where(large, torch.zeros_like(x), x)
    near = torch.log1p(beta * torch.expm1(x_mid))
    far = torch.log((1.0 - beta) + beta * torch.exp(torch.clamp(x_mid, max=0.0)))
    x_large = torch.where(large, x, torch.full_like(x, 30.0))
    high = math.log(beta) + x_large + torch.log1p((1.0 - beta) / beta * torch.exp(-x_large))
    return torch.where(large, high, torch.where(small, near, far))


def js_terms(lp, lq, beta, alpha):
    """Generalised Jensen-Shannon with mixture m = beta q + (1 - beta) p.

    q f(t) = beta q (lq - lm) + (1 - beta) p (lp - lm);  f'(t) = (1 - beta) log(p / m),
    so p f'(t) = (1 - beta) p (lp - lm). ``lp - lm`` comes from :func:`log_mixture_gap`.
    """
    has_p, has_q, lp_safe, lq_safe = _support(lp, lq)
    both = has_p & has_q
    gap = log_mixture_gap(torch.where(both, lp_safe, torch.zeros_like(lp)),
                          torch.where(both, lq_safe, torch.zeros_like(lq)), beta)
    # lp - lm and lq - lm; at the support's edges m is one side alone.
    p_gap = torch.where(both, -gap, torch.full_like(lp, -math.log1p(-beta)))
    q_gap = torch.where(both, (lq_safe - lp_safe) - gap, torch.full_like(lq, -math.log(beta)))
    zero = torch.zeros_like(lp)
    q_part = torch.where(has_q, torch.exp(lq) * q_gap, zero)
    p_part = torch.where(has_p, torch.exp(lp) * p_gap, zero)
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
    both = has_p & has_q
    p = torch.exp(lp)
    zero = torch.zeros_like(lp)
    d = torch.where(both, lp_safe - lq_safe, zero)
    p_t = torch.exp(torch.where(both, lp_safe + d, zero))
    # Each branch sees only its own side of d = 0, so neither overflows where it is not taken.
    shrink = -torch.expm1(-torch.clamp(d, min=0.0))
    grow = torch.expm1(torch.clamp(d, max=0.0))
    value = torch.where(d > 0, p_t * shrink**2, torch.exp(lq_safe) * grow**2)
    # q > 0 = p: f(0) = 1, the term is q; p > 0 = q: the divergence is infinite.
    value = torch.where(both, value, torch.where(has_q, torch.exp(lq_safe),
                                                 torch.where(has_p, torch.full_like(lp, math.inf), zero)))
    slope = torch.where(has_p, 2.0 * (torch.where(has_q, p_t, torch.full_like(lp, math.inf)) - p), zero)
    return value, slope


def alpha_terms(lp, lq, beta, alpha):
    """Amari alpha: q f(t) = (p^a q^(1-a) - a p - (1-a) q) / (a (a-1)); p f'(t) = (p^a q^(1-a) - p) / (a - 1).

    With ``d = lp - lq`` and ``e = a - 1``, ``p^a q^(1-a) = p exp(e d) = q exp(a d)``. Where
    ``|e d|`` (or ``|a d|``) is small the difference to ``p`` (or ``q``) cancels, so the terms
    are formed with ``expm1``: near a = 1, ``q f = (p expm1(e d)/e - (p - q)) / a``; near
    a = 0, ``q f = (q expm1(a d)/a - (p - q)) / e``; ``p f' = p expm1(e d) / e`` where
    ``|e d| <= 1``. Elsewhere the product is one ``exp`` in log space, which cannot overflow
    where the true value does not.
    """
    has_p, has_q, lp_safe, lq_safe = _support(lp, lq)
    both = has_p & has_q
    p, q = torch.exp(lp), torch.exp(lq)
    zero = torch.zeros_like(lp)
    eps = alpha - 1.0
    near_one = alpha > 0.5
    rate = eps if near_one else alpha
    d = torch.where(both, lp_safe - lq_safe, zero)
    small = both & (torch.abs(rate * d) <= 1.0)
    d_small = torch.where(small, d, zero)
    growth = torch.expm1(rate * d_small) / rate  # (p^a q^(1-a) - base) / (rate base)
    base = p if near_one else q
    value_small = (base * growth - (p - q)) / (alpha if near_one else eps)
    # The slope's own expansion holds where |e d| <= 1; beyond, e^(e d) is far from 1 and the
    # log-space product below has no cancellation (while p expm1(e d) could overflow to inf * 0).
    slope_small_ok = both & (torch.abs(eps * d) <= 1.0)
    slope_small = p * torch.expm1(eps * torch.where(slope_small_ok, d, zero)) / eps
    # p^a q^(1-a): one exp in log space, which cannot overflow where the true value does not;
    # at the support's edges 0 unless an exponent blows it up.
    p_only = math.inf if alpha > 1.0 else 0.0
    q_only = math.inf if alpha < 0.0 else 0.0
    mixed = torch.where(
        both,
        torch.exp(torch.where(both, alpha * lp_safe + (1.0 - alpha) * lq_safe, zero)),
        torch.where(has_p, torch.full_like(lp, p_only), torch.where(has_q, torch.full_like(lp, q_only), zero)),
    )
    value = torch.where(small, value_small, (mixed - alpha * p - (1.0 - alpha) * q) / (alpha * eps))
    slope = torch.where(slope_small_ok, slope_small, (mixed - p) / eps)
    return value, slope


GENERATORS: Dict[Divergence, Generator] = {
    Divergence.FORWARD_KL: forward_kl_terms,
    Divergence.REVERSE_KL: reverse_kl_terms,
    Divergence.JS: js_terms,
    Divergence.TV: tv_terms,
    Divergence.HELLINGER: hellinger_terms,
    Divergence.CHI2: chi2_terms,
    Divergence.ALPHA: alpha_terms,
}
