"""The spawned process groups behind the tests of tensor parallelism (``process_group=``) and
DistributedDataParallel, on CPU with gloo: the scenarios, what each rank checks, and the
parent's side that spawns the groups and hands their verdicts to the tests.

Each world size runs ONE spawned process group (spawning costs seconds) in which every
rank runs every check and sends its verdicts to the parent through a queue; the tests only
read those verdicts (``worker_payload``). The group of a world size is spawned once per
session, by the first test that reads it, whichever of test_distributed_numerics.py,
test_distributed_bad_input.py and test_distributed_training.py it is in: the verdicts are
kept in this module (``_RUNS``). A hang cannot block CI: every collective has a 60 s
timeout, the parent reads the queue with a deadline and kills the workers it still has to.

What a rank checks (``_numerics``): the sharded op on its contiguous vocabulary shard
against (1) the float64 oracle of ``tests/contract.py`` on the full logits (the numerics
contract itself) and (2) the single-process op on the full tensors, run in the same worker
without a group. Every op, every divergence, uneven shards with an empty one and a 1-entry
one, labels owned by every non-empty shard, ignored labels, sparse ``div_weight``, masked
(``-inf``) entries up to a whole shard, temperatures, bf16, biased and soft-capped linear
heads, the linear extras. Outputs (and the linear ops' hidden gradient) must be
bit-identical on every rank: the parent compares their hashes.
"""

from __future__ import annotations

import copy
import hashlib
import math
import queue
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import prefopt_kernels as pk
from contract import assert_grads_close, assert_tokens_close, oracle, row_scale, ulp

WORLDS = (2, 3)
# Vocabulary shard sizes per rank, in rank order: uneven, an empty shard (first, middle,
# last) and a 1-entry shard among them.
LAYOUTS = {2: ((211, 96), (0, 173)), 3: ((150, 0, 157), (1, 200, 0))}
# The subgroup case of the 3-rank run: global ranks 1 and 2 hold shards of these sizes.
SUBGROUP_LAYOUT = (90, 70)
LEAD = (2, 6)  # leading shape of every per-token tensor
HIDDEN, REF_HIDDEN = 16, 12
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
HAZARD_TIMEOUT = timedelta(seconds=5)  # the subgroups of the checks that once hung or crashed
GROUP_DEADLINE_S = 240  # the parent's limit for a whole spawned group
# js and alpha with non-default parameters (per layout index).
PARAMS = ((0.3, 1.7), (0.8, -0.4))
OK = "ok"


def _phases(world):
    return ("numerics", "bad_input", "ddp", "mismatch", "one_rank_bad_label", "backward_mismatch") if world == 2 else (
        "numerics", "bad_input")


# --------------------------------------------------------------------------- scenarios


def scenarios(world):
    """``name -> (kind, layout index, op, divergence, backend, dtype)``; the same list on every process."""
    out = {}
    for li in range(len(LAYOUTS[world])):
        for backend in ("native", "reference"):
            out[f"L{li}-{backend}-logprobs"] = ("logits", li, "logprobs", None, backend, torch.float32)
            out[f"L{li}-{backend}-logprobs_entropy"] = ("logits", li, "logprobs_entropy", None, backend, torch.float32)
            for div in pk.DIVERGENCES:
                out[f"L{li}-{backend}-divergence-{div}"] = ("logits", li, "divergence", div, backend, torch.float32)
                out[f"L{li}-{backend}-terms-{div}"] = ("logits", li, "terms", div, backend, torch.float32)
        out[f"L{li}-triton-terms-js"] = ("logits", li, "terms", "js", "triton", torch.float32)
        out[f"L{li}-native-terms-reverse_kl-bf16"] = ("logits", li, "terms", "reverse_kl", "native", torch.bfloat16)
        out[f"L{li}-linear-logprobs"] = ("linear", li, "logprobs", None, "native", torch.float32)
        for div in pk.DIVERGENCES:
            out[f"L{li}-linear-divergence-{div}"] = ("linear", li, "divergence", div, "native", torch.float32)
            out[f"L{li}-linear-terms-{div}"] = ("linear", li, "terms", div, "native", torch.float32)
    if world == 3:
        out["subgroup-terms-alpha"] = ("subgroup", 0, "terms", "alpha", "native", torch.float32)
        out["subgroup-linear-terms-js"] = ("subgroup", 0, "linear_terms", "js", "native", torch.float32)
    return out


# The field each disagreement case must be reported under.
DIFFERING_FIELD = {"token_count": "rows", "linear_token_count": "rows", "no_tokens_on_one_rank": "rows",
                   "divergence": "divergence",
                   "linear_divergence": "divergence", "return_entropy": "entropy",
                   "reference_presence": "reference", "ignore_index": "ignore_index",
                   "linear_softcap": "softcap", "linear_extras": "extras", "linear_head_bias": "has_bias",
                   "linear_logit_scale": "scale", "linear_and_logits_op": "linear op"}

