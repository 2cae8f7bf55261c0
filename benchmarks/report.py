"""Write a run's results: JSON (everything), a markdown table (also printed), a PNG plot."""

from __future__ import annotations

import json
import os
import platform
import re
from typing import Dict, List, Optional

import torch


def device_name(device: torch.device) -> str:
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


def markdown(meta: dict, notes: List[str], results: List[dict]) -> str:
    """A self-contained markdown report: what ran where, the notes, one row per result."""
    lines = [f"# prefopt_kernels benchmarks: {meta['device_name']}", ""]
    lines.append(f"torch {meta['torch']}, triton {meta['triton']}, "
                 f"{meta['device']}; copy bandwidth {meta['copy_gbps']:.1f} GB/s "
                 "(read + write, measured in this run).")
    lines.append("")
    lines.append("time: median per call (20th-80th percentile). GB/s: bytes that must move "
                 "(logits and reference read once per pass, gradient written once) / median "
                 "time; % copy: that over the copy bandwidth. x eager: eager time / this time. "
                 "peak MiB: peak memory above the inputs during one call (in bwd mode, above "
                 "what the forward kept). mem / eager: this peak / eager's peak.")
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        if r["status"] == "ok":
            t = f"{r['time_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f})"
            pct = 100 * r["gbps"] / meta["copy_gbps"] if meta.get("copy_gbps") else None
            cells = [t, _fmt(r["gbps"], ".1f"), _fmt(pct, ".0f"),
                     _fmt(r.get("speedup_vs_eager"), ".2f"), _mib(r.get("mem_bytes")),
                     _fmt(r.get("mem_vs_eager"), ".2f"), r.get("note", "")]
        else:
            cells = [r["status"], "", "", "", "", "", r.get("note", "")]
        lines.append("| " + " | ".join([r["op"], r["mode"], str(r["n"]), str(r["v"]), r["dtype"],
                                          r["impl"]] + cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: List[dict], path: str) -> Optional[str]:
    """Time and peak memory against V, one line per implementation, one row per
    (op, mode, N, dtype) group. Returns a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no PNG plot written."
    groups: Dict[tuple, List[dict]] = {}
    for r in results:
        if r["status"] == "ok":
            groups.setdefault((r["op"], r["mode"], r["n"], r["dtype"]), []).append(r)
    if not groups:
        return "no successful results: no PNG plot written."
    # Groups with the most vocabulary sizes first: those are the sweeps worth a line plot.
    keys = sorted(groups, key=lambda k: (-len({r["v"] for r in groups[k]}), k))[:6]
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 3.2 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        impls = sorted({r["impl"] for r in groups[key]})
        for impl in impls:
            pts = sorted((r["v"], r["time_ms"], r.get("mem_bytes")) for r in groups[key]
                         if r["impl"] == impl)
            row[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            mem = [(p[0], p[2] / 2**20) for p in pts if p[2] is not None]
            if mem:
                row[1].plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=impl)
        title = f"{key[0]} {key[1]} N={key[2]} {key[3]}"
        row[0].set(title=title, xlabel="vocabulary size V", ylabel="time per call (ms)")
        row[1].set(title=title, xlabel="vocabulary size V", ylabel="peak memory above inputs (MiB)")
        for ax in row:
            ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


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
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "notes": notes, "results": results}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(meta, notes, results))
    return paths
