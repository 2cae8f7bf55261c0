"""DPO and the pairwise losses of TRL's ``DPOTrainer``, from per-sequence log-probabilities."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._common import (
    check_lengths,
    check_per_sequence,
    check_positive,
    check_reduction,
    compute_dtype,
    preference_metrics,
    real_scalar,
    reduce,
)

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Loss types built on the score difference; only these accept another f-divergence (as in TRL).
_SCORE_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"})
_LENGTH_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm"})


class RunningMean:
    """Running mean of the batch-mean reward, the baseline ``delta`` of ``bco_pair``.

    ``update(x)`` folds one batch mean into the average of all batch means seen so far
    (each batch counts once) and returns the new mean. Keep one instance per training run
    and pass it to every ``dpo_loss(..., bco_state=state)`` call; it lives on the host as a
    Python float, so ``state_dict()``/``load_state_dict()`` checkpoint it.

    A non-finite batch mean (NaN/inf rewards) is not folded in: the running mean stays as it
    was (one bad batch would otherwise poison it for the rest of training, as GradScaler skips
    a step with non-finite gradients) and ``skipped`` counts such batches.
    """

    def __init__(self, mean: float = 0.0, count: int = 0, skipped: int = 0):
        self.mean = float(mean)
        self.count = int(count)
        self.skipped = int(skipped)

    def update(self, batch_mean: torch.Tensor) -> float:
        batch_mean = float(batch_mean)
        if not math.isfinite(batch_mean):
            self.skipped += 1
            return self.mean
        self.count += 1
        self.mean += (batch_mean - self.mean) / self.count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])
        # Checkpoints written before ``skipped`` existed lack the key.
        self.skipped = int(state.get("skipped", 0))


def _scores(logratios: torch.Tensor, f_divergence: str, f_alpha: float) -> torch.Tensor:
    """``f'(t)`` of the chosen divergence at ``t = pi/pi_ref = exp(logratios)``."""
    if f_divergence == "reverse_kl":  # f'(t) = log t + 1; the constant cancels in differences
        return logratios
    if f_divergence == "forward_kl":  # f'(t) = 1 - 1/t
        return 1.0 - torch.exp(-logratios)
    if f_divergence == "js_divergence":  # f'(t) = log(2t / (1 + t))
        return math.log(2.0) + F.logsigmoid(logratios)
    # alpha_divergence: f'(t) = (t^(alpha-1) - 1) / (alpha - 1); reverse KL at alpha = 1.
    if abs(f_alpha - 1.0) < 1e-6:
        return logratios
    # The exponent is capped at 80 so that exp stays finite in fp32 (TRL does the same).
    return torch.expm1(((f_alpha - 1.0) * logratios).clamp(max=80.0)) / (f_alpha - 1.0)


