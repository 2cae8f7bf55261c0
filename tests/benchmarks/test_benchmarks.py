"""Smoke tests of the benchmark suite at tiny shapes on CPU: the runner, the memory probe,
the report files, the bandwidth and GEMM arithmetic against hand-computed values, and the
implementations of the linear ops against each other."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import plotting, report
from benchmarks.cases import Case, bytes_moved, gemm_flops, grad_bytes, input_bytes, make_inputs
from benchmarks.measure import time_cpu
from benchmarks.peers import installed
from benchmarks.implementations import EAGER, implementations
from benchmarks.runner import (
    RunConfig,
    Runnable,
    effective_bandwidth,
    measure_cpu_memory,
    run_cases,
)
from step_cli import SUITE, SUITE_META, run_tiny_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_cli(out, *args, env=None, timeout=600):
    """``python -m benchmarks ARGS --out OUT`` from the repository root; it must succeed."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks", *args, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


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


def test_linear_case_arithmetic_by_hand():
    # N=4, H=3, V=10 fp32: one GEMM is 2*4*3*10 = 240 flops.
    lp = Case("linear:logprobs", "fwd+bwd", 4, 10, "fp32", h=3)
    assert gemm_flops(Case("linear:logprobs", "fwd", 4, 10, "fp32", h=3)) == 240
    assert gemm_flops(Case("linear:logprobs", "bwd", 4, 10, "fp32", h=3)) == 480  # dZ W, dZ^T h
    assert gemm_flops(lp) == 720
    terms = Case("linear:terms", "fwd+bwd", 4, 10, "fp32", h=3)
    assert gemm_flops(terms) == 2 * 240 + 2 * 240  # both heads forward, the policy's backward
    assert bytes_moved(lp) is None and gemm_flops(Case("logprobs", "fwd", 4, 10, "fp32")) is None
    # inputs: hidden [4, 3] and head [10, 3] in fp32 (168 bytes), twice with a reference
    assert input_bytes(lp) == 168 and input_bytes(terms) == 336
    # the gradients of hidden and head are as large as the policy's inputs; none forward only
    assert grad_bytes(lp) == 168 and grad_bytes(terms) == 168
    assert grad_bytes(Case("linear:terms", "fwd", 4, 10, "fp32", h=3)) == 0
    assert grad_bytes(Case("logprobs", "fwd+bwd", 4, 10, "fp32")) == 0
    assert lp.key == "linear:logprobs|fwd+bwd|N=4|H=3|V=10|fp32"
    assert terms.divergence == "forward_kl" and lp.divergence is None
    # the logits ops keep their keys and row fields
    old = Case("logprobs", "fwd", 4, 10, "fp32")
    assert old.key == "logprobs|fwd|N=4|V=10|fp32" and "h" not in old.as_dict()
    with pytest.raises(ValueError):
        Case("linear:logprobs", "fwd", 4, 10, "fp32")
    with pytest.raises(ValueError):
        Case("logprobs", "fwd", 4, 10, "fp32", h=3)


def test_time_cpu_counts_samples_timed_elsewhere():
    # A sample from elsewhere (the memory probe's call) counts toward min_reps and the budget:
    # a 5 s sample fills a 1 s budget, so nothing runs here, not even the warm-up.
    calls, warm = [], []
    t = time_cpu(lambda: calls.append(1), lambda: None, budget_s=1.0, min_reps=1,
                 warmup=lambda: warm.append(1), samples=[5000.0])
    assert (calls, warm, t.time_ms, t.reps) == ([], [], 5000.0, 1)
    t = time_cpu(lambda: calls.append(1), lambda: None, budget_s=1.0, min_reps=2,
                 warmup=lambda: warm.append(1), samples=[5000.0])
    assert (len(calls), len(warm), t.reps) == (1, 1, 2)


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
    _run_cli(tmp_path, "--tiny", "--ops", "logprobs", "--backends", "triton", "--no-memory", "--no-progress",
             "--budget", "0.05", env=env)
    data = json.loads((tmp_path / "results.json").read_text())
    triton_rows = [r for r in data["results"] if r["impl"] == "prefopt:triton"]
    assert triton_rows and all(r["status"] == "ok" for r in triton_rows)
    assert any("interpreter" in n for n in data["notes"])


def _linear_impls(case):
    backends = _backends()
    impls, _ = implementations(torch.device("cpu"), backends, compile_eager=False)
    return backends, [i for i in impls if i.applies(case)]


