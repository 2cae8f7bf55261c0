"""The trainer-step benchmarks' tiny run through the CLI, shared by their tests."""

import json
import pathlib
import subprocess
import sys

import pytest

from benchmarks import report
from benchmarks.dpo_step import MIN_REPS

ROOT = pathlib.Path(__file__).resolve().parents[2]
SUITE = [{"op": "logprobs", "mode": "fwd", "n": 4, "v": 10, "dtype": "fp32", "impl": "eager",
          "status": "ok", "time_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "gbps": 0.00016}]
SUITE_META = {"device": "cpu", "device_name": "t", "torch": "-", "triton": "-", "copy_gbps": 1.0}


def run_tiny_step(out: pathlib.Path, flag: str, key: str, variants) -> tuple:
    """``python -m benchmarks FLAG --tiny`` on CPU into ``out``, where a suite's results were
    written first. Checks what every step benchmark owes: the suite's rows kept, the section
    complete at the tiny sizes, and every variant measured in order (a median of at least
    ``MIN_REPS`` steps, its memory, its shape). Returns ``(rows by variant, section,
    results.md, the CLI's stdout)``."""
    for module in ("trl", "transformers", "datasets"):
        pytest.importorskip(module)
    report.write(str(out), SUITE_META, [], SUITE, with_plot=False)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", flag, "--tiny", "--device", "cpu",
                           "--no-progress", "--budget", "0.01", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    assert data["results"] == SUITE
    section = data[key]
    assert section["meta"]["complete"] and section["meta"]["model"]["vocab"] == 512
    assert section["meta"]["batch"]["tokens"] == 256 and section["meta"]["param_grad_bytes"] > 0
    rows = {r["variant"]: r for r in section["results"]}
    assert list(rows) == [v.name for v in variants]
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["reps"] >= MIN_REPS and 0 < r["p20_ms"] <= r["time_ms"] <= r["p80_ms"]
        assert r["mem_bytes"] > 0 and r["mem_method"]
        assert (r["v"], r["n"], r["h"], r["dtype"]) == (512, 256, 32, "bf16")
    md = (out / "results.md").read_text()
    assert "| logprobs | fwd | 4 | 10 | fp32 | eager |" in md
    return rows, section, md, proc.stdout
