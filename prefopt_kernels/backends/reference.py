"""Pure-PyTorch backend computed in float64: the oracle of the tests and the last fallback.

It is written from the math (``log_softmax``, ``gather``, the divergence generators of
``prefopt_kernels.divergences``) and takes its gradients from autograd, so it shares no
code path with the fused kernels' hand-derived backward. It materialises ``[N, V]``
float64 tensors: correct everywhere, fast nowhere.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from . import DIVERGENCE_CODES, OpSpec, RowStats

NAME = "reference"


def is_available() -> bool:
    return True


def supports(device: torch.device) -> bool:
    return True


def evaluate(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    ref_logits: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    spec: OpSpec,
) -> Dict[str, torch.Tensor]:
    """Every per-row quantity of ``spec`` in float64, differentiable with respect to ``logits``.

    Shapes: ``logits``/``ref_logits`` ``[..., V]`` flattened to ``[N, V]`` (any float dtype,
    promoted to float64),
    ``labels`` ``[N]`` integer, ``weight`` ``[N]``. Returns a dict of ``[N]`` float64 tensors:
    ``row_max``, ``log_norm``, ``logp``, ``entropy``, ``ref_row_max``, ``ref_log_norm``,
    ``ref_logp``, ``div``, ``div_s`` (those the spec asks for). Skipped rows (ignored label, or zero weight for the divergence terms)
    hold 0. ``row_max``/``log_norm`` split the log-sum-exp as documented on ``RowStats``.
    """
    from ..divergences import GENERATORS

    logits = logits.reshape(-1, logits.shape[-1])
    if ref_logits is not None:
        ref_logits = ref_logits.reshape(-1, ref_logits.shape[-1])
    n = logits.shape[0]
    device = logits.device
    valid = torch.ones(n, dtype=torch.bool, device=device)
    if labels is not None:
        valid = labels != spec.ignore_index
    div_active = valid if weight is None else valid & (weight != 0)
    inv_t = 1.0 / spec.temperature

    def row_log_softmax(x: torch.Tensor, rows: torch.Tensor, prefix: str):
        # Skipped rows may hold anything (even all -inf); they never reach the math.
        x = torch.where(rows[:, None], x.to(torch.float64), torch.zeros((), dtype=torch.float64, device=device))
        lse = torch.logsumexp(x * inv_t, dim=-1)
        row_max = x.detach().amax(-1)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        out[prefix + "row_max"] = torch.where(rows, row_max, zero)
        out[prefix + "log_norm"] = torch.where(rows, lse - row_max * inv_t, zero)
        return x * inv_t - lse[:, None]

    zero = torch.zeros(n, dtype=torch.float64, device=device)
    out: Dict[str, torch.Tensor] = {}
    log_p = row_log_softmax(logits, valid, "")
    safe_labels = None
    if labels is not None:
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    if spec.want_logp:
        out["logp"] = torch.where(valid, log_p.gather(1, safe_labels[:, None])[:, 0], zero)
    if spec.want_entropy:
        p = torch.exp(log_p)
        plogp = torch.where(p > 0, p * torch.where(p > 0, log_p, torch.zeros_like(log_p)), torch.zeros_like(log_p))
        out["entropy"] = torch.where(valid, -plogp.sum(-1), zero)
    if ref_logits is not None:
        log_q = row_log_softmax(ref_logits.detach(), valid, "ref_")
        if spec.want_ref_logp:
            out["ref_logp"] = torch.where(valid, log_q.gather(1, safe_labels[:, None])[:, 0], zero)
        if spec.divergence:
            value, slope = GENERATORS[spec.divergence](log_p, log_q, spec.beta, spec.alpha)
            out["div"] = torch.where(div_active, value.sum(-1), zero)
            out["div_s"] = torch.where(div_active, slope.sum(-1), zero)
            if spec.divergence != DIVERGENCE_CODES["forward_kl"]:
                # Centred at the policy's argmax k, as RowStats documents: S - f'(t_k).
                k = logits.detach().argmax(-1, keepdim=True)
                fprime_k = (slope.gather(1, k) / torch.exp(log_p.gather(1, k)))[:, 0]
                out["div_s"] = torch.where(div_active, out["div_s"] - fprime_k, zero)
                out["ref_at_argmax"] = torch.where(div_active, ref_logits.to(torch.float64).gather(1, k)[:, 0], zero)
    return out


def forward(logits, labels, ref_logits, weight, spec: OpSpec) -> RowStats:
    with torch.no_grad():
        rows = evaluate(logits, labels, ref_logits, weight, spec)
    return RowStats(**{k: v.to(torch.float32) for k, v in rows.items()})


def backward(logits, labels, ref_logits, weight, spec: OpSpec, stats: RowStats,
             grad_logp, grad_entropy, grad_div, grad_out) -> None:
    a = logits.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        rows = evaluate(a, labels, ref_logits, weight, spec)
        total = a.new_zeros(())
        for key, upstream in (("logp", grad_logp), ("entropy", grad_entropy), ("div", grad_div)):
            if upstream is not None and key in rows:
                # A zero upstream gradient must not meet an infinite value (0 * inf = NaN).
                g = upstream.to(torch.float64)
                total = total + torch.where(g != 0, g * rows[key], torch.zeros_like(g)).sum()
        (grad,) = torch.autograd.grad(total, a, allow_unused=True) if total.requires_grad else (None,)
    if grad is None:
        grad_out.zero_()
    else:
        grad_out.copy_(grad.view(grad_out.shape))
