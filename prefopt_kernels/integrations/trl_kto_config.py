"""``PrefOptKTOConfig``: TRL's ``KTOConfig`` whose loss options are checked when it is built.

Needs ``trl`` (the ``[trl]`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import KTOConfig

from ..losses.common import real_scalar
from ..losses.kto import KTO_LOSS_TYPES


def check_kto_options(args) -> None:
    """The KTO options of a ``KTOConfig`` that TRL 1.16 would only trip over in the first step, or never.

    ``loss_type`` one of :data:`~prefopt_kernels.losses.kto.KTO_LOSS_TYPES` (TRL's
    ``_compute_loss`` otherwise fails on an unbound name), ``beta`` finite and > 0,
    ``desirable_weight`` and ``undesirable_weight`` finite and >= 0; each error names the field.
    """
    if not isinstance(args.loss_type, str) or args.loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}; got {args.loss_type!r}")
    real_scalar("beta", args.beta, 0.0, low_open=True)
    real_scalar("desirable_weight", args.desirable_weight, 0.0)
    real_scalar("undesirable_weight", args.undesirable_weight, 0.0)


@dataclass
class PrefOptKTOConfig(KTOConfig):
    r"""``KTOConfig`` with its loss options checked at construction (:func:`check_kto_options`).

    The loss is TRL's: per completion, with ``r = log π(y|x) - log π_ref(y|x)`` and ``z`` the
    batch's clamped mean log-ratio over mismatched (prompt, completion) pairs,
    ``desirable_weight · (1 - σ(β(r - z)))`` for a desirable completion and
    ``undesirable_weight · (1 - σ(β(z - r)))`` for an undesirable one (``loss_type="kto"``), or
    ``desirable_weight · (1 - σ(β r))`` and ``undesirable_weight · σ(β r)``
    (``"apo_zero_unpaired"``); see :func:`prefopt_kernels.losses.kto_loss`.
    """

    def __post_init__(self):
        super().__post_init__()
        check_kto_options(self)