BAD_INPUT_CASES = {
    # name: (exception type, text the message must contain; "{V}" is the global vocabulary)
    "token_count": (ValueError, "the ranks differ in: "),
    "linear_token_count": (ValueError, "the ranks differ in: "),
    # A rank with no tokens at all still takes part in the call check.
    "no_tokens_on_one_rank": (ValueError, "the ranks differ in: "),
    "divergence": (ValueError, "the ranks differ in: "),
    "linear_divergence": (ValueError, "the ranks differ in: "),
    "return_entropy": (ValueError, "the ranks differ in: "),
    "reference_presence": (ValueError, "the ranks differ in: "),
    "ignore_index": (ValueError, "the ranks differ in: "),
    # The fused linear op's own parameters are part of the call check too.
    "linear_softcap": (ValueError, "the ranks differ in: "),
    "linear_extras": (ValueError, "the ranks differ in: "),
    "linear_head_bias": (ValueError, "the ranks differ in: "),
    "linear_logit_scale": (ValueError, "the ranks differ in: "),
    # One rank on the logits op, the other on the linear op: a clean error, not a gloo abort.
    "linear_and_logits_op": (ValueError, "the ranks differ in: "),
    "label_too_large": (ValueError, "labels must lie in [0, {V})"),
    "label_negative": (ValueError, "labels must lie in [0, {V})"),
    "linear_label_too_large": (ValueError, "labels must lie in [0, {V})"),
    "not_a_process_group": (TypeError, "process_group must be a torch.distributed ProcessGroup"),
    "linear_not_a_process_group": (TypeError, "process_group must be a torch.distributed ProcessGroup"),
    "nccl_with_cpu_tensors": (ValueError, "nccl"),
    "all_shards_empty": (ValueError, "hold no entry"),
}

# Ranks that disagree on a scalar, the labels or the weights (world 2): a loud error on every rank.
MISMATCH_CASES = ("temperature", "js_beta", "labels", "div_weight")


def _data(world, li, seed=0):
    """The full tensors of a layout, identical on every process (own generator)."""
    sizes = LAYOUTS[world][li] if li >= 0 else SUBGROUP_LAYOUT
    vocab = sum(sizes)
    gen = torch.Generator().manual_seed(1000 * world + 17 * li + seed)
    a = torch.randn(*LEAD, vocab, generator=gen) * 3.0
    b = 0.6 * a + 2.0 * torch.randn(*LEAD, vocab, generator=gen)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    owned = [(s, s + n) for s, n in zip(starts, sizes) if n]
    masked = torch.zeros(*LEAD, vocab, dtype=torch.bool)
    if len(owned) > 1:
        # Token (0, 3): the whole first non-empty shard is masked (-inf) in both rows.
        masked[0, 3, owned[0][0]:owned[0][1]] = True
    # Token (1, 1): scattered masked entries, the same support for both rows.
    masked[1, 1] = torch.rand(vocab, generator=gen) < 0.3
    a = a.masked_fill(masked, -math.inf)
    b = b.masked_fill(masked, -math.inf)
    # Labels: token i lands in the (i mod k)-th non-empty shard, never on a masked entry.
    labels = torch.empty(LEAD, dtype=torch.int64)
    flat_masked = masked.reshape(-1, vocab)
    for i in range(labels.numel()):
        lo, hi = owned[i % len(owned)]
        allowed = (~flat_masked[i, lo:hi]).nonzero().reshape(-1)
        if allowed.numel() == 0:
            lo, hi = owned[-1]
            allowed = (~flat_masked[i, lo:hi]).nonzero().reshape(-1)
        labels.view(-1)[i] = lo + allowed[torch.randint(allowed.numel(), (1,), generator=gen)].item()
    labels.view(-1)[[4, 9]] = -100
    weight = torch.tensor([[1.0, 0.0, 1.0, 0.5, 0.0, 1.0], [0.0, 1.0, 2.0, 0.0, 1.0, 1.0]])
    upstream = {k: torch.randn(LEAD, generator=gen) for k in ("logp", "entropy", "div")}
    lin = dict(
        h=torch.randn(*LEAD, HIDDEN, generator=gen),
        w=0.5 * torch.randn(vocab, HIDDEN, generator=gen),
        bias=0.3 * torch.randn(vocab, generator=gen),
        hr=torch.randn(*LEAD, REF_HIDDEN, generator=gen),
        wr=0.5 * torch.randn(vocab, REF_HIDDEN, generator=gen),
        bias_r=0.3 * torch.randn(vocab, generator=gen),
    )
    return dict(sizes=sizes, vocab=vocab, starts=starts, a=a, b=b, labels=labels, weight=weight,
                upstream=upstream, lin=lin)


def _tv_rows_decided(a, b, temperature):
    """Rows where every sign(p - q) is decided well above rounding (tv's exemption)."""
    p = torch.softmax(a.to(torch.float64) / temperature, -1)
    q = torch.softmax(b.to(torch.float64) / temperature, -1)
    gap = (p - q).abs()
    return ((gap > 1e-4 * (p + q)) | (p + q < 1e-30)).all(-1)


def _contract_tol(ref, scale, factor):
    """``factor`` times the per-token contract tolerance ``(1e-5 + 1e-6 s)(1 + |x|)``."""
    return factor * (1e-5 + 1e-6 * scale) * (1.0 + ref.detach().to(torch.float64).abs())


def _assert_close_tokens(x, ref, scale, factor, what):
    x, ref = x.detach().to(torch.float64), ref.detach().to(torch.float64)
    bad = ~((x == ref) | ((x - ref).abs() <= _contract_tol(ref, scale, factor)))
    assert not bad.any(), (f"{what}: {int(bad.sum())} tokens differ: got {x[bad][:4].tolist()} "
                           f"want {ref[bad][:4].tolist()}")


def _assert_close(x, ref, tol, what):
    x, ref = x.detach().to(torch.float64), ref.detach().to(torch.float64)
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    bad = ~((x == ref) | ((x - ref).abs() <= tol))
    assert not bad.any(), (f"{what}: {int(bad.sum())} entries differ: got {x[bad][:4].tolist()} "
                           f"want {ref[bad][:4].tolist()} (tol {torch.broadcast_to(tol, bad.shape)[bad][:4].tolist()})")


