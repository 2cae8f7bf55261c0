"""Run cases: the implementations of each (``implementations``), timed and their peak memory
measured (``measure``).

Timing
    CUDA: ``measure.time_cuda``. CPU: ``measure.time_cpu``, one warm-up call, then calls within
    ``--budget``. The linear ops on a CPU take seconds per call in their GEMMs: the call whose
    memory the child process measures is their first sample (and counts toward the budget), a
    small copy of the case warms them up (the case itself for ``torch.compile``, which compiles
    each shape), and one sample is enough (``GEMM_BOUND_MIN_REPS``): ``--budget`` buys more.
Memory
    Peak bytes allocated while the case runs, above what was allocated before it started
    (the inputs, and in backward mode also what the forward left for the backward). CUDA:
    ``measure.cuda_peak_bytes``. CPU: ``measure.rss_peak_bytes`` in a child process per case
    (:func:`memory_probe`). Linear ops: also above the gradients of the hidden states and the
    head weight, which every implementation returns (``cases.grad_bytes``, subtracted from the
    peak).
Bandwidth
    ``bytes_moved(case) / median time`` (see ``cases.bytes_moved``), and that as a fraction of
    a device-to-device copy (read + write) timed the same way in the same run. Linear ops:
    ``gemm_flops(case) / median time`` instead (GFLOP/s).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import measure
from .cases import (
    LINEAR_OPS,
    Case,
    bytes_moved,
    case_key,
    gemm_flops,
    grad_bytes,
    input_bytes,
    make_inputs,
)
from .child_process import run_children
from .implementations import EAGER, TRL_CHUNKED, UNFUSED, Impl, implementations
from .report import progress_bar

# Fewest timed calls of a linear op on a CPU, where one call is seconds of GEMMs (the memory
# probe's call among them): the default suite has room for one per implementation.
GEMM_BOUND_MIN_REPS = 1


# --------------------------------------------------------------------------------------------
# one runnable call per mode


class Runnable:
    """``call()`` runs one iteration of the case's mode.

    The backward returns the logits' gradient (linear ops: the hidden states' and the head
    weight's) with ``torch.autograd.grad`` instead of accumulating it into ``.grad``: in
    training the logits are an activation whose gradient goes straight on to the LM head's
    backward. (Accumulating into a leaf's ``.grad`` would also copy an in-place gradient,
    hiding what ``inplace_backward`` saves.) ``reset()`` is kept for timers; it drops any
    stray ``.grad``.
    """

    def __init__(self, case: Case, impl: Impl, inputs: dict):
        self.case, self.impl, self.inputs = case, impl, inputs
        self.grad_inputs = [inputs[k] for k in case.grad_inputs]
        self.forward = impl.build(case)
        self._grads: Optional[List[torch.Tensor]] = None
        self._outs = None
        if case.mode == "bwd":
            with impl.context():
                self._outs = self._differentiable(self.forward(inputs))

    def _differentiable(self, outs):
        return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]

    def _upstream(self, outs):
        if self._grads is None:
            g = torch.Generator(device=outs[0].device).manual_seed(1234)
            self._grads = [torch.randn(o.shape, device=o.device, dtype=o.dtype, generator=g)
                           if o.dim() else torch.ones_like(o) for o in outs]
        return self._grads

    def reset(self) -> None:
        """Drop any ``.grad`` left on the differentiated inputs (called before each timed call)."""
        for x in self.grad_inputs:
            x.grad = None

    def call(self) -> None:
        """One iteration of the case's mode: the forward, the forward and the backward, or the
        backward alone through the graph of the forward run at construction."""
        with self.impl.context():
            if self.case.mode == "fwd":
                self.forward(self.inputs)
            elif self.case.mode == "fwd+bwd":
                outs = self._differentiable(self.forward(self.inputs))
                torch.autograd.grad(outs, self.grad_inputs, self._upstream(outs))
            else:
                torch.autograd.grad(self._outs, self.grad_inputs, self._upstream(self._outs),
                                    retain_graph=True)

    def outputs_and_grads(self) -> List[torch.Tensor]:
        """Every tensor output of one forward, detached, then the gradients of its backward
        (with the upstream gradients the timed calls use): what implementations are compared
        on."""
        with self.impl.context():
            outs = [o for o in self.forward(self.inputs) if isinstance(o, torch.Tensor)]
            differentiable = self._differentiable(outs)
            grads = torch.autograd.grad(differentiable, self.grad_inputs,
                                        self._upstream(differentiable))
        return [o.detach() for o in outs] + list(grads)


# --------------------------------------------------------------------------------------------
# bandwidth and memory of a case


def effective_bandwidth(case: Case, median_ms: float) -> float:
    """Bytes per second the case must move, at the measured median time."""
    return bytes_moved(case) / (median_ms * 1e-3)


def above_grads(case: Case, peak: int) -> int:
    """A peak less the gradients every implementation of a linear op returns (the peak
    itself for the logits ops): they count as inputs, as part of the floor."""
    return max(0, peak - grad_bytes(case))


def measure_cuda_memory(runnable: Runnable) -> int:
    """Peak bytes allocated during one call above what was allocated before it (and, for a
    linear op, above the gradients it returns)."""
    return above_grads(runnable.case, measure.cuda_peak_bytes(runnable.call, runnable.reset))


def measure_cpu_memory(case: Case, impl_names: Sequence[str], config: dict,
                       timeout_s: Optional[float] = None) -> Dict[str, dict]:
    """Run :func:`memory_probe` in a fresh interpreter for one case; ``{impl: {...}}``. The
    default timeout is 5 minutes, 15 for a linear op (seconds of GEMMs per call)."""
    if timeout_s is None:
        timeout_s = 900 if case.linear else 300
    request = {"case": case.as_dict(), "impls": list(impl_names), "config": config}
    probe = run_children("benchmarks.runner:memory_probe", [request], deadline_s=timeout_s)[0]
    failure = probe.failure("memory probe")
    if failure is None and not probe.lines:
        failure = "memory probe printed no result"
    if failure is not None:
        return {n: {"error": failure} for n in impl_names}
    return probe.lines[-1]


def memory_probe(request: dict) -> Dict[str, dict]:
    """Child side of :func:`measure_cpu_memory`: for each implementation, warm it up on a tiny
    copy of the case (libraries loaded, kernels compiled; the case itself where each shape
    compiles), create the inputs, build the call
    (in backward mode this runs the forward), then measure one call's peak resident memory
    above the resident set at that point (and, for a linear op, above the gradients it
    returns). A linear op's call is also timed (``call_ms``): one of its timing samples."""
    case = Case(**request["case"])
    cfg = request["config"]
    impls, _ = implementations(torch.device("cpu"), cfg["backends"],
                               compile_eager=cfg["compile"], peers=False)
    by_name = {i.name: i for i in impls}
    out: Dict[str, dict] = {}
    for name in request["impls"]:
        impl = by_name[name]
        try:
            warm = impl.warm_up_case(case)
            r = Runnable(warm, impl, make_inputs(warm, torch.device("cpu")))
            r.call()
            del r
            inputs = make_inputs(case, torch.device("cpu"))
            r = Runnable(case, impl, inputs)
            r.reset()
            elapsed: List[float] = []
            peak, method = measure.rss_peak_bytes(measure.timed(r.call, elapsed))
            out[name] = {"mem_bytes": above_grads(case, peak), "mem_method": method}
            if case.linear:
                out[name]["call_ms"] = elapsed[0]
            del r, inputs
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        gc.collect()
    return out


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class RunConfig:
    """How :func:`run_cases` runs: the device, the package backends and whether the eager code
    is compiled (the memory probe rebuilds the implementations from them), whether memory is
    measured, the CPU time budget per case and implementation, and a progress bar."""

    device: torch.device
    backends: List[str]
    compile_eager: bool
    measure_memory: bool = True
    cpu_budget_s: float = 1.0
    progress: bool = True


