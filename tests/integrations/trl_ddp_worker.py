"""Run by ``torch.distributed.run`` from ``test_trl_dpo_losses.py``: PrefOptDPOTrainer under DDP.

Each token-level loss case trains two steps with ``find_unused_parameters=True`` (what TRL and
transformers choose without gradient checkpointing); each rank sees its own examples. Rank 0
writes, per case, the logged losses and the largest difference between the ranks' trained
parameters (0 when DDP all-reduced every gradient) to ``OUT/results.json``.
"""

import os
import sys

import torch
import torch.distributed as dist

from launch import finish_worker
from trl_cases import LOSS_CASES, make_dataset, make_tokenizer, make_word_llama, training_args

from prefopt_kernels.integrations.trl_dpo import PrefOptDPOConfig, PrefOptDPOTrainer

WORKER_CASES = ("tdpo1", "sparse_po_learned", "sparse_po_activation")


def main(out):
    results = {}
    for case in WORKER_CASES:
        args = training_args(PrefOptDPOConfig, os.path.join(out, case), 2, 0.1, beta=0.5,
                             gradient_checkpointing=False, ddp_find_unused_parameters=True, **LOSS_CASES[case])
        trainer = PrefOptDPOTrainer(model=make_word_llama(), ref_model=make_word_llama(seed=1), args=args,
                                    train_dataset=make_dataset(), processing_class=make_tokenizer())
        trainer.train()
        gap = 0.0
        for param in trainer.accelerator.unwrap_model(trainer.model).parameters():
            copies = [torch.empty_like(param) for _ in range(dist.get_world_size())]
            dist.all_gather(copies, param.detach().contiguous())
            gap = max(gap, max((c - copies[0]).abs().max().item() for c in copies))
        results[case] = {"wrapper": type(trainer.model_wrapped).__name__,
                         "find_unused_parameters": trainer.model_wrapped.find_unused_parameters,
                         "losses": [logs["loss"] for logs in trainer.state.log_history if "loss" in logs],
                         "rank_gap": gap}
    finish_worker(out, results)


if __name__ == "__main__":
    main(sys.argv[1])
