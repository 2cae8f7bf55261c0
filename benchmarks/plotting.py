"""The results plot (results.png): time and peak memory per implementation, as lines where
the grid varies V or N for an op, as grouped bars for the cases measured at one shape."""

from __future__ import annotations

from typing import Dict, List, Optional

from .cases import LINEAR_OPS, case_key


_BARS_PER_ROW = 5  # most cases in a row of the bar plot


def plot_layout(ok: List[dict]):
    """``(sweeps, singles)``: the series the grid varies (over V at fixed N, else over N at
    fixed V), each ``(axis, title, rows)``, and the cases measured at one shape only."""
    cases: Dict[tuple, List[dict]] = {}
    for r in ok:
        cases.setdefault(case_key(r), []).append(r)
    sweeps, used = [], set()
    for axis, index in (("V", 4), ("N", 2)):
        series: Dict[tuple, List[tuple]] = {}
        for c in cases:
            if c not in used:
                series.setdefault(c[:index] + c[index + 1:], []).append(c)
        for key, members in series.items():
            if len(members) > 1:
                used.update(members)
                op, mode, *shape, dtype = key
                names = ["N", "H"] if axis == "V" else ["H", "V"]
                fixed = " ".join(f"{k}={v}" for k, v in zip(names, shape) if v is not None)
                sweeps.append((axis, f"{op} {mode} {fixed} {dtype}",
                               [r for c in members for r in cases[c]]))
    sweeps.sort(key=lambda s: -len({r["v" if s[0] == "V" else "n"] for r in s[2]}))
    singles = [c for c in cases if c not in used]
    return sweeps, [(c, cases[c]) for c in singles]


def _label(case: tuple) -> str:
    op, mode, n, h, v, dtype = case
    shape = f"N={n}" + (f" H={h}" if h is not None else "") + f" V={v}"
    return f"{op}\n{mode} {dtype}\n{shape}"


def plot(results: List[dict], path: str) -> Optional[str]:
    """Time and peak memory per implementation. Where the grid varies V (or N) for an op, a
    line per implementation over that axis; the cases measured at a single shape as grouped
    bars, one group per case (the linear ops in rows of their own). Returns a note instead
    when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no PNG plot written."
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return "no successful results: no PNG plot written."
    sweeps, singles = plot_layout(ok)
    rows = [("line", s) for s in sweeps[:6]]
    for linear in (False, True):
        part = [s for s in singles if (s[0][0] in LINEAR_OPS) == linear]
        count = -(-len(part) // _BARS_PER_ROW)  # rows, filled evenly
        rows += [("bars", part[i * len(part) // count:(i + 1) * len(part) // count])
                 for i in range(count)]
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    # Ten distinct colours, then ten lighter ones: neighbouring bars never share a hue.
    palette = ([plt.get_cmap("tab10")(i) for i in range(10)]
               + [plt.get_cmap("tab20")(2 * i + 1) for i in range(10)])
    colour = {name: palette[i % len(palette)] for i, name in enumerate(impls)}
    fig, axes = plt.subplots(len(rows), 2, figsize=(14, 3.6 * len(rows)), squeeze=False)
    for ax_row, (kind, content) in zip(axes, rows):
        if kind == "line":
            _plot_sweep(ax_row, content, colour)
        else:
            _plot_bars(ax_row, content, colour)
        for ax in ax_row:
            ax.grid(True, alpha=0.3)
        ax_row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _plot_sweep(ax_row, sweep, colour) -> None:
    axis, title, rows = sweep
    key = "v" if axis == "V" else "n"
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r[key], r["time_ms"], r.get("mem_bytes")) for r in rows if r["impl"] == impl)
        ax_row[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl,
                       color=colour[impl])
        mem = [(p[0], p[2] / 2**20) for p in pts if p[2] is not None]
        if mem:
            ax_row[1].plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=impl,
                           color=colour[impl])
    xlabel = "vocabulary size V" if axis == "V" else "tokens N"
    ax_row[0].set(title=title, xlabel=xlabel, ylabel="time per call (ms)")
    ax_row[1].set(title=title, xlabel=xlabel, ylabel="peak memory above inputs (MiB)")
    for ax in ax_row:
        ax.set_xscale("log")


def _plot_bars(ax_row, groups, colour) -> None:
    """One group of bars per case, one bar per implementation it ran; a log axis where the
    values of the row span more than a factor of 20."""
    linear = groups[0][0][0] in LINEAR_OPS
    name = "linear ops" if linear else "logits ops"
    for ax, field, scale, title, ylabel in (
            (ax_row[0], "time_ms", 1.0, name, "time per call (ms)"),
            (ax_row[1], "mem_bytes", 2.0**-20, name,
             "peak MiB above inputs" + (" and gradients" if linear else ""))):
        values = [r[field] * scale for _, rows in groups for r in rows if r.get(field)]
        log = bool(values) and max(values) > 20 * min(values)
        seen = set()
        for x, (_, rows) in enumerate(groups):
            width = 0.8 / len(rows)
            for i, r in enumerate(rows):
                value = r.get(field)
                if value is None or (log and not value):  # 0 has no place on a log axis
                    continue
                ax.bar(x - 0.4 + width * (i + 0.5), value * scale, width, color=colour[r["impl"]],
                       label=None if r["impl"] in seen else r["impl"])
                seen.add(r["impl"])
        ax.set_xticks(range(len(groups)), [_label(c) for c, _ in groups], fontsize=7)
        if log:
            ax.set_yscale("log")
            ylabel += " (log)"
            if field == "mem_bytes":
                title += " (a peak of 0 draws no bar)"
        ax.set(title=title, ylabel=ylabel)
