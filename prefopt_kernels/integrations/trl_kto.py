r"""TRL's ``KTOTrainer`` on this package's fused LM head.

:class:`PrefOptKTOTrainer` takes the same arguments as TRL 1.16's ``KTOTrainer``. TRL's constructor
runs with :func:`prefopt_kernels.integrations.trl.add_fused_lm_head` bound in place of TRL's own, so
our head goes on the policy (its PEFT base model) and the reference exactly where TRL puts its
head: before the reference is wrapped (DDP, DeepSpeed, FSDP) and before
``precompute_ref_log_probs`` scores the datasets. Every pass then reads the completions' and the
mismatched KL pairs' label log-probs (and the policy's entropy and mean logit, for the logs)
from :func:`prefopt_kernels.linear_token_logprobs` on the last hidden states and the LM head;
no ``[N, V]`` logits. TRL's ``_compute_loss`` computes the loss and logs its metrics unchanged,
so a step equals a stock ``KTOTrainer`` step on TRL's head, within fp32 rounding::

    from prefopt_kernels.integrations.trl_kto import PrefOptKTOConfig, PrefOptKTOTrainer
    args = PrefOptKTOConfig(output_dir="out", loss_type="kto", beta=0.1)
    trainer = PrefOptKTOTrainer(model=model, ref_model=ref_model, args=args,
                                train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

The loss itself, as a function of summed log-probs, is :func:`prefopt_kernels.losses.kto_loss`.
Needs ``transformers`` and ``trl`` (the ``[trl]`` extra).
"""

from __future__ import annotations

import contextlib
import threading

import trl.trainer.kto_trainer as trl_kto
from trl import KTOTrainer

from .trl import add_fused_lm_head
from .trl_kto_config import PrefOptKTOConfig, check_kto_options

__all__ = ["PrefOptKTOConfig", "PrefOptKTOTrainer"]

# TRL's module name is rebound for one construction at a time.
_CONSTRUCTION = threading.Lock()


@contextlib.contextmanager
def _our_head_in_kto_constructor():
    """``KTOTrainer.__init__`` with our fused LM head bound in place of TRL's.

    The name is rebound under a lock, so another thread's construction waits for this one and
    none restores it out of order (a stock ``KTOTrainer`` built meanwhile in another thread would
    get our head).
    """
    with _CONSTRUCTION:
        install = trl_kto.add_fused_lm_head
        trl_kto.add_fused_lm_head = add_fused_lm_head
        try:
            yield
        finally:
            trl_kto.add_fused_lm_head = install


class PrefOptKTOTrainer(KTOTrainer):
    r"""``KTOTrainer`` whose policy and reference compute their log-probs on our fused LM head.

    Per step (``loss_type="kto"``): the policy's and the reference's summed label log-probs of
    the batch's completions and of its mismatched (prompt, completion) KL pairs, four fused-head
    passes (the policy's KL pass and both reference passes under ``no_grad``; the reference's
    read from the dataset under ``precompute_ref_log_probs``); ``"apo_zero_unpaired"`` has no KL
    pairs. The loss and the logged metrics are TRL's, under TRL's names: ``kl``,
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``logps/chosen``,
    ``logps/rejected``, ``logits/chosen``, ``logits/rejected``, ``entropy``, ``num_tokens``
    (and ``aux_loss`` for a MoE policy).

    Args: as ``KTOTrainer``; ``args`` a ``KTOConfig`` (a :class:`PrefOptKTOConfig` checks its
    options when built, a plain ``KTOConfig`` is checked here the same way).
    """

    def __init__(self, model, ref_model=None, args=None, *more, **kwargs):
        if args is not None:
            check_kto_options(args)
        with _our_head_in_kto_constructor():
            super().__init__(model, ref_model, args, *more, **kwargs)
