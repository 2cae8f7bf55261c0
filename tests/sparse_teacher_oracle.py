"""A float64 oracle of ``linear_sparse_teacher_divergence`` over full logits, shared by the one-process
and the vocabulary-sharded tests.

It is TRL's sparse server loss written out in float64 on the explicit logits ``z = logit_scale (h
W^T + c)`` (softcap after), ``log_softmax(z / T)``: the student's log-probs at the teacher's ids,
TRL's tail ``log(-expm1(min(lse, -1e-7)))`` on both sides (or renormalisation over the ids without
it), then each divergence from its definition on the ``(k + 1)`` points with ``0 log 0 = 0``.
"""

from __future__ import annotations

import math

import torch


def sparse_points(lp_full, ids, add_tail):
    """(k [+ 1])-point log-probs of a full float64 log-distribution at ``ids`` (-1 absent), as TRL forms them."""
    present = ids >= 0
    at_ids = torch.where(present, lp_full.gather(-1, ids.clamp(min=0)), -math.inf)
    log_mass = torch.logsumexp(at_ids, dim=-1, keepdim=True)
    if not add_tail:
        return at_ids - log_mass
    return torch.cat([at_ids, torch.log(-torch.expm1(log_mass.clamp(max=-1e-7)))], dim=-1)


def sparse_divergence(ls, lt, divergence, beta, alpha):
    """D_f(p = exp(ls), q = exp(lt)) per row, float64, terms with p = q = 0 left out."""
    p, q = ls.exp(), lt.exp()
    both = (p > 0) | (q > 0)
    # Logs where the probability is 0 are replaced before use: autograd never meets -inf - -inf.
    ls = torch.where(p > 0, ls, torch.zeros_like(ls))
    lt = torch.where(q > 0, lt, torch.zeros_like(lt))

    def total(x):
        return torch.where(both, x, torch.zeros_like(x)).sum(-1)

    if divergence == "forward_kl":
        return total(torch.where(q > 0, q * (lt - ls), torch.zeros_like(q)))
    if divergence == "reverse_kl":
        return total(torch.where(p > 0, p * (ls - lt), torch.zeros_like(p)))
    if divergence == "js":
        lm = torch.where(both, beta * q + (1 - beta) * p, torch.ones_like(p)).log()
        kl_q = torch.where(q > 0, q * (lt - lm), torch.zeros_like(q))
        kl_p = torch.where(p > 0, p * (ls - lm), torch.zeros_like(p))
        return total(beta * kl_q + (1 - beta) * kl_p)
    if divergence == "tv":
        return total(0.5 * (p - q).abs())
    if divergence == "hellinger":
        return total(p + q - 2 * torch.where(p * q > 0, 0.5 * (ls + lt), torch.full_like(p, -math.inf)).exp())
    if divergence == "chi2":
        return total((p - q) ** 2 / torch.where(q > 0, q, torch.ones_like(q)))
    both_positive = (p > 0) & (q > 0)
    overlap = torch.where(both_positive, alpha * ls + (1 - alpha) * lt, torch.full_like(p, -math.inf)).exp()
    return (total(overlap) - 1) / (alpha * (alpha - 1))


def sparse_oracle(hidden, weight, bias, ids, lp, mask, *, divergence, beta, alpha, temperature, scale, softcap, add_tail):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    b = None if bias is None else bias.double().requires_grad_()
    z = h @ w.t() + (0 if b is None else b)
    z = scale * z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    student = sparse_points((z / temperature).log_softmax(-1), ids, add_tail)
    teacher_full = torch.full(z.shape, -math.inf, dtype=torch.float64)
    # An absent id (-1) lands on column 0 as -inf: amax keeps the teacher's value there if 0 is an id too.
    teacher_full.scatter_reduce_(-1, ids.clamp(min=0), torch.where(ids >= 0, lp.double(), -math.inf), "amax")
    teacher = sparse_points(teacher_full, ids, add_tail)
    per_token = torch.where(mask, sparse_divergence(student, teacher, divergence, beta, alpha), 0.0)
    return per_token, (h, w, b)