@pytest.mark.parametrize("op", ["linear:logprobs", "linear:terms"])
def test_linear_implementations_agree(op):
    # Every implementation of a linear op (the gemm floor aside) gives eager's outputs and
    # gradients: the suite compares like with like.
    case = Case(op, "fwd+bwd", 48, 300, "fp32", h=40)
    backends, impls = _linear_impls(case)
    names = {i.name for i in impls}
    expected = {EAGER, "gemm"} | {f"prefopt:{b}{s}" for b in backends for s in ("", "-unfused", "+batch_invariant")}
    if installed("trl"):
        expected.add("trl-chunked")
    assert names == expected
    results = {}
    for impl in impls:
        if impl.name == "gemm":
            continue
        results[impl.name] = Runnable(case, impl,
                                      make_inputs(case, torch.device("cpu"))).outputs_and_grads()
    for name, got in results.items():
        assert len(got) == len(results[EAGER]), name
        for g, e in zip(got, results[EAGER]):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=name)


def test_linear_memory_is_above_the_gradients(monkeypatch):
    # The probe reports a linear op's peak less the gradients every implementation returns
    # (d hidden, d W), and times the measured call as a sample; a logits op's peak as it is.
    from benchmarks import measure, runner

    def peak_of_100_mib(call):
        call()
        return 100 << 20, "fake"
    monkeypatch.setattr(measure, "rss_peak_bytes", peak_of_100_mib)
    for case in (Case("linear:logprobs", "fwd+bwd", 64, 512, "fp32", h=32),
                 Case("logprobs", "fwd+bwd", 64, 512, "fp32")):
        got = runner.memory_probe({"case": case.as_dict(), "impls": [EAGER],
                                   "config": {"backends": [], "compile": False}})[EAGER]
        assert got["mem_bytes"] == (100 << 20) - grad_bytes(case)
        assert (got.get("call_ms", 0) > 0) == case.linear
    assert grad_bytes(Case("linear:logprobs", "fwd+bwd", 64, 512, "fp32", h=32)) == \
        (64 + 512) * 32 * 4


def test_cli_tiny_linear(tmp_path):
    _run_cli(tmp_path, "--tiny", "--ops", "linear", "--no-memory", "--no-progress", "--budget", "0.01")
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["results"]
    assert {r["op"] for r in rows} == {"linear:logprobs", "linear:terms"}
    assert all(r["status"] == "ok" and r["h"] == 64 for r in rows), rows
    for op in ("linear:logprobs", "linear:terms"):
        names = {r["impl"] for r in rows if r["op"] == op}
        assert {EAGER, "gemm", "prefopt:native", "prefopt:native-unfused"} <= names
        assert ("trl-chunked" in names) == installed("trl")
        assert not names & {"eager-trl", "torch-ce", "prefopt:native+inplace"}
    for r in rows:
        assert r["gflops"] * 1e9 == pytest.approx(r["gemm_flops"] / (r["time_ms"] * 1e-3))
        assert "gbps" not in r
        if r["impl"] == "prefopt:native":
            assert r["time_vs_unfused"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "## From hidden states: the linear ops" in md
    assert "| linear:terms | fwd+bwd | 64 | 64 | 512 | fp32 | prefopt:native |" in md
    assert "above the gradients" in md
    # The plot needs the bench extra's matplotlib; the report says so without it.
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "results.png").stat().st_size > 0
    else:
        assert "matplotlib not installed" in md


def test_plot_layout_lines_where_the_grid_varies(tmp_path):
    def row(op, n, v, impl, h=None):
        r = {"op": op, "mode": "fwd+bwd", "n": n, "v": v, "dtype": "bf16", "impl": impl,
             "status": "ok", "time_ms": 1.0, "mem_bytes": 1 << 20}
        if h is not None:
            r["h"] = h
        return r
    rows = [row("logprobs", 8192, v, i) for v in (32000, 128256) for i in (EAGER, "x")]
    rows += [row("terms:forward_kl", n, 32000, EAGER) for n in (4096, 8192)]
    rows += [row("linear:logprobs", 8192, 151936, i, h=4096) for i in (EAGER, "x")]
    sweeps, singles = plotting.plot_layout(rows)
    assert [(axis, len(r)) for axis, _, r in sweeps] == [("V", 4), ("N", 2)]
    assert [c for c, _ in singles] == [("linear:logprobs", "fwd+bwd", 8192, 4096, 151936, "bf16")]
    pytest.importorskip("matplotlib")
    assert plotting.plot(rows, str(tmp_path / "p.png")) is None
    assert (tmp_path / "p.png").stat().st_size > 0


