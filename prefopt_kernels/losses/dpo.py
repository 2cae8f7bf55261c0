"""DPO and every loss type of TRL 1.16's ``DPOTrainer``, from per-sequence log-probabilities."""

from __future__ import annotations

import enum
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .common import (
    check_lengths,
    check_per_sequence,
    check_positive,
    check_reduction,
    compute_dtype,
    preference_metrics,
    real_scalar,
    reduce,
)
from .dpo_formulas import DPO_FORMULAS, DPO_LOSS_TYPES, PairTerms

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
BCO_DELTAS = (None, "batch_mean", "running_mean")


class RunningMean:
    """Running mean of the batch-mean reward: the BCO paper's baseline δ of ``bco_pair``.

    ``update(x)`` folds one batch mean into the average of all batch means seen so far
    (each batch counts once) and returns the new mean. Keep one instance per training run
    and pass it to every ``dpo_loss(..., bco_delta="running_mean", bco_state=state)`` call;
    it lives on the host as a Python float, so ``state_dict()``/``load_state_dict()``
    checkpoint it.

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
    if f_divergence == "forward_kl":  # f'(t) = 1 - 1/t; the exponent capped as alpha's below
        return 1.0 - torch.exp((-logratios).clamp(max=80.0))
    if f_divergence == "js_divergence":  # f'(t) = log(2t / (1 + t))
        return math.log(2.0) + F.logsigmoid(logratios)
    # alpha_divergence: f'(t) = (t^(alpha-1) - 1) / (alpha - 1); reverse KL at alpha = 1.
    if abs(f_alpha - 1.0) < 1e-6:
        return logratios
    # The exponent is capped at 80 so that exp stays finite in fp32 (TRL does the same).
    return torch.expm1(((f_alpha - 1.0) * logratios).clamp(max=80.0)) / (f_alpha - 1.0)


def _divergence(name: str, value) -> str:
    # Older TRL configs hold an FDivergenceType enum member; its value is the string.
    if isinstance(value, enum.Enum):
        value = value.value
    if not isinstance(value, str) or value not in F_DIVERGENCES:
        raise ValueError(f"{name} {value!r} is unknown; expected one of {F_DIVERGENCES}")
    return value


def _aliased(name: str, value, trl_name: str, trl_value, check, default):
    """One argument given under our ``name`` or TRL's ``trl_name``, checked by ``check(name, v)``.

    Both given must agree (after ``check``), so a config ported from TRL cannot silently
    lose one of them; neither given is ``default``.
    """
    given = {n: check(n, v) for n, v in ((name, value), (trl_name, trl_value)) if v is not None}
    if len(given) == 2 and given[name] != given[trl_name]:
        raise ValueError(
            f"{name}={given[name]!r} and {trl_name}={given[trl_name]!r} disagree; "
            f"{trl_name} is TRL's name for {name}, give one of them"
        )
    return next(iter(given.values()), default)


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
    f_divergence: Optional[str] = None,
    f_alpha: Optional[float] = None,
    f_divergence_type: Optional[str] = None,
    f_alpha_divergence_coef: Optional[float] = None,
    chosen_lengths=None,
    rejected_lengths=None,
    discopop_tau: float = 0.05,
    sigmoid_label_smoothing: bool = False,
    bco_delta: Optional[str] = None,
    bco_state: Optional[RunningMean] = None,
    reduction: str = "mean",
):
    r"""DPO-family loss over ``B`` preference pairs: every loss type of TRL 1.16's ``DPOTrainer``.

    With its defaults, each loss type and each weighted mix computes what
    ``DPOTrainer._compute_loss`` of TRL 1.16 computes from the same per-sequence
    log-probabilities. Two paper variants that TRL 1.16 does not compute are opt-in:
    ``sigmoid_label_smoothing`` and ``bco_delta`` (below).

    Inputs are per-sequence log-probabilities ``[B]`` (sums over the completion's tokens),
    ``B >= 1`` (an empty batch is a ValueError, not a NaN mean), one shape and device, any
    float dtype; arithmetic is done in at least fp32. Gradients flow to all four inputs
    (pass detached reference log-probs, as usual). With ``rho_w = log pi(y_w) - log pi_ref(y_w)``,
    ``rho_l`` likewise, ``s(.)`` the f-divergence score below, ``Δ = s(rho_w) - s(rho_l)``,
    ``ε = label_smoothing``, ``σ`` the logistic function, ``n_w = max(|y_w|, 1)`` and
    ``n_l = max(|y_l|, 1)`` (``chosen_lengths``/``rejected_lengths`` clamped as TRL does),
    the per-pair losses are:

    ============== ===========================================================================
    sigmoid        ``-log σ(βΔ)`` (DPO; ε is not used, as in TRL 1.16)
    hinge          ``relu(1 - βΔ)``
    ipo            ``(s(rho_w)/n_w - s(rho_l)/n_l - 1/(2β))²`` (length-normalised, as TRL)
    exo_pair       ``σ(βΔ)(log σ(βΔ) - log(1-ε)) + σ(-βΔ)(log σ(-βΔ) - log ε)``, needs ε > 0
    nca_pair       ``-log σ(β rho_w) - ½ log σ(-β rho_w) - ½ log σ(-β rho_l)``
    robust         ``(-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)``, ε in [0, ½)
    bco_pair       ``-log σ(β rho_w - δ) - log σ(-(β rho_l - δ))``, δ = 0 (TRL 1.16) by default
    sppo_hard      ``(rho_w - 1/(2β))² + (rho_l + 1/(2β))²``
    aot            ``-(1-ε) log σ(βd) - ε log σ(-βd)``,
                   ``d = sort(log pi_w - log pi_l) - sort(log ref_w - log ref_l)``
    aot_unpaired   the same with ``d = sort(rho_w) - sort(rho_l)``
    apo_zero       ``1 - σ(β rho_w) + σ(β rho_l)``
    apo_down       ``σ(β rho_w) + 1 - σ(β (rho_w - rho_l))``
    discopop       ``(1-m)(-log σ(βΔ)) + m exp(-βΔ)``, ``m = σ(βΔ / discopop_tau)``
    sft            ``-Σ_b log pi(y_w,b) / Σ_b |y_w,b|``: the mean chosen-token NLL of the whole
                   batch, the same value for every pair (TRL's token mean over the chosen mask)
    sigmoid_norm   ``-log σ(β (s(rho_w)/n_w - s(rho_l)/n_l))``
    ============== ===========================================================================

    ``aot``/``aot_unpaired`` sort over the batch, so their per-pair losses belong to sorted
    positions, not to the input pairs.

    Paper variants, off by default:

    * ``sigmoid_label_smoothing=True``: conservative DPO (Mitchell, 2023) for ``sigmoid``,
      ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)``: ε is the probability that a label is flipped.
      TRL 1.16 reads ε only in exo_pair, robust, aot and aot_unpaired. On a batch of one,
      ``aot`` then equals smoothed ``sigmoid`` for every ε (sorting one value is the identity).
    * ``bco_delta``: the reward baseline δ of ``bco_pair`` (BCO, Jung et al., 2024). ``None``:
      δ = 0, TRL 1.16. ``"batch_mean"``: δ = ``(1/2B) Σ_b (β rho_w,b + β rho_l,b)``, this
      batch's mean reward. ``"running_mean"``: δ_t = ``(1/t) Σ_{k<=t} m_k`` with ``m_k`` the
      batch mean of step ``k``, kept across steps in ``bco_state`` (a :class:`RunningMean`,
      required then and used nowhere else). δ carries no gradient; the metric ``bco/delta``
      reports it.

    f-divergence scores (``f_divergence``), ``t = exp(rho)``: ``reverse_kl`` ``s = rho``
    (default); ``forward_kl`` ``s = 1 - 1/t``; ``js_divergence`` ``s = log(2t/(1+t))``;
    ``alpha_divergence`` ``s = (t^(α-1) - 1)/(α-1)`` with ``α = f_alpha`` (default 0.5;
    reverse KL at α = 1; exponent capped at 80). Only sigmoid, sigmoid_norm, hinge, ipo,
    exo_pair, robust, discopop and sft accept a divergence other than reverse KL (TRL's rule;
    sft does not use Δ). TRL's names work as well: ``f_divergence_type`` for ``f_divergence``
    (the same strings; an ``Enum`` member holding one, as older TRL's ``FDivergenceType``, is
    accepted) and ``f_alpha_divergence_coef`` for ``f_alpha``; giving both spellings with
    different values is a ValueError.

    ``loss_type`` may be a list (TRL's ``loss_type=[...]``); the loss is then
    ``Σ_k w_k L_k`` per pair with ``w = loss_weights`` (finite, >= 0; default all 1), so the
    mean over pairs is TRL's ``Σ_k w_k mean(L_k)``. ``chosen_lengths`` (ipo, sigmoid_norm,
    sft) and ``rejected_lengths`` (ipo, sigmoid_norm) ``[B]`` are token counts, finite and
    >= 0 (negative is a ValueError): 0 is a completion truncated to nothing. ``sft`` divides
    by the batch total; when that is 0 the term is 0 (TRL's empty token mean is NaN there).
    Scalars (``beta`` > 0, ``label_smoothing`` in [0, 1], ``f_alpha``, ``discopop_tau`` > 0,
    the weights) may be Python or numpy numbers or 0-d tensors; bools and non-finite values
    are rejected. An option that the given loss types do not use (``sigmoid_label_smoothing``
    without ``sigmoid``, ``bco_delta``/``bco_state`` without ``bco_pair``) is a ValueError.

    TRL options computed outside this function: ``ld_alpha`` (LD-DPO) builds the summed
    log-probs from per-token ones, so pass its weighted sums; TRL's ``sft`` term keeps the
    unweighted sums, so compute it in a second call on those. ``use_weighting`` (WPO)
    multiplies every per-pair loss by a pair weight ``c_b``: TRL's value is
    ``(dpo_loss(..., reduction="none")[0] * c).mean()``.

    Returns ``(loss, metrics)``: ``loss`` is the mean over pairs (``reduction="sum"``: sum;
    ``"none"``: ``[B]``); ``metrics`` holds detached batch means of ``rewards/chosen``
    (``β rho_w``), ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
    ``logps/chosen``, ``logps/rejected`` (and ``bco/delta`` when ``bco_delta`` is set).
    """
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    inputs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    check_per_sequence("pair", **dict(zip(names, inputs)))
    beta = check_positive("beta", beta)
    check_reduction(reduction)
    loss_types, loss_weights = _weighted_loss_types(loss_type, loss_weights)
    f_divergence = _aliased("f_divergence", f_divergence, "f_divergence_type", f_divergence_type,
                            _divergence, "reverse_kl")
    f_alpha = _aliased("f_alpha", f_alpha, "f_alpha_divergence_coef", f_alpha_divergence_coef,
                       real_scalar, 0.5)
    if f_divergence != "reverse_kl" and not all(DPO_FORMULAS[lt].f_divergence for lt in loss_types):
        accepting = sorted(lt for lt, formula in DPO_FORMULAS.items() if formula.f_divergence)
        raise ValueError(
            f"f_divergence={f_divergence!r} is only supported with loss types {accepting}, got {loss_types}"
        )
    eps = real_scalar("label_smoothing", label_smoothing, 0.0, 1.0)
    if "robust" in loss_types and not eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type 'robust', got {eps}")
    if "exo_pair" in loss_types and not 0.0 < eps < 1.0:
        raise ValueError(f"label_smoothing must be in (0, 1) for loss_type 'exo_pair', got {eps}")
    discopop_tau = check_positive("discopop_tau", discopop_tau)
    if not isinstance(sigmoid_label_smoothing, bool):
        raise TypeError(f"sigmoid_label_smoothing must be a bool, got {sigmoid_label_smoothing!r}")
    if sigmoid_label_smoothing and "sigmoid" not in loss_types:
        raise ValueError(f"sigmoid_label_smoothing applies to loss_type 'sigmoid' only, got {loss_types}")
    _check_bco(bco_delta, bco_state, loss_types)

    dtype = compute_dtype(*inputs)
    pc, pr, rc, rr = (t.to(dtype) for t in inputs)
    rho_w, rho_l = pc - rc, pr - rr
    s_w, s_l = _scores(rho_w, f_divergence, f_alpha), _scores(rho_l, f_divergence, f_alpha)
    length_uses = {DPO_FORMULAS[lt].lengths for lt in loss_types}
    len_w = delta_norm = None
    if length_uses & {"chosen", "both"}:
        len_w = check_lengths("chosen_lengths", chosen_lengths, pc, allow_zero=True)
    if "both" in length_uses:
        len_l = check_lengths("rejected_lengths", rejected_lengths, pc, allow_zero=True)
        # TRL divides by the token count clamped at 1: an empty completion keeps its score.
        delta_norm = s_w / len_w.clamp(min=1.0) - s_l / len_l.clamp(min=1.0)

    extra = {}
    bco_mean = None
    if bco_delta is not None:
        batch_mean = torch.cat([beta * rho_w, beta * rho_l]).detach().mean()
        bco_mean = bco_state.update(batch_mean) if bco_delta == "running_mean" else float(batch_mean)
        extra["bco__delta"] = torch.tensor(bco_mean, dtype=torch.float64)
    terms = PairTerms(pc, pr, rc, rr, rho_w, rho_l, s_w - s_l, delta_norm, len_w, beta, eps, discopop_tau,
                      sigmoid_label_smoothing, bco_mean)
    total = 0.0
    for lt, weight in zip(loss_types, loss_weights):
        total = total + weight * DPO_FORMULAS[lt].formula(terms)

    metrics = preference_metrics(beta * rho_w, beta * rho_l, pc, pr, **extra)
    return reduce(total, reduction), metrics


def _weighted_loss_types(loss_type, loss_weights):
    """``loss_type`` (a name or a list of names of :data:`DPO_LOSS_TYPES`) and its checked weights."""
    if isinstance(loss_type, str):
        loss_types = [loss_type]
    elif isinstance(loss_type, (list, tuple)):
        loss_types = list(loss_type)
    else:
        raise TypeError(f"loss_type must be a str or a list of str, got {type(loss_type).__name__}")
    if not loss_types:
        raise ValueError("loss_type must name at least one loss type")
    for lt in loss_types:
        if not isinstance(lt, str) or lt not in DPO_FORMULAS:
            raise ValueError(f"loss_type {lt!r} is unknown; expected one of {DPO_LOSS_TYPES}")
    if loss_weights is None:
        loss_weights = [1.0] * len(loss_types)
    if isinstance(loss_weights, (str, bytes)) or not hasattr(loss_weights, "__len__"):
        raise TypeError(f"loss_weights must be a sequence of numbers, got {loss_weights!r}")
    if len(loss_weights) != len(loss_types):
        raise ValueError(
            f"loss_weights has {len(loss_weights)} entries but loss_type has {len(loss_types)}"
        )
    return loss_types, [real_scalar(f"loss_weights[{i}]", w, 0.0) for i, w in enumerate(loss_weights)]


def _check_bco(bco_delta, bco_state, loss_types) -> None:
    if bco_delta is not None and (not isinstance(bco_delta, str) or bco_delta not in BCO_DELTAS):
        raise ValueError(f"bco_delta {bco_delta!r} is unknown; expected one of {BCO_DELTAS}")
    if bco_state is not None and not isinstance(bco_state, RunningMean):
        raise TypeError(f"bco_state must be a RunningMean or None, got {type(bco_state).__name__}")
    if bco_delta is not None and "bco_pair" not in loss_types:
        raise ValueError(f"bco_delta applies to loss_type 'bco_pair' only, got {loss_types}")
    if (bco_delta == "running_mean") != (bco_state is not None):
        raise ValueError(
            "bco_delta='running_mean' and bco_state (a RunningMean kept across steps) go together; "
            f"got bco_delta={bco_delta!r} and bco_state={bco_state!r}"
        )
