"""One DPO training step of a tiny Llama: stock TRL against ``PrefOptDPOTrainer``.

``python -m benchmarks --dpo-step`` starts one child process (``child_process.run_children``
of :func:`worker`) that runs every variant in turn on copies of the same two models and the
same batch:

``trl:sigmoid``
    ``trl.DPOTrainer``, ``loss_type="sigmoid"``: what a TRL user runs. TRL 1.16 always scores
    both models through its own fused LM head (``add_fused_lm_head``, vocabulary chunks of
    32768, tiles folded by torch ops off CUDA); no option turns it off, so this is both the
    default and TRL's fused path.
``prefopt:sigmoid``
    ``PrefOptDPOTrainer``, ``loss_type="sigmoid"``: TRL's own ``_compute_loss`` on this
    package's fused head (``linear_token_logprobs``), which the trainer installs on both models.
``prefopt:sparse_po``
    ``PrefOptDPOTrainer``, ``loss_type="sparse_po"`` with its default learned mask: one
    ``linear_token_terms`` call over both models' hidden states.
``full-logits:sparse_po``
    the same trainer and loss with that call replaced by ``eager.linear_token_terms_full``:
    both models' ``[B, T, V]`` logits projected in full, then fp32 ``log_softmax``. TRL has no
    SparsePO; this is the loss as its eager implementations compute it.
``trl:orpo``, ``trl:cpo``
    TRL 1.16's stock ``ORPOTrainer`` and ``CPOTrainer`` (``loss_type="sigmoid"``,
    ``cpo_alpha=1``): reference-free; they project the policy's ``[B, T, V]`` logits in full
    (their ``concatenated_forward``), fed the same batch in their collator's
    ``chosen_*``/``rejected_*`` layout.
``prefopt:orpo``, ``prefopt:cpo``
    ``PrefOptDPOTrainer`` with ``loss_type="orpo"`` / ``"cpo"``: the policy only, on the fused
    head (ORPO's head call also scores the prompt tokens, for its NLL).

The model is a ``LlamaForCausalLM`` (vocabulary V, hidden size H, 2 layers, MLP 4H) built in
code; the reference is a second one from another seed, so that the loss of the step is not
the trivial ``log 2`` of identical models and rows of the same loss can be checked against
each other. The batch is tensors as TRL's collator stacks them: ``PAIRS`` prompts, each
followed by a chosen and by a rejected completion (chosen rows first), ``N / (2 PAIRS)``
tokens per row of which the first eighth is prompt, no padding.

The step is what ``Trainer.training_step`` does for one batch: ``compute_loss`` on the model
as ``train()`` prepares it with the trainer's ``Accelerator`` (autocast under the default
bf16 mixed precision), then ``accelerator.backward``. No optimizer step (the same for every
variant); the parameter gradients are set to ``None`` before each step, as
``Trainer.zero_grad`` leaves them. Activation checkpointing is off: TRL's default switches it
on inside ``train()``, which the step bypasses, and with 2 layers it would only add the same
backbone recompute to every variant.

Measured per variant: the time of a step (CPU: ``measure.time_cpu``, a warm-up step on a
2-row batch, then at least ``MIN_REPS`` steps and more within ``--budget``, the step whose
memory is measured being the first; CUDA: ``measure.time_cuda``), its peak memory above what
was allocated before it (CPU: the resident high-water mark, ``measure.rss_peak_bytes``; CUDA:
``measure.cuda_peak_bytes``), which includes the parameter gradients the step creates
(``param_grad_bytes`` in the meta, the same for every variant but the learned mask's few
parameters), and the loss of the measured step.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import report
from .child_process import emit
from .measure import (
    add_ratios,
    cuda_peak_bytes,
    load_average,
    rss_peak_bytes,
    time_cpu,
    time_cuda,
    timed,
)
from .step_runs import check_step_dtype, measure_variants, step_deadline, variant_rows

PAIRS = 8
LAYERS = 2
DEFAULT_VOCAB = 32000
DEFAULT_TOKENS = 4096  # chosen + rejected tokens of the batch: 16 rows of 256
DEFAULT_HIDDEN = 256
TINY = {"vocab": 512, "tokens": 256, "hidden": 32}
MIN_REPS = 3  # a median of at least three steps, however slow one is
TRL_SIGMOID = "trl:sigmoid"
FULL_LOGITS_SPARSE_PO = "full-logits:sparse_po"


@dataclass(frozen=True)
class Variant:
    """One row: which trainer class runs which ``loss_type`` (see the module docstring)."""

    name: str
    trainer: str  # "trl" or "prefopt"
    loss_type: str
    head: str  # how the LM head is scored, for the report


VARIANTS = (
    Variant(TRL_SIGMOID, "trl", "sigmoid", "TRL fused (chunked)"),
    Variant("prefopt:sigmoid", "prefopt", "sigmoid", "prefopt linear_token_logprobs"),
    Variant("prefopt:sparse_po", "prefopt", "sparse_po", "prefopt linear_token_terms"),
    Variant(FULL_LOGITS_SPARSE_PO, "prefopt", "sparse_po", "full logits, fp32 log_softmax"),
    Variant("trl:orpo", "trl-orpo", "orpo", "full logits (ORPOTrainer)"),
    Variant("prefopt:orpo", "prefopt", "orpo", "prefopt linear_token_logprobs"),
    Variant("trl:cpo", "trl-cpo", "cpo", "full logits (CPOTrainer)"),
    Variant("prefopt:cpo", "prefopt", "cpo", "prefopt linear_token_logprobs"),
)
BY_NAME = {v.name: v for v in VARIANTS}
# Each row's ratios: against stock TRL's DPO step, and for a loss that a full-logits
# computation also runs (SparsePO eagerly, ORPO and CPO in TRL's own trainers) against that.
SAME_LOSS_BASELINE = {"sparse_po": FULL_LOGITS_SPARSE_PO, "orpo": "trl:orpo", "cpo": "trl:cpo"}
# The reference-free trainers: no reference model is given to them.
REFERENCE_FREE = {"orpo", "cpo"}


def batch_shape(tokens: int) -> tuple:
    """``(rows, tokens per row, prompt tokens per row)`` of a batch of ``tokens`` tokens."""
    rows = 2 * PAIRS
    if tokens % rows or tokens // rows < 4:
        raise ValueError(f"--tokens {tokens}: must be a multiple of {rows} (rows of the batch), "
                         f"at least {4 * rows}")
    seq = tokens // rows
    return rows, seq, max(1, seq // 8)


# --------------------------------------------------------------------------------------------
# the child: models, trainers, the step


def word_tokenizer():
    """A word-level tokenizer built in code: the trainers need one for pad and EOS ids only."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "w"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")


