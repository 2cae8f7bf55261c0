r"""TRL on our kernels: a drop-in for ``trl.trainer.utils.add_fused_lm_head``.

TRL 1.16's trainers (DPO, KTO, GRPO, RLOO, SFT, async GRPO) call ``add_fused_lm_head`` on
their model (and reference model) at construction, then ask the model for per-token
log-probs with ``model(..., labels=labels, fused_lm_head=True)``. :func:`add_fused_lm_head`
here has the same signature and protocol and computes the same ``FusedCausalLMOutput`` with
:func:`prefopt_kernels.linear_token_logprobs`; :func:`use_in_trl` makes every TRL trainer
built afterwards call it, and :func:`apply_to_trainer` patches a trainer that already exists::

    import prefopt_kernels.integrations.trl as pk_trl
    pk_trl.use_in_trl()                       # before building the trainer
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, ...)
    # or, for a trainer built already:
    pk_trl.apply_to_trainer(trainer)

Needs ``transformers`` and ``trl`` (the ``[trl]`` extra).
"""

from __future__ import annotations

import functools
import importlib
import types
from contextlib import nullcontext
from typing import Optional

import torch

from ..checks import check_flag
from ..linear import linear_token_logprobs

# The FusedCausalLMOutput fields TRL can ask for, and what our op computes for each.
FUSED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_EXTRA_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")
# The TRL modules that import ``add_fused_lm_head`` into their own namespace.
TRL_TRAINER_MODULES = (
    "trl.trainer.dpo_trainer",
    "trl.trainer.kto_trainer",
    "trl.trainer.grpo_trainer",
    "trl.trainer.rloo_trainer",
    "trl.trainer.sft_trainer",
    "trl.trainer.utils",
    "trl.experimental.async_grpo.async_grpo_trainer",
)


