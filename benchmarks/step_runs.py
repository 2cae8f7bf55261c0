"""What the trainer-step benchmarks (``--dpo-step``, ``--grpo-step``, ``--kto-step``,
``--distill-step``) share around their own steps: the child's loop over the variants and the
parent's table of one row per variant."""

from __future__ import annotations

import gc
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import report
from .child_process import emit, run_children


DEADLINE_S = 1800  # the child's bound at benchmark sizes
TINY_DEADLINE_S = 300  # and at tiny ones (tokens * vocab <= 64 * 4096)


def step_deadline(tokens: int, vocab: int) -> float:
    """The child's default deadline in seconds for a step of ``tokens`` tokens over ``vocab`` entries."""
    return TINY_DEADLINE_S if tokens * vocab <= 64 * 4096 else DEADLINE_S


def check_step_dtype(dtype: str) -> None:
    """A step runs in fp32 or in bf16 mixed precision."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype {dtype!r}: fp32 or bf16 (mixed precision)")


def measure_variants(label: str, measure: Callable[[str], dict], request: dict) -> None:
    """Child side: ``measure(name)`` for every name in ``request["variants"]`` in turn, one JSON
    line each; a variant that raises gives an error line and the next one runs."""
    names = request["variants"]
    bar = report.progress_bar(len(names), request["progress"])
    for name in names:
        bar.set_description(f"{label} {name}")
        try:
            result = {"status": "ok", **measure(name)}
        except Exception as exc:  # noqa: BLE001 - reported in the row, the next variant runs
            result = {"status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]}
        emit({"variant": name, **result})
        bar.update(1)
        gc.collect()
        if request["device"] == "cuda":
            torch.cuda.empty_cache()
    bar.close()


def variant_rows(worker: str, request: dict, describe: Callable[[str], dict],
                 deadline_s: float) -> Tuple[dict, list, Optional[str]]:
    """Parent side: ``worker`` (``"module:function"``) on ``request`` in one child process, its
    progress on our stderr. Returns ``(child_meta, rows, failure)``: one row per name in
    ``request["variants"]``, ``describe(name)``'s fields then the child's result for it, or an
    error row saying why it did not run; ``failure`` is the child's failure or None."""
    child = run_children(worker, [request], deadline_s=deadline_s, show_stderr={0})[0]
    failure = child.failure("the child process")
    child_meta = next((line["meta"] for line in child.lines if "meta" in line), {})
    by_name = {line["variant"]: line for line in child.lines if "variant" in line}
    rows = []
    for name in request["variants"]:
        row = describe(name)
        got = by_name.get(name) or {"status": "error", "note": f"not run: {failure or 'the child stopped before it'}"}
        row.update({k: val for k, val in got.items() if k != "variant"})
        rows.append(row)
    return child_meta, rows, failure


def _cell(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def ratio_table(columns: Sequence[str], head_keys: Sequence[str], results: List[dict]) -> List[str]:
    """The markdown table of a step section against a stock row and a full-logits row: header,
    rule and one line per row, ``head_keys``' fields then time (p20-p80), x stock, peak MiB,
    mem / stock, x full logits, mem / full logits, loss and note; a failed row shows its status
    and note."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        head = [r[key] for key in head_keys]
        if r["status"] != "ok":
            cells = [r["status"]] + [""] * (len(columns) - len(head) - 2) + [r.get("note", "")]
        else:
            mem = r.get("mem_bytes")
            cells = [f"{r['time_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f})",
                     _cell(r.get("speedup_vs_trl"), ".2f"), _cell(None if mem is None else mem / 2**20, ".1f"),
                     _cell(r.get("mem_vs_trl"), ".2f"), _cell(r.get("speedup_vs_full_logits"), ".2f"),
                     _cell(r.get("mem_vs_full_logits"), ".2f"), format(r["loss"], ".5f"), r.get("note", "")]
        lines.append("| " + " | ".join(head + cells) + " |")
    return lines