def tiny_llama(vocab: int, hidden: int, seed: int):
    """A ``LlamaForCausalLM`` of ``LAYERS`` layers, MLP ``4 hidden``, from ``seed``, built in code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config)


def make_batch(vocab: int, rows: int, seq: int, prompt: int) -> Dict[str, torch.Tensor]:
    """TRL's stacked preference batch: ``rows // 2`` prompts with a chosen completion, then the
    same prompts with a rejected one; random token ids (above the special ones), no padding."""
    g = torch.Generator().manual_seed(0)
    pairs = rows // 2
    prompts = torch.randint(3, vocab, (pairs, prompt), generator=g)
    completions = torch.randint(3, vocab, (rows, seq - prompt), generator=g)
    input_ids = torch.cat([prompts.repeat(2, 1), completions], dim=1)
    completion_mask = torch.ones_like(input_ids)
    completion_mask[:, :prompt] = 0
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "completion_mask": completion_mask}


def stock_pairwise_batch(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``batch`` in the layout of TRL's ORPO/CPO collator: ``chosen_*`` and ``rejected_*`` rows,
    ``*_labels`` holding the completion tokens (-100 on the prompt)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = {}
    for side, rows in zip(("chosen", "rejected"), batch["input_ids"].chunk(2, dim=0)):
        half = slice(0, rows.shape[0]) if side == "chosen" else slice(rows.shape[0], None)
        out.update({f"{side}_input_ids": rows, f"{side}_attention_mask": batch["attention_mask"][half],
                    f"{side}_labels": labels[half]})
    return out


def _trainer(variant: Variant, policy, reference, request: dict, out_dir: str):
    """The variant's trainer on ``policy`` and ``reference`` (which it patches: pass copies)."""
    import datasets
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from prefopt_kernels.integrations.trl_dpo import PrefOptDPOConfig, PrefOptDPOTrainer

    config_class, trainer_class, fields = {
        "trl": (DPOConfig, DPOTrainer, {"loss_type": variant.loss_type}),
        "trl-orpo": (ORPOConfig, ORPOTrainer, {}),
        "trl-cpo": (CPOConfig, CPOTrainer, {"loss_type": "sigmoid"}),
        "prefopt": (PrefOptDPOConfig, PrefOptDPOTrainer, {"loss_type": variant.loss_type}),
    }[variant.trainer]
    args = config_class(output_dir=out_dir, bf16=request["dtype"] == "bf16", activation_checkpointing=False,
                        use_cpu=request["device"] == "cpu", report_to=[], save_strategy="no",
                        disable_tqdm=True, seed=0, **fields)
    # The constructor wants a dataset; the step is fed the batch directly.
    dataset = datasets.Dataset.from_dict({"prompt": ["w"], "chosen": [" w"], "rejected": [" w"]})
    models = {"model": policy}
    if variant.loss_type not in REFERENCE_FREE:
        models["ref_model"] = reference
    return trainer_class(**models, args=args, train_dataset=dataset, processing_class=word_tokenizer())


