"""Tensor parallelism on a CPU: the vocabulary-sharded ops against gathering the logits.

``python -m benchmarks --distributed`` starts ``WORLD`` gloo ranks, each a child process
(``child_process.run_children`` of :func:`rank_worker`), and runs every case on all of them at
once. The vocabulary is split evenly, in rank order: each rank holds ``logits[:, V/R]`` (and
the reference's), or for a linear op the heads' rows ``[V/R, H]`` with the hidden states
replicated; labels are global ids. Every implementation runs forward + backward and returns
the global per-token outputs and this rank's gradient (linear ops: its head shard's and the
full hidden states', summed over the ranks):

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

import contextlib
import gc
import os
import socket
import time
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from prefopt_kernels.distributed import exchange_bytes_per_token
from prefopt_kernels.divergences import Divergence
from prefopt_kernels.spec import OpSpec

from . import report
from .cases import Case, case_key, grad_bytes, input_bytes, make_inputs
from .child_process import emit, run_children
from .measure import add_ratios, load_average, rss_peak_bytes, time_cpu, timed
from .implementations import Impl, eager_forward, prefopt_forward
from .runner import GEMM_BOUND_MIN_REPS, Runnable, above_grads

WORLD = 2
DEFAULT_OPS = ("terms:forward_kl", "linear:terms")
GATHER_EAGER = "gather+eager"
GATHER = "gather+"
# The logits op a linear op's gathered logits go through.
LOGITS_OP_OF = {"linear:logprobs": "logprobs", "linear:terms": "terms:forward_kl"}
# Fewest timed calls of a logits op (the memory-measured call among them); a linear op's
# follow the suite's GEMM_BOUND_MIN_REPS. Gathering [N, V] over gloo takes seconds per call.
MIN_REPS = 2
COLLECTIVE_TIMEOUT_S = 300  # a rank may wait this long in a collective for a slower one
DEADLINE_S = 900  # the whole run, after which the parent stops its ranks
TINY_DEADLINE_S = 180


# --------------------------------------------------------------------------------------------
# shapes, inputs and the expected communication


def shard_range(v: int, rank: int, world: int) -> tuple:
    """``(v0, v1)``: this rank's columns of an evenly split vocabulary of ``v`` entries."""
    width = v // world
    return rank * width, (rank + 1) * width


