r"""TRL's ``AsyncDistillationTrainer`` loss on :func:`prefopt_kernels.linear_sparse_teacher_divergence`.

The async trainer (``trl.experimental.async_distillation``) receives the teacher's top-k ids and
log-probs per completion token from its rollout workers and computes the loss with the module
function ``_chunked_jsd_loss``: chunks of 256 tokens, each projected to full ``[256, V]`` logits and
log-softmaxed under activation checkpointing. :func:`chunked_sparse_teacher_loss` has that
function's signature and returns the same five values from the fused op's tiles (student entropy
included); :func:`use_in_async_distillation` makes the trainer call it::

    import prefopt_kernels.integrations.trl_async_distill as pk_async
    pk_async.use_in_async_distillation()   # before training; idempotent

Needs ``transformers`` and ``trl`` (the ``[trl]`` extra).
"""

from __future__ import annotations

import importlib

import torch

from ..linear.sparse_teacher import ABSENT_ID, linear_sparse_teacher_divergence, teacher_sparse_logprobs
from .trl_distill_config import trl_beta_divergence

ASYNC_MODULE = "trl.experimental.async_distillation.async_distillation_trainer"


def chunked_sparse_teacher_loss(hidden_valid, lm_head_weight, lm_head_bias, logit_scale, final_logit_softcapping,
                                target_ids, teacher_target_logps, valid_candidate_mask, beta, temperature,
                                add_tail_bucket, teacher_id_idx, num_teachers, chunk_size):
    r"""TRL's ``_chunked_jsd_loss`` on the fused sparse-teacher op: ``(loss, jsd_sum, entropy_sum,
    teacher_entropy_sum, per_teacher_stats)``.

    Per token ``i`` of ``hidden_valid`` ``[n, H]``: ``D_i`` the divergence TRL's ``beta`` names
    (:func:`~prefopt_kernels.integrations.trl_distill_config.trl_beta_divergence`) between the
    student's and the teacher's points at ``target_ids`` ``[n, K]`` (where
    ``valid_candidate_mask``), with the tail bucket when ``add_tail_bucket``; the student's
    logits ``logit_scale (h W^T + b)``, soft-capped, over ``temperature``. ``loss = sum_i D_i``
    (differentiable), ``jsd_sum`` the same detached, ``entropy_sum = sum_i H(p_s)`` over the full
    vocabulary, ``teacher_entropy_sum`` the teacher's entropy on its points, and
    ``per_teacher_stats`` ``[3 num_teachers]``: per teacher index of ``teacher_id_idx``
    ``[n]`` (or zeros without it) the token count, ``sum D`` and ``sum`` teacher entropy.
    ``chunk_size`` is TRL's projection chunk; the op's tiles follow its memory budget instead.
    """
    ids = torch.where(valid_candidate_mask, target_ids, ABSENT_ID)
    logps = torch.where(valid_candidate_mask, teacher_target_logps, float("-inf"))
    divergence, beta = trl_beta_divergence(beta)
    per_token, entropy = linear_sparse_teacher_divergence(
        hidden_valid, lm_head_weight, ids, logps, head_bias=lm_head_bias, divergence=divergence, beta=beta,
        temperature=temperature, logit_scale=logit_scale, softcap=final_logit_softcapping,
        add_tail=add_tail_bucket, return_entropy=True)
    with torch.no_grad():
        teacher = teacher_sparse_logprobs(logps, ids != ABSENT_ID, add_tail_bucket)
        teacher_entropy = -torch.where(teacher > float("-inf"), teacher.exp() * teacher, 0.0).sum(-1)
        stats = per_token.new_zeros(3 * num_teachers)
        if teacher_id_idx is not None:
            rows = [torch.stack([(teacher_id_idx == t).sum().float(), per_token.detach()[teacher_id_idx == t].sum(),
                                 teacher_entropy[teacher_id_idx == t].sum()]) for t in range(num_teachers)]
            stats = torch.cat(rows)
    loss = per_token.sum()
    return loss, loss.detach(), entropy.sum(), teacher_entropy.sum(), stats


def use_in_async_distillation() -> None:
    """Make TRL's ``AsyncDistillationTrainer`` compute its loss with :func:`chunked_sparse_teacher_loss`
    (rebinds the trainer module's ``_chunked_jsd_loss``). Idempotent."""
    module = importlib.import_module(ASYNC_MODULE)
    module._chunked_jsd_loss = chunked_sparse_teacher_loss
