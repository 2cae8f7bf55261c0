"""``python -m benchmarks --distill-step --tiny`` through the CLI: every row measured, the ratios
taken from this run's rows, and ours computing stock's loss on the same batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_cli_distill_step_tiny(tmp_path):
    for module in ("trl", "transformers", "datasets"):
        pytest.importorskip(module)
    from benchmarks.distill_step import BASELINE, VARIANTS
    from benchmarks.dpo_step import MIN_REPS

    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--distill-step", "--tiny", "--device", "cpu",
                           "--no-progress", "--budget", "0.01", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    section = json.loads((tmp_path / "distill_step.json").read_text())
    assert section["meta"]["complete"] and section["meta"]["model"]["vocab"] == 512
    rows = {r["variant"]: r for r in section["results"]}
    assert list(rows) == list(VARIANTS)
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["reps"] >= MIN_REPS and 0 < r["p20_ms"] <= r["time_ms"] <= r["p80_ms"]
        assert r["mem_bytes"] > 0 and r["mem_method"]
        assert (r["v"], r["n"], r["h"], r["dtype"]) == (512, 128, 32, "bf16")
    for ours, stock in BASELINE.items():
        assert rows[ours]["speedup_vs_stock"] == pytest.approx(rows[stock]["time_ms"] / rows[ours]["time_ms"])
        assert rows[ours]["mem_vs_stock"] == pytest.approx(rows[ours]["mem_bytes"] / rows[stock]["mem_bytes"])
        # bf16 autocast: the same loss to bf16 GEMM rounding; a divergence of different models is not 0.
        assert rows[ours]["loss"] == pytest.approx(rows[stock]["loss"], rel=5e-3)
        assert rows[stock]["loss"] > 1e-4
    assert "speedup_vs_stock" not in rows["trl:dense"]
    md = (tmp_path / "distill_step.md").read_text()
    assert "## One distillation step" in md and "## One distillation step" in proc.stdout
    assert "| prefopt:sparse |" in md
