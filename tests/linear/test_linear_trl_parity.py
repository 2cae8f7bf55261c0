"""The fused linear ops against TRL's chunked kernels (``trl.kernels``; skipped without TRL):
log-probs, entropy and extras, the divergences, and how TRL's JSD beta maps onto our js."""

import math

import pytest
import torch

from contract import divergence_terms

from linear_cases import (BACKENDS, F64, Call, assert_close, check, exact_logits, make_head, make_labels, make_pair,
                          make_upstream)


def _trl(module):
    return pytest.importorskip(f"trl.kernels.{module}")


@pytest.mark.parametrize("softcap, scale, temperature", [(None, 1.0, 1.0), (5.0, 0.8, 0.7)])
def test_trl_logprob_parity(softcap, scale, temperature):
    trl_lp = _trl("chunked_logprob")
    policy = make_head((14,), 32, 300, seed=141, bias=True, softcap=softcap, scale=scale)
    labels = make_labels((14,), 300, seed=142, ignored=(1, 8))
    kept = labels != -100
    targets = torch.where(kept, labels, 0)  # TRL computes every row: ignored ones need a valid id
    outputs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    call = Call("logprobs", policy, labels, temperature=temperature, return_entropy=True,
                extras=("mean_logits", "is_top1", "log_sum_sq_probs"))
    upstream = make_upstream(call, 143)
    ours, our_extras, our_grads, exp = check("native" if "native" in BACKENDS else "reference", call, seed=143,
                                             explicit=False)

    h, w, b = policy.leaves()
    trl_out = trl_lp.ChunkedLogProbFunction.apply(h, w, b, targets, temperature, 128, softcap, scale, outputs)
    logp, entropy, lssp, mean_logits, is_top1 = trl_out
    (((logp * upstream["logp"]) + entropy * upstream["entropy"]) * kept).sum().backward()
    # Both are within the bound of the exact value: they agree within twice the bound.
    assert_close(logp[kept], ours["logp"][kept], 2 * exp.value_tol["logp"][kept], "TRL logp")
    assert_close(entropy[kept], ours["entropy"][kept], 2 * exp.value_tol["entropy"][kept], "TRL entropy")
    assert_close(lssp[kept], our_extras["log_sum_sq_probs"][kept], 2 * exp.extra_tol["log_sum_sq_probs"][kept],
                 "TRL log_sum_sq_probs")
    assert_close(mean_logits[kept], our_extras["mean_logits"][kept], 2 * exp.extra_tol["mean_logits"][kept],
                 "TRL mean_logits")
    decided = exp.extra_tol["is_top1_decided"] & kept
    assert torch.equal(is_top1[decided], our_extras["is_top1"][decided])
    for name, got, ours_g in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), our_grads):
        assert_close(got, ours_g, 2 * exp.grad_tol[name], f"TRL d {name}")


def _js64(p, q, beta):
    """Our js of probabilities ``p`` (policy) and ``q`` (reference), the oracle's (tests/contract.py):
    beta KL(q||m) + (1-beta) KL(p||m) with m = beta q + (1 - beta) p."""
    return divergence_terms("js", p.log(), q.log(), beta).sum(-1)


def _trl_jsd64(ps, pt, beta):
    """TRL's generalised JSD transcribed from chunked_divergence._jsd_tile (student ps, teacher pt)."""
    log_ps, log_pt = ps.log(), pt.log()
    log_m = torch.logaddexp(log_ps + math.log(1 - beta), log_pt + math.log(beta))
    return (beta * pt * (log_pt - log_m) + (1 - beta) * ps * (log_ps - log_m)).sum(-1)


def test_trl_js_beta_mapping():
    """TRL's beta equals our js beta, with student = policy (p) and teacher = reference (q):
    both mix ``m = beta q + (1 - beta) p`` and weigh ``KL(q||m)`` by ``beta``. Checked in float64
    on the formulas, on TRL's fp32 kernel, and shown to be discriminating (beta -> 1 - beta fails)."""
    trl_div = _trl("chunked_divergence")
    g = torch.Generator().manual_seed(151)
    p = torch.softmax(torch.randn(6, 300, generator=g, dtype=F64) * 2, -1)
    q = torch.softmax(torch.randn(6, 300, generator=g, dtype=F64) * 2, -1)
    for beta in (0.1, 0.3, 0.5, 0.8):
        torch.testing.assert_close(_trl_jsd64(p, q, beta), _js64(p, q, beta), rtol=1e-12, atol=1e-14)
        if beta != 0.5:
            assert (_trl_jsd64(p, q, 1 - beta) - _js64(p, q, beta)).abs().max() > 1e-3
    # The endpoints: TRL's 0 is KL(teacher||student) = our forward_kl, 1 is our reverse_kl.
    policy, ref = make_pair((6,), seed=152, bias=False, ref_std=1.0)
    z = exact_logits(policy.root.to(F64), policy.weight.to(F64), None, 1.0, None)
    zr = exact_logits(ref.root.to(F64), ref.weight.to(F64), None, 1.0, None)
    lp, lq = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    want = {0.0: (lq.exp() * (lq - lp)).sum(-1), 1.0: (lp.exp() * (lp - lq)).sum(-1),
            0.1: _js64(lp.exp(), lq.exp(), 0.1)}
    # fp32 kernels are within ~1e-6 relative of these; the mirrored beta is 100x the tolerance away.
    mirrored = _js64(lp.exp(), lq.exp(), 0.9)
    assert ((mirrored - want[0.1]).abs() > 1e-2 * want[0.1].abs()).all()
    for beta, expected in want.items():
        div, _ = trl_div.ChunkedDivergenceFunction.apply(policy.root, policy.weight, None, ref.root, ref.weight, None,
                                                          beta, 1.0, 1.0, None, 1.0, None)
        torch.testing.assert_close(div.to(F64), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("divergence, trl_beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("js", 0.3)])
def test_trl_divergence_parity(divergence, trl_beta):
    trl_div = _trl("chunked_divergence")
    policy, ref = make_pair((12,), seed=161, softcaps=(6.0, None), scales=(1.2, 0.9))
    beta = 0.3 if divergence == "js" else 0.5  # TRL's beta is ours (test_trl_js_beta_mapping)
    call = Call("divergence", policy, ref=ref, divergence=divergence, beta=beta, temperature=0.8)
    upstream = make_upstream(call, 162)
    ours, _, our_grads, exp = check("native" if "native" in BACKENDS else "reference", call, seed=162, explicit=False)
    h, w, b = policy.leaves()
    div, _ = trl_div.ChunkedDivergenceFunction.apply(h, w, b, ref.root, ref.weight, ref.bias, trl_beta, 0.8,
                                                      policy.scale, policy.softcap, ref.scale, ref.softcap)
    (div * upstream["div"]).sum().backward()
    assert_close(div, ours["div"], 2 * exp.value_tol["div"], f"TRL {divergence}")
    for name, got, ours_g in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), our_grads):
        assert_close(got, ours_g, 2 * exp.grad_tol[name], f"TRL d {name}")
