"""The benchmark suite of prefopt_kernels: ``python -m benchmarks`` (see ``__main__``).

``cases`` says what is measured and the work it must do (bytes moved for the logits ops, GEMM
flops for the linear ops, which start from hidden states and the LM head), ``eager`` and
``peers`` hold the baselines, ``implementations`` says what each implementation of a case
runs, ``runner`` runs them case by case, ``measure`` times calls, measures their peak memory
and relates rows to their baselines, ``child_process`` runs what needs a fresh interpreter,
``report`` writes the results (JSON, markdown) with ``plotting``'s PNG; ``tensor_parallel``
runs the vocabulary-sharded ops on gloo ranks (``tensor_parallel_rank``) against gathering
the logits (``--distributed``); ``dpo_step`` times one DPO training step of stock TRL against
``PrefOptDPOTrainer`` (``--dpo-step``).
"""
