"""One distillation training step, stock TRL against this package, dense and sparse teacher.

``python -m benchmarks --distill-step`` starts one child process (``child_process.run_children``
of :func:`worker`) that runs every variant in turn on copies of the same student, teacher and batch:

``trl:dense``
    ``trl.DistillationTrainer``: both models' hidden states through TRL's
    ``ChunkedDivergenceFunction`` (vocabulary chunks of 32768; torch tiles off CUDA, Triton on it).
``prefopt:dense``
    ``PrefOptDistillationTrainer``: the same hidden states through ``linear_token_terms``.
``trl:sparse``
    ``ServerDistillationTrainer`` with ``beta = 0``, ``loss_top_k = TOP_K`` and the tail bucket:
    the student's full ``[B, T, V]`` logits and log-softmax, gathered at the teacher's ids.
``prefopt:sparse``
    ``PrefOptServerDistillationTrainer``: ``linear_sparse_teacher_divergence`` on the student's
    hidden states, the same teacher answer.

The sparse variants are given a fixed teacher answer (the dense teacher's top-``TOP_K`` of the
batch, computed once): the step measures the student's side, not a server. The op rows time
``ChunkedDivergenceFunction`` and ``linear_token_divergence`` (forward and backward) on the same
hidden states and heads: the rows the fused-linear suite has for log-probs.

The batch: ``ROWS`` prompts of ``seq / 8`` tokens with completions of the rest, random token ids,
no padding. The step is ``compute_loss`` on the model as ``train()`` prepares it, then
``accelerator.backward``; no optimizer step; gradients set to ``None`` before each. Measured per
row: the time (median, with the 20th and 80th percentiles), the peak memory above what was
allocated before (CPU: resident high-water mark; CUDA: ``max_memory_allocated``, which includes
the parameter gradients the step creates), and the loss.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from typing import Dict

import torch

from . import report
from .child_process import emit
from .dpo_step import Step, measure_step, quiet_libraries
from .measure import add_ratios, load_average
from .step_runs import check_step_dtype, measure_variants, variant_rows

ROWS = 8
LAYERS = 2
TOP_K = 20
BETA = 0.5  # TRL's generalised JSD: its dense path's most expensive divergence
DEFAULT = {"vocab": 32000, "tokens": 2048, "hidden": 256}
TINY = {"vocab": 512, "tokens": 128, "hidden": 32}
DEADLINE_S = 1800
VARIANTS = ("trl:dense", "prefopt:dense", "trl:sparse", "prefopt:sparse", "op:trl_chunked", "op:prefopt_linear")
# Each row's baseline: the stock row of the same teacher.
BASELINE = {"prefopt:dense": "trl:dense", "prefopt:sparse": "trl:sparse", "op:prefopt_linear": "op:trl_chunked"}


def batch_shape(tokens: int) -> tuple:
    """``(rows, tokens per row, prompt tokens per row)``."""
    if tokens % ROWS or tokens // ROWS < 4:
        raise ValueError(f"--tokens {tokens}: must be a multiple of {ROWS}, at least {4 * ROWS}")
    seq = tokens // ROWS
    return ROWS, seq, max(1, seq // 8)


def _model(vocab: int, hidden: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None)
    return LlamaForCausalLM(config)


def make_batch(vocab: int, rows: int, seq: int, prompt: int) -> Dict[str, torch.Tensor]:
    """TRL's distillation batch: prompt and completion ids and masks, random ids, no padding."""
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (rows, prompt), generator=g)
    completion_ids = torch.randint(3, vocab, (rows, seq - prompt), generator=g)
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
            "completion_ids": completion_ids, "completion_mask": torch.ones_like(completion_ids)}