@contextlib.contextmanager
def _lm_head(variant: Variant):
    """For ``full-logits:sparse_po``, ``PrefOptDPOTrainer``'s ``linear_token_terms`` call
    replaced by the full-logits computation; nothing for the other variants."""
    if variant.name != FULL_LOGITS_SPARSE_PO:
        yield
        return
    from prefopt_kernels.integrations import trl_dpo

    from .eager import linear_token_terms_full

    fused = trl_dpo.linear_token_terms
    trl_dpo.linear_token_terms = linear_token_terms_full
    try:
        yield
    finally:
        trl_dpo.linear_token_terms = fused


class Step:
    """``call()``: one training step of ``trainer`` on ``batch`` (see the module docstring);
    ``model`` is the trainer's model as ``train()`` wraps it (``accelerator.prepare_model``)."""

    def __init__(self, trainer, model, batch: Dict[str, torch.Tensor]):
        self.trainer, self.model = trainer, model
        self.inputs = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
        self.losses: List[torch.Tensor] = []

    def reset(self) -> None:
        """Set the parameter gradients to None, as ``Trainer.zero_grad`` leaves them."""
        self.model.zero_grad(set_to_none=True)

    def call(self) -> None:
        """One step: ``compute_loss`` then ``accelerator.backward``; its loss is kept."""
        with self.trainer.compute_loss_context_manager():
            loss = self.trainer.compute_loss(self.model, self.inputs)
        self.trainer.accelerator.backward(loss)
        self.losses.append(loss.detach())


def _measure(variant: Variant, policy, reference, batch, warm_batch, request: dict) -> dict:
    """Time, peak memory and loss of the variant's step."""
    with tempfile.TemporaryDirectory() as out_dir, _lm_head(variant):
        trainer = _trainer(variant, copy.deepcopy(policy), copy.deepcopy(reference), request,
                           out_dir)
        model = trainer.accelerator.prepare_model(trainer.model)
        model.train()
        if variant.trainer in ("trl-orpo", "trl-cpo"):
            batch, warm_batch = stock_pairwise_batch(batch), stock_pairwise_batch(warm_batch)
        return measure_step(Step(trainer, model, batch), Step(trainer, model, warm_batch), request)


def measure_step(step, warm, request: dict) -> dict:
    """Time, peak memory and first loss of ``step`` (a :class:`Step`-like object: ``call``,
    ``reset``, ``losses``); on a CPU ``warm``, the same step on a small batch, warms up before
    every sample, so each sample starts from the same cache state."""
    if request["device"] == "cuda":
        t = time_cuda(step.call, step.reset, min_reps=MIN_REPS)
        if request["memory"]:
            t = t.with_memory(cuda_peak_bytes(step.call, step.reset), "max_memory_allocated")
        return {**t.row(), "loss": float(step.losses[0])}

    def warm_up():
        warm.reset()
        warm.call()
    warm_up()
    elapsed: List[float] = []
    memory = None
    if request["memory"]:
        step.reset()
        gc.collect()
        memory = rss_peak_bytes(timed(step.call, elapsed))
    # A step is seconds of GEMMs: the measured one is a sample, warmed up like the rest.
    t = time_cpu(step.call, step.reset, budget_s=request["budget_s"], min_reps=MIN_REPS,
                 warmup=warm_up, samples=elapsed)
    if memory is not None:
        t = t.with_memory(*memory)
    return {**t.row(), "loss": float(step.losses[0])}