def head_transform(text_config) -> tuple:
    """``(logit_scale, softcap)`` of a transformers text config: how its LM head's logits are scaled.

    ``logit_scale`` is the config's ``logit_scale`` (Cohere), else ``output_multiplier``,
    else ``lm_head_multiplier`` (Falcon-H1), else ``1 / logits_scaling`` (Granite, MiniCPM3;
    HyperCLOVA X multiplies by it), else 1; an explicit 0 is kept. ``softcap`` is
    ``final_logit_softcapping`` (Gemma) or ``None``.
    """
    scale = getattr(text_config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(text_config, name, None)
    scaling = getattr(text_config, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if getattr(text_config, "model_type", "") == "hyperclovax" else 1.0 / scaling
    return (1.0 if scale is None else float(scale)), getattr(text_config, "final_logit_softcapping", None)


def backbone_attr(model) -> str:
    """The attribute of a transformers causal LM that holds its backbone (the model without the LM head)."""
    import transformers
    from packaging.version import Version

    # Before transformers 5, vision-language models keep their language backbone at ``model``.
    if model.config.get_text_config() is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        return "model"
    return "base_model"


def _moe_aux_loss(model, text_config, backbone_outputs, attention_mask):
    """The MoE load-balancing loss the model's own forward adds (Mixtral's, shared by every MoE family)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    experts = getattr(text_config, "num_experts", None)
    if experts is None:
        experts = getattr(model, "num_experts", None)
    per_token = getattr(text_config, "num_experts_per_tok", None)
    if per_token is None:
        per_token = getattr(model, "num_experts_per_tok", None)
    return load_balancing_loss_func(backbone_outputs.router_logits, experts, per_token, attention_mask)


def _aux_loss_coefficient(text_config) -> float:
    """The weight the model's own forward gives its MoE auxiliary loss (JetMoE calls it ``aux_loss_coef``)."""
    for name in ("router_aux_loss_coef", "aux_loss_coef"):
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    return 0.0


def sampler_options(top_k: Optional[int] = None, top_p: Optional[float] = None,
                    min_p: Optional[float] = None) -> dict:
    """The keywords of :func:`prefopt_kernels.linear_token_logprobs` that restrict the scored distribution
    to a sampler's kept set, with the values that keep the whole vocabulary left out.

    ``top_k`` of ``None`` or 0, ``top_p`` of ``None`` or 1 and ``min_p`` of ``None`` or 0 keep every
    token (TRL's and vLLM's conventions), so they are dropped: a call with none left is the plain op.
    """
    options = {}
    if top_k is not None and top_k != 0:
        options["top_k"] = top_k
    if top_p is not None and top_p != 1.0:
        options["top_p"] = top_p
    if min_p is not None and min_p != 0.0:
        options["min_p"] = min_p
    return options


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple = ("log_probs",), top_k: Optional[int] = None,
                      top_p: Optional[float] = None, min_p: Optional[float] = None, process_group=None,
                      batch_invariant: bool = False) -> None:
    r"""Patch ``model`` so that ``model(..., labels=labels, fused_lm_head=True)`` never builds logits.

    The same protocol as TRL 1.16's ``add_fused_lm_head``: with ``fused_lm_head=True`` the
    backbone runs, its last hidden state (shifted by one, or as given with ``shift_labels``)
    goes through the LM head in tiles via :func:`prefopt_kernels.linear_token_logprobs`
    (ignored labels dropped before any matmul), and the call returns TRL's
    ``FusedCausalLMOutput``: ``loss = -sum(log_probs) / (num_items_in_batch or the number
    of kept labels, at least 1)`` plus the MoE auxiliary loss when router logits are asked
    for, ``log_probs``, the fields of ``outputs`` (others ``None``), ``label_mask``,
    ``aux_loss``. Every per-token field is ``[B, T - 1]`` (``[B, T]`` with
    ``shift_labels``) and 0 where the label is -100. Without ``fused_lm_head`` the original
    forward runs unchanged (generation too). The logit scale and soft cap come from the
    config (:func:`head_transform`); FSDP2 and ZeRO-3 heads are gathered for the call; the
    backbone and head are looked up per call, so FSDP and PEFT wrapping after the patch
    work.

    Args:
        model: a transformers causal LM.
        temperature: the logits are divided by it.
        cast_lm_head_to_fp32: run the projection in fp32, outside autocast.
        outputs: names among ``log_probs``, ``entropy``, ``log_sum_sq_probs``,
            ``mean_logits``, ``is_top1``; ``log_probs`` is always computed.
        top_k, top_p, min_p: score the label under the sampler's processed distribution, the
            tempered softmax renormalised on the tokens a vLLM sampler with these settings keeps
            (DESIGN.md "Sampler-matched log-probs"): ``log_probs`` is then ``-inf`` at a label
            outside that set. ``None`` (or 0, 1, 0) keeps the whole vocabulary, TRL's behaviour.
            The entropy stays the full distribution's.
        process_group: for a vocabulary-sharded LM head, its ``torch.distributed`` group (each
            rank's head holds its contiguous vocabulary shard, in rank order); ``None``: a whole head.
        batch_invariant: a token's fields and its hidden state's gradient do not depend on
            the rest of the batch (``linear_token_logprobs``'s ``batch_invariant``; the backbone
            is the model's own).
    """
    from trl.trainer.utils import FusedCausalLMOutput

    unknown = [name for name in outputs if name not in FUSED_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs must name only {', '.join(FUSED_OUTPUTS)}; got {unknown}")
    check_flag(batch_invariant, "batch_invariant")
    text_config = model.config.get_text_config()
    logit_scale, softcap = head_transform(text_config)
    backbone_name = backbone_attr(model)
    original_forward = model.forward
    want_entropy = "entropy" in outputs
    extras = tuple(name for name in _EXTRA_OUTPUTS if name in outputs)
    sampler = sampler_options(top_k, top_p, min_p)

    @functools.wraps(type(model).forward)
    def fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                      num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = getattr(self, backbone_name)(*args, **kwargs)
        if shift_labels is None:
            hidden, targets = backbone_outputs.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, targets = backbone_outputs.last_hidden_state, shift_labels
        head = self.get_output_embeddings()
        hidden, targets = hidden.to(head.weight.device), targets.to(head.weight.device)
        mask = targets != -100
        autocast = nullcontext()
        if cast_lm_head_to_fp32:
            hidden = hidden.float()
            autocast = torch.autocast(hidden.device.type, enabled=False)
        with autocast:
            result = linear_token_logprobs(hidden, head.weight, targets, head_bias=head.bias, temperature=temperature,
                                           logit_scale=logit_scale, softcap=softcap,
                                           return_entropy=want_entropy, extras=extras,
                                           batch_invariant=batch_invariant, process_group=process_group,
                                           **sampler)
        result = result if isinstance(result, tuple) else (result,)
        log_probs = result[0]
        entropy = result[1] if want_entropy else None
        extra = result[-1] if extras else {}
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / denominator
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _moe_aux_loss(self, text_config, backbone_outputs, kwargs.get("attention_mask"))
            loss = loss + _aux_loss_coefficient(text_config) * aux_loss
        return FusedCausalLMOutput(
            loss=loss, log_probs=log_probs, entropy=entropy,
            log_sum_sq_probs=extra.get("log_sum_sq_probs"), mean_logits=extra.get("mean_logits"),
            is_top1=extra.get("is_top1"), label_mask=mask, aux_loss=aux_loss,
        )

    model.forward = types.MethodType(fused_forward, model)


class PolicyAndReference:
    """Mixed into our TRL trainers that score a policy and a reference (``self.model``,
    ``self.ref_model``, ``self.accelerator`` as TRL's trainers hold them): each as its
    transformers model, and the context that turns the policy into the reference under PEFT."""

    def policy_module(self):
        """The policy's transformers model: unwrapped, and the base model under PEFT."""
        from accelerate.utils import is_peft_model

        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    def reference_module(self):
        """The reference's transformers model (the PEFT base model when there is no ``ref_model``)."""
        if self.ref_model is not None:
            return self.accelerator.unwrap_model(self.ref_model)
        return self.policy_module()

    def reference_context(self):
        """Under PEFT without a ``ref_model``, the adapter context that turns the policy into the reference."""
        from accelerate.utils import is_peft_model
        from trl.trainer.utils import use_adapter

        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return nullcontext()


def use_in_trl(batch_invariant: bool = False) -> None:
    """Make every TRL trainer built from now on patch its models with :func:`add_fused_lm_head` here.

    TRL's trainer modules import ``add_fused_lm_head`` by name; this rebinds that name in
    each of them (:data:`TRL_TRAINER_MODULES`), so DPO, KTO, GRPO, RLOO and SFT run their
    fused LM head on our kernels. ``batch_invariant``: the heads are patched with it (see
    :func:`add_fused_lm_head`). Idempotent.
    """
    head = add_fused_lm_head
    if check_flag(batch_invariant, "batch_invariant"):
        head = functools.partial(add_fused_lm_head, batch_invariant=True)
    for name in TRL_TRAINER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional TRL module whose own dependencies are absent
            continue
        if hasattr(module, "add_fused_lm_head"):
            module.add_fused_lm_head = head


def apply_to_trainer(trainer, outputs: Optional[tuple] = None) -> None:
    """Patch an existing TRL trainer's ``model`` (its PEFT base model) and ``ref_model`` with our fused head.

    ``outputs`` as in :func:`add_fused_lm_head` for the policy; ``None`` gives what
    ``DPOTrainer`` logs (``log_probs``, ``entropy``, ``mean_logits``, ``is_top1``), plus
    ``log_sum_sq_probs`` when the trainer has WPO's ``use_weighting``. The reference computes
    ``log_probs`` only, as in TRL. The trainer's ``temperature`` and its args'
    ``cast_lm_head_to_fp32`` are kept, for both models.
    """
    if outputs is None:
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
        if getattr(trainer, "use_weighting", False):
            outputs += ("log_sum_sq_probs",)
    model = trainer.model
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    temperature = getattr(trainer, "temperature", 1.0)
    cast = bool(getattr(getattr(trainer, "args", None), "cast_lm_head_to_fp32", False))
    accelerator = getattr(trainer, "accelerator", None)
    _add_beneath_autocast(model, accelerator, temperature=temperature, cast_lm_head_to_fp32=cast, outputs=outputs)
    if getattr(trainer, "ref_model", None) is not None:
        _add_beneath_autocast(trainer.ref_model, accelerator, temperature=temperature, cast_lm_head_to_fp32=cast)


def _add_beneath_autocast(model, accelerator, **head_options) -> None:
    """:func:`add_fused_lm_head` on a model whose forward accelerate may have wrapped in autocast already.

    A trainer's constructor prepares its reference (and ``train()`` its policy), which under
    mixed precision wraps the forward in autocast (keeping the unwrapped one as
    ``_original_forward``). Our head then goes beneath that wrapper and the call runs in the
    accelerator's autocast, as TRL's head installed before the preparation does.
    """
    unwrapped = getattr(model, "_original_forward", None)
    if unwrapped is None or accelerator is None:
        add_fused_lm_head(model, **head_options)
        return
    model.forward = unwrapped
    add_fused_lm_head(model, **head_options)
    fused = model._original_forward = model.forward  # what accelerate's unwrapping restores

    @functools.wraps(type(model).forward)
    def autocast_forward(self, *args, **kwargs):
        with accelerator.autocast():
            return fused(*args, **kwargs)

    model.forward = types.MethodType(autocast_forward, model)


def add_head_route(model) -> None:
    """Let ``model(..., prefopt_head=fn)`` run the backbone and return ``fn(model, backbone_outputs)``.

    Losses that read a model's last hidden state and LM head themselves (token-level DPO losses,
    GRPO's full-vocabulary KL) go through this route, so reading them happens inside ``model``'s
    own forward and a distributed wrapper (DDP, FSDP) stays in charge of every parameter the
    loss uses: DDP's ``find_unused_parameters`` sees them used in the forward, FSDP has them
    gathered. Without ``prefopt_head`` the forward is unchanged.
    """
    attr = backbone_attr(model)
    forward = model.forward

    @functools.wraps(type(model).forward)
    def routed_forward(self, *args, prefopt_head=None, **kwargs):
        if prefopt_head is None:
            return forward(*args, **kwargs)
        return prefopt_head(self, getattr(self, attr)(*args, **kwargs))

    model.forward = types.MethodType(routed_forward, model)


def backbone_output(model, backbone_outputs):
    """The route's function that returns the backbone's output as it is (a reference's pass)."""
    return backbone_outputs