def test_tensor_parallel_formulas_by_hand():
    from benchmarks.tensor_parallel import gather_bytes_per_token, sharded_bytes_per_token
    from prefopt_kernels.distributed import CALL_CHECK_INT64

    # 2 ranks, N=64: the state all-gather is 4*R*F bytes per token (F=8 for the terms, 9 for
    # the reverse KL divergence), plus the call check's all-gather of CALL_CHECK_INT64 int64 per
    # rank (the package's count of its fingerprint) over 64 tokens.
    check = 2 * 8 * CALL_CHECK_INT64 / 64
    terms = Case("terms:forward_kl", "fwd+bwd", 64, 512, "fp32")
    assert sharded_bytes_per_token(terms, 2) == 64 + check
    reverse = Case("divergence:reverse_kl", "fwd+bwd", 64, 512, "fp32")
    assert sharded_bytes_per_token(reverse, 2) == 72 + check
    # js: F=8 and a second sweep's all-reduce of 2 floats
    js = Case("divergence:js", "fwd+bwd", 64, 512, "fp32")
    assert sharded_bytes_per_token(js, 2) == 72 + check
    assert sharded_bytes_per_token(Case("logprobs", "fwd+bwd", 64, 512, "fp32"), 2) == 32 + check
    # linear: the backward all-reduces the [H] hidden gradient in fp32
    linear = Case("linear:terms", "fwd+bwd", 64, 512, "fp32", h=64)
    assert sharded_bytes_per_token(linear, 2) == 64 + 4 * 64 + check
    # gathering: a [V] row of both logits per token; linear: and the [H] hidden gradient
    assert gather_bytes_per_token(terms) == 2 * 4 * 512
    assert gather_bytes_per_token(linear) == 2 * 4 * 512 + 4 * 64
    assert gather_bytes_per_token(Case("logprobs", "fwd+bwd", 64, 512, "bf16")) == 2 * 512