def make_tokenizer():
    """A word-level tokenizer built in code (the trainers read its pad and EOS ids), left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "w"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   padding_side="left")


class _NoServer:
    """Stands in for ``VLLMClient`` at construction: the sparse variants get a fixed answer."""

    def __init__(self, *args, **kwargs):
        pass


@torch.no_grad()
def teacher_answer(teacher, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The server's answer for ``batch``: the teacher's top-``TOP_K`` ids and log-probs per completion
    token, and its log-prob of each completion token, as ``_get_teacher_token_logprobs_from_server``."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    prompt = batch["prompt_ids"].shape[1]
    logp = teacher(ids).logits[:, prompt - 1:-1].float().log_softmax(-1)
    top_lp, top_ids = logp.topk(TOP_K, dim=-1)
    actual = logp.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return {"actual_logprobs": actual, "topk_logprobs": top_lp, "topk_token_ids": top_ids}


def _trainer(name: str, student, teacher, request: dict, out_dir: str):
    import datasets
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

    from prefopt_kernels.integrations.trl_distill import PrefOptDistillationTrainer
    from prefopt_kernels.integrations.trl_server_distill import PrefOptServerDistillationTrainer

    common = dict(output_dir=out_dir, bf16=request["dtype"] == "bf16", gradient_checkpointing=False,
                  use_cpu=request["device"] == "cpu", report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    dataset = datasets.Dataset.from_dict({"prompt": ["w"]})
    tokenizer = make_tokenizer()
    if name.endswith(":dense"):
        trainer_class = DistillationTrainer if name.startswith("trl") else PrefOptDistillationTrainer
        return trainer_class(model=student, teacher_model=teacher, args=DistillationConfig(beta=BETA, **common),
                             train_dataset=dataset, processing_class=tokenizer)
    import trl.generation.vllm_client as vllm_client

    trainer_class = ServerDistillationTrainer if name.startswith("trl") else PrefOptServerDistillationTrainer
    args = ServerDistillationConfig(beta=0.0, loss_top_k=TOP_K, teacher_model_server_url="http://unused", **common)
    client, vllm_client.VLLMClient = vllm_client.VLLMClient, _NoServer
    try:
        return trainer_class(model=student, args=args, train_dataset=dataset, processing_class=tokenizer)
    finally:
        vllm_client.VLLMClient = client


class OpStep:
    """Forward and backward of the dense divergence op alone, on the models' hidden states and heads."""

    def __init__(self, name: str, student, teacher, batch, dtype: torch.dtype):
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        with torch.no_grad():
            self.h_s = student.model(ids).last_hidden_state.flatten(0, 1).to(dtype)
            self.h_t = teacher.model(ids).last_hidden_state.flatten(0, 1).to(dtype)
        self.w_s = student.lm_head.weight.detach().to(dtype).requires_grad_()
        self.w_t = teacher.lm_head.weight.detach().to(dtype)
        self.h_s.requires_grad_()
        self.name, self.losses = name, []

    def reset(self) -> None:
        self.h_s.grad = self.w_s.grad = None

    def call(self) -> None:
        if self.name == "op:trl_chunked":
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

            div, _ = ChunkedDivergenceFunction.apply(self.h_s, self.w_s, None, self.h_t, self.w_t, None, BETA, 1.0,
                                                     1.0, None, 1.0, None)
        else:
            from prefopt_kernels import linear_token_divergence

            div = linear_token_divergence(self.h_s, self.w_s, self.h_t, self.w_t, divergence="js", beta=BETA)
        loss = div.mean()
        loss.backward()
        self.losses.append(loss.detach())


def _measure(name: str, student, teacher, batch, warm_batch, answer, request: dict) -> dict:
    """Time, peak memory and loss of one row's step."""
    with tempfile.TemporaryDirectory() as out_dir:
        if name.startswith("op:"):
            dtype = torch.bfloat16 if request["dtype"] == "bf16" else torch.float32
            step = OpStep(name, student, teacher, batch, dtype)
            warm = OpStep(name, student, teacher, warm_batch, dtype)
        else:
            trainer = _trainer(name, copy.deepcopy(student), copy.deepcopy(teacher), request, out_dir)
            if name.endswith(":sparse"):
                answers = {batch["prompt_ids"].shape: answer, warm_batch["prompt_ids"].shape:
                           teacher_answer(teacher, warm_batch)}
                trainer._get_teacher_token_logprobs_from_server = (
                    lambda inputs, prompt_length: {k: v.to(trainer.accelerator.device) for k, v in
                                                   answers[inputs["prompt_ids"].shape].items()})
            # What train() sets before its first step; the server trainers divide their loss by it.
            trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
            model = trainer.accelerator.prepare_model(trainer.model)
            model.train()
            step, warm = Step(trainer, model, batch), Step(trainer, model, warm_batch)
        return measure_step(step, warm, request)


