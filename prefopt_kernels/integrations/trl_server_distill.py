r"""TRL's ``ServerDistillationTrainer`` with its loss on :func:`prefopt_kernels.linear_sparse_teacher_divergence`.

The stock trainer asks a vLLM server for the teacher's top-k log-probabilities per completion
token, then compares them with the student's full ``[B, T, V]`` log-softmax. :class:`PrefOptServerDistillationTrainer`
takes the same arguments (``ServerDistillationConfig``) and the same server answers, but the student's
side comes from its last hidden states and LM head in vocabulary tiles: no ``[B, T, V]`` tensor, so
its memory no longer grows with ``V T``. The supports are TRL's:

* ``beta = 0``: the teacher's top ``loss_top_k`` ids (forward KL);
* ``beta > 0`` (TRL allows top-1 only): the teacher's top-1 id and the completion's sampled token
  (absent where it is the top-1), the latter with the teacher's log-prob of that token; ``beta = 1``
  the sampled token alone; generalised JSD in between, reverse KL at 1;

with TRL's tail bucket when ``loss_add_tail`` (its default). The loss is the sum over completion
tokens divided by their count, then by the gradient-accumulation steps in training, as stock::

    from prefopt_kernels.integrations.trl_server_distill import PrefOptServerDistillationTrainer
    trainer = PrefOptServerDistillationTrainer(model=student, args=ServerDistillationConfig(...), ...)

Needs ``transformers`` and ``trl`` (the ``[trl]`` extra).
"""

from __future__ import annotations

import torch
from trl.experimental.server_distillation import ServerDistillationTrainer

from ..linear.sparse_teacher import ABSENT_ID, linear_sparse_teacher_divergence
from .trl import backbone_attr, head_transform
from .trl_distill_config import trl_beta_divergence


def server_teacher_support(teacher_result: dict, completion_tokens: torch.Tensor, beta: float, top_k: int):
    """``(teacher_ids, teacher_logprobs)`` ``[B, T, k]`` of TRL's sparse support for a server's answer.

    ``teacher_result`` holds ``topk_token_ids`` / ``topk_logprobs`` ``[B, T, K]`` and
    ``actual_logprobs`` ``[B, T]`` (the teacher's log-prob of each sampled token). ``beta = 0``:
    the top ``top_k`` (entries with a ``-inf`` log-prob absent); ``beta = 1``: the sampled token;
    otherwise the top-1 and the sampled token, absent where they coincide.
    """
    top_ids, top_lp = teacher_result["topk_token_ids"], teacher_result["topk_logprobs"]
    if beta == 0:
        ids, lp = top_ids[..., :top_k], top_lp[..., :top_k]
        return torch.where(lp > float("-inf"), ids, ABSENT_ID), lp
    sampled, sampled_lp = completion_tokens.unsqueeze(-1), teacher_result["actual_logprobs"].unsqueeze(-1)
    if beta == 1:
        return sampled, sampled_lp
    top1 = top_ids[..., :1]
    sampled = torch.where(sampled == top1, ABSENT_ID, sampled)
    return torch.cat([top1, sampled], dim=-1), torch.cat([top_lp[..., :1], sampled_lp], dim=-1)


def _require_teacher_values(teacher_result: dict, required: torch.Tensor, beta: float) -> None:
    """Stock's checks: with ``beta > 0`` every loss token needs the teacher's log-prob of the sampled
    token, and below ``beta = 1`` its top-1 log-prob; a missing one (``-inf``) raises."""
    if beta == 0:
        return
    needed = [("actual_logprobs", teacher_result["actual_logprobs"])]
    if beta < 1:
        needed.append(("topk_logprobs", teacher_result["topk_logprobs"][..., 0]))
    for name, values in needed:
        missing = int((required & ~torch.isfinite(values)).sum())
        if missing:
            raise ValueError(f"the teacher server's {name} are missing at {missing} of {int(required.sum())} "
                             f"completion tokens")


class PrefOptServerDistillationTrainer(ServerDistillationTrainer):
    """``ServerDistillationTrainer`` whose loss runs on the fused sparse-teacher op (see the module's docstring)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        labels = torch.where(completion_mask.bool(), completion_ids, -100)
        labels = torch.cat([torch.full_like(prompt_ids, -100), labels], dim=1)
        inputs = {**inputs, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                  "prompt_attention_mask": prompt_mask}
        prompt_length = self._compute_prompt_length(inputs)
        teacher_result = self._get_teacher_token_logprobs_from_server(inputs, prompt_length)
        unwrapped = self.accelerator.unwrap_model(model)
        loss = self._forward_redirection(model, unwrapped, self._sparse_loss, unwrapped, inputs, prompt_length,
                                         teacher_result)
        if self.model.training:
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, None) if return_outputs else loss

    def _sparse_loss(self, unwrapped, inputs, prompt_length, teacher_result):
        backbone = getattr(unwrapped, backbone_attr(unwrapped))
        hidden = backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          use_cache=False).last_hidden_state
        comp_len = teacher_result["actual_logprobs"].shape[1]
        hidden = hidden[:, prompt_length - 1:-1][:, :comp_len]
        labels = inputs["labels"][:, prompt_length:][:, :comp_len]
        completion_tokens = inputs["input_ids"][:, prompt_length:][:, :comp_len]
        required = labels != -100
        _require_teacher_values(teacher_result, required, self.beta)
        ids, logprobs = server_teacher_support(teacher_result, completion_tokens, self.beta, self.loss_top_k)
        head = unwrapped.get_output_embeddings()
        scale, softcap = head_transform(unwrapped.config.get_text_config())
        divergence, beta = trl_beta_divergence(self.beta)
        per_token = linear_sparse_teacher_divergence(
            hidden.to(head.weight.device), head.weight, ids, logprobs, head_bias=head.bias, divergence=divergence,
            beta=beta, mask=required, temperature=self.temperature, logit_scale=scale, softcap=softcap,
            add_tail=self.loss_add_tail)
        return per_token.sum() / required.sum().clamp(min=1)