def quiet_libraries() -> None:
    """The libraries' deprecation warnings and progress bars would bury the progress lines."""
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def worker(request: dict) -> None:
    """Child side: every variant of the request in turn; one JSON line per result (a variant
    that fails gives an error line and the next one runs)."""
    quiet_libraries()
    rows, seq, prompt = batch_shape(request["tokens"])
    policy = tiny_llama(request["vocab"], request["hidden"], seed=0)
    reference = tiny_llama(request["vocab"], request["hidden"], seed=1)
    batch = make_batch(request["vocab"], rows, seq, prompt)
    warm_batch = make_batch(request["vocab"], 2, min(seq, 16), min(prompt, 2))
    emit({"meta": {
        "param_grad_bytes": sum(p.numel() * p.element_size() for p in policy.parameters()),
        "params": sum(p.numel() for p in policy.parameters()),
        "threads": torch.get_num_threads()}})
    measure_variants("dpo step", lambda name: _measure(BY_NAME[name], policy, reference, batch, warm_batch,
                                                        request), request)


# --------------------------------------------------------------------------------------------
# the parent


def run(*, vocab: int = DEFAULT_VOCAB, tokens: int = DEFAULT_TOKENS, hidden: int = DEFAULT_HIDDEN,
        dtype: str = "bf16", device: str = "cpu", budget_s: float = 1.0,
        measure_memory: bool = True, progress: bool = True,
        deadline_s: Optional[float] = None) -> dict:
    """Measure every variant of ``VARIANTS`` in one child process; the report's section:
    ``{"meta": ..., "notes": [...], "results": [one row per variant]}``. ``deadline_s``
    bounds the child (default 30 minutes; 5 at tiny sizes)."""
    import importlib.metadata as md

    rows, seq, prompt = batch_shape(tokens)
    names = [v.name for v in VARIANTS]
    check_step_dtype(dtype)
    if deadline_s is None:
        deadline_s = step_deadline(tokens, vocab)
    request = {"vocab": vocab, "tokens": tokens, "hidden": hidden, "dtype": dtype,
               "device": device, "variants": names, "budget_s": budget_s,
               "memory": measure_memory, "progress": progress}
    load = load_average()
    t0 = time.time()
    def describe(name: str) -> dict:
        v = BY_NAME[name]
        return {"variant": name, "trainer": v.trainer, "loss_type": v.loss_type, "head": v.head,
                "v": vocab, "n": tokens, "h": hidden, "dtype": dtype}

    child_meta, results, failure = variant_rows("benchmarks.dpo_step:worker", request, describe, deadline_s)
    # Each row against stock TRL and, for a loss with a same-loss baseline, against that.
    rows_by_variant = {r["variant"]: r for r in results}
    for r in results:
        add_ratios(r, rows_by_variant.get(TRL_SIGMOID), "trl")
        add_ratios(r, rows_by_variant.get(SAME_LOSS_BASELINE.get(r["loss_type"])), "full_logits")
    meta = {"device_name": report.device_name(torch.device(device)), "device": device,
            "torch": torch.__version__, "trl": md.version("trl"),
            "transformers": md.version("transformers"),
            "model": {"vocab": vocab, "hidden": hidden, "layers": LAYERS,
                      "intermediate": 4 * hidden, "params": child_meta.get("params")},
            "batch": {"pairs": PAIRS, "rows": rows, "seq_len": seq, "prompt_len": prompt,
                      "tokens": tokens, "completion_tokens": rows * (seq - prompt)},
            "dtype": dtype, "param_grad_bytes": child_meta.get("param_grad_bytes"),
            "threads": child_meta.get("threads"), "budget_s": budget_s,
            "load_average_before": load,
            "load_average_after": load_average(),
            "wall_s": time.time() - t0, "complete": failure is None}
    notes = [] if failure is None else [failure]
    return {"meta": meta, "notes": notes, "results": results}

