r"""TRL's ``DistillationTrainer`` with its loss on :func:`prefopt_kernels.linear_token_terms`.

:class:`PrefOptDistillationTrainer` takes the arguments of TRL 1.16's ``DistillationTrainer``
and runs everything of it (on-policy generation, buffering, metrics) but the loss: the
student's and the teacher's last hidden states go through their own LM heads in vocabulary
tiles, and one fused call returns each completion token's divergence and the student's
entropy. With :class:`~prefopt_kernels.integrations.trl_distill_config.PrefOptDistillationConfig`'s
default ``divergence=None`` the loss is TRL's for its ``beta`` (forward KL, reverse KL or
generalised JSD); ``divergence=`` picks any of the package's seven::

    from prefopt_kernels.integrations.trl_distill import PrefOptDistillationConfig, PrefOptDistillationTrainer
    args = PrefOptDistillationConfig(output_dir="out", divergence="alpha", divergence_alpha=0.5)
    trainer = PrefOptDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                         train_dataset=prompts, processing_class=tokenizer)

Each head's logit scale and soft cap come from its model's config as TRL reads them
(:func:`~prefopt_kernels.integrations.trl.head_transform`), both divided by the trainer's
temperature; the heads' biases are used. Needs ``transformers`` and ``trl`` (the ``[trl]`` extra).
"""

from __future__ import annotations

import torch
from trl import DistillationTrainer

from ..linear import linear_token_terms
from .trl import head_transform
from .trl_distill_config import PrefOptDistillationConfig, trl_beta_divergence

# The multimodal fields TRL's generation leaves in a batch, passed on to both backbones.
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")

__all__ = ["PrefOptDistillationConfig", "PrefOptDistillationTrainer", "distillation_loss"]


def distillation_loss(student_hidden, student_head, student_config, teacher_hidden, teacher_head, teacher_config,
                      completion_ids, loss_mask, *, divergence: str, beta: float, alpha: float, temperature: float,
                      num_items_in_batch=None):
    r"""``(loss, entropy_sum, n_valid)`` of a distillation batch, from both models' last hidden states.

    Per completion token ``i`` with ``loss_mask[i] != 0``: ``D_i = D_f(p_s, p_t)`` with
    ``p = softmax(z / T)``, each side's ``z`` from its head and its config's transform.
    ``loss = sum_i D_i / num_items_in_batch`` (or ``/ max(1, n_valid)`` without it), as TRL's
    ``_chunked_divergence_loss``; ``entropy_sum = sum_i H(p_s)`` (detached) and ``n_valid``
    the count of kept tokens. Masked tokens are dropped before any matmul.

    Args:
        student_hidden: ``[B, K, H_s]`` the student's last hidden states at the completion tokens.
        student_head: the student's output embedding (``nn.Linear``-like: ``weight [V, H_s]``, ``bias``).
        student_config, teacher_config: the models' text configs.
        teacher_hidden, teacher_head: the teacher's, ``[B, K, H_t]`` and ``[V, H_t]``.
        completion_ids: ``[B, K]`` int, the tokens (read as labels: they must lie in ``[0, V)`` where kept).
        loss_mask: ``[B, K]``, non-zero where the token counts.
        divergence, beta, alpha, temperature: as :func:`prefopt_kernels.linear_token_divergence`.
        num_items_in_batch: the global count of loss tokens, or ``None``.
    """
    valid = loss_mask != 0
    labels = torch.where(valid, completion_ids, torch.full_like(completion_ids, -100))
    scale, softcap = head_transform(student_config)
    teacher_scale, teacher_softcap = head_transform(teacher_config)
    terms = linear_token_terms(student_hidden, student_head.weight, labels, teacher_hidden, teacher_head.weight,
                               head_bias=student_head.bias, ref_head_bias=teacher_head.bias, divergence=divergence,
                               beta=beta, alpha=alpha, temperature=temperature, return_entropy=True,
                               logit_scale=scale, ref_logit_scale=teacher_scale, softcap=softcap,
                               ref_softcap=teacher_softcap)
    n_valid = valid.sum()
    if num_items_in_batch is None:
        denominator = n_valid.clamp(min=1)
    elif isinstance(num_items_in_batch, torch.Tensor):
        denominator = num_items_in_batch.to(terms.div.device)
    else:
        denominator = num_items_in_batch
    return terms.div.sum() / denominator, terms.entropy.sum().detach(), n_valid


class PrefOptDistillationTrainer(DistillationTrainer):
    """TRL's ``DistillationTrainer`` whose loss is :func:`distillation_loss` (see the module's docstring).

    ``args`` may be a plain ``DistillationConfig`` (TRL's ``beta`` semantics) or a
    :class:`PrefOptDistillationConfig`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.args
        if isinstance(config, PrefOptDistillationConfig):
            self.loss_divergence = config.loss_divergence()
        else:
            name, beta = trl_beta_divergence(config.beta)
            self.loss_divergence = (name, beta, 0.5)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # TRL's own hidden-state path (backbones, multimodal fields, tool mask); only the head and loss differ.
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        completion_ids = inputs["completion_ids"]
        logits_to_keep = completion_ids.size(1)
        multimodal = {key: inputs[key] for key in MULTIMODAL_KEYS if key in inputs}
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                                     **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, logits_to_keep, **multimodal)
        student_head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        if student_head.weight.device != teacher_head.weight.device:
            raise ValueError(f"the student's lm_head is on {student_head.weight.device} but the teacher's on "
                             f"{teacher_head.weight.device}: place both on one device in their device_map")
        device = student_head.weight.device
        divergence, beta, alpha = self.loss_divergence
        return distillation_loss(
            student_hidden.to(device), student_head, unwrapped_student.config.get_text_config(),
            teacher_hidden.to(device), teacher_head, unwrapped_teacher.config.get_text_config(),
            completion_ids.to(device), loss_mask.to(device), divergence=divergence, beta=beta, alpha=alpha,
            temperature=self.temperature, num_items_in_batch=num_items_in_batch)