def worker(request: dict) -> None:
    """Child side: every variant in turn; one JSON line per result (a failure is a row too)."""
    quiet_libraries()
    rows, seq, prompt = batch_shape(request["tokens"])
    student = _model(request["vocab"], request["hidden"], seed=0)
    teacher = _model(request["vocab"], request["hidden"] * 3 // 2, seed=1)
    batch = make_batch(request["vocab"], rows, seq, prompt)
    warm_batch = make_batch(request["vocab"], 2, min(seq, 16), min(prompt, 2))
    answer = teacher_answer(teacher, batch)
    emit({"meta": {"threads": torch.get_num_threads(),
                   "params": sum(p.numel() for p in student.parameters())}})
    measure_variants("distill step", lambda name: _measure(name, student, teacher, batch, warm_batch, answer,
                                                            request), request)


def run(*, vocab: int = DEFAULT["vocab"], tokens: int = DEFAULT["tokens"], hidden: int = DEFAULT["hidden"],
        dtype: str = "bf16", device: str = "cpu", budget_s: float = 1.0, measure_memory: bool = True,
        progress: bool = True) -> dict:
    """Every variant in one child process: ``{"meta", "notes", "results"}`` (one row per variant)."""
    import importlib.metadata as md

    rows, seq, prompt = batch_shape(tokens)
    check_step_dtype(dtype)
    request = {"vocab": vocab, "tokens": tokens, "hidden": hidden, "dtype": dtype, "device": device,
               "variants": list(VARIANTS), "budget_s": budget_s, "memory": measure_memory, "progress": progress}
    load, t0 = load_average(), time.time()
    child_meta, results, failure = variant_rows(
        "benchmarks.distill_step:worker", request,
        lambda name: {"variant": name, "v": vocab, "n": tokens, "h": hidden, "dtype": dtype}, DEADLINE_S)
    rows_by_name = {r["variant"]: r for r in results}
    for r in results:
        add_ratios(r, rows_by_name.get(BASELINE.get(r["variant"])), "stock")
    meta = {"device_name": report.device_name(torch.device(device)), "device": device, "torch": torch.__version__,
            "trl": md.version("trl"), "transformers": md.version("transformers"),
            "model": {"vocab": vocab, "hidden": hidden, "teacher_hidden": hidden * 3 // 2, "layers": LAYERS,
                      "params": child_meta.get("params")},
            "batch": {"rows": rows, "seq_len": seq, "prompt_len": prompt, "completion_tokens": rows * (seq - prompt)},
            "beta": BETA, "top_k": TOP_K, "dtype": dtype, "threads": child_meta.get("threads"),
            "load_average_before": load, "load_average_after": load_average(), "wall_s": time.time() - t0,
            "complete": failure is None}
    return {"meta": meta, "notes": [] if failure is None else [failure], "results": results}


COLUMNS = ("variant", "median ms (p20-p80)", "speedup vs stock", "peak MiB", "memory vs stock", "loss", "note")


def markdown(section: dict) -> str:
    """The section as markdown (also printed)."""
    meta, model, batch = section["meta"], section["meta"]["model"], section["meta"]["batch"]
    lines = ["## One distillation step (TRL DistillationTrainer / ServerDistillationTrainer)", "",
             f"{meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}, TRL {meta['trl']}; "
             f"{meta.get('threads')} thread(s); {meta['wall_s']:.0f} s; load average {meta['load_average_before']} "
             f"before, {meta['load_average_after']} after.", "",
             f"Llama student V={model['vocab']}, H={model['hidden']}, teacher H={model['teacher_hidden']}, "
             f"{model['layers']} layers. Batch: {batch['rows']} rows of {batch['seq_len']} tokens (prompt "
             f"{batch['prompt_len']}), {batch['completion_tokens']} completion tokens. Dense: beta={meta['beta']} "
             f"(generalised JSD); sparse: beta=0, top-{meta['top_k']} with the tail bucket, a fixed teacher answer. "
             f"{meta['dtype']}. Op rows: the dense divergence's forward and backward alone, all N tokens."]
    lines += [f"- {n}" for n in section["notes"]]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in section["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['status']} | | | | | {r.get('note', '')} |")
            continue
        mem = "" if r.get("mem_bytes") is None else f"{r['mem_bytes'] / 2**20:,.1f}"
        cells = [r["variant"], f"{r['time_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f})",
                 "" if "speedup_vs_stock" not in r else f"{r['speedup_vs_stock']:.2f}", mem,
                 "" if "mem_vs_stock" not in r else f"{r['mem_vs_stock']:.2f}", f"{r['loss']:.5f}", r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(out_dir: str, section: dict) -> Dict[str, str]:
    """``distill_step.json`` and ``distill_step.md`` under ``out_dir``; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"distill_step.{k}") for k in ("json", "md")}
    with open(paths["json"], "w") as f:
        json.dump(section, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(section))
    return paths

