r"""The loss registry: one :class:`LossEntry` per loss type, read by ``PreferenceLoss`` and the trainers.

An entry says what a loss needs and how to call it; the callers build the named inputs from a
batch and call ``entry.function(**inputs, beta=..., **entry.options, **user_options)``. Adding a
loss is one file holding its function and one :func:`register` line (here, or in the caller's
code for a private loss).

Input names (keyword arguments of the loss functions):

* sequence level, per pair ``[B]``: ``policy_chosen_logps``, ``policy_rejected_logps`` (summed
  log-probs), ``ref_chosen_logps``, ``ref_rejected_logps``, ``prev_chosen_logps``,
  ``prev_rejected_logps`` (a previous iterate's), ``chosen_lengths``, ``rejected_lengths`` (token
  counts, clamped at ``entry.min_length``);
* token level, per token ``[B, T]``: ``chosen_logratios``, ``rejected_logratios``
  (``log π - log π_ref``), ``chosen_kl``, ``rejected_kl`` (``KL(π_ref ‖ π)`` per position),
  ``chosen_mask``, ``rejected_mask`` (validity), ``chosen_reward_mask``, ``rejected_reward_mask``,
  ``chosen_kl_mask``, ``rejected_kl_mask`` (SparsePO's token weights, or None);
* unpaired (``paired=False``), sequence level: the policy/reference names above over ``[Bd]``
  desirable (chosen) and ``[Bu]`` undesirable (rejected) completions, and ``policy_kl_logps``,
  ``ref_kl_logps`` ``[M]`` (summed log-probs of mismatched prompt/completion pairs, whose mean
  log-ratio is KTO's reference point).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Mapping, Optional

from .cpo import cpo_loss
from .dpo import dpo_loss
from .dpo_formulas import DPO_FORMULAS
from .inpo import inpo_loss
from .kto import kto_loss
from .orpo import orpo_loss
from .simpo import simpo_loss
from .sparse_po import sparse_po_loss
from .tdpo import tdpo_loss

LEVELS = ("sequence", "token")
POLICY_INPUTS = ("policy_chosen_logps", "policy_rejected_logps")
REFERENCE_INPUTS = ("ref_chosen_logps", "ref_rejected_logps")
PREVIOUS_INPUTS = ("prev_chosen_logps", "prev_rejected_logps")
LENGTH_INPUTS = ("chosen_lengths", "rejected_lengths")
TOKEN_INPUTS = ("chosen_logratios", "rejected_logratios", "chosen_kl", "rejected_kl", "chosen_mask",
                "rejected_mask")
KL_PAIR_INPUTS = ("policy_kl_logps", "ref_kl_logps")
TOKEN_MASK_INPUTS = ("chosen_reward_mask", "rejected_reward_mask", "chosen_kl_mask", "rejected_kl_mask")


@dataclasses.dataclass(frozen=True)
class LossEntry:
    """One loss type.

    * ``name``: the ``loss_type`` string.
    * ``function``: the loss function, ``(**inputs, **options) -> (loss, metrics)``.
    * ``formula``: its per-pair formula as a short function (the DPO family's ``PairTerms -> [B]``;
      otherwise the loss function itself).
    * ``inputs``: the input names it reads (module docstring).
    * ``level``: ``"sequence"`` (per-sequence log-probs) or ``"token"`` (per-token terms).
    * ``paired``: chosen and rejected come in pairs (False: an unpaired loss, e.g. KTO).
    * ``needs_reference``: a reference model is scored (False: none is loaded).
    * ``needs_kl``: the per-token KL over the vocabulary, hence the reference's logits.
    * ``token_masks``: reads SparsePO's reward/KL token masks.
    * ``options``: keyword arguments the entry fixes (a variant); callers may not set them.
    * ``config``: loss keyword -> ``PrefOptDPOConfig`` field the trainer reads it from.
    * ``min_length``: token counts are clamped at this (1: an empty completion counts one token).
    * ``nll_over_prompt``: the trainer takes the chosen NLL over prompt and completion (ORPO).
    * ``trl_dpo``: TRL's ``DPOTrainer`` computes it itself (its own loss types).
    """

    name: str
    function: Callable
    inputs: tuple
    formula: Optional[Callable] = None
    level: str = "sequence"
    paired: bool = True
    needs_reference: bool = True
    needs_kl: bool = False
    token_masks: bool = False
    options: Mapping = dataclasses.field(default_factory=dict)
    config: Mapping = dataclasses.field(default_factory=dict)
    min_length: int = 0
    nll_over_prompt: bool = False
    trl_dpo: bool = False

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if self.needs_kl and (self.level != "token" or not self.needs_reference):
            raise ValueError(f"loss {self.name!r}: needs_kl is a token-level term of a reference")
        if self.formula is None:
            object.__setattr__(self, "formula", self.function)

    def __call__(self, inputs: Mapping, *, beta: float, **kwargs):
        """``function`` on the inputs it reads (picked from ``inputs``), its ``options``, ``beta`` where
        it takes one (INPO does not) and ``kwargs``."""
        if "beta" in inspect.signature(self.function).parameters:
            kwargs["beta"] = beta
        return self.function(**{name: inputs[name] for name in self.inputs}, **self.options, **kwargs)


LOSSES: dict = {}


def register(entry: LossEntry) -> LossEntry:
    """Add ``entry`` to :data:`LOSSES` under its name (a name taken is a ValueError)."""
    if not isinstance(entry, LossEntry):
        raise TypeError(f"entry must be a LossEntry, got {type(entry).__name__}")
    if entry.name in LOSSES:
        raise ValueError(f"loss_type {entry.name!r} is registered already")
    LOSSES[entry.name] = entry
    return entry


def loss_entry(loss_type) -> LossEntry:
    """The entry of ``loss_type``: a registered name, or a list of DPOTrainer loss types (TRL's weighted mix)."""
    if isinstance(loss_type, (list, tuple)):
        bad = [lt for lt in loss_type if not isinstance(lt, str) or lt not in DPO_FORMULAS]
        if not loss_type or bad:
            raise ValueError(
                f"a list loss_type mixes DPOTrainer loss types {tuple(DPO_FORMULAS)}; got {list(loss_type)}"
            )
        return dataclasses.replace(LOSSES["sigmoid"], name="mix", formula=dpo_loss,
                                   options={"loss_type": list(loss_type)})
    if not isinstance(loss_type, str) or loss_type not in LOSSES:
        raise ValueError(f"loss_type {loss_type!r} is unknown; expected one of {tuple(LOSSES)}")
    return LOSSES[loss_type]


def entries_reading(input_name: str) -> tuple:
    """Names of the loss types that read ``input_name``."""
    return tuple(name for name, entry in LOSSES.items() if input_name in entry.inputs)


def stacked_token_inputs(logratios, kl, valid, reward_mask=None, kl_mask=None) -> dict:
    """The token-level inputs of a stacked batch ``[2B, T]`` (rows ``[0, B)`` chosen, ``[B, 2B)`` rejected)."""
    n = logratios.shape[0] // 2
    inputs = {}
    for side, rows in (("chosen", slice(None, n)), ("rejected", slice(n, None))):
        inputs.update({f"{side}_logratios": logratios[rows], f"{side}_kl": kl[rows], f"{side}_mask": valid[rows],
                       f"{side}_reward_mask": None if reward_mask is None else reward_mask[rows],
                       f"{side}_kl_mask": None if kl_mask is None else kl_mask[rows]})
    return inputs


_PAIR = POLICY_INPUTS + REFERENCE_INPUTS + LENGTH_INPUTS
for _name, _pair_formula in DPO_FORMULAS.items():
    register(LossEntry(_name, dpo_loss, _PAIR, formula=_pair_formula.formula, options={"loss_type": _name},
                       trl_dpo=True))
register(LossEntry("simpo", simpo_loss, POLICY_INPUTS + LENGTH_INPUTS, needs_reference=False, min_length=1,
                   config={"gamma": "simpo_gamma", "label_smoothing": "label_smoothing"}))
register(LossEntry("inpo", inpo_loss, POLICY_INPUTS + REFERENCE_INPUTS + PREVIOUS_INPUTS,
                   config={"eta": "inpo_eta", "tau": "inpo_tau"}))
for _variant in (1, 2):
    register(LossEntry(f"tdpo{_variant}", tdpo_loss, TOKEN_INPUTS, level="token", needs_kl=True,
                       options={"variant": _variant}, config={"alpha": "tdpo_alpha"}))
register(LossEntry("sparse_po", sparse_po_loss, TOKEN_INPUTS + TOKEN_MASK_INPUTS, level="token", needs_kl=True,
                   token_masks=True, config={"l1_reward": "sparse_po_l1_reward", "l1_kl": "sparse_po_l1_kl"}))
register(LossEntry("orpo", orpo_loss, POLICY_INPUTS + LENGTH_INPUTS, needs_reference=False, min_length=1,
                   nll_over_prompt=True))
_CPO_CONFIG = {"label_smoothing": "label_smoothing", "cpo_alpha": "cpo_alpha"}
for _name, _variant in (("cpo", "sigmoid"), ("cpo_hinge", "hinge"), ("cpo_ipo", "ipo"), ("cpo_simpo", "simpo")):
    register(LossEntry(_name, cpo_loss, POLICY_INPUTS + LENGTH_INPUTS, needs_reference=False, min_length=1,
                       options={"variant": _variant},
                       config=dict(_CPO_CONFIG, simpo_gamma="simpo_gamma") if _variant == "simpo" else _CPO_CONFIG))
_KTO_CONFIG = {"desirable_weight": "desirable_weight", "undesirable_weight": "undesirable_weight"}
register(LossEntry("kto", kto_loss, POLICY_INPUTS + REFERENCE_INPUTS + KL_PAIR_INPUTS, paired=False,
                   options={"loss_type": "kto"}, config=_KTO_CONFIG))
register(LossEntry("apo_zero_unpaired", kto_loss, POLICY_INPUTS + REFERENCE_INPUTS, paired=False,
                   options={"loss_type": "apo_zero_unpaired"}, config=_KTO_CONFIG))
