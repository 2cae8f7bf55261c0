"""Preference-optimisation losses over per-token or per-sequence tensors.

Every loss returns ``(loss, metrics)``; ``metrics`` holds detached tensors under TRL's names.
None of them depends on a kernel backend: the fused ops produce their per-token inputs.
Which loss types exist, and what each needs, is the registry (:mod:`.registry`).
"""

from .cpo import CPO_VARIANTS, cpo_loss
from .dpo import BCO_DELTAS, DPO_LOSS_TYPES, F_DIVERGENCES, RunningMean, dpo_loss
from .fdpg import FDPG_DIVERGENCES, FDPGState, fdpg_loss, fdpg_pseudo_rewards
from .inpo import inpo_loss
from .kto import KTO_LOSS_TYPES, kto_loss
from .module import PREFERENCE_LOSS_TYPES, PreferenceLoss
from .orpo import orpo_loss
from .registry import LOSSES, LossEntry, register
from .simpo import simpo_loss
from .sparse_po import sparse_po_loss
from .tdpo import tdpo_loss

__all__ = [
    "BCO_DELTAS",
    "CPO_VARIANTS",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "FDPG_DIVERGENCES",
    "FDPGState",
    "KTO_LOSS_TYPES",
    "LOSSES",
    "LossEntry",
    "PREFERENCE_LOSS_TYPES",
    "PreferenceLoss",
    "RunningMean",
    "cpo_loss",
    "dpo_loss",
    "fdpg_loss",
    "fdpg_pseudo_rewards",
    "inpo_loss",
    "kto_loss",
    "orpo_loss",
    "register",
    "simpo_loss",
    "sparse_po_loss",
    "tdpo_loss",
]