def _smoothed_logistic(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1.0 - eps) - F.logsigmoid(-logits) * eps


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    chosen_lengths=None,
    rejected_lengths=None,
    discopop_tau: float = 0.05,
    bco_state: Optional[RunningMean] = None,
    reduction: str = "mean",
):
    r"""DPO-family loss over ``B`` preference pairs: every pairwise loss of TRL's ``DPOTrainer``.

    Inputs are per-sequence log-probabilities ``[B]`` (sums over the completion's tokens),
    ``B >= 1`` (an empty batch is a ValueError, not a NaN mean), one shape and device, any
    float dtype; arithmetic is done in at least fp32. Gradients flow to all four inputs
    (pass detached reference log-probs, as usual). With ``rho_w = log pi(y_w) - log pi_ref(y_w)``,
    ``rho_l`` likewise, ``s(.)`` the f-divergence score below, ``Δ = s(rho_w) - s(rho_l)``,
    ``ε = label_smoothing``, ``σ`` the logistic function, the per-pair losses are:

    ============== ===========================================================================
    sigmoid        ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)`` (DPO; ε > 0 is conservative DPO)
    hinge          ``relu(1 - βΔ)``
    ipo            ``(s(rho_w)/|y_w| - s(rho_l)/|y_l| - 1/(2β))²`` (length-normalised, needs lengths)
    exo_pair       ``σ(βΔ)(log σ(βΔ) - log(1-ε)) + σ(-βΔ)(log σ(-βΔ) - log ε)``, needs ε > 0
    nca_pair       ``-log σ(β rho_w) - ½ log σ(-β rho_w) - ½ log σ(-β rho_l)``
    robust         ``(-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)``, ε in [0, ½)
    bco_pair       ``-log σ(β rho_w - δ) - log σ(-(β rho_l - δ))``, δ the running reward mean
    sppo_hard      ``(rho_w - 1/(2β))² + (rho_l + 1/(2β))²``
    aot            sigmoid (with ε) of ``sort(log pi_w - log pi_l) - sort(log ref_w - log ref_l)``
    aot_unpaired   sigmoid (with ε) of ``sort(rho_w) - sort(rho_l)``
    apo_zero       ``1 - σ(β rho_w) + σ(β rho_l)``
    apo_down       ``σ(β rho_w) + 1 - σ(β (rho_w - rho_l))``
    discopop       ``(1-m)(-log σ(βΔ)) + m exp(-βΔ)``, ``m = σ(βΔ / discopop_tau)``
    sigmoid_norm   ``-log σ(β (s(rho_w)/|y_w| - s(rho_l)/|y_l|))`` (needs lengths)
    ============== ===========================================================================

    ``aot``/``aot_unpaired`` sort over the batch, so their per-pair losses belong to sorted
    positions, not to the input pairs. On a batch of one, ``aot`` equals ``sigmoid`` for every
    ε (here ``sigmoid`` keeps conservative-DPO smoothing; TRL >= 1.0 dropped it from
    ``sigmoid``, so against TRL's current ``sigmoid`` the identity holds only at ε = 0).

    f-divergence scores (``f_divergence``, TRL's ``f_divergence_type``), ``t = exp(rho)``:
    ``reverse_kl`` ``s = rho``; ``forward_kl`` ``s = 1 - 1/t``; ``js_divergence``
    ``s = log(2t/(1+t))``; ``alpha_divergence`` ``s = (t^(α-1) - 1)/(α-1)`` with
    ``α = f_alpha`` (reverse KL at α = 1; exponent capped at 80). Only the losses built on Δ
    (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop) accept a divergence other
    than reverse KL.

    ``bco_pair``'s δ: with ``bco_state`` (a :class:`RunningMean` kept across steps), the batch
    mean of ``β rho`` over chosen and rejected is folded in and the updated running mean is δ
    (TRL's behaviour); without it δ is this batch's mean alone. δ carries no gradient.

    ``loss_type`` may be a list; the per-pair losses are then summed with ``loss_weights``
    (finite, >= 0; default all 1). ``chosen_lengths``/``rejected_lengths`` ``[B]`` (token
    counts, finite and > 0) are required by ``ipo`` and ``sigmoid_norm``. Scalars (``beta`` > 0,
    ``label_smoothing`` in [0, 1], ``f_alpha``, ``discopop_tau`` > 0, the weights) may be Python
    or numpy numbers or 0-d tensors; bools and non-finite values are rejected.

    Returns ``(loss, metrics)``: ``loss`` is the mean over pairs (``reduction="sum"``: sum;
    ``"none"``: ``[B]``); ``metrics`` holds detached batch means of ``rewards/chosen``
    (``β rho_w``), ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
    ``logps/chosen``, ``logps/rejected`` (and ``bco/delta`` for bco_pair).
    """
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    inputs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    check_per_sequence("pair", **dict(zip(names, inputs)))
    beta = check_positive("beta", beta)
    check_reduction(reduction)
    if isinstance(loss_type, str):
        loss_types = [loss_type]
    elif isinstance(loss_type, (list, tuple)):
        loss_types = list(loss_type)
    else:
        raise TypeError(f"loss_type must be a str or a list of str, got {type(loss_type).__name__}")
    if not loss_types:
        raise ValueError("loss_type must name at least one loss type")
    for lt in loss_types:
        if not isinstance(lt, str) or lt not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type {lt!r} is unknown; expected one of {DPO_LOSS_TYPES}")
    if loss_weights is None:
        loss_weights = [1.0] * len(loss_types)
    if isinstance(loss_weights, (str, bytes)) or not hasattr(loss_weights, "__len__"):
        raise TypeError(f"loss_weights must be a sequence of numbers, got {loss_weights!r}")
    if len(loss_weights) != len(loss_types):
        raise ValueError(
            f"loss_weights has {len(loss_weights)} entries but loss_type has {len(loss_types)}"
        )
    loss_weights = [real_scalar(f"loss_weights[{i}]", w, 0.0) for i, w in enumerate(loss_weights)]
    if not isinstance(f_divergence, str) or f_divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence {f_divergence!r} is unknown; expected one of {F_DIVERGENCES}")
    if f_divergence != "reverse_kl" and not set(loss_types) <= _SCORE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence={f_divergence!r} is only supported with loss types "
            f"{sorted(_SCORE_LOSS_TYPES)}, got {loss_types}"
        )
    f_alpha = real_scalar("f_alpha", f_alpha)
    eps = real_scalar("label_smoothing", label_smoothing, 0.0, 1.0)
    if "robust" in loss_types and not eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type 'robust', got {eps}")
    if "exo_pair" in loss_types and not 0.0 < eps < 1.0:
        raise ValueError(f"label_smoothing must be in (0, 1) for loss_type 'exo_pair', got {eps}")
    discopop_tau = check_positive("discopop_tau", discopop_tau)
    if bco_state is not None and not isinstance(bco_state, RunningMean):
        raise TypeError(f"bco_state must be a RunningMean or None, got {type(bco_state).__name__}")

    dtype = compute_dtype(*inputs)
    pc, pr, rc, rr = (t.to(dtype) for t in inputs)
    rho_w, rho_l = pc - rc, pr - rr
    s_w, s_l = _scores(rho_w, f_divergence, f_alpha), _scores(rho_l, f_divergence, f_alpha)
    delta = s_w - s_l
    if _LENGTH_LOSS_TYPES & set(loss_types):
        len_w = check_lengths("chosen_lengths", chosen_lengths, pc)
        len_l = check_lengths("rejected_lengths", rejected_lengths, pc)
        delta_norm = s_w / len_w - s_l / len_l

    extra = {}
    total = 0.0
    for lt, weight in zip(loss_types, loss_weights):
        z = beta * delta
        if lt == "sigmoid":
            per_pair = _smoothed_logistic(z, eps)
        elif lt == "hinge":
            per_pair = torch.relu(1.0 - z)
        elif lt == "ipo":
            per_pair = (delta_norm - 1.0 / (2.0 * beta)) ** 2
        elif lt == "exo_pair":
            per_pair = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
                F.logsigmoid(-z) - math.log(eps)
            )
        elif lt == "nca_pair":
            cw, cl = beta * rho_w, beta * rho_l
            per_pair = -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-cl)
        elif lt == "robust":
            per_pair = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
        elif lt == "bco_pair":
            cw, cl = beta * rho_w, beta * rho_l
            batch_mean = torch.cat([cw, cl]).detach().mean()
            bco_delta = bco_state.update(batch_mean) if bco_state is not None else float(batch_mean)
            extra["bco__delta"] = torch.tensor(bco_delta, dtype=torch.float64)
            per_pair = -F.logsigmoid(cw - bco_delta) - F.logsigmoid(-(cl - bco_delta))
        elif lt == "sppo_hard":
            per_pair = (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2
        elif lt == "aot":
            d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
            per_pair = _smoothed_logistic(beta * d, eps)
        elif lt == "aot_unpaired":
            d = torch.sort(rho_w).values - torch.sort(rho_l).values
            per_pair = _smoothed_logistic(beta * d, eps)
        elif lt == "apo_zero":
            per_pair = 1.0 - torch.sigmoid(beta * rho_w) + torch.sigmoid(beta * rho_l)
        elif lt == "apo_down":
            per_pair = torch.sigmoid(beta * rho_w) + 1.0 - torch.sigmoid(beta * (rho_w - rho_l))
        elif lt == "discopop":
            m = torch.sigmoid(z / discopop_tau)
            per_pair = (1.0 - m) * -F.logsigmoid(z) + m * torch.exp(-z)
        else:  # sigmoid_norm
            per_pair = -F.logsigmoid(beta * delta_norm)
        total = total + weight * per_pair

    metrics = preference_metrics(beta * rho_w, beta * rho_l, pc, pr, **extra)
    return reduce(total, reduction), metrics
