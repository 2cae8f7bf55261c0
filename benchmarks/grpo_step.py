"""One GRPO training step of a tiny Llama: stock TRL against ``PrefOptGRPOTrainer``.

``python -m benchmarks --grpo-step`` starts one child process (``child_process.run_children``
of :func:`worker`) that runs every variant in turn on the same two models and micro-batch:

``trl:k3``
    ``trl.GRPOTrainer`` with ``beta > 0``: TRL's k3 estimate of the KL on the sampled token,
    both models scored through TRL's own fused, chunked LM head (``add_fused_lm_head``).
``prefopt:k3``
    ``PrefOptGRPOTrainer``, ``kl_estimator="k3"``: TRL's loss on this package's fused head
    (``linear_token_logprobs``) for both models.
``prefopt:full``
    ``PrefOptGRPOTrainer``, ``kl_estimator="full"``: the exact ``KL(π ‖ π_ref)`` over the
    vocabulary from one ``linear_token_terms`` pass over both models' hidden states.
``full-logits:full``
    the same trainer and loss with that pass replaced by :func:`full_logits_kl_terms`: both
    models' ``[B, T, V]`` logits projected in full, then fp32 ``log_softmax``, as a trainer
    without fused kernels computes the exact KL. TRL has no exact KL.

The models are ``dpo_step.tiny_llama`` (V, H, 2 layers); the reference is a second one from
another seed, so that the KL is not 0. The micro-batch is what TRL's generation hands the loss:
``ROWS`` completions of ``N / ROWS`` tokens each, of which the first eighth is prompt, no
padding, random advantages; TRL's default ``loss_type="dapo"``, ``beta = 0.04``,
``num_iterations = 1`` (so no old log-probs: the ratio is 1 in value).

The step is the work of one micro-batch that differs between the variants: for k3, the
reference's log-probs (``_get_per_token_logps_and_entropies`` on the reference under
``no_grad``, as TRL's generation step computes them), then ``compute_loss`` and
``accelerator.backward``; for full, ``compute_loss`` (which runs the reference backbone under
``no_grad`` itself) and ``accelerator.backward``. Generation, rewards and the optimizer step
are the same for every variant and left out. Measured as ``dpo_step`` measures: time, peak
memory above what was allocated before the step (parameter gradients included), the loss.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import report
from .child_process import emit
from .dpo_step import LAYERS, Step, measure_step, quiet_libraries, tiny_llama, word_tokenizer
from .measure import add_ratios, load_average
from .step_runs import check_step_dtype, measure_variants, ratio_table, step_deadline, variant_rows

ROWS = 16
BETA = 0.04
DEFAULT_VOCAB = 32000
DEFAULT_TOKENS = 4096  # 16 completions of 256 tokens, prompt included
DEFAULT_HIDDEN = 256
TINY = {"vocab": 512, "tokens": 256, "hidden": 32}
TRL_K3 = "trl:k3"
FULL_LOGITS = "full-logits:full"


@dataclass(frozen=True)
class Variant:
    """One row: which trainer class runs which ``kl_estimator`` (see the module docstring)."""

    name: str
    trainer: str  # "trl" or "prefopt"
    kl_estimator: str
    head: str  # how the LM heads are scored, for the report


VARIANTS = (
    Variant(TRL_K3, "trl", "k3", "TRL fused (chunked)"),
    Variant("prefopt:k3", "prefopt", "k3", "prefopt linear_token_logprobs"),
    Variant("prefopt:full", "prefopt", "full", "prefopt linear_token_terms"),
    Variant(FULL_LOGITS, "prefopt", "full", "full logits, fp32 log_softmax"),
)
BY_NAME = {v.name: v for v in VARIANTS}
SAME_LOSS_BASELINE = {"full": FULL_LOGITS}


def batch_shape(tokens: int) -> tuple:
    """``(rows, tokens per row, prompt tokens per row)`` of a micro-batch of ``tokens`` tokens."""
    if tokens % ROWS or tokens // ROWS < 4:
        raise ValueError(f"--tokens {tokens}: must be a multiple of {ROWS} (completions of the batch), "
                         f"at least {4 * ROWS}")
    seq = tokens // ROWS
    return ROWS, seq, max(1, seq // 8)


def make_batch(vocab: int, rows: int, seq: int, prompt: int) -> Dict[str, torch.Tensor]:
    """The micro-batch TRL's generation hands ``compute_loss``: random ids above the special ones."""
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (rows, prompt), generator=g)
    completion_ids = torch.randint(3, vocab, (rows, seq - prompt), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": torch.randn(rows, generator=g),
            "num_items_in_batch": completion_mask.sum().float()}