def _fits(case: Case, device: torch.device) -> Optional[str]:
    """A note when the case's inputs cannot even be created on this device, else None."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    # + the [N, V] gradient of the logits ops, or the linear ops' logits and their gradients
    need = input_bytes(case) + case.n * case.v * case.torch_dtype.itemsize + grad_bytes(case)
    if need > 0.9 * total:
        return f"would not fit: inputs and gradient need {need / 2**30:.1f} GiB"
    return None


def run_cases(cases: Sequence[Case], impls: Sequence[Impl], cfg: RunConfig,
              on_case: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Run every applicable implementation on every case; one result dict per pair.

    ``on_case(results_so_far)`` is called after each case, so that a run cut short by a time
    limit still leaves its results behind."""
    device = cfg.device
    results: List[dict] = []
    ordered = sorted(impls, key=lambda i: i.mutates_input)
    plan = [(c, [i for i in ordered if i.applies(c)]) for c in cases]
    total = sum(len(p[1]) for p in plan)
    bar = progress_bar(total, cfg.progress)
    for case, case_impls in plan:
        base = {**case.as_dict(), "bytes_moved": bytes_moved(case),
                "input_bytes": input_bytes(case)}
        if case.linear:
            base.update(gemm_flops=gemm_flops(case), grad_bytes=grad_bytes(case))
        skip = _fits(case, device)
        if skip:
            for impl in case_impls:
                results.append({**base, "impl": impl.name, "status": "skipped", "note": skip})
                bar.update(1)
            continue
        mem_cpu: Dict[str, dict] = {}
        if cfg.measure_memory and device.type == "cpu":
            bar.set_description(f"{case.op} {case.mode} memory")
            mem_cpu = measure_cpu_memory(case, [i.name for i in case_impls],
                                         {"backends": cfg.backends, "compile": cfg.compile_eager})
        inputs = make_inputs(case, device)
        for impl in case_impls:
            bar.set_description(f"{case.op} {case.mode} {impl.name}")
            results.append({**base, "impl": impl.name,
                            **_run_one(case, impl, inputs, cfg, mem_cpu.get(impl.name))})
            bar.update(1)
        del inputs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_case is not None:
            _add_baseline_ratios(results)
            on_case(results)
    bar.close()
    _add_baseline_ratios(results)
    return results


