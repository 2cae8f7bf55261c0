"""One KTO training step of a tiny Llama: stock TRL against ``PrefOptKTOTrainer``.

``python -m benchmarks --kto-step`` starts one child process (``child_process.run_children`` of
:func:`worker`) that runs every variant in turn on copies of the same two models and batch:

``trl:kto``
    ``trl.KTOTrainer``, ``loss_type="kto"``: both models scored through TRL 1.16's own fused,
    chunked LM head (``add_fused_lm_head``), which KTO always uses.
``prefopt:kto``
    ``PrefOptKTOTrainer``: TRL's ``_compute_loss`` on this package's fused head
    (``linear_token_logprobs``) for both models.
``full-logits:kto``
    ``trl.KTOTrainer`` with its head replaced by :func:`add_full_logits_head`: each model's
    ``[B, T, V]`` logits projected in full, then fp32 ``log_softmax``, as KTO trainers without a
    fused head compute the same log-probs.

The models are ``dpo_step.tiny_llama`` (V, H, 2 layers); the reference is a second one from
another seed. The batch is what TRL's collator stacks: ``ROWS`` completions, desirable and
undesirable alternating, ``N / ROWS`` tokens each of which the first eighth is prompt, no
padding, and the ``ROWS`` mismatched KL pairs (each prompt followed by the next row's completion,
as TRL builds them). The step is ``compute_loss`` (the policy's KL pass and both reference
passes under ``no_grad``, the policy's completion pass) and ``accelerator.backward``, measured as
``dpo_step`` measures: time, peak memory above what was allocated before the step (parameter
gradients included), the loss.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import tempfile
import time
import types
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from . import report
from .child_process import emit
from .dpo_step import LAYERS, Step, measure_step, quiet_libraries, tiny_llama, word_tokenizer
from .measure import add_ratios, load_average
from .step_runs import check_step_dtype, measure_variants, ratio_table, step_deadline, variant_rows

ROWS = 16
DEFAULT_VOCAB = 32000
DEFAULT_TOKENS = 4096  # 16 completions of 256 tokens, prompt included (the KL pairs the same again)
DEFAULT_HIDDEN = 256
TINY = {"vocab": 512, "tokens": 256, "hidden": 32}
TRL_KTO = "trl:kto"
FULL_LOGITS = "full-logits:kto"


@dataclass(frozen=True)
class Variant:
    """One row: which trainer class scores the models with which head (see the module docstring)."""

    name: str
    trainer: str  # "trl" or "prefopt"
    head: str  # how the LM heads are scored, for the report


VARIANTS = (
    Variant(TRL_KTO, "trl", "TRL fused (chunked)"),
    Variant("prefopt:kto", "prefopt", "prefopt linear_token_logprobs"),
    Variant(FULL_LOGITS, "trl", "full logits, fp32 log_softmax"),
)
BY_NAME = {v.name: v for v in VARIANTS}


def batch_shape(tokens: int) -> tuple:
    """``(rows, tokens per row, prompt tokens per row)`` of a batch of ``tokens`` tokens."""
    if tokens % ROWS or tokens // ROWS < 4:
        raise ValueError(f"--tokens {tokens}: must be a multiple of {ROWS} (completions of the batch), "
                         f"at least {4 * ROWS}")
    seq = tokens // ROWS
    return ROWS, seq, max(1, seq // 8)


def make_batch(vocab: int, rows: int, seq: int, prompt: int) -> Dict[str, torch.Tensor]:
    """TRL's collated KTO batch: random ids above the special ones, labels alternating, and the
    KL pairs (prompt ``i`` with completion ``i + 1``, cyclically)."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (rows, prompt), generator=g)
    completions = torch.randint(3, vocab, (rows, seq - prompt), generator=g)
    input_ids = torch.cat([prompts, completions], dim=1)
    kl_input_ids = torch.cat([prompts, completions.roll(-1, dims=0)], dim=1)
    completion_mask = torch.ones_like(input_ids)
    completion_mask[:, :prompt] = 0
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "completion_mask": completion_mask, "label": torch.arange(rows) % 2 == 0,
            "KL_input_ids": kl_input_ids, "KL_attention_mask": torch.ones_like(input_ids),
            "KL_completion_mask": completion_mask.clone()}


