"""Write a run's results: JSON (everything), a markdown table (also printed), a PNG plot
(drawn by ``plotting``); and show its progress meanwhile."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from typing import Dict, List, Optional

import torch

from .cases import LINEAR_OPS
from .plotting import plot


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with its core and thread counts."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            model = m.group(1)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """``text`` as a directory name: lower case, runs of other characters as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


def _mib(b: Optional[float]) -> str:
    if b is None:
        return ""
    m = b / 2**20
    return f"{m:.2f}" if m < 10 else f"{m:,.0f}"


def _fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None else format(x, spec)


COLUMNS = ["op", "mode", "N", "V", "dtype", "impl", "time ms (p20-p80)", "GB/s", "% copy",
           "x eager", "peak MiB", "mem / eager", "note"]
LINEAR_COLUMNS = ["op", "mode", "N", "H", "V", "dtype", "impl", "time ms (p20-p80)", "GFLOP/s",
                  "x eager", "time / unfused", "time / trl", "peak MiB", "mem / eager", "note"]
LINEAR_HEADER = (
    "The linear ops take hidden states [N, H] and the LM head [V, H] instead of logits "
    "(linear:terms: the reference model's too, which get no gradient): linear:logprobs returns "
    "the label log-probs, linear:terms logp, ref_logp and KL(q||p); the backward gives d hidden "
    "and d head weight. "
    "eager: hidden @ W.T, then fp32 log_softmax and gather (terms: the reference's logits too, "
    "its log_softmax and KL(q||p)). prefopt:B-unfused: the same logits, then this package's "
    "logits op on backend B (token_logprobs / token_terms, inplace_backward in fwd+bwd). "
    "prefopt:B: linear_token_logprobs / linear_token_terms (default memory_budget); "
    "prefopt:B+batch_invariant: the same with batch_invariant=True (fixed [1024, 4096] tiles, the "
    "kept rows padded to whole 1024-row chunks). gemm: the "
    "head's GEMMs alone, a floor: hidden @ W.T forward (terms: the reference's projection "
    "too), dZ @ W and dZ.T @ hidden backward.")
LINEAR_METRICS = (
    "time: median per call (20th-80th percentile). GFLOP/s: 2·N·H·V per GEMM that any "
    "implementation must run (one projection per head forward; d hidden and d W backward) / "
    "median time; a backward that projects the logits again does more than it counts (GB/s "
    "is not reported: these ops are bound by their GEMMs). x eager: eager time / this time. "
    "time / unfused: this time / prefopt:B-unfused's time. time / trl: this time / "
    "trl-chunked's time. peak MiB: peak memory during one call above the inputs (hidden states "
    "and heads; in bwd mode, also above what the forward kept) and above the gradients every "
    "implementation returns (d hidden and d head weight, subtracted at their size). mem / "
    "eager: this peak / eager's peak.")


def _is_linear(r: dict) -> bool:
    return r["op"] in LINEAR_OPS


def _row(r: dict, head: List[str], cells: List[str]) -> str:
    if r["status"] != "ok":
        cells = [r["status"]] + [""] * (len(cells) - 2) + [r.get("note", "")]
    return "| " + " | ".join(head + cells) + " |"


def _time(r: dict) -> str:
    if r["status"] != "ok":
        return ""
    return f"{r['time_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f})"


def markdown(meta: dict, notes: List[str], results: List[dict],
             sections: Optional[Dict[str, dict]] = None) -> str:
    """A self-contained markdown report: what ran where, the notes, one row per result (the
    linear ops in a table of their own, with GEMM throughput instead of bandwidth), then the
    sections of ``python -m benchmarks --distributed`` and ``--dpo-step`` that ``sections``
    holds (keyed as in ``SECTIONS``)."""
    sections = sections or {}
    lines = [f"# prefopt_kernels benchmarks: {meta['device_name']}", ""]
    if results or not sections:
        lines += _single_process_lines(meta, notes, results)
    for key, section_markdown in SECTIONS.items():
        if key in sections:
            lines += [""] + section_markdown(sections[key]).splitlines()
    return "\n".join(lines) + "\n"


