"""A float64 oracle of the sampler's kept set that sorts (shares nothing with the candidates of
``prefopt_kernels.sampling``), the checks the sampling tests share, and their input strategy.

Boundaries. A kept set is decided by comparisons that rounding can flip: the ops form
``u = (x - max x) / T`` in fp32 and take the full normaliser from the backend's fp32 first
pass, so a decision is *ambiguous* where the oracle's float64 quantity lies within rounding
of its threshold: a logit within ``1e-6 (1 + |u|)`` of the min-p threshold or of the k-th
largest (when not exactly tied with it), or a cumulative mass within ``1e-6`` relative of
``top_p`` (the fp32 normaliser's error, ~1e-7). Such rows are left out of the comparison
(:func:`ambiguous_rows`), and the property tests assert that they stay rare.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")
BOUNDARY = 1e-6


def kept_mask(x: torch.Tensor, temperature: float, top_k, top_p, min_p) -> torch.Tensor:
    """Bool ``[n, V]``: vLLM's kept set of float64 ``z = x / T``, by sorting each row."""
    z = x.double() / temperature
    n, vocab = z.shape
    keep = torch.ones_like(z, dtype=torch.bool)
    if min_p:
        keep &= z >= z.max(1, keepdim=True).values + math.log(min_p)
    if top_k and top_k < vocab:
        kth = z.sort(1, descending=True).values[:, top_k - 1:top_k]
        keep &= z >= kth
    if top_p is not None and top_p < 1:
        left = torch.where(keep, z, NEG_INF)
        probs = torch.softmax(left, 1)
        order = probs.argsort(dim=1, descending=True, stable=True)
        sorted_probs = probs.gather(1, order)
        before = sorted_probs.cumsum(1) - sorted_probs
        last = (before < top_p).sum(1, keepdim=True) - 1
        cutoff = left.gather(1, order).gather(1, last)
        keep &= z >= cutoff
    return keep


def oracle(x, labels, temperature, top_k, top_p, min_p, ignore_index=-100):
    """``(logp, log_kept_mass, grad)`` in float64: ``grad`` the gradient of ``sum logp`` (finite
    entries) with respect to ``x``, ``[n, V]``; ignored rows 0."""
    x = x.double().reshape(-1, x.shape[-1])
    labels = labels.reshape(-1)
    z = x / temperature
    keep = kept_mask(x, temperature, top_k, top_p, min_p)
    read = labels != ignore_index
    y = torch.where(read, labels, 0)
    kept_lse = torch.logsumexp(torch.where(keep, z, NEG_INF), 1)
    label_kept = keep.gather(1, y[:, None]).squeeze(1)
    logp = torch.where(label_kept, z.gather(1, y[:, None]).squeeze(1) - kept_lse, NEG_INF)
    mass = kept_lse - torch.logsumexp(z, 1)
    p_kept = torch.where(keep, (z - kept_lse[:, None]).exp(), 0.0)
    onehot = torch.zeros_like(z).scatter_(1, y[:, None], label_kept.double()[:, None])
    grad = (onehot - p_kept) / temperature
    zero = torch.zeros((), dtype=torch.float64)
    return (torch.where(read, logp, zero), torch.where(read, mass, zero), torch.where(read[:, None], grad, zero))


def ambiguous_rows(x, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """Bool ``[n]``: rows where a decision of the kept set lies within rounding (module docstring)."""
    z = x.double().reshape(-1, x.shape[-1]) / temperature
    u = z - z.max(1, keepdim=True).values
    n, vocab = u.shape
    near = torch.zeros(n, dtype=torch.bool)
    tol = BOUNDARY * (1 + u.abs())
    if min_p:
        near |= ((u - math.log(min_p)).abs() <= tol).any(1)
    if top_k and top_k < vocab:
        kth = u.sort(1, descending=True).values[:, top_k - 1:top_k]
        gap = (u - kth).abs()
        near |= ((gap <= tol) & (gap > 0)).any(1)
    if top_p is not None and top_p < 1:
        keep = kept_mask(x.reshape(-1, x.shape[-1]), temperature, top_k, None, min_p)
        left = torch.where(keep, u, NEG_INF)
        order = left.argsort(dim=1, descending=True, stable=True)
        probs = torch.softmax(left, 1).gather(1, order)
        cum = probs.cumsum(1)
        near |= ((cum - top_p).abs() <= BOUNDARY * top_p).any(1)
        # Distinct logits that fp32 might merge right at the cutoff.
        cutoff = left.gather(1, order).gather(1, ((cum - probs) < top_p).sum(1, keepdim=True) - 1)
        gap = (u - cutoff).abs()
        near |= ((gap <= tol) & (gap > 0)).any(1)
    return near