def _kinds(outputs):
    """``name -> (dtype, shape)`` of the per-token outputs (checked in the parent)."""
    return {k: (str(v.dtype), tuple(v.shape)) for k, v in outputs.items()}


def _digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- logits ops


def _call_logits(op, div, x, labels, ref, weight, params, group, temperature):
    """The op's differentiable and other outputs, by name."""
    beta, alpha = params
    if op == "logprobs":
        return {"logp": pk.token_logprobs(x, labels, temperature=temperature, process_group=group)}
    if op == "logprobs_entropy":
        logp, ent = pk.token_logprobs(x, labels, temperature=temperature, return_entropy=True, process_group=group)
        return {"logp": logp, "entropy": ent}
    if op == "divergence":
        return {"div": pk.token_divergence(x, ref, divergence=div, beta=beta, alpha=alpha, weight=weight,
                                           temperature=temperature, process_group=group)}
    t = pk.token_terms(x, labels, ref, divergence=div, div_weight=weight, beta=beta, alpha=alpha,
                       temperature=temperature, return_entropy=True, process_group=group)
    return {"logp": t.logp, "ref_logp": t.ref_logp, "div": t.div, "entropy": t.entropy}


_TEMPERATURE = {"logprobs": 1.0, "logprobs_entropy": 0.7, "divergence": 1.3, "terms": 0.8}


def _check_logits_op(d, rank_sizes, rank, group, op, div, params, dtype, strided):
    """Sharded logits op of this rank vs the float64 oracle and the single-process op."""
    v0, vr = sum(rank_sizes[:rank]), rank_sizes[rank]
    sl = slice(v0, v0 + vr)
    a, b = d["a"].to(dtype), d["b"].to(dtype)
    temperature = _TEMPERATURE[op]
    has_ref = op in ("divergence", "terms")
    labels = None if op == "divergence" else d["labels"]
    weight = d["weight"] if has_ref else None
    # The shard: a strided view of the full logits (rows not contiguous) or a contiguous copy.
    x = a.clone()[..., sl].requires_grad_() if strided else a[..., sl].contiguous().requires_grad_()
    ref = (b[..., sl] if strided else b[..., sl].contiguous()) if has_ref else None
    out = _call_logits(op, div, x, labels, ref, weight, params, group, temperature)
    g_out = torch.zeros(LEAD)
    loss = 0.0
    for k, v in out.items():
        if k != "ref_logp":
            loss = loss + (v * d["upstream"][k]).sum()
            g_out = g_out + d["upstream"][k].abs()
    loss.backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == dtype, "shard gradient shape/dtype"
    if "ref_logp" in out:
        assert not out["ref_logp"].requires_grad, "ref_logp must not be differentiable"

    # (1) The contract, against float64 on the same rounded full inputs.
    beta, alpha = params
    upstream = {k: d["upstream"][k] for k in out if k != "ref_logp"}
    want, grad = oracle(a, labels, b if has_ref else None, weight, divergence=div, beta=beta, alpha=alpha,
                        temperature=temperature, want_logp="logp" in out, want_ref_logp="ref_logp" in out,
                        want_entropy="entropy" in out, upstream=upstream)
    s = row_scale(a, b if has_ref else None, temperature)
    for k, v in out.items():
        assert_tokens_close(v, want[k], s, f"{k} vs float64")
    rows = torch.ones(LEAD, dtype=torch.bool)
    if div is not None:
        rows &= ~(torch.isfinite(want["div"]) & (want["div"].abs() > torch.finfo(torch.float32).max))
        if div == "tv":
            rows &= _tv_rows_decided(a, b, temperature)
    # The shard's gradient in its place in the full row: the per-row tolerance is the
    # contract's, with max_j |g_ref_j| over the WHOLE row.
    full = grad.clone()
    full[..., sl] = x.grad.to(torch.float64)
    assert_grads_close(full, grad, s, g_out, dtype, "shard gradient vs float64", rows=rows)

    # (2) Against the single-process op on the full tensors. Both meet the contract
    # against the same float64 values, so they differ by at most twice its tolerance
    # (taken at the single-process value instead of the float64 one: a second-order change).
    y = a.clone().requires_grad_()
    single = _call_logits(op, div, y, labels, b if has_ref else None, weight, params, None, temperature)
    sum(((v * d["upstream"][k]).sum() for k, v in single.items() if k != "ref_logp")).backward()
    for k in out:
        _assert_close_tokens(out[k], single[k], s, 2.0, f"{k} vs single process")
    g1 = y.grad.to(torch.float64)
    tol = 2.0 * (((1e-5 + 1e-6 * s) * g1.abs().amax(-1) + 2e-7 * g_out)[..., None] + ulp(g1, dtype))
    _assert_close(x.grad[rows], g1[..., sl][rows], tol[..., sl][rows], "shard gradient vs single process")
    return _digest(*out.values()), _kinds(out)


# --------------------------------------------------------------------------- linear ops


SOFTCAP, REF_SOFTCAP, LOGIT_SCALE, LINEAR_T = 6.0, 5.0, 1.3, 0.9
EXTRAS = ("mean_logits", "is_top1", "log_sum_sq_probs")