def _run_one(case: Case, impl: Impl, inputs: dict, cfg: RunConfig, mem: Optional[dict]) -> dict:
    """The status, measurement and throughput of one implementation on one case; ``mem`` is
    what the CPU memory probe measured for it."""
    res: dict = {"status": "ok"}
    try:
        r = Runnable(case, impl, inputs)
        if cfg.device.type == "cuda":
            t = measure.time_cuda(r.call, r.reset)
            if cfg.measure_memory:
                t = t.with_memory(measure_cuda_memory(r), "max_memory_allocated")
        elif case.linear:
            # Seconds of GEMMs per call: a full-size warm-up call would warm nothing that a
            # small one does not (every large buffer is mapped afresh on each call anyway),
            # unless the implementation compiles each shape; the memory probe's call, warmed
            # up the same way, is a sample already.
            probed = [mem["call_ms"]] if mem and "call_ms" in mem else []
            warm = impl.warm_up_case(case)

            def warm_up():
                Runnable(warm, impl, inputs if warm is case else make_inputs(warm, cfg.device)).call()
            t = measure.time_cpu(r.call, r.reset, budget_s=cfg.cpu_budget_s,
                                 min_reps=GEMM_BOUND_MIN_REPS, samples=probed,
                                 warmup=warm_up)
        else:
            t = measure.time_cpu(r.call, r.reset, budget_s=cfg.cpu_budget_s)
        if mem and "error" in mem:
            res["note"] = mem["error"]
        elif mem:
            t = t.with_memory(mem["mem_bytes"], mem["mem_method"])
        res.update(t.row())
        if case.linear:
            res["gflops"] = gemm_flops(case) / (t.time_ms * 1e-3) / 1e9
        else:
            res["gbps"] = effective_bandwidth(case, t.time_ms) / 1e9
        del r
    except torch.cuda.OutOfMemoryError:
        res = {"status": "oom", "note": "out of device memory"}
    except Exception as exc:
        res = {"status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        for name in case.grad_inputs:
            inputs[name].grad = None
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _add_baseline_ratios(results: List[dict]) -> None:
    """Speed-up and memory ratio against the eager baseline of the same case in this run;
    for the package's linear ops also their time over that of the same backend's explicit
    logits path (``time_vs_unfused``) and of TRL's chunked functions (``time_vs_trl``)."""
    ok = {(case_key(r), r["impl"]): r for r in results if r["status"] == "ok"}
    for r in results:
        measure.add_ratios(r, ok.get((case_key(r), EAGER)), "eager")
        fused = r["impl"].startswith("prefopt:") and not r["impl"].endswith(UNFUSED)
        if r["op"] in LINEAR_OPS and fused:
            for name, other in (("unfused", r["impl"] + UNFUSED), ("trl", TRL_CHUNKED)):
                measure.add_ratios(r, ok.get((case_key(r), other)), name,
                                   time_over_baseline=True)