def test_cli_distributed_tiny(tmp_path):
    # A suite run's results are already there: the tensor-parallel section joins them, and a
    # later suite run keeps the section.
    suite = [{"op": "logprobs", "mode": "fwd", "n": 4, "v": 10, "dtype": "fp32", "impl": EAGER,
              "status": "ok", "time_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "gbps": 0.00016}]
    meta = {"device": "cpu", "device_name": "t", "torch": "-", "triton": "-", "copy_gbps": 1.0}
    report.write(str(tmp_path), meta, [], suite, with_plot=False)
    proc = _run_cli(tmp_path, "--distributed", "--tiny", "--no-progress", "--budget", "0.01", timeout=300)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"] == suite
    section = data["tensor_parallel"]
    assert section["meta"]["ranks"] == 2 and section["meta"]["complete"]
    rows = section["results"]
    backends = section["meta"]["backends"]
    assert "native" in backends
    names = {f"prefopt:{b}" for b in backends} | {f"gather+prefopt:{b}" for b in backends}
    for op in ("terms:forward_kl", "linear:terms"):
        assert {r["impl"] for r in rows if r["op"] == op} == names | {"gather+eager"}
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["n"], r["v"], r.get("h", 64)) == (64, 512, 64)
        assert len(r["per_rank"]) == 2
        assert all(p["time_ms"] > 0 and p["mem_bytes"] >= 0 for p in r["per_rank"])
        # same outputs and gradients as gathering the logits, on every rank
        assert r["max_abs_diff"] < 1e-4
        # every rank passes the same tensors to the same collectives
        assert r["collectives"][0] == r["collectives"][1]
        assert len(set(r["collective_bytes_per_token"])) == 1
        if r["impl"].startswith("gather+"):
            # two gathered [64, 512] fp32 logits; linear: the [64, 64] hidden gradient
            assert r["collective_bytes_per_token"][0] == r["formula_bytes_per_token"]
            sent = 2 * 4 * 256 + (4 * 64 if r["op"] == "linear:terms" else 0)
            assert r["sent_bytes_per_token"][0] == sent
        else:
            floats = {c["collective"]: c for c in r["collectives"][0] if c["dtype"] == "float32"}
            if r["op"] == "terms:forward_kl":
                # the per-row state: F = 8 fp32 per token from each of the 2 ranks; nothing else
                assert floats["all_gather"]["bytes_out"] == 2 * 8 * 4 * 64
                assert set(floats) == {"all_gather"}
            else:
                assert floats["all_reduce"]["bytes_out"] == 4 * 64 * 64  # the hidden gradient
    md = (tmp_path / "results.md").read_text()
    assert "| logprobs | fwd | 4 | 10 | fp32 | eager |" in md
    assert "## Tensor parallel (2 gloo ranks)" in md
    assert "| linear:terms | 64 | 64 | 512 | fp32 | prefopt:native |" in md
    assert "## Tensor parallel (2 gloo ranks)" in proc.stdout
    report.write(str(tmp_path), meta, [], suite, with_plot=False)
    assert json.loads((tmp_path / "results.json").read_text())["tensor_parallel"] == section
    assert "## Tensor parallel (2 gloo ranks)" in (tmp_path / "results.md").read_text()


def test_linear_token_terms_full_matches_the_fused_op():
    # full-logits:sparse_po swaps this function in for pk.linear_token_terms inside
    # PrefOptDPOTrainer: same outputs, extras and gradients, so that row is like for like.
    import prefopt_kernels as pk
    from benchmarks.eager import linear_token_terms_full

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(300, 16, generator=g)).requires_grad_()
    ref_hidden = torch.randn(2, 7, 16, generator=g)
    ref_weight = 0.3 * torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 300, (2, 7), generator=g)
    labels[:, :2] = -100
    div_weight = (torch.rand(2, 7, generator=g) > 0.3).float()
    kwargs = dict(divergence="forward_kl", div_weight=div_weight, return_entropy=True,
                  logit_scale=0.7, softcap=5.0, extras=("mean_logits", "is_top1"))
    got, want = (f(hidden, weight, labels, ref_hidden, ref_weight, **kwargs)
                 for f in (linear_token_terms_full, pk.linear_token_terms))
    for name in ("logp", "ref_logp", "div", "entropy"):
        torch.testing.assert_close(getattr(got[0], name), getattr(want[0], name), msg=name)
    torch.testing.assert_close(got[1]["mean_logits"], want[1]["mean_logits"])
    assert torch.equal(got[1]["is_top1"], want[1]["is_top1"])
    assert not got[0].div[div_weight == 0].any() and not got[0].logp[:, :2].any()
    grads = [torch.autograd.grad((t[0].logp + t[0].div).sum(), (hidden, weight))
             for t in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_cli_dpo_step_tiny(tmp_path):
    # One DPO step per trainer and loss at tiny sizes, through the CLI: every row measured, the
    # ratios taken from this run's rows, the rows of one loss computing the same loss, and the
    # section written beside a suite's results.
    from benchmarks.dpo_step import VARIANTS

    rows, section, md, stdout = run_tiny_step(tmp_path, "--dpo-step", "dpo_step", VARIANTS)
    trl = rows["trl:sigmoid"]
    full = rows["full-logits:sparse_po"]
    same_loss = {"sparse_po": full, "orpo": rows["trl:orpo"], "cpo": rows["trl:cpo"]}
    for r in rows.values():
        assert r["speedup_vs_trl"] == pytest.approx(trl["time_ms"] / r["time_ms"])
        assert r["mem_vs_trl"] == pytest.approx(r["mem_bytes"] / trl["mem_bytes"])
        if r["loss_type"] in same_loss:
            baseline = same_loss[r["loss_type"]]
            assert r["speedup_vs_full_logits"] == pytest.approx(baseline["time_ms"] / r["time_ms"])
            assert r["mem_vs_full_logits"] == pytest.approx(r["mem_bytes"] / baseline["mem_bytes"])
        else:
            assert "speedup_vs_full_logits" not in r
    assert trl["speedup_vs_trl"] == 1.0
    # The reference differs from the policy, so the loss is not log 2; bf16 autocast.
    assert rows["prefopt:sigmoid"]["loss"] == pytest.approx(trl["loss"], rel=5e-3)
    assert rows["prefopt:sparse_po"]["loss"] == pytest.approx(full["loss"], rel=5e-3)
    # ORPO and CPO: our trainer on the fused head computes the stock trainers' loss.
    assert rows["prefopt:orpo"]["loss"] == pytest.approx(rows["trl:orpo"]["loss"], rel=5e-3)
    assert rows["prefopt:cpo"]["loss"] == pytest.approx(rows["trl:cpo"]["loss"], rel=5e-3)
    assert abs(trl["loss"] - 0.6931) > 1e-3
    assert "## One DPO step (TRL DPOTrainer)" in md and "## One DPO step" in stdout
    assert "| prefopt:sparse_po | prefopt | sparse_po | prefopt linear_token_terms |" in md
    report.write(str(tmp_path), SUITE_META, [], SUITE, with_plot=False)
    assert json.loads((tmp_path / "results.json").read_text())["dpo_step"] == section
