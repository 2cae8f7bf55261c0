"""One rank of the tensor-parallel benchmark (``tensor_parallel``): a child process each.

:func:`rank_worker`, the child's entry, joins the gloo group and runs every case on this
rank's shard of the inputs (:func:`shard_inputs`): the package's op with ``process_group=``,
and the baselines that gather the logits first. For each implementation it checks the outputs
and gradient against ``gather+eager``'s on a small copy of the case, then measures one call's
peak resident memory and the collectives it made (:func:`recording_collectives`), and times
calls with the ranks in step; one JSON line per result goes back to the parent.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist

from . import report
from .cases import Case, make_inputs
from .child_process import emit
from .implementations import Impl, eager_forward, prefopt_forward
from .measure import rss_peak_bytes, time_cpu, timed
from .runner import GEMM_BOUND_MIN_REPS, Runnable, above_grads
from .tensor_parallel import GATHER, GATHER_EAGER, rank_case

# The logits op a linear op's gathered logits go through.
LOGITS_OP_OF = {"linear:logprobs": "logprobs", "linear:terms": "terms:forward_kl"}
# Fewest timed calls of a logits op (the memory-measured call among them); a linear op's
# follow the suite's GEMM_BOUND_MIN_REPS. Gathering [N, V] over gloo takes seconds per call.
MIN_REPS = 2


# --------------------------------------------------------------------------------------------
# this rank's inputs


def shard_range(v: int, rank: int, world: int) -> tuple:
    """``(v0, v1)``: this rank's columns of an evenly split vocabulary of ``v`` entries."""
    width = v // world
    return rank * width, (rank + 1) * width


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


# --------------------------------------------------------------------------------------------
# the implementations: the sharded op and the gathering baselines


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


def rank_implementations(backends: Sequence[str], group, rank: int, world: int) -> List[Impl]:
    """The implementations of ``tensor_parallel.impl_names(backends)``, in that order, for
    this rank."""
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
    impls = rank_implementations(request["backends"], group, rank, world)
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