def _single_process_lines(meta: dict, notes: List[str], results: List[dict]) -> List[str]:
    logit_rows = [r for r in results if not _is_linear(r)]
    linear_rows = [r for r in results if _is_linear(r)]
    lines = []
    lines.append(f"torch {meta['torch']}, triton {meta['triton']}, "
                 f"{meta['device']}; copy bandwidth {meta['copy_gbps']:.1f} GB/s "
                 "(read + write, measured in this run).")
    if logit_rows or not linear_rows:
        lines.append("")
        lines.append("time: median per call (20th-80th percentile). GB/s: bytes that must move "
                     "(logits and reference read once per pass, gradient written once) / median "
                     "time; % copy: that over the copy bandwidth. x eager: eager time / this time. "
                     "peak MiB: peak memory above the inputs during one call (in bwd mode, above "
                     "what the forward kept). mem / eager: this peak / eager's peak.")
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    if logit_rows or not linear_rows:
        lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in logit_rows:
            pct = None
            if r["status"] == "ok" and meta.get("copy_gbps"):
                pct = 100 * r["gbps"] / meta["copy_gbps"]
            cells = [_time(r), _fmt(r.get("gbps"), ".1f"), _fmt(pct, ".0f"),
                     _fmt(r.get("speedup_vs_eager"), ".2f"), _mib(r.get("mem_bytes")),
                     _fmt(r.get("mem_vs_eager"), ".2f"), r.get("note", "")]
            lines.append(_row(r, [r["op"], r["mode"], str(r["n"]), str(r["v"]), r["dtype"],
                                  r["impl"]], cells))
    if linear_rows:
        lines += ["", "## From hidden states: the linear ops", "", LINEAR_HEADER, "",
                  LINEAR_METRICS, "",
                  "| " + " | ".join(LINEAR_COLUMNS) + " |", "|" + "---|" * len(LINEAR_COLUMNS)]
        for r in linear_rows:
            cells = [_time(r), _fmt(r.get("gflops"), ".1f"),
                     _fmt(r.get("speedup_vs_eager"), ".2f"),
                     _fmt(r.get("time_vs_unfused"), ".2f"), _fmt(r.get("time_vs_trl"), ".2f"),
                     _mib(r.get("mem_bytes")), _fmt(r.get("mem_vs_eager"), ".3f"),
                     r.get("note", "")]
            lines.append(_row(r, [r["op"], r["mode"], str(r["n"]), str(r["h"]), str(r["v"]),
                                  r["dtype"], r["impl"]], cells))
    return lines


TP_COLUMNS = ["op", "N", "H", "V", "dtype", "impl", "time ms per rank", "x gather+eager",
              "peak MiB per rank", "mem / gather+eager", "sent B/token", "collective B/token",
              "formula B/token", "max abs diff", "note"]
TP_HEADER = (
    "Forward + backward with the vocabulary split evenly over the ranks, in rank order "
    "(Megatron-style): each rank holds logits[:, V/R] and the reference's (linear ops: the "
    "rows [V/R, H] of both heads, the hidden states replicated); labels are global ids. Every "
    "rank returns the global per-token outputs and its gradient: its logits shard's (linear "
    "ops: its head shard's and the full hidden states', summed over the ranks). "
    "prefopt:B: the op with process_group= on backend B. gather+eager: without it, "
    "torch.distributed.all_gather of the shards into [N, V] on every rank (linear ops: each "
    "rank projects its shard first), then the eager fp32 code of the suite; the backward keeps "
    "the rank's columns of the [N, V] gradient, and the linear ops all-reduce the hidden "
    "gradient (Megatron's column-parallel head). gather+prefopt:B: the same gather, then the "
    "package's unsharded op (inplace_backward: the gathered logits are a private copy).")
TP_METRICS = (
    "time ms per rank: median per call on each rank (wall clock; the ranks agree on the number "
    "of calls outside the timed region). x gather+eager: gather+eager's time / this time, the "
    "slowest rank of each. peak MiB per rank: peak resident memory during one call above the "
    "rank's inputs (linear ops: also above d hidden and d head shard). mem / gather+eager: "
    "largest peak over the ranks / gather+eager's. sent B/token: bytes of the tensors the rank "
    "passes into torch.distributed.all_gather (its input) and all_reduce (its tensor) during one "
    "call, over N, recorded by wrapping both. collective B/token: the same with all_gather "
    "counted by its gathered result (R x the input), as the package counts. formula B/token: "
    "prefopt rows: the package's count, prefopt_kernels.distributed.exchange_bytes_per_token "
    "(the row states' all-gather, a second sweep's all-reduce, a linear backward's all-reduce of "
    "the hidden gradient, and the call check's all-gather spread over N); gather rows: the [V] "
    "rows of the logits and reference logits (+ the [H] hidden gradient). max abs "
    "diff: largest difference of any output or gradient from gather+eager's on a small copy of "
    "the case (N=64, V<=512, H<=64).")


def _per_rank(values: List[float], spec: str) -> str:
    """One value when every rank has it, else the ranks' values in rank order."""
    texts = [format(v, spec) for v in values]
    return texts[0] if len(set(texts)) == 1 else " / ".join(texts)


