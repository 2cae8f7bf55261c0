"""Tensor parallelism on a CPU: the vocabulary-sharded ops against gathering the logits.

``python -m benchmarks --distributed`` starts ``WORLD`` gloo ranks, each a child process
(``child_process.run_children`` of ``tensor_parallel_rank.rank_worker``), and runs every case
on all of them at once. The vocabulary is split evenly, in rank order: each rank holds
``logits[:, V/R]`` (and the reference's), or for a linear op the heads' rows ``[V/R, H]`` with
the hidden states replicated; labels are global ids. Every implementation runs forward +
backward and returns the global per-token outputs and this rank's gradient (linear ops: its
head shard's and the full hidden states', summed over the ranks):

``prefopt:B``
    the package's op with ``process_group=`` on backend ``B``.
``gather+eager``
    what a trainer has without it: ``torch.distributed.all_gather`` of the shards,
    concatenated into ``[N, V]`` on every rank (a linear op projects its shard first), then
    the suite's eager code. The backward keeps this rank's columns of the ``[N, V]``
    gradient; a linear op all-reduces the hidden states' gradient, as Megatron's
    column-parallel LM head does.
``gather+prefopt:B``
    the same gather, then the package's unsharded op (with ``inplace_backward``: the
    gathered logits are a private copy that nothing else reads).

Measured on every rank: the time per call (wall clock, ``measure.time_cpu`` with the ranks
in step), the peak resident memory of one call above the rank's inputs
(``measure.rss_peak_bytes``), the bytes of the tensors passed to ``all_gather`` and
``all_reduce`` during that call (recorded by wrapping both), and the largest difference of the
outputs and gradient from ``gather+eager``'s on a small copy of the case. The bytes the
package's own count expects (``prefopt_kernels.distributed.exchange_bytes_per_token``) stand
beside them.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from typing import List, Optional, Sequence

import torch

from prefopt_kernels.distributed import exchange_bytes_per_token
from prefopt_kernels.divergences import Divergence
from prefopt_kernels.spec import OpSpec

from . import report
from .cases import Case, case_key, grad_bytes, input_bytes
from .child_process import run_children
from .measure import add_ratios, load_average

WORLD = 2
DEFAULT_OPS = ("terms:forward_kl", "linear:terms")
GATHER_EAGER = "gather+eager"
GATHER = "gather+"
COLLECTIVE_TIMEOUT_S = 300  # a rank may wait this long in a collective for a slower one
DEADLINE_S = 900  # the whole run, after which the parent stops its ranks
TINY_DEADLINE_S = 180


# --------------------------------------------------------------------------------------------
# shapes and the expected communication


def rank_case(case: Case, world: int) -> Case:
    """The case as one rank holds it (its vocabulary shard): for its input and gradient bytes."""
    return replace(case, v=case.v // world)


def op_spec(case: Case) -> OpSpec:
    """The ``OpSpec`` of the package's call for the case (see
    ``implementations.prefopt_forward``): the outputs it asks for and its divergence, which
    decide the row state the ranks exchange."""
    divergence_only = case.op.startswith("divergence:")
    return OpSpec(divergence=Divergence[case.divergence.upper()] if case.divergence else 0,
                  want_logp=not divergence_only,
                  want_ref_logp=case.has_ref and not divergence_only,
                  want_entropy=case.op == "logprobs+entropy")


def sharded_bytes_per_token(case: Case, world: int) -> float:
    """Collective bytes per token of the sharded op, forward and backward, on ``world`` ranks,
    as the package counts them (``prefopt_kernels.distributed.exchange_bytes_per_token``); a
    linear op's hidden states need a gradient."""
    return exchange_bytes_per_token(op_spec(case), case.has_ref, world, case.n,
                                    hidden_size=case.h if case.linear else None)


def gather_bytes_per_token(case: Case) -> float:
    """Collective bytes per token of gathering the logits: a ``[V]`` row of the logits (and of
    the reference's) on every rank, and for a linear op the ``[H]`` hidden gradient's
    all-reduce."""
    elt = case.torch_dtype.itemsize
    per_token = elt * case.v * (2 if case.has_ref else 1)
    return per_token + (elt * case.h if case.linear else 0)


def impl_names(backends: Sequence[str]) -> List[str]:
    """The implementations of every case, in the order they run and are reported."""
    return ([f"prefopt:{b}" for b in backends] + [f"{GATHER}prefopt:{b}" for b in backends]
            + [GATHER_EAGER])


