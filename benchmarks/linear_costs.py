"""``python -m benchmarks.linear_costs``: the host-side launches and the workspace of a fused linear call.

Counted with ``torch.profiler`` on the CPU, so the numbers hold without a GPU and do not
depend on timing:

* **launches**: the aten ops at the top level of dispatch (an ``aten::`` event with no
  ``aten::`` ancestor: the op the Python code called, not what it calls inside) that would
  each launch work on a GPU: an op counts when it, or an aten op it calls, is not in
  :data:`NON_LAUNCH_OPS` (views, metadata and allocations from the caching allocator). A
  no-op ``.to(same dtype)`` therefore does not count, a ``.to`` that copies does.
* **gemms**: the launches whose op, or an op it calls, is a matrix product (:data:`GEMM_OPS`).
* **kernels**: the native backend's kernel calls (``fold``, ``sweep``, ``backward`` per tile;
  ``kept_tokens``, ``finalize`` and, for a second sweep, ``finish_sweep`` once per call), which
  go through pybind and are not aten ops: counted by their profiler labels
  (``native.PROFILER_LABEL``).
* **workspace**: the peak of the bytes allocated (the profiler's memory events, summed in
  order) over the call, less the bytes of the gradients it returns.

The default run is the shape of the fused-linear cost check: N=1024, H=256, V=32000 fp32 with
a 4 MiB ``memory_budget`` for launches, and N=4096, H=1024, V=32000 bf16 with the default
budget for the backward's workspace.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Callable, Dict, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from prefopt_kernels.backends import native

NON_LAUNCH_OPS = frozenset(
    f"aten::{name}" for name in (
        "view", "_unsafe_view", "reshape", "_reshape_alias", "slice", "select", "t", "transpose",
        "unsqueeze", "squeeze", "expand", "expand_as", "as_strided", "permute", "alias", "detach",
        "detach_", "narrow", "split", "split_with_sizes", "unbind", "chunk", "flatten", "unflatten",
        "view_as", "lift_fresh", "resolve_conj", "resolve_neg", "to", "contiguous", "numpy_T",
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_",
        "requires_grad_", "result_type", "_has_compatible_shallow_copy_type",
    )
)
GEMM_OPS = frozenset(f"aten::{name}" for name in ("mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul"))


def _subtree_names(event):
    """The names of ``event`` and of the aten ops it calls, at any depth."""
    yield event.name
    for child in event.cpu_children:
        if child.name.startswith("aten::"):
            yield from _subtree_names(child)


def _has_aten_ancestor(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def launched_ops(call: Callable[[], object]) -> Tuple[Counter, int, int]:
    """``(others, gemms, kernels)`` of one run of ``call`` (see the module docstring): the launches
    that are not GEMMs counted by op name (``"sum"`` for ``aten::sum``), the GEMM launches and the
    native kernel calls."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    others, gemms, kernels = Counter(), 0, 0
    for event in prof.events():
        kernels += event.name.startswith(native.PROFILER_LABEL)
        if not event.name.startswith("aten::") or _has_aten_ancestor(event):
            continue
        names = set(_subtree_names(event))
        if names <= NON_LAUNCH_OPS:
            continue
        if names & GEMM_OPS:
            gemms += 1
        else:
            others[event.name[len("aten::"):]] += 1
    return others, gemms, kernels


def launch_counts(call: Callable[[], object]) -> Dict[str, int]:
    """``{"launches", "gemms", "kernels"}`` of one run of ``call`` (see the module docstring)."""
    others, gemms, kernels = launched_ops(call)
    return {"launches": sum(others.values()) + gemms, "gemms": gemms, "kernels": kernels}


def peak_allocated_bytes(call: Callable[[], object]) -> int:
    """The peak, over one run of ``call``, of the bytes allocated since it started (frees of
    older tensors count against it)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    total = peak = 0
    for event in events:
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def linear_call(op: str, n: int, hidden: int, vocab: int, dtype: torch.dtype, budget: int, seed: int = 0):
    """``(forward, tensors)``: a closure running ``op`` (``logprobs``, ``terms:<divergence>``)
    on random inputs and returning the loss, and the tensors that receive gradients."""
    import prefopt_kernels as pk

    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hidden, generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    if op == "logprobs":
        return (lambda: pk.linear_token_logprobs(h, w, labels, memory_budget=budget).sum()), (h, w)
    divergence = op.split(":", 1)[1]
    h_ref = (torch.randn(n, hidden, generator=g) * 0.5).to(dtype)
    w_ref = (w.detach() + 0.01 * torch.randn(vocab, hidden, generator=g).to(dtype))

    def forward():
        terms = pk.linear_token_terms(h, w, labels, h_ref, w_ref, divergence=divergence, memory_budget=budget)
        return terms.logp.sum() + terms.div.sum()
    return forward, (h, w)


def step_counts(op: str, n: int, hidden: int, vocab: int, dtype: torch.dtype, budget: int) -> Dict[str, int]:
    """:func:`launch_counts` of one forward and backward of :func:`linear_call`."""
    forward, _ = linear_call(op, n, hidden, vocab, dtype, budget)
    return launch_counts(lambda: forward().backward())


def step_ops(op: str, n: int, hidden: int, vocab: int, dtype: torch.dtype, budget: int) -> Tuple[Counter, int, int]:
    """:func:`launched_ops` of one forward and backward of :func:`linear_call`."""
    forward, _ = linear_call(op, n, hidden, vocab, dtype, budget)
    return launched_ops(lambda: forward().backward())


def backward_workspace(op: str, n: int, hidden: int, vocab: int, dtype: torch.dtype, budget: int) -> int:
    """The backward's peak allocation above the gradients it produces, in bytes."""
    forward, leaves = linear_call(op, n, hidden, vocab, dtype, budget)
    loss = forward()
    peak = peak_allocated_bytes(loss.backward)
    return peak - sum(t.grad.numel() * t.grad.element_size() for t in leaves)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.linear_costs", description=__doc__.split("\n")[0])
    p.add_argument("--ops", default="logprobs,terms:forward_kl,terms:js")
    p.add_argument("--no-workspace", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    print("launches per forward + backward, fp32, N=1024 H=256 V=32000, memory_budget 4 MiB")
    print(f"{'op':<18} {'launches':>8} {'gemms':>6} {'kernels':>8} {'others per gemm':>15} {'all per gemm':>12}")
    for op in args.ops.split(","):
        c = step_counts(op, 1024, 256, 32000, torch.float32, 4 << 20)
        others = c["launches"] - c["gemms"] + c["kernels"]
        print(f"{op:<18} {c['launches']:>8} {c['gemms']:>6} {c['kernels']:>8} {others / c['gemms']:>15.3f} "
              f"{(c['launches'] + c['kernels']) / c['gemms']:>12.3f}")
    if args.no_workspace:
        return
    print("backward workspace above the gradients, N=4096 H=1024 V=32000, default memory_budget (64 MiB)")
    for dtype in (torch.bfloat16, torch.float32):
        peak = backward_workspace("logprobs", 4096, 1024, 32000, dtype, 64 << 20)
        print(f"logprobs {str(dtype):<16} {peak / 2 ** 20:8.1f} MiB "
              f"(bound: budget + 16 N H = {(64 << 20) + 16 * 4096 * 1024:,} bytes = "
              f"{((64 << 20) + 16 * 4096 * 1024) / 2 ** 20:.0f} MiB)")


if __name__ == "__main__":
    main()
