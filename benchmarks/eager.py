"""Eager PyTorch baselines: the token terms computed the way trainers compute them today.

Every function takes ``[N, V]`` logits (and ``[N]`` labels / ``[N, V]`` reference logits) and
returns per-token fp32 tensors with the same meaning as the package's ops, so the suite can
time and measure both on the same inputs. They are deliberately the plain formulations (full
``log_softmax`` in fp32, elementwise terms, a sum over V): that is what materialises the
``[N, V]`` intermediates the package avoids. The ``linear_*`` functions start from hidden
states and the LM head and project the logits first, as a model's forward does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .cases import SEQ_LEN


def logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full fp32 ``log_softmax`` then a gather of the label column."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def sampled_logprobs(logits: torch.Tensor, labels: torch.Tensor, top_k: int, top_p: float,
                     min_p: float) -> torch.Tensor:
    """vLLM's processed log-probs the way a sampler forms them: fp32 logits masked by min-p, top-k
    (``topk``) and top-p (a full sort and a cumulative sum), then ``log_softmax`` and a gather."""
    z = logits.float()
    z = z.masked_fill(z < z.amax(-1, keepdim=True) + math.log(min_p), -math.inf)
    z = z.masked_fill(z < z.topk(top_k, -1).values[:, -1:], -math.inf)
    ordered, order = z.sort(-1)
    drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    z = z.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return torch.log_softmax(z, dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def logprobs_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused cross-entropy kernel, negated (what ``model(labels=...)`` uses)."""
    return -F.cross_entropy(logits.float(), labels, reduction="none")