def check_cases(cases: Sequence[Case], world: int) -> None:
    """Raise ``ValueError`` for a case this benchmark cannot run."""
    for case in cases:
        if case.mode != "fwd+bwd":
            raise ValueError(f"{case.key}: the tensor-parallel benchmark runs fwd+bwd only")
        if case.v % world:
            raise ValueError(f"{case.key}: V must split evenly over {world} ranks "
                             "(all_gather takes equal shards)")


# --------------------------------------------------------------------------------------------
# the parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _combine(case: Case, name: str, per_rank: List[Optional[dict]], world: int,
             failure: Optional[str]) -> dict:
    """One result row from the ranks' lines for a case and implementation."""
    row = {**case.as_dict(), "impl": name, "ranks": world,
           "formula_bytes_per_token": (gather_bytes_per_token(case) if name.startswith(GATHER)
                                       else sharded_bytes_per_token(case, world))}
    errors = [r["note"] for r in per_rank if r is not None and r["status"] != "ok"]
    if errors or any(r is None for r in per_rank):
        note = errors[0] if errors else f"not run: {failure or 'a rank stopped before it'}"
        return {**row, "status": "error", "note": note}
    row["status"] = "ok"
    row["per_rank"] = [{k: r[k] for k in ("time_ms", "p20_ms", "p80_ms", "reps", "mem_bytes",
                                          "mem_method") if k in r} for r in per_rank]
    row["time_ms"] = max(r["time_ms"] for r in per_rank)  # a step lasts as long as its slowest rank
    if all("mem_bytes" in r for r in per_rank):
        row["mem_bytes"] = max(r["mem_bytes"] for r in per_rank)
    for field, size in (("sent_bytes_per_token", "bytes_in"),
                        ("collective_bytes_per_token", "bytes_out")):
        row[field] = [sum(c[size] * c["calls"] for c in r["collectives"]) / case.n
                      for r in per_rank]
    row["collectives"] = [r["collectives"] for r in per_rank]
    row["max_abs_diff"] = max(r["max_abs_diff"] for r in per_rank)
    row["input_bytes"] = input_bytes(rank_case(case, world))
    row["grad_bytes"] = grad_bytes(rank_case(case, world))
    return row


def run(cases: Sequence[Case], backends: Sequence[str], *, budget_s: float = 1.0,
        measure_memory: bool = True, progress: bool = True, world: int = WORLD,
        deadline_s: Optional[float] = None) -> dict:
    """Run the cases on ``world`` gloo ranks of this machine; the report's section:
    ``{"meta": ..., "notes": [...], "results": [one row per case and implementation]}``.
    ``deadline_s`` bounds the whole run (default 15 minutes; 3 when every case is small)."""
    check_cases(cases, world)
    if deadline_s is None:
        deadline_s = TINY_DEADLINE_S if all(c.n * c.v <= 64 * 512 for c in cases) else DEADLINE_S
    threads = max(1, (os.cpu_count() or 1) // world)
    request = {"cases": [c.as_dict() for c in cases], "backends": list(backends), "world": world,
               "port": _free_port(), "threads": threads, "budget_s": budget_s,
               "memory": measure_memory, "progress": progress,
               "collective_timeout_s": min(COLLECTIVE_TIMEOUT_S, deadline_s)}
    load = load_average()
    t0 = time.time()
    ranks = run_children("benchmarks.tensor_parallel_rank:rank_worker",
                         [{**request, "rank": rank} for rank in range(world)],
                         deadline_s=deadline_s, show_stderr={0})  # rank 0 shows its progress
    failures = [child.failure(f"rank {rank}") for rank, child in enumerate(ranks)]
    failure = next((f for f in failures if f is not None), None)
    by_rank = [{(ln["key"], ln["impl"]): ln for ln in child.lines} for child in ranks]
    results = [_combine(case, name, [r.get((case.key, name)) for r in by_rank], world, failure)
               for case in cases for name in impl_names(backends)]
    ok = {(case_key(r), r["impl"]): r for r in results if r["status"] == "ok"}
    for r in results:
        add_ratios(r, ok.get((case_key(r), GATHER_EAGER)), "gather_eager")
    meta = {"device_name": report.device_name(torch.device("cpu")), "torch": torch.__version__,
            "ranks": world, "threads_per_rank": threads, "backend": "gloo",
            "backends": list(backends), "load_average_before": load,
            "load_average_after": load_average(),
            "wall_s": time.time() - t0, "complete": failure is None}
    notes = [f"each rank: a process with {threads} intra-op thread(s); gloo moves the tensors "
             "over loopback TCP with threads of its own."]
    if failure:
        notes.append(failure)
    return {"meta": meta, "notes": notes, "results": results}