def rank_case(case: Case, world: int) -> Case:
    """The case as one rank holds it (its vocabulary shard): for its input and gradient bytes."""
    return replace(case, v=case.v // world)


def shard_inputs(case: Case, rank: int, world: int) -> Dict[str, torch.Tensor]:
    """This rank's inputs: ``make_inputs`` of the whole case (the same on every rank), with the
    logits (linear ops: the head weights) cut to the rank's shard, in their own storage."""
    full = make_inputs(case, torch.device("cpu"))
    v0, v1 = shard_range(case.v, rank, world)
    out = dict(full)
    for name in (("weight", "ref_weight") if case.linear else ("logits", "ref_logits")):
        if name in full:
            t = full[name]
            part = t[v0:v1] if case.linear else t[:, v0:v1]
            out[name] = part.detach().clone(memory_format=torch.contiguous_format)
            out[name].requires_grad_(t.requires_grad)
    return out


def op_spec(case: Case) -> OpSpec:
    """The ``OpSpec`` of the package's call for the case (see ``runner.prefopt_forward``): the
    outputs it asks for and its divergence, which decide the row state the ranks exchange."""
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
# the gathering baselines


class _GatherVocab(torch.autograd.Function):
    """``[N, V/R]`` shards to ``[N, V]`` on every rank: all_gather, then concatenate. The
    backward keeps this rank's columns of the gradient, in their own storage (what the shard's
    producer expects)."""

    @staticmethod
    def forward(ctx, shard, group, v0):
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        ctx.columns = (v0, v0 + shard.shape[-1])
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        v0, v1 = ctx.columns
        return grad[:, v0:v1].contiguous(), None, None


class _SumGradient(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the ranks (the replicated hidden
    states feed every rank's head shard)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # The gradient of a matmul's input: a fresh tensor nothing else holds, reduced in place.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _gathered_inputs(case: Case, x: dict, group, v0: int) -> dict:
    """The logits op's inputs on every rank: the full ``[N, V]`` logits (and reference logits)."""
    if case.linear:
        logits = _SumGradient.apply(x["hidden"], group) @ x["weight"].t()
        ref = x["ref_hidden"] @ x["ref_weight"].t() if case.has_ref else None
    else:
        logits, ref = x["logits"], x.get("ref_logits")
    out = {"logits": _GatherVocab.apply(logits, group, v0), "labels": x["labels"]}
    if ref is not None:
        out["ref_logits"] = _GatherVocab.apply(ref, group, v0)
    if "mask" in x:
        out["mask"] = x["mask"]
    return out


def _gather_forward(case: Case, group, v0: int, prefopt: bool):
    """Gathering the logits, then the package's unsharded op (``prefopt``) or the eager code."""
    logits_case = replace(case, op=LOGITS_OP_OF[case.op], h=None) if case.linear else case
    if prefopt:
        op = prefopt_forward(logits_case, inplace=True)
    else:
        op = eager_forward(logits_case)
    return lambda x: op(_gathered_inputs(case, x, group, v0))


def _implementations(backends: Sequence[str], group, rank: int, world: int) -> List[Impl]:
    """The implementations of ``impl_names(backends)``, in that order, for this rank."""
    def ctx(b):
        import prefopt_kernels as pk
        return pk.use_backend(b)

    def v0(case):
        return shard_range(case.v, rank, world)[0]
    impls = [Impl(f"prefopt:{b}", lambda c: prefopt_forward(c, False, process_group=group),
                  context=lambda b=b: ctx(b)) for b in backends]
    impls += [Impl(f"{GATHER}prefopt:{b}", lambda c: _gather_forward(c, group, v0(c), True),
                   context=lambda b=b: ctx(b)) for b in backends]
    impls.append(Impl(GATHER_EAGER, lambda c: _gather_forward(c, group, v0(c), False)))
    return impls


# --------------------------------------------------------------------------------------------
# measuring on one rank


@contextlib.contextmanager
def recording_collectives():
    """Record every ``torch.distributed.all_gather`` and ``all_reduce`` made in the block as
    ``(collective, dtype, bytes passed in, bytes of the result)``: for all_gather the rank's
    input and the gathered list, for all_reduce its tensor twice."""
    log: list = []
    all_gather, all_reduce = dist.all_gather, dist.all_reduce

    def nbytes(t):
        return t.numel() * t.element_size()

    def gather(tensor_list, tensor, *args, **kwargs):
        log.append(("all_gather", str(tensor.dtype).replace("torch.", ""), nbytes(tensor),
                    sum(nbytes(t) for t in tensor_list)))
        return all_gather(tensor_list, tensor, *args, **kwargs)

    def reduce(tensor, *args, **kwargs):
        log.append(("all_reduce", str(tensor.dtype).replace("torch.", ""), nbytes(tensor),
                    nbytes(tensor)))
        return all_reduce(tensor, *args, **kwargs)
    dist.all_gather, dist.all_reduce = gather, reduce
    try:
        yield log
    finally:
        dist.all_gather, dist.all_reduce = all_gather, all_reduce


def _collectives_summary(log: list) -> List[dict]:
    return [{"collective": c, "dtype": d, "bytes_in": i, "bytes_out": o, "calls": k}
            for (c, d, i, o), k in Counter(log).items()]


def _ranks_agree(group):
    """``agree(more)`` for ``measure.time_cpu``: another call is timed when any rank wants one,
    so every rank times the same calls (an all-reduce outside the timed region, which also
    starts the ranks together)."""
    def agree(more: bool) -> bool:
        flag = torch.tensor([int(more)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())
    return agree


def _max_diff(got: List[torch.Tensor], want: List[torch.Tensor]) -> float:
    return max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want))


def _measure(case: Case, impl: Impl, inputs: dict, world: int, group, request: dict) -> dict:
    """Time, peak memory and collectives of the implementation on this rank's ``inputs``
    (which no implementation modifies)."""
    r = Runnable(case, impl, inputs)
    r.reset()
    elapsed: List[float] = []
    memory = None
    dist.barrier(group=group)
    with recording_collectives() as log:
        if request["memory"]:
            peak, method = rss_peak_bytes(timed(r.call, elapsed))
            memory = (above_grads(rank_case(case, world), peak), method)
        else:
            timed(r.call, elapsed)()
    # The small copy warmed everything up, so the measured call is a sample (as for the
    # suite's linear ops) and no warm-up call follows: every call maps its large tensors
    # afresh anyway.
    t = time_cpu(r.call, r.reset, budget_s=request["budget_s"],
                 min_reps=GEMM_BOUND_MIN_REPS if case.linear else MIN_REPS,
                 warmup=lambda: None, samples=elapsed, agree=_ranks_agree(group))
    if memory is not None:
        t = t.with_memory(*memory)
    return {**t.row(), "collectives": _collectives_summary(log)}


def rank_worker(request: dict) -> None:
    """Child side: rank ``request["rank"]``, every case, every implementation; one JSON line
    per result. On an error it reports it and exits at once, so the other ranks fail fast in
    their next collective instead of running out of step."""
    rank, world = request["rank"], request["world"]
    torch.set_num_threads(request["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{request['port']}", rank=rank,
                            world_size=world,
                            timeout=timedelta(seconds=request["collective_timeout_s"]))
    group = dist.new_group(list(range(world)))
    impls = _implementations(request["backends"], group, rank, world)
    cases = [Case(**c) for c in request["cases"]]
    bar = report.progress_bar(len(cases) * len(impls), request["progress"]) if rank == 0 else None
    for case in cases:
        current = None
        try:
            small, checks = case.small(), {}
            small_inputs = shard_inputs(small, rank, world)
            for impl in impls:
                current = impl.name
                # One call on the small copy: the outputs to compare, and a warm-up
                # (libraries loaded, the ranks' connections made).
                checks[impl.name] = Runnable(small, impl, small_inputs).outputs_and_grads()
            inputs = shard_inputs(case, rank, world)
            for impl in impls:
                current = impl.name
                if bar is not None:
                    bar.set_description(f"{case.op} {impl.name} (rank 0 of {world})")
                result = _measure(case, impl, inputs, world, group, request)
                result["max_abs_diff"] = _max_diff(checks[impl.name], checks[GATHER_EAGER])
                emit({"key": case.key, "impl": impl.name, "status": "ok", **result})
                if bar is not None:
                    bar.update(1)
                gc.collect()
            del inputs, small_inputs
        except Exception as exc:  # noqa: BLE001 - reported, then this rank stops
            emit({"key": case.key, "impl": current, "status": "error",
                  "note": f"{type(exc).__name__}: {exc}"[:300]})
            os._exit(1)
    if bar is not None:
        bar.close()
    dist.destroy_process_group()


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
    ranks = run_children("benchmarks.tensor_parallel:rank_worker",
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