def full_logits_kl_terms(hidden, head, labels, ref_hidden, ref_head, *, temperature=1.0, logit_scale=1.0,
                         softcap=None, ref_logit_scale=1.0, ref_softcap=None, process_group=None, **sampler):
    """``trl_grpo.full_kl_terms`` as a trainer without it computes the terms: both models' logits
    projected in full (in the autocast dtype, the reference's under ``no_grad``), fp32
    ``log_softmax`` of each at ``temperature``, then the label's log-prob, the entropy and
    ``KL(p ‖ q)`` read from those arrays; 0 at ignored labels. No shards, no sampler options."""
    if process_group is not None or sampler:
        raise ValueError("the full-logits terms take neither a process group nor sampler options")

    def project(h, layer, scale, cap):
        z = F.linear(h, layer.weight, layer.bias)
        if scale != 1.0:
            z = z * scale
        return z if cap is None else cap * torch.tanh(z / cap)
    z = project(hidden, head, logit_scale, softcap)
    with torch.no_grad():
        zq = project(ref_hidden, ref_head, ref_logit_scale, ref_softcap)
    keep = labels != -100
    lp = torch.log_softmax(z.float() / temperature, dim=-1)
    lq = torch.log_softmax(zq.float() / temperature, dim=-1)
    p = lp.exp()
    zero = lp.new_zeros(())
    logp = torch.where(keep, lp.gather(-1, labels.masked_fill(~keep, 0).unsqueeze(-1)).squeeze(-1), zero)
    entropy = torch.where(keep, -(p * lp).sum(-1), zero)
    kl = torch.where(keep, (p * (lp - lq)).sum(-1), zero)
    return logp, entropy, kl


# --------------------------------------------------------------------------------------------
# the child: trainers, the step


def _trainer(variant: Variant, policy_dir: str, reference, request: dict, out_dir: str):
    """The variant's trainer: the policy loaded from ``policy_dir``, the reference's weights set to ``reference``'s."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from prefopt_kernels.integrations.trl_grpo import PrefOptGRPOConfig, PrefOptGRPOTrainer

    options = dict(output_dir=out_dir, beta=BETA, per_device_train_batch_size=ROWS,
                   max_completion_length=request["completion"], bf16=request["dtype"] == "bf16",
                   activation_checkpointing=False, use_cpu=request["device"] == "cpu", report_to=[],
                   save_strategy="no", disable_tqdm=True, seed=0)
    if variant.trainer == "trl":
        config_class, trainer_class = GRPOConfig, GRPOTrainer
    else:
        config_class, trainer_class = PrefOptGRPOConfig, PrefOptGRPOTrainer
        options["kl_estimator"] = variant.kl_estimator
    # The constructor wants a dataset and a reward; the step is fed the micro-batch directly.
    trainer = trainer_class(model=policy_dir, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                            args=config_class(**options), train_dataset=datasets.Dataset.from_dict({"prompt": ["w"]}),
                            processing_class=word_tokenizer())
    trainer.ref_model.load_state_dict(reference.state_dict())
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before a step
    return trainer


@contextlib.contextmanager
def _lm_heads(variant: Variant):
    """For ``full-logits:full``, the trainer's ``full_kl_terms`` replaced by the full-logits terms."""
    if variant.name != FULL_LOGITS:
        yield
        return
    from prefopt_kernels.integrations import trl_grpo

    fused = trl_grpo.full_kl_terms
    trl_grpo.full_kl_terms = full_logits_kl_terms
    try:
        yield
    finally:
        trl_grpo.full_kl_terms = fused


class ReferenceScoringStep(Step):
    """A DPO-step :class:`~benchmarks.dpo_step.Step` that first scores the reference's log-probs
    when ``score_reference`` (k3: what TRL's generation does before ``compute_loss``)."""

    def __init__(self, trainer, model, batch: Dict[str, torch.Tensor], score_reference: bool):
        super().__init__(trainer, model, batch)
        self.score_reference = score_reference
        if score_reference:
            inputs = self.inputs
            self.ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            self.mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)

    def call(self) -> None:
        if self.score_reference:
            with torch.no_grad():
                self.inputs["ref_per_token_logps"] = self.trainer._get_per_token_logps_and_entropies(
                    self.trainer.ref_model, self.ids, self.mask, self.inputs["completion_ids"].size(1))[0]
        super().call()