def add_full_logits_head(model, outputs: tuple = ("log_probs",), **ignored) -> None:
    """TRL's ``add_fused_lm_head`` protocol answered from full logits: with ``fused_lm_head=True``
    the model's own forward builds ``[B, T, V]`` logits, then fp32 ``log_softmax`` gives the
    shifted labels' log-probs (0 where the label is -100), the entropy and the mean logit (those
    in ``outputs``); ``loss`` is their mean negative log-prob. Temperature 1, no soft cap or scale
    beyond the model's own forward, no MoE auxiliary loss."""
    from trl.trainer.utils import FusedCausalLMOutput

    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def full_logits_forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return original_forward(*args, **({} if labels is None else {"labels": labels}), **kwargs)
        kwargs["use_cache"] = False
        logits = original_forward(*args, **kwargs).logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != -100
        log_softmax = torch.log_softmax(logits, dim=-1)
        picked = log_softmax.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
        log_probs = torch.where(mask, picked, 0.0)
        entropy = mean_logits = None
        if "entropy" in outputs:
            entropy = torch.where(mask, -(log_softmax.exp() * log_softmax).sum(-1), 0.0)
        if "mean_logits" in outputs:
            mean_logits = torch.where(mask, logits.detach().mean(-1), 0.0)
        return FusedCausalLMOutput(loss=-log_probs.sum() / mask.sum().clamp(min=1), log_probs=log_probs,
                                   entropy=entropy, mean_logits=mean_logits, label_mask=mask)

    model.forward = types.MethodType(full_logits_forward, model)


@contextlib.contextmanager
def _lm_heads(variant: Variant):
    """For ``full-logits:kto``, TRL's KTO module given :func:`add_full_logits_head` during construction."""
    if variant.name != FULL_LOGITS:
        yield
        return
    import trl.trainer.kto_trainer as trl_kto

    fused = trl_kto.add_fused_lm_head
    trl_kto.add_fused_lm_head = add_full_logits_head
    try:
        yield
    finally:
        trl_kto.add_fused_lm_head = fused


def _trainer(variant: Variant, policy, reference, request: dict, out_dir: str):
    """The variant's trainer on ``policy`` and ``reference`` (which it patches: pass copies)."""
    import datasets
    from trl import KTOConfig, KTOTrainer

    from prefopt_kernels.integrations.trl_kto import PrefOptKTOConfig, PrefOptKTOTrainer

    config_class, trainer_class = ((KTOConfig, KTOTrainer) if variant.trainer == "trl"
                                   else (PrefOptKTOConfig, PrefOptKTOTrainer))
    args = config_class(output_dir=out_dir, per_device_train_batch_size=ROWS, bf16=request["dtype"] == "bf16",
                        activation_checkpointing=False, use_cpu=request["device"] == "cpu", report_to=[],
                        save_strategy="no", disable_tqdm=True, seed=0)
    # The constructor wants a dataset; the step is fed the batch directly.
    dataset = datasets.Dataset.from_dict({"prompt": ["w", "w"], "completion": [" w", " w"], "label": [True, False]})
    with _lm_heads(variant):
        return trainer_class(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                             processing_class=word_tokenizer())


def _measure(variant: Variant, policy, reference, batch, warm_batch, request: dict) -> dict:
    """Time, peak memory and loss of the variant's step."""
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = _trainer(variant, copy.deepcopy(policy), copy.deepcopy(reference), request, out_dir)
        model = trainer.accelerator.prepare_model(trainer.model)
        model.train()
        return measure_step(Step(trainer, model, batch), Step(trainer, model, warm_batch), request)


def worker(request: dict) -> None:
    """Child side: every variant of the request in turn; one JSON line per result (a variant
    that fails gives an error line and the next one runs)."""
    quiet_libraries()
    rows, seq, prompt = batch_shape(request["tokens"])
    policy = tiny_llama(request["vocab"], request["hidden"], seed=0)
    reference = tiny_llama(request["vocab"], request["hidden"], seed=1)
    batch = make_batch(request["vocab"], rows, seq, prompt)
    warm_batch = make_batch(request["vocab"], 2, min(seq, 16), min(prompt, 2))
    emit({"meta": {"param_grad_bytes": sum(p.numel() * p.element_size() for p in policy.parameters()),
                   "params": sum(p.numel() for p in policy.parameters()),
                   "threads": torch.get_num_threads()}})
    measure_variants("kto step", lambda name: _measure(BY_NAME[name], policy, reference, batch, warm_batch,
                                                        request), request)


# --------------------------------------------------------------------------------------------
# the parent


