r"""TRL's ``GRPOTrainer`` on this package's fused LM head, with an exact full-vocabulary KL.

:class:`PrefOptGRPOTrainer` and :class:`PrefOptGRPOConfig` take the same arguments as TRL 1.16's
``GRPOTrainer`` and ``GRPOConfig``, plus (see :class:`PrefOptGRPOConfig`)

* ``kl_estimator="k3"`` (default): TRL's loss and metrics unchanged, on our fused head;
  ``kl_estimator="full"``: the per-token ``KL(π ‖ π_ref)`` over the whole vocabulary, with its
  exact gradient, in place of TRL's sampled-token k3 estimate;
* ``sampler_matched_logprobs=True``: the policy's log-probs scored under the sampler's
  processed distribution (``temperature``, ``top_k``, ``top_p``, ``min_p``), so that the
  importance ratio against vLLM's ``processed_logprobs`` compares one distribution.

The constructor's ``process_group=`` (a ``torch.distributed`` group) is for a vocabulary-sharded
LM head: each rank's head holds its contiguous shard of the vocabulary, in rank order, and every
op of the trainer (log-probs, entropy, the full KL) merges the shards' row states through it::

    from prefopt_kernels.integrations.trl_grpo import PrefOptGRPOConfig, PrefOptGRPOTrainer
    args = PrefOptGRPOConfig(output_dir="out", beta=0.04, kl_estimator="full")
    trainer = PrefOptGRPOTrainer(model="Qwen/Qwen2.5-0.5B", reward_funcs=reward, args=args,
                                 train_dataset=dataset)
    trainer.train()

The reference's hidden states at loss time (``"full"``): the reference backbone is run again
under ``no_grad`` inside ``compute_loss``, on the micro-batch, and TRL's pass that scores the
reference's log-probs at generation is skipped. With ``num_iterations = 1`` that is the same
number of reference backbone passes as the stock trainer (one per completion); each further
iteration over a generation batch adds one. Keeping the hidden states from generation instead
would hold ``[B, T, H]`` per completion for the whole generation batch.

Needs ``transformers`` and ``trl`` (the ``[trl]`` extra).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
import trl.trainer.grpo_trainer as trl_grpo
from trl import GRPOTrainer

from ..linear import linear_token_terms
from .trl import (PolicyAndReference, add_fused_lm_head, add_head_route, backbone_output, head_transform,
                  sampler_options)
from .trl_grpo_config import KL_ESTIMATORS, PrefOptGRPOConfig

# TRL's module name is rebound for one construction at a time.
_CONSTRUCTION = threading.Lock()
# Loss types whose loss is a mean of per-sequence token means, or of per-sequence sums, divided
# by the gradient-accumulation steps; the token-count-normalised ones divide by num_items_in_batch.
_PER_SEQUENCE_MEAN = ("grpo", "sapo")
_PER_ITEM = ("cispo", "dapo", "vespo")


def full_kl_terms(hidden, head, labels, ref_hidden, ref_head, *, temperature: float = 1.0,
                  logit_scale: float = 1.0, softcap: Optional[float] = None, ref_logit_scale: float = 1.0,
                  ref_softcap: Optional[float] = None, process_group=None, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, min_p: Optional[float] = None):
    r"""Per-token ``(logp, entropy, kl)`` of a policy against its reference, from hidden states.

    With ``z = logit_scale·(hidden @ Wᵀ + b)`` (then ``softcap·tanh(z/softcap)`` when set),
    ``p = softmax(z/T)``, and ``q`` likewise from ``ref_hidden`` and the reference head:

    * ``logp = log p(y)``, or with ``top_k``/``top_p``/``min_p`` the label's log-prob under
      ``p`` renormalised on the sampler's kept set (:func:`sampler_options`);
    * ``entropy = H(p)``;
    * ``kl = KL(p ‖ q) = Σ_v p_v (log p_v - log q_v)`` over the whole vocabulary.

    One :func:`prefopt_kernels.linear_token_terms` pass (``divergence="reverse_kl"``); all three
    are fp32 ``[...]`` with the labels' shape, 0 where the label is -100, and differentiable to
    the policy's ``hidden``, head weight and bias (never the reference's).

    Args:
        hidden: ``[..., H]`` policy's last hidden states (any float dtype).
        head: the policy's LM head, an ``nn.Linear`` with ``weight [V, H]`` (``[V_rank, H]``, the
            rank's vocabulary shard, under ``process_group``) and optional ``bias``.
        labels: ``[...]`` int64 global token ids, -100 where ignored.
        ref_hidden, ref_head: the same for the reference (``ref_hidden``'s leading shape equals
            ``hidden``'s).
        temperature, logit_scale, softcap, ref_logit_scale, ref_softcap: the logits' transform.
        process_group: a vocabulary-sharded head's group (DESIGN.md "Tensor parallel").
        top_k, top_p, min_p: the sampler's kept set for ``logp`` (``None``: the whole vocabulary).
    """
    terms = linear_token_terms(
        hidden, head.weight, labels, ref_hidden, ref_head.weight, head_bias=head.bias, ref_head_bias=ref_head.bias,
        divergence="reverse_kl", temperature=temperature, return_entropy=True, logit_scale=logit_scale,
        ref_logit_scale=ref_logit_scale, softcap=softcap, ref_softcap=ref_softcap, process_group=process_group,
        **sampler_options(top_k, top_p, min_p),
    )
    return terms.logp, terms.entropy, terms.div


@contextlib.contextmanager
def _grpo_constructor(policy_sampler: dict, process_group):
    """``GRPOTrainer.__init__`` with our fused LM head in place of TRL's.

    TRL 1.16 installs the policy's head first, then the reference's; both get ``process_group``,
    the policy's also ``policy_sampler`` (the sampler's kept set). The name is rebound under a
    lock, as in the DPO trainer.
    """
    with _CONSTRUCTION:
        install = trl_grpo.add_fused_lm_head
        installed = 0

        def install_ours(model, **head_options):
            nonlocal installed
            sampler = policy_sampler if installed == 0 else {}
            installed += 1
            add_fused_lm_head(model, **head_options, **sampler, process_group=process_group)

        trl_grpo.add_fused_lm_head = install_ours
        try:
            yield
        finally:
            trl_grpo.add_fused_lm_head = install


class PrefOptGRPOTrainer(PolicyAndReference, GRPOTrainer):
    r"""``GRPOTrainer`` on our fused LM head, with ``kl_estimator`` and ``sampler_matched_logprobs``.

    ``kl_estimator="k3"`` runs TRL's ``_compute_loss`` unchanged. ``kl_estimator="full"`` scores
    the micro-batch in one :func:`full_kl_terms` pass over the policy's hidden states (with
    gradient) and the reference backbone's (recomputed under ``no_grad``), and adds
    ``beta · KL_t`` (times the importance ratio when ``use_bias_correction_kl``) to TRL's
    per-token loss, aggregated as the ``loss_type`` aggregates it; TRL's loss is linear in its
    per-token loss, so that sum is TRL's loss with ``KL_t`` in place of k3. The ``kl`` metric is
    the masked token mean of ``KL_t``, as TRL logs k3.

    Args: as ``GRPOTrainer``, plus ``process_group``: the group of a vocabulary-sharded LM head
    (policy and reference alike), or ``None``.
    """

    def __init__(self, model, reward_funcs, args=None, *more, process_group=None, **kwargs):
        options = _prefopt_options(args)
        sampler = {}
        if options["sampler_matched_logprobs"]:
            sampler = sampler_options(args.top_k, args.top_p, args.min_p)
        with _grpo_constructor(sampler, process_group):
            super().__init__(model, reward_funcs, args, *more, **kwargs)
        self.kl_estimator = options["kl_estimator"]
        self.process_group = process_group
        self.policy_sampler = sampler
        self._full_kl_scoring = False
        self._full_kl = None
        if self.kl_estimator != "full":
            return
        if self.aux_loss_enabled:
            raise ValueError("kl_estimator='full' does not add the MoE auxiliary loss; set router_aux_loss_coef=0.0")
        add_head_route(self.policy_module())
        if self.ref_model is not None:
            add_head_route(self.accelerator.unwrap_model(self.ref_model))

    @contextlib.contextmanager
    def _without_k3_term(self):
        """TRL's code with ``beta = 0``: it then neither scores the reference at generation nor adds k3."""
        beta = self.beta
        self.beta = 0.0
        try:
            yield
        finally:
            self.beta = beta

    # ------------------------------------------------------------------ generation and loss

    def _generate_and_score_completions(self, inputs):
        if self.kl_estimator != "full":
            return super()._generate_and_score_completions(inputs)
        with self._without_k3_term():
            return super()._generate_and_score_completions(inputs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **model_extras):
        if not self._full_kl_scoring:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **model_extras)
        logps, entropies, kl = self._full_kl_pass(model, input_ids, attention_mask, logits_to_keep, model_extras)
        self._full_kl = (logps, kl)
        return logps, entropies, None

    def _full_kl_pass(self, model, input_ids, attention_mask, logits_to_keep, model_extras):
        """``(logp, entropy, kl)`` ``[B, logits_to_keep]`` of the completion tokens: the reference
        backbone under ``no_grad``, then the policy's forward with :func:`full_kl_terms` as its head."""
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        # The loss scores the micro-batch in one chunk, so every model input is whole.
        model_inputs.update({name: value for name, value in model_extras.items()
                             if value is not None and name not in ("num_images", "num_tiles")})
        labels = input_ids[:, -logits_to_keep:].masked_fill(attention_mask[:, -logits_to_keep:] == 0, -100)
        reference_call = self.ref_model if self.ref_model is not None else model
        no_checkpointing = trl_grpo.disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
        with torch.no_grad(), no_checkpointing, self.reference_context(), self.accelerator.autocast():
            ref_out = reference_call(**model_inputs, prefopt_head=backbone_output)
        # The hidden state at t predicts the token at t + 1.
        ref_hidden = ref_out.last_hidden_state[:, -logits_to_keep - 1:-1]
        reference = self.reference_module()
        ref_head = reference.get_output_embeddings()
        ref_scale, ref_softcap = head_transform(reference.config.get_text_config())
        cast = self.args.cast_lm_head_to_fp32

        def policy_terms(policy, backbone_outputs):
            """Run inside the policy's forward: reads its hidden state and LM head."""
            hidden = backbone_outputs.last_hidden_state[:, -logits_to_keep - 1:-1]
            head = policy.get_output_embeddings()
            scale, softcap = head_transform(policy.config.get_text_config())
            reference_hidden = ref_hidden
            autocast = contextlib.nullcontext()
            if cast:
                hidden, reference_hidden = hidden.float(), ref_hidden.float()
                autocast = torch.autocast(hidden.device.type, enabled=False)
            with autocast:
                return full_kl_terms(hidden, head, labels.to(head.weight.device), reference_hidden, ref_head,
                                     temperature=self.temperature, logit_scale=scale, softcap=softcap,
                                     ref_logit_scale=ref_scale, ref_softcap=ref_softcap,
                                     process_group=self.process_group, **self.policy_sampler)

        with self.accelerator.autocast():
            return model(**model_inputs, prefopt_head=policy_terms)

    def _compute_loss(self, model, inputs):
        if self.kl_estimator != "full":
            return super()._compute_loss(model, inputs)
        self._full_kl_scoring = True
        try:
            with self._without_k3_term():
                loss = super()._compute_loss(model, inputs)
            per_token_logps, per_token_kl = self._full_kl
        finally:
            self._full_kl_scoring, self._full_kl = False, None
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"
        if self.args.use_bias_correction_kl:
            per_token_kl = per_token_kl * self._importance_weights(per_token_logps, inputs, mask)
        penalty, unscaled = self._aggregate(self.beta * per_token_kl, mask, inputs, mode)
        if self._entropy_bonus_enabled:
            # TRL's policy_loss metric includes its KL term.
            policy_loss = self._metrics[mode]["policy_loss"]
            policy_loss[-1] += self.accelerator.gather(unscaled.detach()).nanmean().item()
        sums = torch.stack([(per_token_kl * mask).sum(), mask.sum().float()])
        totals = self.accelerator.reduce(sums, reduction="sum")
        self._metrics[mode]["kl"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return loss + penalty

    def _importance_weights(self, per_token_logps, inputs, mask):
        """TRL's ``coef_1``: ``exp(log π - log π_old)`` per token, or of its masked mean per sequence."""
        old = inputs.get("old_per_token_logps")
        log_ratio = per_token_logps - (per_token_logps.detach() if old is None else old)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return torch.exp(log_ratio)

    def _aggregate(self, per_token, mask, inputs, mode):
        """``(loss term, the same before the gradient-accumulation scaling)`` of ``per_token`` ``[B, T]``,
        reduced as TRL 1.16 reduces its per-token loss for ``self.loss_type``."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type in _PER_ITEM:
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            term = (per_token * mask).sum() / normalizer
            return term, term
        if self.loss_type in _PER_SEQUENCE_MEAN:
            unscaled = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        elif self.loss_type == "bnpo":
            unscaled = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        elif self.loss_type == "dr_grpo":
            unscaled = (per_token * mask).sum() / (per_token.size(0) * self.max_completion_length)
        elif self.loss_type == "luspo":
            unscaled = (per_token * mask).sum(-1).mean()
        else:
            raise ValueError(f"Unknown loss type: {self.loss_type}")
        return unscaled / accumulation, unscaled


def _prefopt_options(args) -> dict:
    """``kl_estimator`` and ``sampler_matched_logprobs`` of ``args``: a :class:`PrefOptGRPOConfig`'s,
    or the stock values for TRL's ``GRPOConfig`` (or ``None``)."""
    if isinstance(args, PrefOptGRPOConfig):
        return {"kl_estimator": args.kl_estimator, "sampler_matched_logprobs": args.sampler_matched_logprobs}
    return {"kl_estimator": KL_ESTIMATORS[0], "sampler_matched_logprobs": False}
