"""Pure-PyTorch backend computed in float64: the oracle of the tests and the last fallback.

It is written from the math (``log_softmax``, ``gather``, the divergence generators of
``prefopt_kernels.divergences``) and takes its gradients from autograd with respect to the
log-probabilities, chained through the softmax by its Jacobian, so it shares no code path
with the fused kernels' hand-derived backward. It materialises ``[N, V]``
float64 tensors: correct everywhere, fast nowhere.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from ..divergences import GENERATORS, Divergence
from . import NO_KEPT_LABEL, OpSpec, RowStats, kept_rows, nan_guard, row_state, rows_read

NAME = "reference"


def is_available() -> bool:
    """Always: plain PyTorch."""
    return True


def supports(device: torch.device) -> bool:
    """Every device PyTorch runs on."""
    return True


def kept_tokens(labels: Optional[torch.Tensor], weight: Optional[torch.Tensor], ignore_index: int, n_tokens: int,
                device):
    """The rows a pass reads (:func:`~prefopt_kernels.backends.kept_rows`) as a fused linear call
    keeps them: ``(index, summary)``, ``index`` int64 ``[N]`` their indices in increasing order
    then -1, ``summary`` int64 ``[3]`` their count ``n`` and the least and greatest of their
    labels (``NO_KEPT_LABEL``, ``(2**63 - 1, -2**63)``, without labels or with ``n = 0``).
    ``labels`` int64 ``[N]`` or ``None``, ``weight`` fp32 ``[N]`` or ``None``; on ``device``."""
    kept = kept_rows(labels, weight, ignore_index, n_tokens, device).nonzero().reshape(-1)
    index = torch.full((n_tokens,), -1, dtype=torch.int64, device=device)
    index[:kept.numel()] = kept
    span = torch.tensor(NO_KEPT_LABEL, dtype=torch.int64, device=device)
    if labels is not None and kept.numel():
        span = torch.stack(torch.aminmax(labels[kept]))
    count = torch.tensor([kept.numel()], dtype=torch.int64, device=device)
    return index, torch.cat([count, span])


def evaluate(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    ref_logits: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    spec: OpSpec,
    policy: Optional[tuple] = None,
    div_upstream: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Every per-row quantity of ``spec`` in float64, differentiable with respect to ``logits``.

    A given ``policy``, ``(log_p, row_max, log_norm)`` of :func:`_log_softmax` over the read
    rows, stands in for the policy's own: :func:`gradient` differentiates with respect to its
    ``log_p``.
    ``div_upstream`` (``[N]``): rows where it is 0 feed the divergence generator finite
    stand-ins, so that a NaN reference row cannot leak into a gradient that ignores it.

    Shapes: ``logits``/``ref_logits`` ``[..., V]`` flattened to ``[N, V]`` (any float dtype,
    promoted to float64),
    ``labels`` ``[N]`` integer, ``weight`` ``[N]``. Returns a dict of ``[N]`` float64 tensors:
    ``row_max``, ``log_norm``, ``logp``, ``entropy``, ``ref_row_max``, ``ref_log_norm``,
    ``ref_logp``, ``div``, ``div_s`` (those the spec asks for). Skipped rows (ignored label, or zero weight for the divergence terms)
    hold 0. ``row_max``/``log_norm`` split the log-sum-exp as documented on ``RowStats``.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    if ref_logits is not None:
        ref_logits = ref_logits.reshape(-1, ref_logits.shape[-1])
    n = logits.shape[0]
    device = logits.device
    read, div_active = rows_read(labels, weight, spec, n, device)
    inv_temperature = 1.0 / spec.temperature

    def row_log_softmax(x: torch.Tensor, rows: torch.Tensor, prefix: str, given: Optional[tuple] = None):
        log_probs, row_max, log_norm = _log_softmax(x, rows, inv_temperature) if given is None else given
        out[prefix + "row_max"] = torch.where(rows, row_max, zero)
        out[prefix + "log_norm"] = torch.where(rows, log_norm, zero)
        return log_probs

    zero = torch.zeros(n, dtype=torch.float64, device=device)
    out: Dict[str, torch.Tensor] = {}
    log_p = row_log_softmax(logits, read, "", policy)
    safe_labels = None
    if labels is not None:
        # Clamped: a label the op's range check did not see (graph capture) must not index out of bounds.
        safe_labels = torch.where(read, labels, torch.zeros_like(labels)).long().clamp(0, logits.shape[1] - 1)
    if spec.want_logp:
        out["logp"] = torch.where(read, log_p.gather(1, safe_labels[:, None])[:, 0], zero)
    if spec.want_entropy:
        p = torch.exp(log_p)
        plogp = torch.where(p > 0, p * torch.where(p > 0, log_p, torch.zeros_like(log_p)), torch.zeros_like(log_p))
        out["entropy"] = torch.where(read, -plogp.sum(-1), zero)
    if ref_logits is not None:
        log_q = row_log_softmax(ref_logits.detach(), read, "ref_")
        if spec.want_ref_logp:
            out["ref_logp"] = torch.where(read, log_q.gather(1, safe_labels[:, None])[:, 0], zero)
        if spec.divergence:
            # Rows without a divergence see a harmless stand-in, so no inf reaches autograd there.
            # Rows whose divergence gets no upstream gradient must not carry a NaN reference
            # into autograd (0 * NaN): their generator sees the stand-in too.
            active = (div_active if div_upstream is None else div_active & (div_upstream != 0))[:, None]
            value, slope = GENERATORS[spec.divergence](
                torch.where(active, log_p, torch.zeros_like(log_p)),
                torch.where(active, log_q, torch.zeros_like(log_q)),
                spec.beta, spec.alpha,
            )
            out["div"] = torch.where(div_active, value.sum(-1), zero)
            out["div_s"] = torch.where(div_active, slope.sum(-1), zero)
            # NaN/+inf in either row makes the divergence NaN, whatever the generator kept.
            guard = nan_guard(out["log_norm"]) + nan_guard(out["ref_log_norm"])
            out["div"] = torch.where(div_active, out["div"] + guard, zero)
            if Divergence(spec.divergence).centred:
                # Centred at the policy's argmax k, as RowStats documents: S - f'(t_k).
                k = logits.detach().argmax(-1, keepdim=True)
                fprime_k = (slope.gather(1, k) / torch.exp(log_p.gather(1, k)))[:, 0]
                out["div_s"] = torch.where(div_active, out["div_s"] - fprime_k, zero)
                out["ref_at_argmax"] = torch.where(div_active, ref_logits.to(torch.float64).gather(1, k)[:, 0], zero)
            # An infinite or NaN divergence has no gradient: S is NaN there (see RowStats).
            out["div_s"] = torch.where(torch.isfinite(out["div"].detach()), out["div_s"], math.nan)
    guard = nan_guard(out["log_norm"])
    for key in ("logp", "entropy"):
        if key in out:
            out[key] = out[key] + guard
    if "ref_logp" in out:
        out["ref_logp"] = out["ref_logp"] + nan_guard(out["ref_log_norm"])
    return out



def _log_softmax(x: torch.Tensor, rows: torch.Tensor, inv_temperature: float):
    """``(log_softmax(x / T), row_max, log_norm)`` in float64 over the rows where ``rows`` is True.

    Skipped rows may hold anything (even all -inf); they never reach the math.
    """
    x = torch.where(rows[:, None], x.to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    row_max = x.detach().amax(-1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    # Raw differences first, then 1/T: exact at a tiny T, where x/T alone would round away.
    shifted = (x - row_max[:, None]) * inv_temperature
    log_norm = torch.logsumexp(shifted, dim=-1)
    return shifted - log_norm[:, None], row_max, log_norm


def forward(logits, labels, ref_logits, weight, spec: OpSpec) -> RowStats:
    """:func:`evaluate` without autograd, rounded to the fp32 :class:`RowStats` of every backend."""
    with torch.no_grad():
        rows = evaluate(logits, labels, ref_logits, weight, spec)
    return RowStats(**{k: v.to(torch.float32) for k, v in rows.items()})


def softmax_input_grad(grad_log_p: torch.Tensor, log_p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Chain ``g = dL/dlog p`` through ``log p = log_softmax(a / T)``: ``(g_j - p_j sum_i g_i) / T``.

    At the argmax ``k`` the plain form cancels (``1 - p_k`` can be far below float64's
    resolution for a peaked row), so ``g_k (1 - p_k) - p_k sum_{i != k} g_i`` is formed with
    ``1 - p_k = sum_{i != k} p_i`` taken as a log-sum-exp of the other entries.
    """
    p = torch.exp(log_p)
    grad = grad_log_p - p * grad_log_p.sum(-1, keepdim=True)
    k = log_p.argmax(-1, keepdim=True)
    at_k = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, k, True)
    others_p = torch.exp(torch.logsumexp(log_p.masked_fill(at_k, -math.inf), -1, keepdim=True))
    others_g = grad_log_p.masked_fill(at_k, 0.0).sum(-1, keepdim=True)
    grad_k = grad_log_p.gather(-1, k) * others_p - p.gather(-1, k) * others_g
    return grad.scatter(-1, k, grad_k) / temperature