def run(*, vocab: int = DEFAULT_VOCAB, tokens: int = DEFAULT_TOKENS, hidden: int = DEFAULT_HIDDEN,
        dtype: str = "bf16", device: str = "cpu", budget_s: float = 1.0, measure_memory: bool = True,
        progress: bool = True, deadline_s: Optional[float] = None) -> dict:
    """Measure every variant of ``VARIANTS`` in one child process; the report's section:
    ``{"meta": ..., "notes": [...], "results": [one row per variant]}``."""
    import importlib.metadata as md

    rows, seq, prompt = batch_shape(tokens)
    names = [v.name for v in VARIANTS]
    check_step_dtype(dtype)
    if deadline_s is None:
        deadline_s = step_deadline(tokens, vocab)
    request = {"vocab": vocab, "tokens": tokens, "hidden": hidden, "dtype": dtype, "device": device,
               "variants": names, "budget_s": budget_s, "memory": measure_memory, "progress": progress}
    load = load_average()
    t0 = time.time()
    def describe(name: str) -> dict:
        v = BY_NAME[name]
        return {"variant": name, "trainer": v.trainer, "head": v.head, "v": vocab, "n": tokens, "h": hidden,
                "dtype": dtype}

    child_meta, results, failure = variant_rows("benchmarks.kto_step:worker", request, describe, deadline_s)
    rows_by_variant = {r["variant"]: r for r in results}
    for r in results:
        add_ratios(r, rows_by_variant.get(TRL_KTO), "trl")
        add_ratios(r, rows_by_variant.get(FULL_LOGITS), "full_logits")
    meta = {"device_name": report.device_name(torch.device(device)), "device": device, "torch": torch.__version__,
            "trl": md.version("trl"), "transformers": md.version("transformers"),
            "model": {"vocab": vocab, "hidden": hidden, "layers": LAYERS, "intermediate": 4 * hidden,
                      "params": child_meta.get("params")},
            "batch": {"rows": rows, "seq_len": seq, "prompt_len": prompt, "tokens": tokens,
                      "completion_tokens": rows * (seq - prompt)},
            "dtype": dtype, "param_grad_bytes": child_meta.get("param_grad_bytes"),
            "threads": child_meta.get("threads"), "budget_s": budget_s, "load_average_before": load,
            "load_average_after": load_average(), "wall_s": time.time() - t0, "complete": failure is None}
    return {"meta": meta, "notes": [] if failure is None else [failure], "results": results}


# --------------------------------------------------------------------------------------------
# the report

COLUMNS = ["variant", "trainer", "LM heads", "time ms (p20-p80)", "x trl:kto", "peak MiB", "mem / trl:kto",
           "x full logits", "mem / full logits", "loss", "note"]
HEADER = (
    "One KTO training step: compute_loss (the policy's pass over the mismatched KL pairs and both "
    "reference passes under no_grad, the policy's pass over the completions) and accelerator.backward; "
    "the optimizer step is left out (the same for every variant). trl:kto: trl.KTOTrainer on TRL's "
    "fused head. prefopt:kto: PrefOptKTOTrainer, TRL's loss on this package's fused head. "
    "full-logits:kto: trl.KTOTrainer with both models' full logits and fp32 log_softmax.")
METRICS = (
    "time: median per step (20th-80th percentile). x trl:kto: trl:kto's time / this time; x full "
    "logits: full-logits:kto's time / this time. peak MiB: peak memory during one step above what "
    "was allocated before it, parameter gradients included. loss: the loss of the measured step; "
    "every row computes the same loss.")


def markdown(section: dict) -> str:
    """The section of ``python -m benchmarks --kto-step`` as markdown (also printed)."""
    meta = section["meta"]
    model, batch = meta["model"], meta["batch"]
    precision = "bf16 mixed precision (TRL's default)" if meta["dtype"] == "bf16" else "fp32"
    lines = ["## One KTO step (TRL KTOTrainer)", "",
             f"{meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}, TRL "
             f"{meta['trl']}; {meta.get('threads')} thread(s); {meta['wall_s']:.0f} s.", "",
             f"Llama: V={model['vocab']}, H={model['hidden']}, {model['layers']} layers, MLP "
             f"{model['intermediate']}. Batch: {batch['rows']} completions of {batch['seq_len']} tokens "
             f"(prompt {batch['prompt_len']}) and as many KL pairs: {batch['completion_tokens']} completion "
             f"tokens each. {precision}.", "", HEADER, "", METRICS]
    lines += [f"- {n}" for n in section["notes"]]
    lines += [""] + ratio_table(COLUMNS, ("variant", "trainer", "head"), section["results"])
    return "\n".join(lines) + "\n"