def tensor_parallel_markdown(section: dict) -> str:
    """The section of ``python -m benchmarks --distributed`` as markdown (also printed)."""
    meta = section["meta"]
    load = [meta.get(k) for k in ("load_average_before", "load_average_after")]
    lines = [f"## Tensor parallel ({meta['ranks']} {meta['backend']} ranks)", "",
             f"{meta['device_name']}; torch {meta['torch']}; {meta['threads_per_rank']} intra-op "
             f"thread(s) per rank; {meta['wall_s']:.0f} s"
             + ("" if None in load else f"; load average {load[0]:.2f} before, {load[1]:.2f} after")
             + ".", "", TP_HEADER, "", TP_METRICS]
    if section["notes"]:
        lines.append("")
        lines += [f"- {n}" for n in section["notes"]]
    lines += ["", "| " + " | ".join(TP_COLUMNS) + " |", "|" + "---|" * len(TP_COLUMNS)]
    for r in section["results"]:
        head = [r["op"], str(r["n"]), str(r.get("h", "")), str(r["v"]), r["dtype"], r["impl"]]
        if r["status"] != "ok":
            cells = [r["status"]] + [""] * (len(TP_COLUMNS) - len(head) - 2) + [r.get("note", "")]
        else:
            ranks = r["per_rank"]
            mem = [p["mem_bytes"] for p in ranks if "mem_bytes" in p]
            cells = [" / ".join(f"{p['time_ms']:.3f}" for p in ranks),
                     _fmt(r.get("speedup_vs_gather_eager"), ".2f"),
                     " / ".join(_mib(m) for m in mem) if len(mem) == len(ranks) else "",
                     _fmt(r.get("mem_vs_gather_eager"), ".3f"),
                     _per_rank(r["sent_bytes_per_token"], ",.2f"),
                     _per_rank(r["collective_bytes_per_token"], ",.2f"),
                     format(r["formula_bytes_per_token"], ",.2f"),
                     format(r["max_abs_diff"], ".1e"), r.get("note", "")]
        lines.append("| " + " | ".join(head + cells) + " |")
    return "\n".join(lines) + "\n"


DPO_COLUMNS = ["variant", "trainer", "loss_type", "LM head", "time ms (p20-p80)",
               "x trl:sigmoid", "peak MiB", "mem / trl:sigmoid", "x same-loss baseline",
               "mem / same-loss baseline", "loss", "note"]
DPO_HEADER = (
    "One training step (compute_loss on the model as train() prepares it, then "
    "accelerator.backward; no optimizer step) on the same batch and the same two models. "
    "trl:sigmoid: trl.DPOTrainer as a user runs it, which always scores both models through "
    "TRL's own fused, chunked LM head (no option turns it off). prefopt:sigmoid: "
    "PrefOptDPOTrainer, TRL's loss on this package's fused head. "
    "prefopt:sparse_po: PrefOptDPOTrainer's SparsePO (learned mask) from one "
    "linear_token_terms call over both models' hidden states. full-logits:sparse_po: the same "
    "with that call replaced by both models' logits projected in full and fp32 log_softmax, "
    "as eager SparsePO code computes it (TRL has no SparsePO). trl:orpo, trl:cpo: TRL's "
    "ORPOTrainer and CPOTrainer (sigmoid); prefopt:orpo, prefopt:cpo: PrefOptDPOTrainer's "
    "reference-free loss types of the same names on the fused head.")
DPO_METRICS = (
    "time: median per step (20th-80th percentile). x trl:sigmoid: trl:sigmoid's time / this "
    "time; x same-loss baseline: the time of the row that computes the same loss the stock "
    "way / this time (full-logits:sparse_po for SparsePO, trl:orpo and trl:cpo for ORPO and "
    "CPO). peak MiB: "
    "peak memory during one step above what was allocated before it (models and batch); it "
    "includes the parameter gradients the step creates. mem / ...: this peak / that row's "
    "peak. loss: the loss of the measured step; rows of the same loss_type compute the same "
    "loss.")