def _call_linear(op, div, h, w, bias, labels, lin, params, group, sl, budget):
    beta, alpha = params
    common = dict(head_bias=bias, temperature=LINEAR_T, logit_scale=LOGIT_SCALE, softcap=SOFTCAP,
                  memory_budget=budget, process_group=group)
    ref = dict(ref_head_bias=lin["bias_r"][sl], ref_softcap=REF_SOFTCAP)
    if op == "logprobs":
        logp, ent, extras = pk.linear_token_logprobs(h, w, labels, return_entropy=True, extras=EXTRAS, **common)
        return {"logp": logp, "entropy": ent}, extras
    if op == "divergence":
        div_out = pk.linear_token_divergence(h, w, lin["hr"], lin["wr"][sl], divergence=div, beta=beta, alpha=alpha,
                                             div_weight=lin["weight"], **ref, **common)
        return {"div": div_out}, {}
    t, extras = pk.linear_token_terms(h, w, labels, lin["hr"], lin["wr"][sl], divergence=div, beta=beta,
                                      alpha=alpha, div_weight=lin["weight"], return_entropy=True, extras=EXTRAS,
                                      **ref, **common)
    return {"logp": t.logp, "ref_logp": t.ref_logp, "div": t.div, "entropy": t.entropy}, extras


def _linear_logits(h, w, bias, scale, softcap):
    """``softcap tanh(scale (h W^T + c) / softcap)``, and its pre-transform ``u`` (a leaf)."""
    u = (h.reshape(-1, h.shape[-1]) @ w.t() + bias).detach().requires_grad_()
    z = scale * u
    z = softcap * torch.tanh(z / softcap)
    return u, z.reshape(*h.shape[:-1], -1)


def _check_linear_op(d, rank_sizes, rank, group, op, div, params):
    """Sharded linear op vs the single-process linear op: outputs, extras, every gradient."""
    v0, vr = sum(rank_sizes[:rank]), rank_sizes[rank]
    sl = slice(v0, v0 + vr)
    lin = dict(d["lin"], weight=d["weight"])
    labels = None if op == "divergence" else d["labels"].clone()
    # Make the label the argmax of the logits at three tokens, so is_top1 is tested both ways.
    z64 = LOGIT_SCALE * (lin["h"].double() @ lin["w"].double().t() + lin["bias"].double())
    z64 = SOFTCAP * torch.tanh(z64 / SOFTCAP)
    if labels is not None:
        for t in ((0, 0), (0, 5), (1, 2)):
            labels[t] = z64[t].argmax()
    h = lin["h"].clone().requires_grad_()
    w = lin["w"][sl].clone().requires_grad_()
    bias = lin["bias"][sl].clone().requires_grad_()
    # A small budget: several vocabulary tiles inside a shard.
    out, extras = _call_linear(op, div, h, w, bias, labels, lin, params, group, sl, budget=4096)
    loss = sum((v * d["upstream"][k]).sum() for k, v in out.items() if k != "ref_logp")
    loss.backward()
    assert h.grad is not None and h.grad.shape == h.shape, "hidden gradient shape"
    assert w.grad is not None and w.grad.shape == w.shape and bias.grad.shape == bias.shape, "shard gradient shapes"

    full = slice(0, d["vocab"])
    h1 = lin["h"].clone().requires_grad_()
    w1 = lin["w"].clone().requires_grad_()
    b1 = lin["bias"].clone().requires_grad_()
    single, single_extras = _call_linear(op, div, h1, w1, b1, labels, lin, params, None, full, budget=None)
    sum((v * d["upstream"][k]).sum() for k, v in single.items() if k != "ref_logp").backward()

    # Tolerances. s: the contract's row scale of the logits z (float64 here). Both paths
    # compute their own fp32 logits by GEMMs that differ in tiling (rounding of a few ulp
    # of |z| <= 1e-6 s) and each meets the contract against float64 evaluation of its
    # logits, so per-token values differ by at most 3x the contract tolerance.
    zr64 = lin["hr"].double() @ lin["wr"].double().t() + lin["bias_r"].double()
    zr64 = REF_SOFTCAP * torch.tanh(zr64 / REF_SOFTCAP)
    s = row_scale(z64, zr64 if op != "logprobs" else None, LINEAR_T)
    for k in out:
        _assert_close_tokens(out[k], single[k], s, 3.0, f"{k} vs single process")
    if extras:
        assert set(extras) == set(EXTRAS)
        for k in ("mean_logits", "log_sum_sq_probs"):
            _assert_close_tokens(extras[k], single_extras[k], s, 3.0, f"{k} vs single process")
        # is_top1 is exact unless the top two logits are closer than rounding can decide.
        top2 = z64.topk(2, -1).values
        decided = (top2[..., 0] - top2[..., 1]) > 1e-4 * s
        assert extras["is_top1"].dtype == torch.bool
        assert torch.equal(extras["is_top1"][decided], single_extras["is_top1"][decided]), "is_top1"
        assert bool(single_extras["is_top1"].any()) and not bool(single_extras["is_top1"].all())

    # Gradients. The contract bounds each path's logits gradient dz, per row n, by
    # r_n = (1e-5 + 1e-6 s_n) max_j |dz_nj| + 2e-7 |g_out_n| (+ ulp); the chain through the
    # logit transform multiplies it by at most logit_scale. Both paths meet it, plus the
    # GEMM rounding above: 3 r_n per entry of d(hW^T + c). The hidden/weight/bias gradients
    # are sums of such entries times |W| or |h|; the sums themselves run in a different
    # order (per shard, then all-reduced), which costs at most the contract's relative
    # rate 1e-5 times the sum of the absolute terms. dz comes from the logits op on the
    # materialised logits (single process).
    u, z = _linear_logits(lin["h"], lin["w"], lin["bias"], LOGIT_SCALE, SOFTCAP)
    z.retain_grad()
    zr = REF_SOFTCAP * torch.tanh((lin["hr"] @ lin["wr"].t() + lin["bias_r"]) / REF_SOFTCAP)
    kw = dict(temperature=LINEAR_T)
    beta, alpha = params
    if op == "logprobs":
        lp, ent = pk.token_logprobs(z, labels, return_entropy=True, **kw)
        mat = {"logp": lp, "entropy": ent}
    elif op == "divergence":
        mat = {"div": pk.token_divergence(z, zr, divergence=div, beta=beta, alpha=alpha, weight=d["weight"], **kw)}
    else:
        t = pk.token_terms(z, labels, zr, divergence=div, beta=beta, alpha=alpha, div_weight=d["weight"],
                           return_entropy=True, **kw)
        mat = {"logp": t.logp, "div": t.div, "entropy": t.entropy}
    sum((v * d["upstream"][k]).sum() for k, v in mat.items()).backward()
    g_out = sum(d["upstream"][k].abs() for k in mat).reshape(-1)
    dz_max = z.grad.abs().reshape(-1, d["vocab"]).amax(-1)
    s_flat = s.reshape(-1)
    r = 3.0 * LOGIT_SCALE * ((1e-5 + 1e-6 * s_flat) * dz_max + 2e-7 * g_out + ulp(dz_max, torch.float32))  # [N]
    du = u.grad.abs().double()  # [N, V]: |dL/du|
    h_abs, w_abs = lin["h"].reshape(-1, HIDDEN).abs().double(), lin["w"].abs().double()
    tol_h = r[:, None] * w_abs.sum(0)[None, :] + 1e-5 * (du @ w_abs)
    _assert_close(h.grad.reshape(-1, HIDDEN), h1.grad.reshape(-1, HIDDEN), tol_h, "hidden gradient (full)")
    tol_w = (r[:, None] * h_abs).sum(0)[None, :] + 1e-5 * (du.t() @ h_abs)
    _assert_close(w.grad, w1.grad[sl], tol_w[sl], "head_weight shard gradient")
    tol_b = r.sum() + 1e-5 * du.sum(0)
    _assert_close(bias.grad, b1.grad[sl], tol_b[sl], "head_bias shard gradient")
    assert float(h1.grad.abs().max()) > 0, "vacuous: zero hidden gradient"
    floats = dict(out, **{k: v for k, v in extras.items() if k != "is_top1"})
    return _digest(*out.values(), *[extras[k] for k in sorted(extras)], h.grad), _kinds(floats)


