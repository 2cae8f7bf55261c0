"""ORPO: odds-ratio preference optimisation, reference-free (Hong et al. 2024)."""

from __future__ import annotations

import math
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
    reduce,
)

_MINUS_LOG_2 = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    r"""``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole range.

    ``log(-expm1(x))`` loses nothing where ``exp(x)`` is near 1 (``x`` near 0) and
    ``log1p(-exp(x))`` nothing where it is small; the switch at ``x = -log 2`` is where both are
    exact to rounding (Mächler, "Accurately computing log(1 - exp(-|a|))").
    """
    return torch.where(x < _MINUS_LOG_2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def chosen_token_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """``-Σ_b log π(y_w,b) / Σ_b |y_w,b|``: the mean negative log-likelihood of the batch's chosen tokens.

    That is the token mean of ``nn.CrossEntropyLoss`` over every chosen token of the batch, as
    TRL's ORPO and CPO trainers take it (not a mean of per-sequence means). A batch without
    chosen tokens gives 0 (the empty mean would be NaN).
    """
    n_tokens = chosen_lengths.sum()
    return -policy_chosen_logps.sum() / torch.where(n_tokens > 0, n_tokens, 1.0)


def check_chosen_nll(chosen_nll, like: torch.Tensor) -> torch.Tensor:
    """``chosen_nll`` as a 0-d floating tensor on ``like``'s device, or an error naming it."""
    if not isinstance(chosen_nll, torch.Tensor) or chosen_nll.dim() != 0 or not chosen_nll.is_floating_point():
        got = f"shape {tuple(chosen_nll.shape)} {chosen_nll.dtype}" if isinstance(chosen_nll, torch.Tensor) \
            else type(chosen_nll).__name__
        raise TypeError(f"chosen_nll must be a 0-d floating-point tensor, got {got}")
    if chosen_nll.device != like.device:
        raise ValueError(f"chosen_nll must be on the log-probs' device {like.device}, got {chosen_nll.device}")
    return chosen_nll


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths,
    rejected_lengths,
    *,
    beta: float = 0.1,
    chosen_nll: Optional[torch.Tensor] = None,
    reduction: str = "mean",
):
    r"""ORPO loss over ``B`` pairs; no reference model.

    With the length-averaged log-probabilities ``a_w = log π(y_w) / |y_w|``, ``a_l`` likewise, and
    the log odds ``log odds(y) = a - log(1 - exp(a))`` (:func:`log1mexp`), the per-pair loss is

    .. math::
        L = NLL_w - λ \log σ\big(\log odds(y_w) - \log odds(y_l)\big),

    ``λ = beta`` (TRL's name for it) and ``NLL_w`` the batch's chosen negative log-likelihood:
    ``chosen_nll`` if given (a 0-d tensor; TRL's ORPO trainer takes it over the prompt and the
    completion), else :func:`chosen_token_nll` of the completions, the same for every pair. The
    mean over pairs is TRL's ``nll_loss - mean(λ log σ(...))``.

    Inputs: summed log-probs ``[B]`` (``B >= 1``, any float dtype, computed in at least fp32, each
    ``< 0``: a completion of probability 1 has infinite odds) and token counts ``[B]`` (finite,
    > 0). ``beta`` > 0. Returns ``(loss, metrics)`` with TRL's names: ``rewards/*`` ``λ a``,
    ``logps/*`` the averages ``a``, ``nll_loss``, ``log_odds_ratio`` (the batch mean of
    ``log σ(log odds(y_w) - log odds(y_l))``) and ``log_odds_chosen`` (of the log odds difference).
    """
    check_per_sequence(
        "pair", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps
    )
    beta = check_positive("beta", beta)
    check_reduction(reduction)
    dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    len_w = check_lengths("chosen_lengths", chosen_lengths, pc)
    avg_w = pc / len_w
    avg_l = pr / check_lengths("rejected_lengths", rejected_lengths, pc)
    nll = chosen_token_nll(pc, len_w) if chosen_nll is None else check_chosen_nll(chosen_nll, pc).to(dtype)
    log_odds = (avg_w - avg_l) - (log1mexp(avg_w) - log1mexp(avg_l))
    ratio = F.logsigmoid(log_odds)
    losses = nll - beta * ratio
    metrics = preference_metrics(beta * avg_w, beta * avg_l, avg_w, avg_l, nll_loss=nll,
                                 log_odds_ratio=ratio, log_odds_chosen=log_odds)
    return reduce(losses, reduction), metrics