def logprobs_trl(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` strategy on ``[B, T, V]`` views of the input.

    fp32/fp64: gather the label logit and subtract a log-sum-exp computed one sequence at a
    time. Half precision: ``log_softmax`` one sequence at a time in the input dtype (a fp32
    full-batch ``log_softmax`` is what it avoids) and gather.
    """
    n = logits.shape[0]
    t = SEQ_LEN if n % SEQ_LEN == 0 else n
    seqs, seq_labels = logits.view(n // t, t, -1), labels.view(n // t, t)
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels[:, None]).squeeze(-1)
        lse = torch.cat([torch.logsumexp(s, dim=-1) for s in seqs])
        return picked - lse
    rows = [torch.log_softmax(s, dim=-1).gather(-1, l[:, None]).squeeze(-1)
            for s, l in zip(seqs, seq_labels)]
    return torch.cat(rows).float()


def logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor):
    """Label log-prob and entropy from one fp32 ``log_softmax``."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def divergence(logits: torch.Tensor, ref_logits: torch.Tensor, name: str,
               beta: float = 0.5, alpha: float = 0.5) -> torch.Tensor:
    """``D(policy, reference)`` per token: two fp32 ``log_softmax`` and an elementwise sum.

    Same conventions as the package (see ``prefopt_kernels.divergences``): ``p`` the policy, ``q`` the reference,
    ``forward_kl = KL(q||p)``, ``js`` mixes with ``m = beta q + (1 - beta) p``.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    lq = torch.log_softmax(ref_logits.float(), dim=-1)
    if name == "forward_kl":
        return (lq.exp() * (lq - lp)).sum(-1)
    if name == "reverse_kl":
        return (lp.exp() * (lp - lq)).sum(-1)
    if name == "js":
        lm = torch.logaddexp(lq + math.log(beta), lp + math.log1p(-beta))
        return (beta * lq.exp() * (lq - lm) + (1 - beta) * lp.exp() * (lp - lm)).sum(-1)
    if name == "tv":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if name == "hellinger":
        return ((lp * 0.5).exp() - (lq * 0.5).exp()).square().sum(-1)
    if name == "chi2":
        q = lq.exp()
        return ((lp.exp() - q).square() / q).sum(-1)
    if name == "alpha":
        t = (lp - lq).exp()
        f = (t.pow(alpha) - alpha * t - (1 - alpha)) / (alpha * (alpha - 1))
        return (lq.exp() * f).sum(-1)
    raise ValueError(f"unknown divergence {name!r}")


def terms_forward_kl(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor):
    """SparsePO's own eager path: two fp32 ``log_softmax``, two gathers, ``KL(q||p)`` summed."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    lq = torch.log_softmax(ref_logits.float(), dim=-1)
    logp = lp.gather(-1, labels[:, None]).squeeze(-1)
    ref_logp = lq.gather(-1, labels[:, None]).squeeze(-1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    return logp, ref_logp, kl


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` in the inputs' dtype, then :func:`logprobs`."""
    return logprobs(hidden @ weight.t(), labels)


def linear_terms(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 ref_hidden: torch.Tensor, ref_weight: torch.Tensor):
    """Both models' logits projected in full, then :func:`terms_forward_kl`."""
    return terms_forward_kl(hidden @ weight.t(), labels, ref_hidden @ ref_weight.t())


def linear_token_terms_full(hidden, head_weight, labels, ref_hidden, ref_head_weight, *,
                            head_bias=None, ref_head_bias=None, divergence="forward_kl",
                            div_weight=None, ignore_index=-100, return_entropy=False,
                            logit_scale=1.0, ref_logit_scale=1.0, softcap=None, ref_softcap=None,
                            extras=()):
    """``prefopt_kernels.linear_token_terms`` (forward KL) as a trainer without it computes the
    terms: both models' logits projected in full for every position (in the autocast dtype, as
    the model's LM head does; the reference's under ``no_grad``), fp32 ``log_softmax`` of each,
    then :func:`terms_forward_kl`'s gathers and ``KL(q||p)``, with the entropy and the extras
    (``mean_logits``, ``is_top1``) read from the same arrays. Same returns and conventions:
    0 at ignored tokens, the KL 0 where ``div_weight`` is 0."""
    from prefopt_kernels import TokenTerms

    if divergence != "forward_kl":
        raise ValueError(f"divergence {divergence!r}: forward_kl only")

    def project(h, w, b, scale, cap):
        z = F.linear(h, w, b)
        if scale != 1.0:  # a multiply by 1 would keep one more [..., V] array for the backward
            z = z * scale
        return z if cap is None else cap * torch.tanh(z / cap)
    z = project(hidden, head_weight, head_bias, logit_scale, softcap)
    with torch.no_grad():
        zq = project(ref_hidden, ref_head_weight, ref_head_bias, ref_logit_scale, ref_softcap)
    keep = labels != ignore_index
    index = labels.masked_fill(~keep, 0).unsqueeze(-1)
    lp = torch.log_softmax(z.float(), dim=-1)
    lq = torch.log_softmax(zq.float(), dim=-1)
    zero = lp.new_zeros(())
    logp = torch.where(keep, lp.gather(-1, index).squeeze(-1), zero)
    ref_logp = torch.where(keep, lq.gather(-1, index).squeeze(-1), zero)
    kl_kept = keep if div_weight is None else keep & (div_weight != 0)
    kl = torch.where(kl_kept, (lq.exp() * (lq - lp)).sum(-1), zero)
    entropy = None
    with torch.no_grad():  # logged, never differentiated by the trainers
        if return_entropy:
            entropy = torch.where(keep, -(lp.exp() * lp).sum(-1), zero)
        extra = {}
        if "mean_logits" in extras:
            extra["mean_logits"] = torch.where(keep, z.float().mean(-1), zero)
        if "is_top1" in extras:
            extra["is_top1"] = keep & (z.argmax(-1) == labels)
    unknown = set(extras) - set(extra)
    if unknown:
        raise ValueError(f"extras {sorted(unknown)}: mean_logits and is_top1 only")
    terms = TokenTerms(logp, ref_logp, kl, entropy)
    return (terms, extra) if extras else terms


class _GemmFloor(torch.autograd.Function):
    """``Z = hidden @ W.T`` forward; backward ``dZ @ W`` and ``dZ.T @ hidden`` with ``Z`` itself
    standing in for ``dZ``: the LM head's three GEMMs and nothing else."""

    @staticmethod
    def forward(ctx, hidden, weight):
        z = hidden @ weight.t()
        ctx.save_for_backward(hidden, weight, z)
        return hidden.new_zeros(hidden.shape[0], dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, z = ctx.saved_tensors
        return z @ weight, z.t() @ hidden


def gemm_floor(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden=None, ref_weight=None):
    """The GEMMs of the LM head alone (and the reference's projection, when given): the time
    below which no implementation of a linear op can go. Returns a placeholder ``[N]`` output
    that the backward differentiates."""
    if ref_hidden is not None:
        torch.mm(ref_hidden, ref_weight.t())  # the reference's logits: computed, not used
    return _GemmFloor.apply(hidden, weight)