# --------------------------------------------------------------------------- worker phases


def _numerics(rank, world):
    """Every scenario on this rank: ``(verdicts, digests, kinds)``, keyed by scenario name."""
    group = dist.group.WORLD
    verdicts, digests, kinds = {}, {}, {}
    subgroup = dist.new_group(ranks=[1, 2], timeout=COLLECTIVE_TIMEOUT) if world == 3 else None
    for name, (kind, li, op, div, backend, dtype) in scenarios(world).items():
        try:
            params = PARAMS[li]
            if kind == "subgroup":
                if rank == 0:
                    verdicts[name] = OK  # not a member: nothing to run
                    continue
                d = _data(world, -1)
                sub_rank = dist.get_rank(subgroup)
                assert sub_rank == rank - 1, sub_rank
                if op == "terms":
                    digests[name], kinds[name] = _check_logits_op(d, SUBGROUP_LAYOUT, sub_rank, subgroup, "terms",
                                                                  div, params, dtype, strided=False)
                else:
                    digests[name], kinds[name] = _check_linear_op(d, SUBGROUP_LAYOUT, sub_rank, subgroup, "terms",
                                                                  div, params)
            else:
                d = _data(world, li)
                with pk.use_backend(backend):
                    if kind == "logits":
                        digests[name], kinds[name] = _check_logits_op(d, d["sizes"], rank, group, op, div, params,
                                                                      dtype, strided=(op == "divergence"))
                    else:
                        digests[name], kinds[name] = _check_linear_op(d, d["sizes"], rank, group, op, div, params)
            verdicts[name] = OK
        except Exception:  # noqa: BLE001 - reported to the parent
            verdicts[name] = traceback.format_exc(limit=4)[-2000:]
    # Control: the checker must notice shards handed over in the wrong order (each rank
    # passes its right neighbour's block of an equal-block layout).
    sizes = (64,) * world
    d = _data(world, 0, seed=5)
    d = dict(d, vocab=64 * world, sizes=sizes, a=d["a"][..., :64 * world], b=d["b"][..., :64 * world],
             labels=torch.randint(0, 64 * world, LEAD, generator=torch.Generator().manual_seed(3)))
    d["a"], d["b"] = d["a"].masked_fill(~torch.isfinite(d["a"]), 0.0), d["b"].masked_fill(~torch.isfinite(d["b"]), 0.0)
    rolled = dict(d, a=d["a"].roll(-64, -1), b=d["b"].roll(-64, -1))
    try:
        # Rank r's shard of ``rolled`` is block r + 1 of ``d``; check it as if it were block r.
        shard = rolled["a"][..., 64 * rank:64 * (rank + 1)]
        x = shard.contiguous().requires_grad_()
        out = pk.token_terms(x, d["labels"], rolled["b"][..., 64 * rank:64 * (rank + 1)].contiguous(),
                             divergence="js", process_group=group)
        want, _ = oracle(d["a"], d["labels"], d["b"], None, divergence="js", want_logp=True, want_ref_logp=True)
        assert_tokens_close(out.logp, want["logp"], row_scale(d["a"], d["b"], 1.0), "logp")
        verdicts["control"] = "the checker accepted shards in the wrong order"
    except AssertionError:
        verdicts["control"] = OK
    except Exception:  # noqa: BLE001
        verdicts["control"] = traceback.format_exc(limit=4)[-2000:]
    return verdicts, digests, kinds


