"""Smoke tests of the benchmark suite at tiny shapes on CPU: the runner, the memory probe,
the report files, and the bandwidth arithmetic against hand-computed values."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import report
from benchmarks.cases import Case, bytes_moved, input_bytes
from benchmarks.runner import (
    EAGER,
    RunConfig,
    effective_bandwidth,
    implementations,
    measure_cpu_memory,
    run_cases,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bytes_moved_by_hand():
    # logprobs, fp32, N=4, V=10: one [4, 10] fp32 array is 160 bytes.
    assert bytes_moved(Case("logprobs", "fwd", 4, 10, "fp32")) == 160
    # backward: read the logits again (160), write the gradient (160)
    assert bytes_moved(Case("logprobs", "bwd", 4, 10, "fp32")) == 320
    assert bytes_moved(Case("logprobs", "fwd+bwd", 4, 10, "fp32")) == 480
    # with reference logits, bf16: an array is 80 bytes; fwd reads 2, bwd reads 2 writes 1
    terms = Case("terms:forward_kl", "fwd+bwd", 4, 10, "bf16")
    assert bytes_moved(terms) == 2 * 80 + 3 * 80
    assert input_bytes(terms) == 160
    # 400 bytes in 2 ms is 200 kB/s
    assert effective_bandwidth(terms, 2.0) == pytest.approx(200_000.0)


def _backends():
    import prefopt_kernels as pk

    return [b for b in ("reference", "native") if b in pk.available_backends()]


def test_runner_and_report(tmp_path):
    cases = [Case("logprobs", "fwd+bwd", 64, 256, "fp32"),
             Case("divergence:js", "fwd", 64, 256, "fp32"),
             Case("terms:forward_kl", "bwd", 64, 256, "bf16")]
    backends = _backends()
    impls, notes = implementations(torch.device("cpu"), backends, compile_eager=False)
    cfg = RunConfig(device=torch.device("cpu"), backends=backends, compile_eager=False,
                    measure_memory=False, cpu_budget_s=0.05, progress=False)
    results = run_cases(cases, impls, cfg)
    assert all(r["status"] == "ok" for r in results), [r for r in results if r["status"] != "ok"]
    names = {r["impl"] for r in results}
    assert {EAGER, "eager-trl", "torch-ce"} <= names
    assert {f"prefopt:{b}" for b in backends} <= names
    for r in results:
        assert r["time_ms"] > 0 and r["p20_ms"] <= r["time_ms"] <= r["p80_ms"]
        assert r["gbps"] * 1e9 == pytest.approx(r["bytes_moved"] / (r["time_ms"] * 1e-3))
        if r["impl"] == EAGER:
            assert r["speedup_vs_eager"] == 1.0
    meta = {"device": "cpu", "device_name": "test", "torch": torch.__version__,
            "triton": "-", "copy_gbps": 1.0}
    paths = report.write(str(tmp_path), meta, notes, results)
    data = json.loads(open(paths["json"]).read())
    assert len(data["results"]) == len(results)
    md = open(paths["md"]).read()
    assert "| logprobs | fwd+bwd | 64 | 256 | fp32 | eager |" in md
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(paths["png"]) > 0
    except ImportError:
        assert "png" not in paths and "matplotlib not installed" in json.dumps(data["notes"])


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    results = [{"op": "logprobs", "mode": "fwd", "n": 4, "v": 10, "dtype": "fp32",
                "impl": EAGER, "status": "ok", "time_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0,
                "gbps": 0.00016}]
    meta = {"device": "cpu", "device_name": "t", "torch": "-", "triton": "-", "copy_gbps": 1.0}
    paths = report.write(str(tmp_path), meta, [], results)
    assert "png" not in paths and not (tmp_path / "results.png").exists()
    assert "matplotlib not installed" in open(paths["md"]).read()


def test_cpu_memory_probe_sees_the_saved_log_softmax():
    # Eager forward of logprobs keeps its fp32 log_softmax for the backward: N*V*4 bytes.
    case = Case("logprobs", "fwd", 512, 4096, "fp32")
    got = measure_cpu_memory(case, [EAGER], {"backends": [], "compile": False})[EAGER]
    assert "error" not in got, got
    saved = 512 * 4096 * 4
    # Linux batches resident-set counters per thread (up to 64 pages each): allow 1 MiB.
    assert saved - (1 << 20) <= got["mem_bytes"] < 4 * saved


def test_cli_triton_interpreted_tiny(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--ops", "logprobs", "--backends",
         "triton", "--no-memory", "--no-progress", "--budget", "0.05", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    triton_rows = [r for r in data["results"] if r["impl"] == "prefopt:triton"]
    assert triton_rows and all(r["status"] == "ok" for r in triton_rows)
    assert any("interpreter" in n for n in data["notes"])