def dpo_step_markdown(section: dict) -> str:
    """The section of ``python -m benchmarks --dpo-step`` as markdown (also printed)."""
    meta = section["meta"]
    model, batch = meta["model"], meta["batch"]
    load = [meta.get(k) for k in ("load_average_before", "load_average_after")]
    precision = ("bf16 mixed precision (TRL's default)" if meta["dtype"] == "bf16"
                 else "fp32")
    params = "" if model.get("params") is None else f", {model['params'] / 1e6:.1f}M parameters"
    grads = ("" if meta.get("param_grad_bytes") is None
             else f" Parameter gradients: {_mib(meta['param_grad_bytes'])} MiB.")
    lines = ["## One DPO step (TRL DPOTrainer)", "",
             f"{meta['device_name']}; torch {meta['torch']}, transformers "
             f"{meta['transformers']}, TRL {meta['trl']}; {meta.get('threads')} thread(s); "
             f"{meta['wall_s']:.0f} s"
             + ("" if None in load else f"; load average {load[0]:.2f} before, {load[1]:.2f} after")
             + ".", "",
             f"Llama: V={model['vocab']}, H={model['hidden']}, {model['layers']} layers, MLP "
             f"{model['intermediate']}{params}. Batch: {batch['pairs']} pairs, {batch['rows']} "
             f"rows of {batch['seq_len']} tokens (prompt {batch['prompt_len']}): N="
             f"{batch['tokens']} tokens, {batch['completion_tokens']} completion tokens. "
             f"{precision}.{grads}", "", DPO_HEADER, "", DPO_METRICS]
    if section["notes"]:
        lines.append("")
        lines += [f"- {n}" for n in section["notes"]]
    lines += ["", "| " + " | ".join(DPO_COLUMNS) + " |", "|" + "---|" * len(DPO_COLUMNS)]
    for r in section["results"]:
        head = [r["variant"], r["trainer"], r["loss_type"], r["head"]]
        if r["status"] != "ok":
            cells = [r["status"]] + [""] * (len(DPO_COLUMNS) - len(head) - 2) + [r.get("note", "")]
        else:
            cells = [_time(r), _fmt(r.get("speedup_vs_trl"), ".2f"), _mib(r.get("mem_bytes")),
                     _fmt(r.get("mem_vs_trl"), ".2f"), _fmt(r.get("speedup_vs_full_logits"), ".2f"),
                     _fmt(r.get("mem_vs_full_logits"), ".2f"), format(r["loss"], ".5f"),
                     r.get("note", "")]
        lines.append("| " + " | ".join(head + cells) + " |")
    return "\n".join(lines) + "\n"


def grpo_step_markdown(section: dict) -> str:
    """The section of ``python -m benchmarks --grpo-step`` as markdown (``grpo_step.markdown``)."""
    from .grpo_step import markdown  # grpo_step imports this module

    return markdown(section)


def kto_step_markdown(section: dict) -> str:
    """The section of ``python -m benchmarks --kto-step`` as markdown (``kto_step.markdown``)."""
    from .kto_step import markdown  # kto_step imports this module

    return markdown(section)


# The sections other commands add to the results files, in the order the markdown shows them.
SECTIONS = {"tensor_parallel": tensor_parallel_markdown, "dpo_step": dpo_step_markdown,
            "grpo_step": grpo_step_markdown, "kto_step": kto_step_markdown}


def write(out_dir: str, meta: dict, notes: List[str], results: List[dict],
          with_plot: bool = True) -> Dict[str, str]:
    """Write results.json, results.md and (``with_plot``) results.png under ``out_dir``;
    return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("json", "md", "png")}
    if with_plot:
        note = plot(results, paths["png"])
    else:
        note = "run in progress: no plot yet."
        if os.path.exists(paths["png"]):
            os.remove(paths["png"])  # a plot from an earlier run would not match these results
    if note:
        notes = notes + [note]
        del paths["png"]
    _write_files(paths, meta, notes, results, _sections(_load(paths["json"])))
    return paths


def write_section(out_dir: str, key: str, section: dict) -> Dict[str, str]:
    """Put a section (``key`` in ``SECTIONS``: ``python -m benchmarks --distributed`` or
    ``--dpo-step``) into results.json and results.md under ``out_dir``, keeping the suite's
    results and the other sections already there (and the plot)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("json", "md")}
    data = _load(paths["json"])
    _write_files(paths, data.get("meta", section["meta"]), data.get("notes", []),
                 data.get("results", []), {**_sections(data), key: section})
    return paths


def _sections(data: dict) -> Dict[str, dict]:
    return {key: data[key] for key in SECTIONS if key in data}


def _load(path: str) -> dict:
    """An earlier results.json, or ``{}`` when there is none (or it was cut short)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_files(paths: Dict[str, str], meta: dict, notes: List[str], results: List[dict],
                 sections: Dict[str, dict]) -> None:
    data = {"meta": meta, "notes": notes, "results": results, **sections}
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(meta, notes, results, sections))


class _PrintedProgress:
    """The progress bar's interface, as one line on stderr per step (no tqdm, or disabled)."""

    def __init__(self, total):
        self.total, self.n = total, 0

    def update(self, k):
        self.n += k

    def set_description(self, text):
        print(f"[{self.n + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self):
        pass


def progress_bar(total: int, enabled: bool):
    """A tqdm bar of ``total`` steps on stderr when ``enabled`` and tqdm is installed; else a
    line on stderr per step (``set_description``)."""
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            pass
    return _PrintedProgress(total)
