"""Native backend: the C++/OpenMP CPU kernels and the CUDA kernels of ``prefopt_kernels._C``.

A thin bridge: it allocates the fp32 ``[N]`` outputs with torch and hands the extension raw
``data_ptr()``s, shapes, row strides (in elements), a dtype code and, on CUDA, the current
stream as an integer. The extension never links libtorch, so one build serves every PyTorch
version. Inputs arrive already checked by ``prefopt_kernels.ops`` (see
``prefopt_kernels.backends`` for the contract).

Math (per row, ``x = a / T``, ``p = softmax(x)``, ``q = softmax(b / T)``):
``row_max = max a``, ``log_norm = log sum exp((a - row_max) / T)`` (so ``logsumexp(x) =
row_max / T + log_norm``), ``logp = x_y - logsumexp(x)``, ``H = logsumexp(x) - sum p x``,
``div = sum q f(p / q)``; ``S = sum p f'(p / q)`` is kept centred at the policy's argmax
``k`` as ``RowStats`` documents (``div_s = S - f'(t_k)``, ``ref_at_argmax = b_k``; forward
KL ``div_s = -1``); the backward writes

    g_j = [ g_logp (1[j=y] - p_j) - g_ent p_j (log p_j + H) + g_div p_j (f'(t_j) - S) ] / T

in the logits' dtype, computed in fp32 and rounded once.

``beta`` and ``alpha`` cross as Python floats (C++ doubles): the kernels' ``1 - beta``,
``log beta``, ``log(1 - beta)``, ``alpha - 1`` and their inverses are derived from them in
double and rounded to fp32 once (``make_div_params``), so the ``expm1``/``log1p`` forms of js
and alpha stay accurate up to the parameter edges that validation allows.

NaN policy (as every backend): a NaN or ``+inf`` policy logit in a row that is not skipped
makes its ``logp``, ``entropy``, ``div`` and whole gradient row NaN; one in the reference
makes ``ref_logp`` and ``div`` NaN, and the gradient row NaN where the divergence term is
active (weight and ``grad_div`` non-zero); a divergence that is ``+inf`` (supports that
disagree where ``f`` is unbounded) keeps ``div = +inf`` and saves ``div_s = NaN``, so its
active gradient row is NaN. Skipped rows are never read and stay 0.

CPU instruction sets: the CPU kernels are compiled for generic x86-64, AVX2+FMA and AVX-512
and run the widest variant the CPU supports. ``PREFOPT_CPU_ISA=generic|avx2|avx512`` in the
environment (read when this module is imported) or :class:`cpu_isa` picks another; an
unknown name, or a variant this CPU or build cannot run, raises ``ValueError`` naming the
variable or the argument, never falling back. :func:`supported_cpu_isas` lists the choices.

Row states (``prefopt_kernels.backends.row_state``): :func:`fold`, :func:`sweep` and
:func:`slice_backward` run the same kernels over a vocabulary slice ``[v0, v0 + Vs)`` of
every row; the whole-row ops are the slice ``v0 = 0, Vs = V`` (the forward in one call).
:func:`finalize` and :func:`finish_sweep` finish the states of the whole vocabulary, one
launch each.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields
from typing import Optional

import torch

from . import SAVED_STATS, SWEEP_STATS, OpSpec, RowStats, present_stats, row_state

NAME = "native"

try:
    from .. import _C
except ImportError:  # built without the extension (no compiler, or PREFOPT_NO_NATIVE=1)
    _C = None

if _C is not None:
    _C.cpu_isa()  # reads PREFOPT_CPU_ISA now: a bad value fails the import, not a later kernel call

# Element-type codes of csrc/include/prefopt/common.h.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def is_available() -> bool:
    """True when the compiled extension ``prefopt_kernels._C`` imports."""
    return _C is not None


def has_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.has_cuda())


def supports(device: torch.device) -> bool:
    """CPU tensors always (when built); CUDA tensors when the CUDA kernels were compiled."""
    if _C is None:
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and has_cuda()


def supported_cpu_isas() -> list:
    """The CPU instruction-set variants this CPU and build run, widest first.

    A subset of ``["avx512", "avx2", "generic"]`` (``generic`` always); empty without the
    extension.
    """
    return [] if _C is None else list(_C.supported_cpu_isas())


def current_cpu_isa() -> Optional[str]:
    """The variant the CPU kernels run now (``None`` without the extension)."""
    return None if _C is None else _C.cpu_isa()


class cpu_isa(contextlib.AbstractContextManager):
    """Run the native CPU kernels on the instruction-set variant ``isa``.

    ``isa`` is one of :func:`supported_cpu_isas`. Call it to switch, or use it as a context
    manager to switch for a block (the previous variant is restored on exit). The choice is
    process-wide, as ``PREFOPT_CPU_ISA`` is; CUDA kernels are unaffected. An unknown name or
    a variant that cannot run here raises ``ValueError`` naming ``isa``.
    """

    def __init__(self, isa: str):
        if _C is None:
            raise RuntimeError("prefopt_kernels._C is not built: no CPU variant to choose")
        self._previous = _C.cpu_isa()
        _C.set_cpu_isa(isa)

    def __exit__(self, *exc_info):
        _C.set_cpu_isa(self._previous)
        return False


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _strides(t: Optional[torch.Tensor]) -> tuple:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _common(logits: torch.Tensor, labels, ref_logits, weight, spec: OpSpec) -> dict:
    batch, tokens, vocab = logits.shape
    return dict(
        n_rows=batch * tokens,
        tokens=tokens,
        vocab=vocab,
        logits=logits.data_ptr(),
        logits_batch_stride=_strides(logits)[0],
        logits_token_stride=_strides(logits)[1],
        ref=_ptr(ref_logits),
        ref_batch_stride=_strides(ref_logits)[0],
        ref_token_stride=_strides(ref_logits)[1],
        dtype=DTYPE_CODES[logits.dtype],
        labels=_ptr(labels),
        weight=_ptr(weight),
        temperature=float(spec.temperature),  # double on the C++ side: 1/T as the reference
        ignore_index=int(spec.ignore_index),
        divergence=int(spec.divergence) if ref_logits is not None else 0,
        beta=float(spec.beta),
        alpha=float(spec.alpha),
    )


# The prefix of the profiler label of each extension call (``prefopt_kernels::native_fold``, ...):
# they are not aten ops, so a trace would not show them otherwise.
PROFILER_LABEL = "prefopt_kernels::native_"


def _launch(fn_name: str, device: torch.device, **kwargs) -> None:
    with torch.profiler.record_function(PROFILER_LABEL + fn_name):
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device).cuda_stream
            getattr(_C, f"cuda_{fn_name}")(stream=stream, **kwargs)
        else:
            getattr(_C, f"cpu_{fn_name}")(num_threads=torch.get_num_threads(), **kwargs)


def _contiguous(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype).contiguous()


def _saved(stats: RowStats, names) -> dict:
    """The named statistics as contiguous fp32 tensors (``None`` where absent).

    The extension gets raw pointers, so the caller holds this dict until the call returns.
    """
    return {name: _contiguous(getattr(stats, name), torch.float32) for name in names}


def _pointers(tensors: dict, names) -> dict:
    """``{name: data_ptr}`` for the named entries of ``tensors``, 0 where absent."""
    return {name: _ptr(tensors[name]) for name in names}


def forward(logits: torch.Tensor, labels: Optional[torch.Tensor], ref_logits: Optional[torch.Tensor],
            weight: Optional[torch.Tensor], spec: OpSpec) -> RowStats:
    """Per-row statistics of one fused read of ``logits`` (and ``ref_logits``).

    Shapes: ``logits``/``ref_logits`` ``[B, T, V]`` views (fp32/bf16/fp16, vocab stride 1,
    any batch and token strides), ``labels`` ``[N]`` int64 and ``weight`` ``[N]`` fp32 with
    ``N = B * T`` in row-major token order. Returns :class:`RowStats` of fp32 ``[N]``
    tensors; skipped rows hold 0.
    """
    return _forward(logits, labels, ref_logits, weight, spec, 0)[0]


def max_candidates(device: torch.device, entry: str = "forward_with_candidates") -> int:
    """The most candidates per row ``entry`` gathers on ``device`` (0: none): ``_C.MAX_CANDIDATES``
    on CPU for :func:`forward_with_candidates` and :func:`fold_with_candidates`, and for the
    forward on CUDA where the extension was built with its CUDA kernels (the CUDA fold gathers
    none: a sharded call on CUDA reads its rows once more)."""
    kind = torch.device(device).type
    if entry not in ("forward_with_candidates", "fold_with_candidates"):
        raise ValueError(f"entry must be forward_with_candidates or fold_with_candidates, got {entry!r}")
    if _C is None or kind not in ("cpu", "cuda") or (kind == "cuda" and not _C.has_cuda()):
        return 0
    if kind == "cuda" and entry == "fold_with_candidates":
        return 0
    return int(_C.MAX_CANDIDATES)


def forward_with_candidates(logits: torch.Tensor, labels: Optional[torch.Tensor],
                            ref_logits: Optional[torch.Tensor], weight: Optional[torch.Tensor], spec: OpSpec,
                            count: int):
    """:func:`forward` and, from the same read of each row, its ``count`` largest policy logits.

    Returns ``(RowStats, values)``: ``values`` fp32 ``[N, count]``, each row's largest raw logits
    in descending order (the multiset ``torch.topk`` gives), ``-inf`` padded past ``V`` and on
    skipped rows; NaN never enters. CPU or CUDA tensors, ``1 <= count <= max_candidates``.
    """
    return _forward(logits, labels, ref_logits, weight, spec, count)


def _forward(logits, labels, ref_logits, weight, spec: OpSpec, count: int):
    n = logits.shape[0] * logits.shape[1]
    labels = _contiguous(labels, torch.int64)
    weight = _contiguous(weight, torch.float32)

    stats = RowStats.empty(n, present_stats(spec, labels is not None, ref_logits is not None), logits.device)
    values = torch.empty(n, count, dtype=torch.float32, device=logits.device) if count else None
    _launch(
        "forward",
        logits.device,
        **_common(logits, labels, ref_logits, weight, spec),
        want_logp=stats.logp is not None,
        want_ref_logp=stats.ref_logp is not None,
        want_entropy=stats.entropy is not None,
        **_pointers(vars(stats), [f.name for f in fields(RowStats)]),
        candidates=count,
        candidate_values=_ptr(values),
    )
    return stats, values


def backward(logits: torch.Tensor, labels: Optional[torch.Tensor], ref_logits: Optional[torch.Tensor],
             weight: Optional[torch.Tensor], spec: OpSpec, stats: RowStats,
             grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
             grad_div: Optional[torch.Tensor], grad_out: torch.Tensor) -> None:
    """Write d(sum_i g_logp_i logp_i + g_ent_i H_i + g_div_i div_i)/d logits into ``grad_out``.

    ``grad_out`` is a ``[B, T, V]`` view in the logits' dtype with vocab stride 1; it may be
    ``logits`` itself (each element is read before it is written). Every element is written (0 on
    skipped rows). ``grad_*`` are fp32 ``[N]`` or ``None`` (zero); ``div`` is unweighted,
    so ``grad_div`` already carries any weighting, and rows with weight 0 get no divergence
    term. The whole row is the slice ``v0 = 0`` of :func:`slice_backward`, except that an fp32
    gradient's row sums to 0 (softmax is shift invariant): where the policy is peaked
    (``p_k > e^-0.69``, just over 1/2), its argmax entry is written as ``-sum_{j != k} g_j`` from the same pass,
    which is accurate where ``(p_k - q_k) / T`` or ``1 - p_k`` would cancel.
    """
    _backward(logits, labels, ref_logits, weight, spec, stats, grad_logp, grad_entropy, grad_div, grad_out, 0,
              whole_row=True)


# --------------------------------------------------------------------------- kept tokens


def kept_tokens(labels: Optional[torch.Tensor], weight: Optional[torch.Tensor], ignore_index: int, n_tokens: int,
                device) -> tuple:
    """The kept tokens of a fused linear call in one kernel launch: ``(index, summary)``.

    ``index`` int64 ``[N]``: the rows a pass reads (:func:`~prefopt_kernels.backends.kept_rows`:
    label not ``ignore_index``; without labels, a non-zero weight; without either, all) in
    increasing order, then -1. ``summary`` int64 ``[3]`` on ``device``: their count and the least
    and greatest kept label (``NO_KEPT_LABEL``, ``(2**63 - 1, -2**63)``, where no label is
    kept). ``labels`` int64 and ``weight`` fp32 ``[N]`` or ``None``, on ``device`` (CPU: one
    sequential pass; CUDA: one thread block).
    """
    device = torch.device(device)
    labels = _contiguous(labels, torch.int64)
    weight = _contiguous(weight, torch.float32)
    index = torch.empty(n_tokens, dtype=torch.int64, device=device)
    summary = torch.empty(3, dtype=torch.int64, device=device)
    _launch("kept_tokens", device, n_tokens=int(n_tokens), labels=_ptr(labels), weight=_ptr(weight),
            ignore_index=int(ignore_index), index=_ptr(index), summary=_ptr(summary))
    return index, summary


# --------------------------------------------------------------------------- row states


def fold(state: row_state.RowState, logits: torch.Tensor, labels: Optional[torch.Tensor],
         ref_logits: Optional[torch.Tensor], weight: Optional[torch.Tensor], spec: OpSpec,
         v0: int, first_slice: bool = False) -> row_state.RowState:
    """Merge the first-pass state of the vocabulary slice ``[v0, v0 + Vs)`` into ``state`` in
    place (one kernel launch), and return ``state``.

    ``logits``/``ref_logits``: ``[B, T, Vs]`` views of the slice (vocab stride 1, any batch
    and token strides, as :func:`forward`), ``labels`` ``[N]`` int64 global ids or ``None``,
    ``weight`` ``[N]`` fp32 or ``None``; ``state`` a :class:`~row_state.RowState` of ``N``
    rows whose fields are contiguous (fp32, ``argmax`` int64). The kernel runs the forward's
    first pass over the slice, per row with ``u = (a - m_a) / T``: ``m_a``, ``sum exp(u)``,
    the global index ``v0 + j`` of the slice's first max (-1 where ``m_a = -inf``), the raw
    ``a_y``/``b_y`` where ``v0 <= y < v0 + Vs``, the raw ``b`` at that max, and the
    accumulators ``state`` carries (``ent_acc``; ``fkl_acc``/``rkl_acc`` on rows with the
    divergence term, ``rkl_acc`` centred at the slice's own ``b_k``), in double on the CPU;
    its epilogue merges them into the row's running state as :func:`row_state.merge` does
    (``csrc/include/prefopt/fold_state.h``). Rows that are not read are left as they are.
    ``first_slice``: the rows' first slice: ``state`` is not read but taken as
    :func:`row_state.empty`, and every row is written (the empty state where not read), so it
    may come from :func:`row_state.unfilled`; the result is bit-identical to a fold into an
    empty state.
    """
    return _fold(state, logits, labels, ref_logits, weight, spec, v0, 0, first_slice)[0]


def fold_with_candidates(state: row_state.RowState, logits: torch.Tensor, labels: Optional[torch.Tensor],
                         ref_logits: Optional[torch.Tensor], weight: Optional[torch.Tensor], spec: OpSpec, v0: int,
                         count: int):
    """:func:`fold` and, from the same read of the slice, its ``count`` largest policy logits.

    Returns ``(state, values)``: ``values`` fp32 ``[N, count]``, each row's largest raw logits of
    this slice alone (not merged with earlier folds) in descending order, the multiset
    ``torch.topk`` gives, ``-inf`` padded past the slice's width and on skipped rows; NaN never
    enters. CPU tensors, ``1 <= count <= max_candidates``; a slice of width 0 gives all ``-inf``.
    """
    return _fold(state, logits, labels, ref_logits, weight, spec, v0, count)


def _fold(state, logits, labels, ref_logits, weight, spec: OpSpec, v0: int, count: int, first_slice: bool = False):
    labels = _contiguous(labels, torch.int64)
    weight = _contiguous(weight, torch.float32)
    names = [f.name for f in fields(row_state.RowState)]
    for name, field in state.tensors().items():
        if not field.is_contiguous():
            raise ValueError(f"fold: state.{name} must be contiguous (the kernel updates it in place)")
    has_ref = state.ref_max is not None
    n = logits.shape[0] * logits.shape[1]
    values = torch.empty(n, count, dtype=torch.float32, device=logits.device) if count else None
    _launch("fold", logits.device, **_common(logits, labels, ref_logits if has_ref else None, weight, spec),
            v0=int(v0), first_slice=int(first_slice), **_pointers(vars(state), names), candidates=count,
            candidate_values=_ptr(values))
    return state, values


def sweep(stats: RowStats, logits: torch.Tensor, ref_logits: torch.Tensor, labels: Optional[torch.Tensor],
          weight: Optional[torch.Tensor], spec: OpSpec, v0: int, value_sum: torch.Tensor, centred_sum: torch.Tensor,
          first_slice: bool = False):
    """The second sweep over one vocabulary slice, its sums added into ``value_sum`` and
    ``centred_sum`` in place (one kernel launch); returns ``(value_sum, centred_sum)``.

    For js/tv/hellinger/chi2/alpha, with ``log p = (a - row_max) / T - log_norm``, ``log q``
    likewise and ``k`` the whole row's policy argmax (``ref_at_argmax = b_k``), the slice's
    ``sum_j q_j f(t_j)`` and ``sum_j p_j (f'(t_j) - f'(t_k))``, from the final ``stats`` of
    :func:`row_state.finalize`, 0 on rows without the divergence term; every row becomes
    ``acc = (first_slice ? 0 : acc) + slice sum`` in fp32, bit for bit the slices' sums added
    into zero-filled accumulators in slice order. ``value_sum``/``centred_sum``: contiguous fp32
    ``[N]``; with ``first_slice`` they are not read, so they may come from ``torch.empty``.
    ``logits``/``ref_logits`` ``[B, T, Vs]`` slice views as in :func:`fold`. ``v0`` is not
    needed (nothing here depends on global indices); it keeps the interface.
    """
    device = logits.device
    row_state.check_sweep_sums(value_sum, centred_sum, stats.log_norm.shape[0], device)
    labels = _contiguous(labels, torch.int64)
    weight = _contiguous(weight, torch.float32)
    inputs = _saved(stats, SWEEP_STATS)
    _launch("sweep", device, **_common(logits, labels, ref_logits, weight, spec),
            **_pointers(inputs, SWEEP_STATS), first_slice=int(first_slice), value_sum=_ptr(value_sum),
            centred_sum=_ptr(centred_sum))
    return value_sum, centred_sum


def slice_backward(logits: torch.Tensor, labels: Optional[torch.Tensor], ref_logits: Optional[torch.Tensor],
                   weight: Optional[torch.Tensor], spec: OpSpec, stats: RowStats,
                   grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                   grad_div: Optional[torch.Tensor], grad_out: torch.Tensor, v0: int) -> None:
    """The gradient of the vocabulary slice ``[v0, v0 + Vs)`` from the whole row's statistics.

    ``g_j = [g_logp (1[j = y] - p_j) - g_ent p_j (log p_j + H) + g_div p_j (f'(t_j) - S)] / T``
    for the slice's entries (``S`` centred as ``RowStats`` documents; forward KL
    ``p_j - q_j``), the label's indicator only where ``v0 <= y < v0 + Vs`` (at ``y - v0``);
    the same kernel, skip rules and NaN guards as :func:`backward`, which is ``v0 = 0``.
    ``logits``/``ref_logits``/``grad_out``: ``[B, T, Vs]`` slice views (``grad_out`` in the
    logits' dtype, may alias ``logits``); ``labels`` global ids; ``stats`` fp32 ``[N]``.
    """
    _backward(logits, labels, ref_logits, weight, spec, stats, grad_logp, grad_entropy, grad_div, grad_out, v0,
              whole_row=False)


def _backward(logits, labels, ref_logits, weight, spec: OpSpec, stats: RowStats, grad_logp, grad_entropy, grad_div,
              grad_out, v0: int, whole_row: bool) -> None:
    labels = _contiguous(labels, torch.int64)
    weight = _contiguous(weight, torch.float32)
    saved = _saved(stats, SAVED_STATS)
    g_logp, g_ent, g_div = (_contiguous(g, torch.float32) for g in (grad_logp, grad_entropy, grad_div))
    _launch(
        "backward",
        logits.device,
        **_common(logits, labels, ref_logits, weight, spec),
        **_pointers(saved, SAVED_STATS),
        grad_logp=_ptr(g_logp if labels is not None else None),
        grad_entropy=_ptr(g_ent if saved["entropy"] is not None else None),
        grad_div=_ptr(g_div if ref_logits is not None and saved["div_s"] is not None else None),
        grad=grad_out.data_ptr(),
        grad_batch_stride=grad_out.stride(0),
        grad_token_stride=grad_out.stride(1),
        v0=int(v0),
        whole_row=int(whole_row),
    )


def _finish_inputs(n: int, labels, weight, spec: OpSpec, has_ref: bool) -> dict:
    """The row inputs of the finishing entry points: the rows' rules, no logits."""
    return dict(n_rows=n, labels=_ptr(labels), weight=_ptr(weight), temperature=float(spec.temperature),
                ignore_index=int(spec.ignore_index), divergence=int(spec.divergence) if has_ref else 0)


def finalize(state: row_state.RowState, labels: Optional[torch.Tensor], weight: Optional[torch.Tensor],
             spec: OpSpec, every_row_read: bool = False) -> RowStats:
    """The forward's :class:`RowStats` from the state of the whole vocabulary, in one launch.

    :func:`row_state.finalize`'s math and rules per row (``csrc/include/prefopt/finalize_state.h``):
    ``row_max = m_a`` (0 for ``-inf``), ``log_norm = log Z_a``, ``logp = (a_y - row_max) / T -
    log_norm``, ``entropy = log_norm - ent_acc / Z_a``, the reference's likewise, and forward /
    reverse KL's ``div`` and ``div_s`` complete (a second-sweep divergence's are left to
    :func:`finish_sweep`); the NaN guards; rows not read hold 0, and the divergence's fields 0
    where its weight is 0. In double on the CPU, in fp32 with the forward's ``fast_log`` on CUDA.
    ``state``: contiguous fp32 ``[N]`` fields; ``labels`` ``[N]`` int64 or ``None``, ``weight``
    ``[N]`` fp32 or ``None``. A centred divergence's ``ref_at_argmax`` statistic is the state's
    own field, masked in place (the state is spent). ``every_row_read``: the caller knows that
    no row is skipped.
    """
    labels = _contiguous(labels, torch.int64)
    weight = _contiguous(weight, torch.float32)
    n, has_ref = state.max.shape[0], state.ref_max is not None

    def launch(stats: RowStats) -> None:
        _launch("finalize", state.max.device, **_finish_inputs(n, labels, weight, spec, has_ref),
                every_row_read=int(every_row_read),
                **_pointers(vars(state), [f.name for f in fields(row_state.RowState)]),
                **_pointers(vars(stats), [f.name for f in fields(RowStats) if f.name != "ref_at_argmax"]))

    return row_state.finalize_launch(state, labels is not None, spec, launch)


def finish_sweep(stats: RowStats, value_sum: torch.Tensor, centred_sum: torch.Tensor,
                 labels: Optional[torch.Tensor], weight: Optional[torch.Tensor], spec: OpSpec,
                 every_row_read: bool = False) -> RowStats:
    """A second-sweep divergence completed from the summed sweeps, in one launch: ``stats`` with
    ``div = value_sum`` plus the NaN guards of ``log_norm`` and ``ref_log_norm``, ``div_s =
    centred_sum`` (NaN where ``div`` is not finite), both 0 where the divergence's term is off, as
    :func:`row_state.finish_sweep`. ``value_sum``, ``centred_sum``: fp32 ``[N]``.
    """
    n, device = value_sum.shape[0], value_sum.device
    labels = _contiguous(labels, torch.int64)
    weight = _contiguous(weight, torch.float32)
    inputs = {"log_norm": stats.log_norm, "ref_log_norm": stats.ref_log_norm,
              "value_sum": value_sum, "centred_sum": centred_sum}
    inputs = {name: _contiguous(value, torch.float32) for name, value in inputs.items()}
    stats.div = torch.empty(n, dtype=torch.float32, device=device)
    stats.div_s = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        _launch("finish_sweep", device, **_finish_inputs(n, labels, weight, spec, True),
                every_row_read=int(every_row_read), **_pointers(inputs, list(inputs)),
                div=_ptr(stats.div), div_s=_ptr(stats.div_s))
    return stats