def _outcome(fn):
    """``"no error"`` or ``"ExceptionType: message"``: what a call did on this rank."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _bad_input(rank, world):
    """Each bad call on this rank: its outcome; then a good call must still work."""
    group = dist.group.WORLD
    d = _data(world, 0)
    sizes, vocab = d["sizes"], d["vocab"]
    sl = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    a, b, labels = d["a"][..., sl].contiguous(), d["b"][..., sl].contiguous(), d["labels"]
    lin = d["lin"]
    h, w = lin["h"], lin["w"][sl]
    first = rank == 0

    def with_label(value):
        bad = labels.clone()
        bad[1, 3] = value
        return bad

    def nccl_case():
        original = dist.get_backend
        dist.get_backend = lambda group=None: "nccl"
        try:
            pk.token_logprobs(a, labels, process_group=group)
        finally:
            dist.get_backend = original

    cases = {
        "token_count": lambda: pk.token_terms(a[:, :6 if first else 5], labels[:, :6 if first else 5],
                                              b[:, :6 if first else 5], process_group=group),
        "linear_token_count": lambda: pk.linear_token_logprobs(h[:, :6 if first else 5], w,
                                                               labels[:, :6 if first else 5], process_group=group),
        "no_tokens_on_one_rank": lambda: pk.token_terms(a[:, :0 if first else 5], labels[:, :0 if first else 5],
                                                        b[:, :0 if first else 5], process_group=group),
        "divergence": lambda: pk.token_divergence(a, b, divergence="forward_kl" if first else "js",
                                                  process_group=group),
        "linear_divergence": lambda: pk.linear_token_divergence(h, w, lin["hr"], lin["wr"][sl],
                                                                divergence="tv" if first else "chi2",
                                                                process_group=group),
        "return_entropy": lambda: pk.token_logprobs(a, labels, return_entropy=first, process_group=group),
        "reference_presence": lambda: (pk.token_logprobs(a, labels, process_group=group) if first
                                       else pk.token_terms(a, labels, b, process_group=group)),
        "ignore_index": lambda: pk.token_logprobs(a, labels.masked_fill(labels == -100, -1 if first else -100),
                                                  ignore_index=-1 if first else -100, process_group=group),
        "linear_softcap": lambda: pk.linear_token_logprobs(h, w, labels, softcap=2.0 if first else None,
                                                           process_group=group),
        "linear_extras": lambda: pk.linear_token_logprobs(h, w, labels, extras=("mean_logits",) if first else (),
                                                          process_group=group),
        "linear_head_bias": lambda: pk.linear_token_logprobs(h, w, labels, head_bias=torch.zeros(w.shape[0])
                                                             if first else None, process_group=group),
        "linear_logit_scale": lambda: pk.linear_token_logprobs(h, w, labels, logit_scale=1.0 + rank,
                                                               process_group=group),
        "linear_and_logits_op": lambda: (pk.token_logprobs(a, labels, process_group=group) if first
                                         else pk.linear_token_logprobs(h, w, labels, process_group=group)),
        "label_too_large": lambda: pk.token_terms(a, with_label(vocab), b, process_group=group),
        "label_negative": lambda: pk.token_logprobs(a, with_label(-1), process_group=group),
        "linear_label_too_large": lambda: pk.linear_token_terms(h, w, with_label(vocab), lin["hr"], lin["wr"][sl],
                                                                process_group=group),
        "not_a_process_group": lambda: pk.token_logprobs(a, labels, process_group=object()),
        "linear_not_a_process_group": lambda: pk.linear_token_logprobs(h, w, labels, process_group="world"),
        "nccl_with_cpu_tensors": nccl_case,
        "all_shards_empty": lambda: pk.token_logprobs(a[..., :0], torch.full(LEAD, -100), process_group=group),
    }
    assert set(cases) == set(BAD_INPUT_CASES)
    result = {name: _outcome(fn) for name, fn in cases.items()}
    # The group is still in step: a good call after all of them.
    try:
        _check_logits_op(d, sizes, rank, group, "terms", "hellinger", PARAMS[0], torch.float32, strided=False)
        result["good_call_after"] = OK
    except Exception:  # noqa: BLE001
        result["good_call_after"] = traceback.format_exc(limit=4)[-2000:]
    result["vocab"] = vocab
    return result


class _TinyLM(torch.nn.Module):
    """A body and an LM head; ``fused`` takes the head through the fused linear op."""

    def __init__(self, vocab):
        super().__init__()
        self.body = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, vocab)

    def forward(self, x, labels, ref_hidden, ref_weight, fused):
        hidden = torch.tanh(self.body(x))
        if fused:
            return pk.linear_token_terms(hidden, self.head.weight, labels, ref_hidden, ref_weight,
                                         head_bias=self.head.bias, divergence="forward_kl")
        ref_logits = ref_hidden @ ref_weight.t()
        return pk.token_terms(self.head(hidden), labels, ref_logits, divergence="forward_kl")


def _tdpo(model, batch, pairs, fused):
    """TDPO1 loss over the preference pairs ``pairs`` (a slice), mean over those pairs.

    Chosen and rejected go through ONE forward call (DDP expects one per backward).
    """
    def both(key):
        return torch.cat([batch["chosen"][key][pairs], batch["rejected"][key][pairs]])

    labels = both("labels")
    t = model(both("x"), labels, both("ref_hidden"), batch["ref_weight"], fused)
    n = labels.shape[0] // 2
    ratio, kl, mask = t.logp - t.ref_logp, t.div, labels != -100
    loss, _ = pk.losses.tdpo_loss(ratio[:n], ratio[n:], kl[:n], kl[n:], mask[:n], mask[n:], beta=0.5, variant=1,
                                  reduction="mean")
    return loss


def _ddp(rank, world):
    """DDP over ``world`` ranks, each with half of the pairs, vs one process on all of them.

    Rank r's loss is L_r = (1 / B_r) sum_{i in S_r} l_i (the mean over its B_r = B / R
    pairs). DDP all-reduces the gradients and divides by R, so every rank ends with
    (1 / R) sum_r grad L_r = (1 / (R B_r)) sum_i grad l_i = grad[(1 / B) sum_i l_i]: the
    gradient of the mean loss over the full batch in one process. The losses likewise
    average to the full-batch loss.
    """
    from torch.nn.parallel import DistributedDataParallel

    vocab, pairs_total, tokens = 40, 4, 5
    gen = torch.Generator().manual_seed(7)
    batch = {"ref_weight": 0.5 * torch.randn(vocab, HIDDEN, generator=gen)}
    for side in ("chosen", "rejected"):
        labels = torch.randint(0, vocab, (pairs_total, tokens), generator=gen)
        labels[:, 0] = -100  # the prompt's last token
        labels[1, -1] = -100  # padding
        batch[side] = dict(x=torch.randn(pairs_total, tokens, HIDDEN, generator=gen), labels=labels,
                           ref_hidden=torch.randn(pairs_total, tokens, HIDDEN, generator=gen))
    local = slice(rank * pairs_total // world, (rank + 1) * pairs_total // world)
    result = {}
    for fused in (False, True):
        name = "fused_linear" if fused else "logits"
        try:
            torch.manual_seed(0)
            model = _TinyLM(vocab)
            single = copy.deepcopy(model)
            ddp = DistributedDataParallel(model)
            loss = _tdpo(ddp, batch, local, fused)
            loss.backward()
            full_loss = _tdpo(single, batch, slice(0, pairs_total), fused)
            full_loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= world
            # The contract's relative rate 1e-5 per path, twice: summation order differs.
            assert abs(mean_loss.item() - full_loss.item()) <= 2e-5 * (1 + abs(full_loss.item())), (
                f"loss: mean over ranks {mean_loss.item()} vs full batch {full_loss.item()}")
            grads = []
            for (pname, p), p1 in zip(ddp.module.named_parameters(), single.parameters()):
                scale = float(p1.grad.abs().max())
                assert scale > 0, f"vacuous: zero gradient for {pname}"
                _assert_close(p.grad, p1.grad, torch.tensor(2e-5 * scale), f"{name} {pname} gradient")
                grads.append(p.grad)
            result[name] = (OK, _digest(*grads))
        except Exception:  # noqa: BLE001
            result[name] = (traceback.format_exc(limit=4)[-2000:], None)
    return result


def _mismatch(rank, world):
    """Ranks that disagree on a scalar or per-token input the fingerprint does not cover."""
    group = dist.group.WORLD
    d = _data(world, 0)
    sl = slice(sum(d["sizes"][:rank]), sum(d["sizes"][:rank + 1]))
    a, b = d["a"][..., sl].contiguous(), d["b"][..., sl].contiguous()
    labels = d["labels"] if rank == 0 else d["labels"].roll(1, -1)
    weight = d["weight"] if rank == 0 else 1.0 - d["weight"].clamp(max=1)
    cases = {
        "temperature": lambda: pk.token_logprobs(a, d["labels"], temperature=1.0 + 0.5 * rank, process_group=group),
        "js_beta": lambda: pk.token_divergence(a, b, divergence="js", beta=0.2 + 0.5 * rank, process_group=group),
        "labels": lambda: pk.token_terms(a, labels, b, process_group=group),
        "div_weight": lambda: pk.token_terms(a, d["labels"], b, div_weight=weight, process_group=group),
    }
    return {name: _outcome(fn) for name, fn in cases.items()}


# Short-timeout groups for the checks that may hang or crash, made while the ranks are in
# step (a group's timeout also bounds its creation).
_HAZARD_GROUPS = []


def _one_rank_bad_label(rank, world):
    """Rank 1 alone passes a label outside [0, V); on a short-timeout group (it may hang)."""
    assert _HAZARD_GROUPS, "the short-timeout groups could not be made"
    group = _HAZARD_GROUPS[0]
    d = _data(world, 0)
    sl = slice(sum(d["sizes"][:rank]), sum(d["sizes"][:rank + 1]))
    labels = d["labels"].clone()
    if rank == 1:
        labels[0, 0] = d["vocab"]
    return {"outcome": _outcome(lambda: pk.token_logprobs(d["a"][..., sl].contiguous(), labels,
                                                         process_group=group))}


def _linear_ignore_mismatch(rank, world):
    """Linear op where rank 1 ignores one more token than rank 0 (same token count)."""
    assert _HAZARD_GROUPS, "the short-timeout groups could not be made"
    group = _HAZARD_GROUPS[1]
    d = _data(world, 0)
    sl = slice(sum(d["sizes"][:rank]), sum(d["sizes"][:rank + 1]))
    labels = d["labels"].clone()
    if rank == 1:
        labels[0, 0] = -100
    return {"outcome": _outcome(lambda: pk.linear_token_logprobs(d["lin"]["h"], d["lin"]["w"][sl], labels,
                                                                process_group=group))}


def _backward_mismatch(rank, world):
    """Linear ops whose forwards agree but whose backwards would not: rank 1's hidden states need
    no gradient (it would skip the hidden gradient's all-reduce rank 0 waits in), or have another
    width (the all-reduces would differ in size). Forward and backward, on short-timeout groups."""
    assert len(_HAZARD_GROUPS) == 4, "the short-timeout groups could not be made"
    d = _data(world, 0)
    sl = slice(sum(d["sizes"][:rank]), sum(d["sizes"][:rank + 1]))
    lin = d["lin"]

    def step(hidden, weight, group):
        logp = pk.linear_token_logprobs(hidden, weight, d["labels"], process_group=group)
        if logp.requires_grad:
            logp.sum().backward()

    width = HIDDEN - 4 * rank
    return {
        "needs_grad": _outcome(lambda: step(lin["h"].clone().requires_grad_(rank == 0),
                                            lin["w"][sl].clone().requires_grad_(), _HAZARD_GROUPS[2])),
        "hidden_size": _outcome(lambda: step(lin["h"][..., :width].clone().requires_grad_(),
                                             lin["w"][sl, :width].clone().requires_grad_(), _HAZARD_GROUPS[3])),
    }


_PHASES = {"numerics": _numerics, "bad_input": _bad_input, "ddp": _ddp, "mismatch": _mismatch,
           "one_rank_bad_label": _one_rank_bad_label, "backward_mismatch": _backward_mismatch}


def _worker(rank, world, port, results, hazard):
    torch.set_num_threads(1)  # 2-3 ranks share the machine's cores
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
    except Exception:  # noqa: BLE001
        results.put((rank, "init", traceback.format_exc(limit=4)))
        return
    if world == 2:
        try:
            dist.barrier()  # in step: the short timeout also bounds the groups' creation
            _HAZARD_GROUPS.extend(dist.new_group(timeout=HAZARD_TIMEOUT) for _ in range(4))
        except Exception:  # noqa: BLE001 - the two hazard checks then report this
            pass
    for phase in _phases(world):
        try:
            payload = _PHASES[phase](rank, world)
        except Exception:  # noqa: BLE001
            payload = {"__phase_error__": traceback.format_exc(limit=6)[-3000:]}
        results.put((rank, phase, payload))
    # Everything above is delivered before the last check, which may kill this process.
    results.close()
    results.join_thread()
    if world == 2:
        try:
            payload = _linear_ignore_mismatch(rank, world)
        except Exception:  # noqa: BLE001
            payload = {"__phase_error__": traceback.format_exc(limit=6)[-3000:]}
        hazard.put((rank, "linear_ignore_mismatch", payload))
        hazard.close()
        hazard.join_thread()
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------- parent side


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _collect(q, expected, deadline, procs, into):
    while set(expected) - set(into) and time.monotonic() < deadline:
        try:
            rank, phase, payload = q.get(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                try:  # a last item may still be in the pipe
                    rank, phase, payload = q.get(timeout=1.0)
                except queue.Empty:
                    break
            else:
                continue
        into[(rank, phase)] = payload


def _spawn(world):
    ctx = mp.get_context("spawn")
    results, hazard = ctx.Queue(), ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, results, hazard), daemon=True) for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    got, hazards = {}, {}
    try:
        deadline = start + GROUP_DEADLINE_S
        _collect(results, [(r, ph) for r in range(world) for ph in _phases(world)], deadline, procs, got)
        if world == 2:
            _collect(hazard, [(r, "linear_ignore_mismatch") for r in range(world)],
                     min(deadline, time.monotonic() + 30), procs, hazards)
    finally:
        for p in procs:
            p.join(timeout=max(1.0, min(20.0, start + GROUP_DEADLINE_S - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return {"results": got, "hazards": hazards, "exitcodes": [p.exitcode for p in procs],
            "seconds": time.monotonic() - start}


_RUNS = {}


def _run(world):
    """The verdicts of the ``world``-rank group, spawned once per session."""
    if world not in _RUNS:
        _RUNS[world] = _spawn(world)
    return _RUNS[world]


def worker_payload(world, rank, phase, store="results"):
    """What rank ``rank`` of the ``world``-rank group sent for ``phase`` (``store``: ``"results"``, or
    ``"hazards"`` for the last check, which may kill the process); fails the calling test where the
    group could not start, the rank sent nothing in time or its phase raised."""
    run = _run(world)
    key = (rank, phase)
    if ("init" in {p for _, p in run[store]}):
        pytest.fail(f"init_process_group failed: {run[store]}")
    assert key in run[store], (f"rank {rank} sent no '{phase}' result within the deadline "
                               f"(exit codes {run['exitcodes']}, {run['seconds']:.0f} s)")
    payload = run[store][key]
    if isinstance(payload, dict) and "__phase_error__" in payload:
        pytest.fail(f"rank {rank} phase {phase} raised:\n{payload['__phase_error__']}")
    return payload

