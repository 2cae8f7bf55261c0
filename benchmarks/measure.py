"""Timing and memory: what every part of the suite measures, and how.

Timing
    CUDA (:func:`time_cuda`): CUDA events around each call, the L2 cache flushed (a 256 MiB
    buffer zeroed) before every call, warm-up by time, then the per-call samples
    (``triton.testing.do_bench``'s method). CPU (:func:`time_cpu`): wall clock around each call
    after a warm-up, at least ``min_reps`` calls and more within a time budget. Both report the
    median and the 20th/80th percentiles of the samples (:class:`Measurement`).
Memory
    Peak bytes allocated during one call above what was allocated before it. CUDA
    (:func:`cuda_peak_bytes`): the caching allocator's ``max_memory_allocated`` after
    ``reset_peak_memory_stats``. CPU (:func:`rss_peak_bytes`): the resident high-water mark,
    reset just before the call; a process's resident set only grows, so every CPU measurement
    runs in a child process of its own (``child_process``).
Ratios
    :func:`add_ratios` relates a row to a baseline row of the same case measured in the same run.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import re
import resource
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class Measurement:
    """The measured fields of a result row: the median time per call (``time_ms``) with the 20th
    and 80th percentiles of the samples, how many calls were timed, and the peak memory of one
    call (``mem_bytes``, None when not measured) with the method that measured it."""

    time_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    mem_bytes: Optional[int] = None
    mem_method: Optional[str] = None

    @classmethod
    def of_samples(cls, samples_ms: Sequence[float]) -> "Measurement":
        """The median and percentiles of per-call times in milliseconds (linear interpolation)."""
        s = sorted(samples_ms)

        def quantile(p):
            pos = p * (len(s) - 1)
            lo, hi = math.floor(pos), math.ceil(pos)
            return s[lo] + (s[hi] - s[lo]) * (pos - lo)
        return cls(quantile(0.5), quantile(0.2), quantile(0.8), len(s))

    def with_memory(self, mem_bytes: int, mem_method: str) -> "Measurement":
        """This timing with the peak memory of a call and the method that measured it."""
        return dataclasses.replace(self, mem_bytes=mem_bytes, mem_method=mem_method)

    def row(self) -> dict:
        """The fields as a result row writes them (the memory only when measured)."""
        fields = {"time_ms": self.time_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                  "reps": self.reps}
        if self.mem_bytes is not None:
            fields.update(mem_bytes=self.mem_bytes, mem_method=self.mem_method)
        return fields


# --------------------------------------------------------------------------------------------
# timing


def time_cuda(call: Callable[[], None], reset: Callable[[], None], *, warmup_ms: float = 25,
              rep_ms: float = 100, min_reps: int = 5, max_reps: int = 200) -> Measurement:
    """Milliseconds per call from CUDA events, with the L2 cache flushed before each call."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    reset(); call(); torch.cuda.synchronize()  # first call: compilation, autotuning
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        flush.zero_(); reset(); call()
    end.record(); torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        reset(); call()
    n = min(max(min_reps, int(rep_ms / est)), max_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_(); reset()
        starts[i].record(); call(); ends[i].record()
    torch.cuda.synchronize()
    del flush
    return Measurement.of_samples([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_cpu(call: Callable[[], None], reset: Callable[[], None], *, budget_s: float = 1.0,
             min_reps: int = 3, max_reps: int = 20,
             warmup: Optional[Callable[[], None]] = None,
             samples: Sequence[float] = (),
             agree: Optional[Callable[[bool], bool]] = None) -> Measurement:
    """Milliseconds per call by wall clock: a warm-up (one call, unless ``warmup`` is given),
    then calls until there are at least ``min_reps`` samples (a median needs repeats, however
    slow the call) and more while the samples add up to less than ``budget_s``. ``samples``
    timed elsewhere count as samples and toward the budget; when they are enough, nothing runs
    here.

    ``agree(more)`` turns this process's wish to time another call into the decision of every
    process that times the same calls in step (the ranks of a collective: one that stopped
    alone would leave the others waiting); it is asked before the warm-up and before each call.
    """
    samples = list(samples)

    def more() -> bool:
        wanted = len(samples) < max_reps and (len(samples) < min_reps
                                              or sum(samples) * 1e-3 < budget_s)
        return wanted if agree is None else agree(wanted)
    if not more():
        return Measurement.of_samples(samples)
    if warmup is None:
        reset(); call()
    else:
        warmup()
    while more():
        reset(); t0 = time.perf_counter(); call()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Measurement.of_samples(samples)


def timed(call: Callable[[], None], samples_ms: List[float]) -> Callable[[], None]:
    """``call`` that also appends its wall-clock time in milliseconds to ``samples_ms``: the
    call whose memory is measured then counts as a timing sample too."""
    def timed_call():
        t0 = time.perf_counter()
        call()
        samples_ms.append((time.perf_counter() - t0) * 1e3)
    return timed_call


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write counted), timed like the cases."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 256 << 20
        if device.type == "cuda":
            nbytes = min(nbytes, torch.cuda.mem_get_info()[0] // 4)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    timer = time_cuda if device.type == "cuda" else time_cpu
    t = timer(lambda: dst.copy_(src), lambda: None)
    return 2 * nbytes / (t.time_ms * 1e-3)


def load_average() -> Optional[float]:
    """The machine's one-minute load average (None where the OS has none): other work on the
    cores shows in CPU timings."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# --------------------------------------------------------------------------------------------
# memory


def cuda_peak_bytes(call: Callable[[], None], reset: Callable[[], None]) -> int:
    """Peak bytes allocated during one ``call()`` above what was allocated before it."""
    reset()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _proc_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of resident memory (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rss_peak_bytes(call: Callable[[], None]) -> Tuple[int, str]:
    """``(bytes, method)``: peak resident bytes during ``call()`` above the resident set just
    before it, and how that was measured (``VmHWM`` where the high-water mark can be reset)."""
    gc.collect()
    base = _proc_kib("VmRSS")
    if base is not None and _reset_peak_rss():
        call()
        return max(0, (_proc_kib("VmHWM") - base) * 1024), "VmHWM"
    if base is not None:
        # No resettable high-water mark: sample the resident set every millisecond.
        peak, done = [base], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _proc_kib("VmRSS") or 0)
                time.sleep(1e-3)
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        call()
        done.set(); th.join()
        return max(0, (max(peak[0], _proc_kib("VmRSS") or 0) - base) * 1024), "sampled VmRSS"
    # No /proc (macOS): ru_maxrss only grows, so this is a lower bound when the inputs
    # were created at a higher peak than the resident set before the call.
    scale = 1 if sys.platform == "darwin" else 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, (after - before) * scale), "ru_maxrss delta"


# --------------------------------------------------------------------------------------------
# ratios


def add_ratios(row: dict, baseline: Optional[dict], name: str, *,
               time_over_baseline: bool = False) -> None:
    """Relate ``row`` to ``baseline``, a row of the same case measured in the same run.

    Adds ``speedup_vs_{name}``, the baseline's time over the row's, and ``mem_vs_{name}``, the
    row's peak over the baseline's (where both were measured and the baseline's is not 0). With
    ``time_over_baseline``, ``time_vs_{name}`` alone instead: the row's time over the
    baseline's. Nothing when either row is missing or did not run.
    """
    if baseline is None or row["status"] != "ok" or baseline["status"] != "ok":
        return
    if time_over_baseline:
        row[f"time_vs_{name}"] = row["time_ms"] / baseline["time_ms"]
        return
    row[f"speedup_vs_{name}"] = baseline["time_ms"] / row["time_ms"]
    if row.get("mem_bytes") is not None and baseline.get("mem_bytes"):
        row[f"mem_vs_{name}"] = row["mem_bytes"] / baseline["mem_bytes"]
