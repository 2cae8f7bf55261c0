r"""TRL's ``DPOTrainer`` with the preference losses of :mod:`prefopt_kernels.losses`.

:class:`PrefOptDPOTrainer` and :class:`PrefOptDPOConfig` take the same arguments as TRL 1.16's
``DPOTrainer`` and ``DPOConfig``; ``loss_type`` additionally accepts

* ``"sparse_po"``: :func:`~prefopt_kernels.losses.sparse_po_loss` with learned, activation or no
  token masks;
* ``"tdpo1"``, ``"tdpo2"``: :func:`~prefopt_kernels.losses.tdpo_loss`;
* ``"simpo"``: :func:`~prefopt_kernels.losses.simpo_loss` (no reference forward);
* ``"inpo"``: :func:`~prefopt_kernels.losses.inpo_loss`;
* ``"orpo"``: :func:`~prefopt_kernels.losses.orpo_loss`, ``"cpo"``, ``"cpo_hinge"``,
  ``"cpo_ipo"``, ``"cpo_simpo"``: :func:`~prefopt_kernels.losses.cpo_loss` (no reference forward);
* any loss registered in :data:`prefopt_kernels.losses.registry.LOSSES`: the trainer reads its
  entry (level, reference, inputs, config fields) and calls it.

Every other ``loss_type`` runs TRL's own ``_compute_loss`` unchanged, on this package's fused
LM head (:func:`prefopt_kernels.integrations.trl.add_fused_lm_head` replaces TRL's on the
policy, the reference and INPO's previous iterate). The token-level losses
(SparsePO, TDPO) get the policy's and the reference's label log-probs and the per-token
``KL(π_ref ‖ π)`` from one :func:`prefopt_kernels.linear_token_terms` call over both models'
last hidden states, so neither model's logits are ever materialised::

    from prefopt_kernels.integrations.trl_dpo import PrefOptDPOConfig, PrefOptDPOTrainer
    args = PrefOptDPOConfig(output_dir="out", loss_type="sparse_po", sparse_po_mask="learned")
    trainer = PrefOptDPOTrainer(model=model, ref_model=ref_model, args=args,
                                train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

Needs ``transformers`` and ``trl`` (the ``[trl]`` extra).
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch
import trl.trainer.dpo_trainer as trl_dpo
from trl import DPOTrainer

from ..linear import linear_token_terms
from ..losses.registry import LOSSES, stacked_token_inputs
from ..losses.sparse_po import kl_row_selector
from ..masks import ActivationTokenMask, LearnedTokenMask
from .trl import PolicyAndReference, add_fused_lm_head, add_head_route, backbone_output, head_transform
from .trl_dpo_config import MASK_MODULE_NAME, PrefOptDPOConfig

# TRL's module names are rebound for one construction at a time.
_CONSTRUCTION = threading.Lock()


@contextlib.contextmanager
def _dpo_constructor(policy_by_name: bool, load_reference: bool):
    """``DPOTrainer.__init__`` with our fused LM head in place of TRL's, and optionally no reference loaded.

    TRL installs its head on the policy and the reference inside its constructor, before the
    reference is wrapped (DDP, DeepSpeed, FSDP) and before ``precompute_ref_log_probs`` runs the
    reference over the datasets: ours goes in at that same point, so every pass runs on it.
    Without ``load_reference``, TRL's load of a reference from the policy's name (its last call to
    ``create_model_from_path``; the first loads the policy when it is given by name) gives ``None``.
    The names are rebound under a lock: another thread's construction waits for this one, so
    none restores them out of order (a stock ``DPOTrainer`` built meanwhile in another thread
    would see them rebound).
    """
    with _CONSTRUCTION:
        install, create = trl_dpo.add_fused_lm_head, trl_dpo.create_model_from_path
        loads_left = 1 if policy_by_name else 0

        def create_policy_only(path, **kwargs):
            nonlocal loads_left
            if loads_left == 0:
                return None
            loads_left -= 1
            return create(path, **kwargs)

        trl_dpo.add_fused_lm_head = add_fused_lm_head
        if not load_reference:
            trl_dpo.create_model_from_path = create_policy_only
        try:
            yield
        finally:
            trl_dpo.add_fused_lm_head, trl_dpo.create_model_from_path = install, create


class PrefOptDPOTrainer(PolicyAndReference, DPOTrainer):
    r"""``DPOTrainer`` whose ``loss_type`` also takes ``sparse_po``, ``tdpo1``, ``tdpo2``, ``simpo``, ``inpo``.

    The losses and their parameters are those of :class:`PrefOptDPOConfig`. For the token-level
    losses, per completion token ``t`` (label ``y_t``, prompt and padding excluded):

    .. math::
        l_t = \log π(y_t|·) - \log π_{ref}(y_t|·), \qquad
        KL_t = KL\big(π_{ref}(·|ctx_t) \,‖\, π(·|ctx_t)\big),

    all three from one :func:`~prefopt_kernels.linear_token_terms` call on the policy's last
    hidden state (with gradient) and the reference backbone's (under ``no_grad``). ``KL_t`` is
    skipped where the activation mask (detached) is 0; the learned mask, while it trains, gets
    ``KL_t`` at every completion token, since its gradient there is ``±c KL_t`` even where it is
    0 (:func:`~prefopt_kernels.losses.sparse_po_loss`). The learned SparsePO mask is a submodule
    of the policy (``MASK_MODULE_NAME``), so the optimizer trains it and checkpoints store it.

    Logged metrics: TRL's names (``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
    ``entropy``, ``logits/*``, ``mean_token_accuracy``, ``num_tokens``) plus each loss's own
    (``kl/chosen``, ``kl/rejected``, ``mask/density``, ...), each the batch mean of the loss's
    metric, as the loss defines it (SimPO's rewards are length-normalised, INPO's are not
    scaled by ``β``).

    Every pass runs on our fused LM head, installed where TRL installs its own: training,
    evaluation and the ``precompute_ref_log_probs`` pass over the datasets.

    Args: as ``DPOTrainer``, plus ``prev_model``: the previous INPO iterate ``π_t``, frozen
    (``None``: the reference). The reference-free losses (``simpo``, ``orpo``, ``cpo*``: their
    registry entry's ``needs_reference`` is False) have none: ``ref_model`` must be ``None``, and
    none is loaded from the policy's name.
    """

    def __init__(self, model, ref_model=None, args=None, *more, prev_model=None, **kwargs):
        entries = [LOSSES[name] for name in getattr(args, "loss_type", ()) if name in LOSSES]
        reference_free = any(not entry.needs_reference for entry in entries)
        if reference_free and ref_model is not None:
            raise ValueError(f"ref_model: loss_type {args.loss_type} has no reference model; pass ref_model=None")
        with _dpo_constructor(policy_by_name=isinstance(model, str), load_reference=not reference_free):
            super().__init__(model, ref_model, args, *more, **kwargs)
        entry = LOSSES.get(self.loss_types[0])
        # The package's losses; TRL's own loss types run TRL's _compute_loss.
        self.prefopt_loss = None if entry is None or entry.trl_dpo else entry
        self.prev_model = None
        if prev_model is not None and (self.prefopt_loss is None
                                       or "prev_chosen_logps" not in self.prefopt_loss.inputs):
            raise ValueError(f"prev_model is the previous INPO iterate; loss_type is {self.loss_types}")
        if self.prefopt_loss is None:
            return
        if not isinstance(self.args, PrefOptDPOConfig):
            raise TypeError(f"loss_type {entry.name!r} needs a PrefOptDPOConfig")
        if self.aux_loss_enabled:
            raise ValueError(f"loss_type {entry.name!r} does not add the MoE auxiliary loss; "
                             "set router_aux_loss_coef=0.0")
        policy = self.policy_module()
        if entry.level == "token":
            add_head_route(policy)
            if self.ref_model is not None:
                add_head_route(self.reference_module())
        self._activation_mask = None
        if entry.token_masks and self.args.sparse_po_mask == "learned":
            text_config = self.reference_module().config.get_text_config()
            # output_hidden_states gives the embeddings and every layer's output.
            mask = LearnedTokenMask(text_config.hidden_size, text_config.num_hidden_layers + 1,
                                    separate_kl=self.args.sparse_po_separate_kl_mask,
                                    dropout=self.args.sparse_po_mask_dropout)
            policy.add_module(MASK_MODULE_NAME, mask.to(policy.get_output_embeddings().weight.device))
        elif entry.token_masks and self.args.sparse_po_mask == "activation":
            reference = self.reference_module()
            # The language decoder's layers only: a vision-language model also names its vision
            # tower's layers in _no_split_modules.
            layer_names = set(getattr(reference, "_no_split_modules", None) or ())
            layer_types = tuple({type(m) for m in reference.get_decoder().modules()
                                 if type(m).__name__ in layer_names})
            if not layer_types:
                raise ValueError("sparse_po_mask='activation' hooks the decoder layers named in the reference "
                                 f"model's _no_split_modules; {type(reference).__name__}'s decoder has none")
            self._activation_mask = ActivationTokenMask(layer_types)
        if prev_model is not None:
            self.prev_model = self._prepare_frozen(prev_model)

    def _prepare_frozen(self, model):
        """A frozen model scored like the reference: our head on it (its PEFT base model), then wrapped
        for the run as TRL wraps the reference (DeepSpeed, FSDP or plain accelerate)."""
        add_fused_lm_head(model.get_base_model() if trl_dpo.is_peft_model(model) else model)
        if self.args.disable_dropout:
            trl_dpo.disable_dropout_in_model(model)
        model.requires_grad_(False)
        model.eval()
        if self.is_deepspeed_enabled:
            return trl_dpo.prepare_deepspeed(model, self.accelerator)
        if self.is_fsdp_enabled:
            return trl_dpo.prepare_fsdp(model, self.accelerator)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs, return_outputs):
        if self.prefopt_loss is None:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        if self.prefopt_loss.level == "token":
            loss, metrics, token_stats = self._token_level_loss(model, model_kwargs, labels, completion_mask)
        else:
            loss, metrics, token_stats = self._sequence_level_loss(model, model_kwargs, labels, shift_mask, inputs)

        for key, value in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value).mean().item())
        self._log_token_metrics(mode, inputs, shift_mask, *token_stats)

        if return_outputs:
            warnings.warn(
                "`return_outputs=True` recomputes the logits with an extra forward pass.", FutureWarning, stacklevel=2
            )
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _token_level_loss(self, model, model_kwargs, labels, completion_mask):
        """SparsePO / TDPO from one fused pass over the policy's and the reference's hidden states."""
        args = self.args
        seq_len = labels.size(1) - 1
        shift_mask = completion_mask[:, 1:]
        reference = self.reference_module()
        learned = self.prefopt_loss.token_masks and args.sparse_po_mask == "learned"

        record = (self._activation_mask.record(reference.get_decoder()) if self._activation_mask is not None
                  else contextlib.nullcontext())
        # Through the reference's own (wrapped) forward, as TRL scores its reference: the policy's
        # with its adapter off under PEFT; DeepSpeed or FSDP gather the parameters for the call.
        # The route skips accelerate's autocast wrapper, so autocast is applied here, as that
        # wrapper (and the policy's, around its own forward) applies it.
        reference_call = self.ref_model if self.ref_model is not None else model
        with (torch.no_grad(), trl_dpo.disable_gradient_checkpointing(self.model, args.gradient_checkpointing_kwargs),
              self.reference_context(), record, self.accelerator.autocast()):
            ref_out = reference_call(**model_kwargs, output_hidden_states=learned, prefopt_head=backbone_output)
        ref_hidden = ref_out.last_hidden_state[:, :-1][:, -seq_len:]
        # Masks are built in the input layout [B, T], then shifted like the labels.
        activation_mask = None
        if self._activation_mask is not None:
            activation_mask = self._activation_mask.compute(completion_mask)[:, 1:]
        ref_head = reference.get_output_embeddings()
        ref_scale, ref_softcap = head_transform(reference.config.get_text_config())

        def policy_terms(policy, backbone_outputs):
            """Run inside the policy's forward: reads its hidden state, LM head and learned mask."""
            hidden = backbone_outputs.last_hidden_state[:, :-1][:, -seq_len:]
            reward_mask = kl_mask = activation_mask
            if learned:
                reward_mask, kl_mask = getattr(policy, MASK_MODULE_NAME)(ref_out.hidden_states, completion_mask)
                reward_mask, kl_mask = reward_mask[:, 1:], kl_mask[:, 1:]
            head = policy.get_output_embeddings()
            scale, softcap = head_transform(policy.config.get_text_config())
            terms, extra = linear_token_terms(
                hidden, head.weight, labels[:, 1:], ref_hidden, ref_head.weight, head_bias=head.bias,
                ref_head_bias=ref_head.bias, divergence="forward_kl", div_weight=kl_row_selector(kl_mask), return_entropy=True,
                logit_scale=scale, ref_logit_scale=ref_scale, softcap=softcap, ref_softcap=ref_softcap,
                extras=("mean_logits", "is_top1"),
            )
            return terms, extra, reward_mask, kl_mask

        terms, extra, reward_mask, kl_mask = model(**model_kwargs, prefopt_head=policy_terms)
        loss_inputs = stacked_token_inputs(terms.logp - terms.ref_logp, terms.div, shift_mask, reward_mask, kl_mask)
        loss, metrics = self.prefopt_loss(loss_inputs, beta=self.beta, **self._config_options())
        # logp is 0 at ignored tokens, so the row sums are the completions' log-probs.
        chosen_logps, rejected_logps = terms.logp.detach().sum(dim=1).chunk(2, dim=0)
        metrics["logps/chosen"], metrics["logps/rejected"] = chosen_logps, rejected_logps
        return loss, metrics, (terms.entropy, extra["mean_logits"], extra["is_top1"])

    def _config_options(self) -> dict:
        """The loss's keyword arguments that its registry entry reads from the config."""
        return {option: getattr(self.args, field) for option, field in self.prefopt_loss.config.items()}

    def _sequence_level_loss(self, model, model_kwargs, labels, shift_mask, inputs):
        """A sequence-level loss (SimPO, INPO, ORPO, CPO, ...) from the completion log-probs of the fused LM head.

        With ``nll_over_prompt`` (ORPO) the head also scores the prompt tokens, whose mean
        negative log-likelihood over the chosen rows is the loss's ``chosen_nll``, as TRL's
        ``ORPOTrainer`` takes it.
        """
        entry = self.prefopt_loss
        seq_len = shift_mask.size(1)
        extra = {}
        if entry.nll_over_prompt:
            scored = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            outputs = model(**model_kwargs, labels=scored, fused_lm_head=True)
            token_logps = outputs.log_probs[:, -seq_len:]
            logps = torch.where(shift_mask.bool(), token_logps, 0.0).sum(dim=1)
            chosen_scored = (scored[:, 1:][:, -seq_len:] != -100).chunk(2, dim=0)[0]
            chosen_token_logps = token_logps.chunk(2, dim=0)[0]
            extra["chosen_nll"] = (-torch.where(chosen_scored, chosen_token_logps, 0.0).sum()
                                   / chosen_scored.sum().clamp(min=1))
        else:
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        # A completion truncated away has no token; its length is taken as min_length (its log-prob is 0).
        lengths = shift_mask.sum(dim=1).clamp(min=entry.min_length).to(logps.dtype)
        chosen_lengths, rejected_lengths = lengths.chunk(2, dim=0)
        loss_inputs = dict(policy_chosen_logps=chosen_logps, policy_rejected_logps=rejected_logps,
                           chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        if "ref_chosen_logps" in entry.inputs:
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                reference = self.ref_model if self.ref_model is not None else self.model
                ref_chosen, ref_rejected = self.compute_ref_log_probs(reference, inputs)
            loss_inputs.update(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
        if "prev_chosen_logps" in entry.inputs:
            if self.prev_model is None:
                prev_chosen, prev_rejected = ref_chosen, ref_rejected
            else:
                prev_chosen, prev_rejected = self.compute_ref_log_probs(self.prev_model, inputs)
            loss_inputs.update(prev_chosen_logps=prev_chosen, prev_rejected_logps=prev_rejected)
        loss, metrics = entry(loss_inputs, beta=self.beta, **self._config_options(), **extra)
        return loss, metrics, (outputs.entropy, outputs.mean_logits, outputs.is_top1)

    def _log_token_metrics(self, mode, inputs, shift_mask, entropy, mean_logits, is_top1):
        """TRL's ``entropy``, ``num_tokens``, ``logits/*`` and ``mean_token_accuracy``, computed as TRL does."""
        gather = self.accelerator.gather_for_metrics
        seq_len = shift_mask.size(1)
        mask = shift_mask.bool()
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)

        total = gather(mask.sum()).sum()
        entropy_sum = gather((entropy[:, -seq_len:].detach() * mask).sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / total).item() if total > 0 else 0.0)

        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        chosen_logits, rejected_logits = mean_logits[:, -seq_len:].chunk(2, dim=0)
        for name, values, side_mask in (("chosen", chosen_logits, chosen_mask),
                                        ("rejected", rejected_logits, rejected_mask)):
            value_sum = gather(values[side_mask].sum()).sum().item()
            count = gather(side_mask.sum()).sum().item()
            self._metrics[mode][f"logits/{name}"].append(value_sum / count if count > 0 else 0.0)

        chosen_top1, _ = is_top1[:, -seq_len:].chunk(2, dim=0)
        correct = gather((chosen_top1 & chosen_mask).sum()).sum()
        count = gather(chosen_mask.sum()).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)
