"""``PrefOptDPOConfig``: TRL's ``DPOConfig`` plus the parameters of this package's preference
losses, and the loss types :class:`~prefopt_kernels.integrations.trl_dpo.PrefOptDPOTrainer` adds.

Needs ``trl`` (the ``[trl]`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from ..losses.registry import LOSSES

SPARSE_PO_MASKS = ("learned", "activation", "none")
# The learned SparsePO mask lives on the policy under this name, so the optimizer and the
# checkpoints include its parameters.
MASK_MODULE_NAME = "prefopt_sparse_po_mask"


@dataclass
class PrefOptDPOConfig(DPOConfig):
    r"""``DPOConfig`` plus the parameters of the losses of :mod:`prefopt_kernels.losses`.

    ``beta`` is each loss's ``β`` and ``label_smoothing`` SimPO's ``ε``. Per loss type:

    * ``"sparse_po"``: ``-log σ(β[(U(y_w) - U(y_l)) - (D(y_l) - D(y_w))])
      + λ_u Σ‖m_u‖_1 + λ_d Σ‖m_d‖_1`` with ``U = Σ_t m_u (log π - log π_ref)``,
      ``D = Σ_t m_d KL(π_ref ‖ π)``, ``λ_u = sparse_po_l1_reward``, ``λ_d = sparse_po_l1_kl``;
      the masks ``m_u, m_d`` come from ``sparse_po_mask``: ``"learned"``
      (:class:`~prefopt_kernels.masks.LearnedTokenMask` over the reference's hidden states,
      trained with the policy; ``sparse_po_separate_kl_mask`` gives ``m_d`` its own network,
      ``sparse_po_mask_dropout`` its dropout), ``"activation"``
      (:class:`~prefopt_kernels.masks.ActivationTokenMask` over the reference's decoder layers,
      ``m_u = m_d``) or ``"none"`` (all ones: TDPO1).
    * ``"tdpo1"`` / ``"tdpo2"``: ``-log σ(β(u - (D(y_l) - D(y_w))))`` /
      ``-log σ(β(u - α(D(y_l) - sg[D(y_w)])))`` with ``α = tdpo_alpha``.
    * ``"simpo"``: ``-log σ(β(log π(y_w)/|y_w| - log π(y_l)/|y_l|) - γ)`` with
      ``γ = simpo_gamma``.
    * ``"orpo"``: ``NLL_w - β log σ(log odds(y_w) - log odds(y_l))``
      (:func:`~prefopt_kernels.losses.orpo_loss`; ``β`` is ORPO's ``λ``, the NLL is over the chosen
      prompt and completion tokens, as TRL's ``ORPOTrainer`` takes it).
    * ``"cpo"``, ``"cpo_hinge"``, ``"cpo_ipo"``, ``"cpo_simpo"``: TRL's ``CPOTrainer`` loss types
      ``sigmoid``, ``hinge``, ``ipo``, ``simpo`` (:func:`~prefopt_kernels.losses.cpo_loss`) plus
      ``cpo_alpha`` times the chosen completions' NLL; ``label_smoothing`` and ``simpo_gamma`` as
      there. They are named apart from DPOTrainer's ``sigmoid``/``hinge``/``ipo`` and SimPO.
    * ``"inpo"``: ``(h - η/2)²``, ``h = Δ_π - ητ Δ_ref - (1 - ητ) Δ_prev`` (``Δ`` the chosen
      minus rejected log-prob), ``η = inpo_eta``, ``τ = inpo_tau``; the previous iterate is the
      trainer's ``prev_model``, or the reference when none is given.

    One of these loss types is used alone (no ``loss_weights`` mix), with
    ``f_divergence_type="reverse_kl"``, ``ld_alpha=None`` and ``use_weighting=False``; the
    token-level ones need the reference's hidden states, so not ``precompute_ref_log_probs``;
    the reference-free ones (``simpo``, ``orpo``, ``cpo*``) load no reference, so neither
    ``precompute_ref_log_probs`` nor ``sync_ref_model``. Which loss types exist and what each
    reads is :data:`prefopt_kernels.losses.registry.LOSSES`.
    """

    sparse_po_mask: str = field(
        default="learned",
        metadata={"help": "SparsePO token mask: 'learned', 'activation' or 'none'.",
                  "choices": list(SPARSE_PO_MASKS)},
    )
    sparse_po_l1_reward: float = field(default=0.0, metadata={"help": "SparsePO L1 weight of the reward mask."})
    sparse_po_l1_kl: float = field(default=0.0, metadata={"help": "SparsePO L1 weight of the KL mask."})
    sparse_po_separate_kl_mask: bool = field(
        default=False, metadata={"help": "Learned SparsePO mask: a separate network for the KL mask."}
    )
    sparse_po_mask_dropout: float = field(default=0.0, metadata={"help": "Learned SparsePO mask: dropout."})
    tdpo_alpha: float = field(default=0.5, metadata={"help": "TDPO2 weight α of the sequential KL margin."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin γ."})
    inpo_eta: float = field(default=0.1, metadata={"help": "INPO step size η (> 0)."})
    inpo_tau: float = field(default=1.0, metadata={"help": "INPO KL strength τ (>= 0, ητ <= 1)."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "CPO weight of the chosen NLL (>= 0)."})

    def __post_init__(self):
        super().__post_init__()
        unknown = [name for name in self.loss_type if name not in LOSSES]
        if unknown:
            raise ValueError(f"loss_type {unknown[0]!r} is unknown; expected one of {tuple(LOSSES)}")
        ours = [LOSSES[name] for name in self.loss_type if name in LOSSES and not LOSSES[name].trl_dpo]
        if not ours:
            return
        name = ours[0].name
        if not ours[0].paired:
            raise ValueError(f"loss_type {name!r} is unpaired; DPOTrainer's batches are chosen/rejected pairs")
        if len(self.loss_type) != 1 or self.loss_weights is not None:
            raise ValueError(f"loss_type {name!r} must be used alone, without loss_weights; got loss_type "
                             f"{self.loss_type}, loss_weights {self.loss_weights}")
        if self.f_divergence_type != "reverse_kl" or self.ld_alpha is not None or self.use_weighting:
            raise ValueError(
                f"loss_type {name!r} needs f_divergence_type='reverse_kl', ld_alpha=None and use_weighting=False"
            )
        if ours[0].level == "token" and self.precompute_ref_log_probs:
            raise ValueError(f"loss_type {name!r} needs the reference's hidden states: "
                             "set precompute_ref_log_probs=False")
        if not ours[0].needs_reference and (self.precompute_ref_log_probs or self.sync_ref_model):
            raise ValueError(f"loss_type {name!r} has no reference model: "
                             "set precompute_ref_log_probs=False and sync_ref_model=False")
        if self.sparse_po_mask not in SPARSE_PO_MASKS:
            raise ValueError(f"sparse_po_mask must be one of {SPARSE_PO_MASKS}; got {self.sparse_po_mask!r}")