def _measure(variant: Variant, policy_dir: str, reference, batch, warm_batch, request: dict) -> dict:
    """Time, peak memory and loss of the variant's step."""
    with tempfile.TemporaryDirectory() as out_dir, _lm_heads(variant):
        trainer = _trainer(variant, policy_dir, reference, request, out_dir)
        model = trainer.accelerator.prepare_model(trainer.model)
        model.train()
        score = variant.kl_estimator == "k3"
        return measure_step(ReferenceScoringStep(trainer, model, batch, score),
                            ReferenceScoringStep(trainer, model, warm_batch, score), request)


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
    with tempfile.TemporaryDirectory() as policy_dir:
        policy.save_pretrained(policy_dir)  # GRPO loads its reference from the policy's name
        word_tokenizer().save_pretrained(policy_dir)
        del policy
        measure_variants("grpo step", lambda name: _measure(BY_NAME[name], policy_dir, reference, batch, warm_batch,
                                                             {**request, "completion": seq - prompt}), request)


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
        return {"variant": name, "trainer": v.trainer, "kl_estimator": v.kl_estimator, "head": v.head,
                "v": vocab, "n": tokens, "h": hidden, "dtype": dtype}

    child_meta, results, failure = variant_rows("benchmarks.grpo_step:worker", request, describe, deadline_s)
    rows_by_variant = {r["variant"]: r for r in results}
    for r in results:
        add_ratios(r, rows_by_variant.get(TRL_K3), "trl")
        add_ratios(r, rows_by_variant.get(SAME_LOSS_BASELINE.get(r["kl_estimator"])), "full_logits")
    meta = {"device_name": report.device_name(torch.device(device)), "device": device, "torch": torch.__version__,
            "trl": md.version("trl"), "transformers": md.version("transformers"),
            "model": {"vocab": vocab, "hidden": hidden, "layers": LAYERS, "intermediate": 4 * hidden,
                      "params": child_meta.get("params")},
            "batch": {"rows": rows, "seq_len": seq, "prompt_len": prompt, "tokens": tokens,
                      "completion_tokens": rows * (seq - prompt)},
            "dtype": dtype, "beta": BETA, "param_grad_bytes": child_meta.get("param_grad_bytes"),
            "threads": child_meta.get("threads"), "budget_s": budget_s, "load_average_before": load,
            "load_average_after": load_average(), "wall_s": time.time() - t0, "complete": failure is None}
    return {"meta": meta, "notes": [] if failure is None else [failure], "results": results}


# --------------------------------------------------------------------------------------------
# the report

COLUMNS = ["variant", "trainer", "kl_estimator", "LM heads", "time ms (p20-p80)", "x trl:k3", "peak MiB",
           "mem / trl:k3", "x full logits", "mem / full logits", "loss", "note"]
HEADER = (
    "The work of one micro-batch that differs between the variants: for k3, the reference's "
    "log-probs under no_grad (as TRL's generation step computes them), then compute_loss and "
    "accelerator.backward; for full, compute_loss (the reference backbone under no_grad inside "
    "it) and accelerator.backward. Generation, rewards and the optimizer step are left out (the "
    "same for every variant). trl:k3: trl.GRPOTrainer on TRL's fused head. prefopt:k3: "
    "PrefOptGRPOTrainer, TRL's loss on this package's fused head. prefopt:full: the exact "
    "KL(pi || pi_ref) over the vocabulary from one linear_token_terms pass. full-logits:full: "
    "the same loss from both models' full logits and fp32 log_softmax.")
METRICS = (
    "time: median per step (20th-80th percentile). x trl:k3: trl:k3's time / this time; x full "
    "logits: full-logits:full's time / this time (full rows). peak MiB: peak memory during one "
    "step above what was allocated before it, parameter gradients included. loss: the loss of "
    "the measured step; rows of the same kl_estimator compute the same loss.")


def markdown(section: dict) -> str:
    """The section of ``python -m benchmarks --grpo-step`` as markdown (also printed)."""
    meta = section["meta"]
    model, batch = meta["model"], meta["batch"]
    precision = "bf16 mixed precision (TRL's default)" if meta["dtype"] == "bf16" else "fp32"
    lines = ["## One GRPO step (TRL GRPOTrainer)", "",
             f"{meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}, TRL "
             f"{meta['trl']}; {meta.get('threads')} thread(s); {meta['wall_s']:.0f} s.", "",
             f"Llama: V={model['vocab']}, H={model['hidden']}, {model['layers']} layers, MLP "
             f"{model['intermediate']}. Micro-batch: {batch['rows']} completions of {batch['seq_len']} tokens "
             f"(prompt {batch['prompt_len']}): {batch['completion_tokens']} completion tokens; beta "
             f"{meta['beta']}, loss_type dapo. {precision}.", "", HEADER, "", METRICS]
    lines += [f"- {n}" for n in section["notes"]]
    lines += [""] + ratio_table(COLUMNS, ("variant", "trainer", "kl_estimator", "head"), section["results"])
    return "\n".join(lines) + "\n"