def gradient(logits, labels, ref_logits, weight, spec: OpSpec, upstream: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Float64 ``dL/dlogits`` for ``L = sum_k sum_n upstream[k]_n * out[k]_n``, shape ``[N, V]``.

    ``torch.func.grad`` gives ``dL/dlog p`` (where each output is elementwise in ``log p``);
    :func:`softmax_input_grad` takes it through the softmax without cancellation. No
    autograd graph is recorded, so this also runs inside a registered op's implementation.
    """
    g_div = upstream.get("div")
    options = dict(div_upstream=None if g_div is None else g_div.reshape(-1))
    logits = logits.detach().reshape(-1, logits.shape[-1])
    read, _ = rows_read(labels, weight, spec, logits.shape[0], logits.device)
    log_p, row_max, log_norm = _log_softmax(logits, read, 1.0 / spec.temperature)

    def total_of(log_p):
        rows = evaluate(logits, labels, ref_logits, weight, spec, policy=(log_p, row_max, log_norm), **options)
        total = log_p.new_zeros(())
        for key, g in upstream.items():
            if g is not None and key in rows:
                g = g.to(torch.float64).reshape(-1)
                # A zero upstream gradient must not meet an infinite value (0 * inf = NaN).
                total = total + torch.where(g != 0, g * rows[key], torch.zeros_like(g)).sum()
        return total, rows

    grad_log_p, rows = torch.func.grad(total_of, has_aux=True)(log_p)
    grad = softmax_input_grad(grad_log_p, log_p, spec.temperature)
    bad = _undefined_gradient(rows["log_norm"].detach(), rows.get("div_s"), upstream.get("div"))
    return torch.where(bad[:, None], math.nan, grad)


def _undefined_gradient(log_norm: torch.Tensor, div_s: Optional[torch.Tensor], grad_div) -> torch.Tensor:
    """``[N]`` bool, the rows whose gradient is NaN by the policy of ``prefopt_kernels.ops``.

    A row that is read (``log_norm`` is 0 on rows that are not) with a NaN or ``+inf``
    policy logit; a row whose divergence term is used (``div_s`` is 0 where it is not, and
    the upstream gradient is nonzero) while ``div_s`` is NaN: a NaN/``+inf`` reference logit
    or an infinite divergence.
    """
    bad = ~torch.isfinite(log_norm)
    if grad_div is not None and div_s is not None:
        bad = bad | (torch.isnan(div_s.detach()) & (grad_div.reshape(-1) != 0))
    return bad


def backward(logits, labels, ref_logits, weight, spec: OpSpec, stats: RowStats,
             grad_logp, grad_entropy, grad_div, grad_out) -> None:
    """:func:`gradient` of the three per-token outputs, written into ``grad_out`` in its dtype."""
    grad = gradient(logits, labels, ref_logits, weight, spec,
                    {"logp": grad_logp, "entropy": grad_entropy, "div": grad_div})
    grad_out.copy_(grad.view(grad_out.shape))



# --------------------------------------------------------------------------- row states


def fold(state: row_state.RowState, logits, labels, ref_logits, weight, spec: OpSpec, v0: int,
         first_slice: bool = False):
    """Merge the first-pass state of the slice ``[v0, v0 + Vs)`` of every row into ``state`` in
    place (:func:`row_state.merge_into`), and return ``state``; ``first_slice``: into the empty
    state, whatever ``state`` holds (it may come from :func:`row_state.unfilled`).

    ``logits``/``ref_logits``: ``[..., Vs]`` slices (flattened to ``[N, Vs]``); ``labels``
    ``[N]`` global ids. The slice's state is formed in float64 and rounded to the state's
    dtype before the merge.
    """
    n, width = state.max.shape[0], logits.shape[-1]
    x = logits.reshape(n, width).to(torch.float64)
    y = None if ref_logits is None else ref_logits.reshape(n, width).to(torch.float64)
    read, div_on = rows_read(labels, weight, spec, n, state.max.device)
    inv_temperature = 1.0 / spec.temperature
    x = torch.where(read[:, None], x, -math.inf)
    dtype = state.max.dtype

    def distribution(z):
        m = z.amax(-1) if width else torch.full((n,), -math.inf, dtype=torch.float64, device=z.device)
        m_s = torch.where(m == -math.inf, 0.0, m)
        u = (z - m_s[:, None]) * inv_temperature
        e = torch.exp(u)
        return m, u, e, e.sum(-1)

    m, u, e, z = distribution(x)
    argmax = torch.where(m > -math.inf, x.argmax(-1) + v0 if width else -1, -1)
    local_label = None
    if labels is not None:
        owned = read & (labels >= v0) & (labels < v0 + width)
        local_label = torch.where(owned, labels - v0, 0)[:, None]
    piece = row_state.RowState(max=m.to(dtype), sum_exp=z.to(dtype), argmax=argmax,
                               label_logit=torch.zeros(n, dtype=dtype, device=x.device))
    if local_label is not None and width:
        piece.label_logit = torch.where(owned, x.gather(1, local_label)[:, 0], 0.0).to(dtype)
    if state.ent_acc is not None:
        piece.ent_acc = torch.where(e > 0, e * u, 0.0).sum(-1).to(dtype)
    if y is not None:
        y = torch.where(read[:, None], y, -math.inf)
        mb, ub, eb, zb = distribution(y)
        piece.ref_max, piece.ref_sum_exp = mb.to(dtype), zb.to(dtype)
        piece.ref_label_logit = torch.zeros(n, dtype=dtype, device=x.device)
        if local_label is not None and width:
            piece.ref_label_logit = torch.where(owned, y.gather(1, local_label)[:, 0], 0.0).to(dtype)
        if state.ref_at_argmax is not None:
            ref_at_argmax = (y.gather(1, torch.clamp(argmax - v0, min=0)[:, None])[:, 0] if width
                             else torch.zeros(n, dtype=torch.float64, device=x.device))
            piece.ref_at_argmax = torch.where(argmax >= 0, ref_at_argmax, 0.0).to(dtype)
        if state.fkl_acc is not None:
            piece.fkl_acc = torch.where(div_on[:, None] & (eb > 0), eb * (ub - u), 0.0).sum(-1).to(dtype)
        if state.rkl_acc is not None:
            centre = torch.where(piece.ref_at_argmax == -math.inf, 0.0, piece.ref_at_argmax.to(torch.float64))
            rel = u - (y - centre[:, None]) * inv_temperature
            piece.rkl_acc = torch.where(div_on[:, None] & (e > 0), e * rel, 0.0).sum(-1).to(dtype)
    if first_slice:
        row_state.reset(state)
    return row_state.merge_into(state, piece, spec)


def finalize(state: row_state.RowState, labels, weight, spec: OpSpec, every_row_read: bool = False) -> RowStats:
    """The forward's :class:`RowStats` from the state of the whole vocabulary: :func:`row_state.finalize`
    (torch ops in the state's dtype)."""
    return row_state.finalize(state, labels, weight, spec, every_row_read)


def finish_sweep(stats: RowStats, value_sum, centred_sum, labels, weight, spec: OpSpec,
                 every_row_read: bool = False) -> RowStats:
    """A second-sweep divergence completed from the summed sweeps: :func:`row_state.finish_sweep`."""
    return row_state.finish_sweep(stats, value_sum, centred_sum, labels, weight, spec, every_row_read)


def _log_probs(x, shift, offset, inv_temperature):
    return (x - shift[:, None].to(torch.float64)) * inv_temperature - offset[:, None].to(torch.float64)


def _fprime_at_argmax(stats: RowStats, spec: OpSpec):
    """``f'(t_k)`` per row from ``log p_k = -log_norm`` and ``log q_k`` at the saved ``b_k``."""
    inv_temperature = 1.0 / spec.temperature
    lp_k = -stats.log_norm.to(torch.float64)[:, None]
    lq_k = _log_probs(stats.ref_at_argmax.to(torch.float64)[:, None], stats.ref_row_max, stats.ref_log_norm,
                      inv_temperature)
    _, slope_k = GENERATORS[spec.divergence](lp_k, lq_k, spec.beta, spec.alpha)
    return (slope_k / torch.exp(lp_k))[:, 0]


def sweep(stats: RowStats, logits, ref_logits, labels, weight, spec: OpSpec, v0: int, value_sum, centred_sum,
          first_slice: bool = False):
    """The second sweep over one slice: ``sum q f(t)`` and ``sum p (f'(t) - f'(t_k))`` per row in
    float64, added into ``value_sum`` and ``centred_sum`` (``[N]``, any floating dtype: float64
    keeps the sums exact) as ``acc = (first_slice ? 0 : acc) + sum`` (:func:`row_state.add_sweep_sums`);
    returns them.

    Needs the final ``row_max``, ``log_norm``, ``ref_row_max``, ``ref_log_norm`` and
    ``ref_at_argmax`` of :func:`row_state.finalize`. Rows without the divergence add 0.
    """
    n, width = stats.log_norm.shape[0], logits.shape[-1]
    _, div_on = rows_read(labels, weight, spec, n, stats.log_norm.device)
    inv_temperature = 1.0 / spec.temperature
    on = div_on[:, None]
    lp = _log_probs(logits.reshape(n, width).to(torch.float64), stats.row_max, stats.log_norm, inv_temperature)
    lq = _log_probs(ref_logits.reshape(n, width).to(torch.float64), stats.ref_row_max, stats.ref_log_norm,
                    inv_temperature)
    lp, lq = torch.where(on, lp, 0.0), torch.where(on, lq, 0.0)
    value, slope = GENERATORS[spec.divergence](lp, lq, spec.beta, spec.alpha)
    centred = slope - torch.exp(lp) * _fprime_at_argmax(stats, spec)[:, None]
    centred = torch.where(lp > -math.inf, centred, 0.0)
    return row_state.add_sweep_sums(value_sum, centred_sum, torch.where(on, value, 0.0).sum(-1),
                                    torch.where(on, centred, 0.0).sum(-1), first_slice)


def slice_backward(logits, labels, ref_logits, weight, spec: OpSpec, stats: RowStats,
                   grad_logp, grad_entropy, grad_div, grad_out, v0: int) -> None:
    """The gradient of the slice ``[v0, v0 + Vs)`` from the final statistics alone, into ``grad_out``.

    ``g_j = [g_logp (1[j=y] - p_j) - g_H p_j (log p_j + H) + g_D p_j (f'(t_j) - S)] / T`` with
    ``S = div_s + f'(t_k)`` (forward KL: ``p_j - q_j``), in float64, NaN rows by the policy.
    """
    n, width = stats.log_norm.shape[0], logits.shape[-1]
    read, div_on = rows_read(labels, weight, spec, n, stats.log_norm.device)
    inv_temperature = 1.0 / spec.temperature
    lp = _log_probs(logits.reshape(n, width).to(torch.float64), stats.row_max, stats.log_norm, inv_temperature)
    lp = torch.where(read[:, None], lp, -math.inf)
    p = torch.exp(lp)
    grad = torch.zeros_like(lp)
    if grad_logp is not None:
        owned = read & (labels >= v0) & (labels < v0 + width)
        onehot = torch.zeros_like(lp)
        onehot[owned, (labels - v0)[owned]] = 1.0
        grad += grad_logp.to(torch.float64)[:, None] * (onehot - p)
    if grad_entropy is not None:
        h = stats.entropy.to(torch.float64)[:, None]
        grad -= grad_entropy.to(torch.float64)[:, None] * torch.where(p > 0, p * (lp + h), 0.0)
    g_div = None
    if grad_div is not None and spec.divergence:
        g_div = torch.where(div_on, grad_div.to(torch.float64), 0.0)
        lq = _log_probs(ref_logits.reshape(n, width).to(torch.float64), stats.ref_row_max, stats.ref_log_norm,
                        inv_temperature)
        on = div_on[:, None]
        if spec.divergence == Divergence.FORWARD_KL:
            term = torch.where(on, p - torch.exp(lq), 0.0)
        else:
            lp_on, lq_on = torch.where(on, lp, 0.0), torch.where(on, lq, 0.0)
            _, slope = GENERATORS[spec.divergence](lp_on, lq_on, spec.beta, spec.alpha)
            s_total = (stats.div_s.to(torch.float64) + _fprime_at_argmax(stats, spec))[:, None]
            term = torch.where(on & (p > 0), slope - p * s_total, 0.0)
        grad += g_div[:, None] * term
    grad = grad * inv_temperature
    bad = _undefined_gradient(stats.log_norm, stats.div_s, g_div)
    grad = torch.where(bad[:, None], math.nan, grad)
    grad_out.copy_(grad.view(grad_out.shape))
