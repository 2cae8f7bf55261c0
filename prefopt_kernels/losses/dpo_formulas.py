"""The per-pair formula of every loss type of TRL 1.16's ``DPOTrainer`` (``dpo_loss`` checks the options)."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F


class PairTerms(NamedTuple):
    """What a DPO-family formula reads: per-pair tensors ``[B]`` (compute dtype) and the options.

    ``delta = s(rho_w) - s(rho_l)`` with ``s`` the f-divergence score; ``delta_norm`` the same with
    each score divided by its length clamped at 1 (None unless a loss type needs lengths);
    ``chosen_lengths`` unclamped (None likewise); ``bco_mean`` the bco_pair baseline δ (None: 0).
    """

    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor
    rr: torch.Tensor
    rho_w: torch.Tensor
    rho_l: torch.Tensor
    delta: torch.Tensor
    delta_norm: Optional[torch.Tensor]
    chosen_lengths: Optional[torch.Tensor]
    beta: float
    eps: float
    discopop_tau: float
    sigmoid_label_smoothing: bool
    bco_mean: Optional[float]


def _smoothed_logistic(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1.0 - eps) - F.logsigmoid(-logits) * eps


def _sigmoid(t: PairTerms) -> torch.Tensor:
    z = t.beta * t.delta
    return _smoothed_logistic(z, t.eps) if t.sigmoid_label_smoothing else -F.logsigmoid(z)


def _hinge(t: PairTerms) -> torch.Tensor:
    return torch.relu(1.0 - t.beta * t.delta)


def _ipo(t: PairTerms) -> torch.Tensor:
    return (t.delta_norm - 1.0 / (2.0 * t.beta)) ** 2


def _exo_pair(t: PairTerms) -> torch.Tensor:
    z, eps = t.beta * t.delta, t.eps
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(t: PairTerms) -> torch.Tensor:
    cw, cl = t.beta * t.rho_w, t.beta * t.rho_l
    return -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-cl)


def _robust(t: PairTerms) -> torch.Tensor:
    z, eps = t.beta * t.delta, t.eps
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def _bco_pair(t: PairTerms) -> torch.Tensor:
    cw, cl = t.beta * t.rho_w, t.beta * t.rho_l
    if t.bco_mean is None:
        return -F.logsigmoid(cw) - F.logsigmoid(-cl)
    return -F.logsigmoid(cw - t.bco_mean) - F.logsigmoid(-(cl - t.bco_mean))


def _sppo_hard(t: PairTerms) -> torch.Tensor:
    return (t.rho_w - 0.5 / t.beta) ** 2 + (t.rho_l + 0.5 / t.beta) ** 2


def _aot(t: PairTerms) -> torch.Tensor:
    d = torch.sort(t.pc - t.pr).values - torch.sort(t.rc - t.rr).values
    return _smoothed_logistic(t.beta * d, t.eps)


def _aot_unpaired(t: PairTerms) -> torch.Tensor:
    d = torch.sort(t.rho_w).values - torch.sort(t.rho_l).values
    return _smoothed_logistic(t.beta * d, t.eps)


def _apo_zero(t: PairTerms) -> torch.Tensor:
    return 1.0 - torch.sigmoid(t.beta * t.rho_w) + torch.sigmoid(t.beta * t.rho_l)


def _apo_down(t: PairTerms) -> torch.Tensor:
    return torch.sigmoid(t.beta * t.rho_w) + 1.0 - torch.sigmoid(t.beta * (t.rho_w - t.rho_l))


def _discopop(t: PairTerms) -> torch.Tensor:
    z = t.beta * t.delta
    m = torch.sigmoid(z / t.discopop_tau)
    # m exp(-z) as one exponential: m underflows to 0 where exp(-z) overflows.
    return (1.0 - m) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / t.discopop_tau) - z)


def _sft(t: PairTerms) -> torch.Tensor:
    n_tokens = t.chosen_lengths.sum()
    # A batch without chosen tokens sums nothing: 0, where TRL's empty mean is NaN.
    return (-t.pc.sum() / torch.where(n_tokens > 0, n_tokens, 1.0)).expand(t.pc.shape)


def _sigmoid_norm(t: PairTerms) -> torch.Tensor:
    return -F.logsigmoid(t.beta * t.delta_norm)


class PairFormula(NamedTuple):
    """One DPOTrainer loss type: its per-pair ``formula`` and what it reads besides the log-probs.

    ``f_divergence``: accepts another f-divergence than reverse KL (TRL's list: the f-DPO
    reparameterisation leaves a β log Z(x) term that cancels only in the chosen-rejected
    difference). ``lengths``: which token counts it reads (``""``, ``"chosen"``, ``"both"``).
    """

    formula: Callable[[PairTerms], torch.Tensor]
    f_divergence: bool = False
    lengths: str = ""


DPO_FORMULAS = {
    "sigmoid": PairFormula(_sigmoid, f_divergence=True),
    "hinge": PairFormula(_hinge, f_divergence=True),
    "ipo": PairFormula(_ipo, f_divergence=True, lengths="both"),
    "exo_pair": PairFormula(_exo_pair, f_divergence=True),
    "nca_pair": PairFormula(_nca_pair),
    "robust": PairFormula(_robust, f_divergence=True),
    "bco_pair": PairFormula(_bco_pair),
    "sppo_hard": PairFormula(_sppo_hard),
    "aot": PairFormula(_aot),
    "aot_unpaired": PairFormula(_aot_unpaired),
    "apo_zero": PairFormula(_apo_zero),
    "apo_down": PairFormula(_apo_down),
    "discopop": PairFormula(_discopop, f_divergence=True),
    "sft": PairFormula(_sft, f_divergence=True, lengths="chosen"),
    "sigmoid_norm": PairFormula(_sigmoid_norm, f_divergence=True, lengths="both"),
}
DPO_LOSS_TYPES = tuple(DPO_FORMULAS)
