"""Values and gradients of every fused linear op against the explicit projection and float64
(``check``; the tolerances are derived in linear_cases.py): every op and divergence, leading
shapes, bf16 inputs and bf16 autocast."""

import pytest
import torch

from linear_cases import (BACKENDS, DIVERGENCE_CASES, ISA_BACKENDS, Call, check, explicit_on, make_head,
                          make_labels, make_pair, make_upstream, make_weight, run_explicit)

# The divergences test_terms runs in the Triton interpreter (test_divergence runs every one there).
TRITON_TERMS_CASES = [("forward_kl", 0.5, 0.5), ("js", 0.2, 0.5), ("tv", 0.5, 0.5), ("alpha", 0.5, -0.4)]


def _ids(cases):
    return [f"{d}-b{b}-a{a}" for d, b, a in cases]


LOGPROB_CASES = {
    "plain": dict(),
    "bias_scale_temperature_entropy": dict(bias=True, scale=0.7, temperature=0.7, return_entropy=True),
    "softcap_entropy_ignored": dict(bias=True, softcap=4.0, temperature=1.3, return_entropy=True,
                                    ignored=(0, 5, 6)),
    "scale_softcap_negative_scale": dict(scale=-1.6, softcap=2.5, return_entropy=True, ignored=(3,)),
}


@pytest.mark.parametrize("case", list(LOGPROB_CASES))
@pytest.mark.parametrize("backend", ISA_BACKENDS)
def test_logprobs(backend, case):
    cfg = dict(LOGPROB_CASES[case])
    ignored = cfg.pop("ignored", ())
    temperature = cfg.pop("temperature", 1.0)
    entropy = cfg.pop("return_entropy", False)
    policy = make_head((12,), 32, 300, seed=1, **cfg)
    labels = make_labels((12,), 300, seed=2, ignored=ignored)
    check(backend, Call("logprobs", policy, labels, temperature=temperature, return_entropy=entropy), seed=3,
          key=("logprobs", case))


@pytest.mark.parametrize("divergence, beta, alpha", DIVERGENCE_CASES, ids=_ids(DIVERGENCE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence(backend, divergence, beta, alpha):
    # chi2 and alpha > 1 weigh p / q: keep the reference close enough that they stay moderate.
    # The reference alone is soft-capped here (the policy is in test_terms).
    policy, ref = make_pair((8,), seed=11, vocab=200, scales=(1.3, 0.8), ref_std=2.0, softcaps=(None, 4.0))
    weight = make_weight((8,), seed=12)
    call = Call("divergence", policy, ref=ref, div_weight=weight, divergence=divergence, beta=beta, alpha=alpha,
                temperature=1.2)
    check(backend, call, seed=13, key=("divergence", divergence, beta, alpha), explicit=explicit_on(backend))


@pytest.mark.parametrize("divergence, beta, alpha", DIVERGENCE_CASES, ids=_ids(DIVERGENCE_CASES))
@pytest.mark.parametrize("backend", ISA_BACKENDS)
def test_terms(backend, divergence, beta, alpha):
    if backend == "triton" and (divergence, beta, alpha) not in TRITON_TERMS_CASES:
        pytest.skip("the Triton interpreter is slow: every divergence runs on it in test_divergence")
    policy, ref = make_pair((9,), seed=21, vocab=200, softcaps=(5.0, 6.0), scales=(1.0, 1.2), ref_std=2.0)
    labels = make_labels((9,), 200, seed=22, ignored=(2,))
    weight = make_weight((9,), seed=23)
    call = Call("terms", policy, labels, ref, div_weight=weight, divergence=divergence, beta=beta, alpha=alpha,
                temperature=0.9, return_entropy=True)
    check(backend, call, seed=24, key=("terms", divergence, beta, alpha), explicit=explicit_on(backend))


LEADING = {
    "slice_B_Tm1": dict(lead=(2, 3), sliced=True),  # [B, T-1, H] view of a [B, T, H] tensor
    "flat_N": dict(lead=(5,)),  # 1-D leading shape
    "three_d": dict(lead=(2, 2, 2)),
    "single_token": dict(lead=()),
}


@pytest.mark.parametrize("shape", list(LEADING))
@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shapes(backend, shape):
    cfg = LEADING[shape]
    lead = cfg["lead"]
    policy, ref = make_pair(lead, seed=41, vocab=200, sliced=cfg.get("sliced", False))
    n = int(torch.Size(lead).numel())
    labels = make_labels(lead, 200, seed=42, ignored=(1,) if n > 1 else ())
    weight = make_weight(lead, seed=43) if n > 1 else None
    explicit = explicit_on(backend)
    check(backend, Call("logprobs", policy, labels, return_entropy=True), seed=44, key=("lead", shape, 1),
          explicit=explicit)
    check(backend, Call("terms", policy, labels, ref, div_weight=weight, divergence="reverse_kl"), seed=45,
          key=("lead", shape, 2), explicit=explicit)


@pytest.mark.parametrize("op", ["logprobs", "terms_js", "divergence_alpha"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend, op):
    """bf16 hidden and heads: bf16 tiles on CPU; against the explicit bf16 path and float64."""
    softcaps = (6.0, None) if op == "terms_js" else (None, None)
    policy, ref = make_pair((8,), seed=51, vocab=200, dtype=torch.bfloat16, softcaps=softcaps, scales=(1.1, 1.0),
                            ref_std=2.0)
    labels = make_labels((8,), 200, seed=52, ignored=(3,))
    if op == "logprobs":
        call = Call("logprobs", policy, labels, return_entropy=True, temperature=0.8)
    elif op == "terms_js":
        call = Call("terms", policy, labels, ref, divergence="js", beta=0.3, div_weight=make_weight((8,), seed=53),
                    return_entropy=True)
    else:
        call = Call("divergence", policy, ref=ref, divergence="alpha", alpha=0.3)
    check(backend, call, seed=54, key=("bf16", op), explicit=explicit_on(backend))


@pytest.mark.parametrize("op", ["logprobs", "terms"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16(backend, op):
    """fp32 inputs under CPU bf16 autocast: bf16 GEMM inputs, fp32 gradients."""
    policy, ref = make_pair((8,), seed=61, vocab=200, scales=(0.9, 1.0), ref_std=2.0)
    labels = make_labels((8,), 200, seed=62, ignored=(0,))
    if op == "logprobs":
        call = Call("logprobs", policy, labels, return_entropy=True)
    else:
        call = Call("terms", policy, labels, ref, divergence="forward_kl", temperature=1.5)
    values, _, grads, _ = check(backend, call, seed=63, autocast=True, key=("autocast", op),
                                explicit=explicit_on(backend))
    assert all(g.dtype == torch.float32 for g in grads if g is not None)
    # Autocast really changed the computation: the fp32 oracle's bound is far tighter than
    # the bf16 GEMM's error, so the result must differ from the fp32 explicit path.
    e_values, _ = run_explicit(backend, call, make_upstream(call, 63), torch.float32)
    assert (values["logp"] - e_values["logp"]).abs().max() > 1e-4
