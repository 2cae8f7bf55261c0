"""Bad input to the fused linear ops fails loudly, naming the argument first, on every backend
that runs on CPU tensors, before any kernel runs (conftest.py's ``no_kernels``).

``BAD`` is the linear ops' table of bad input: name -> (call, exception type, the argument
the message starts with); the logits ops' table is in tests/ops/test_ops_bad_input.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import prefopt_kernels as pk

from contract import backends_on

BACKENDS = backends_on(torch.device("cpu"))


def _bad_inputs():
    g = torch.Generator().manual_seed(131)
    h = torch.randn(2, 3, 8, generator=g)
    w = torch.randn(50, 8, generator=g)
    b = torch.randn(50, generator=g)
    y = torch.randint(0, 50, (2, 3), generator=g)
    rh = torch.randn(2, 3, 6, generator=g)
    rw = torch.randn(50, 6, generator=g)
    return h, w, b, y, rh, rw


LP = pk.linear_token_logprobs
DIV = pk.linear_token_divergence
TERMS = pk.linear_token_terms
BAD = {
    "hidden float64": (lambda h, w, b, y, rh, rw: LP(h.double(), w, y), TypeError, "hidden"),
    "hidden int": (lambda h, w, b, y, rh, rw: LP(h.long(), w, y), TypeError, "hidden"),
    "hidden not a tensor": (lambda h, w, b, y, rh, rw: LP(h.tolist(), w, y), TypeError, "hidden"),
    "ref_hidden float64": (lambda h, w, b, y, rh, rw: DIV(h, w, rh.double(), rw), TypeError, "ref_hidden"),
    "head_weight wrong H": (lambda h, w, b, y, rh, rw: LP(h, w[:, :-1], y), ValueError, "head_weight"),
    "head_weight 1-D": (lambda h, w, b, y, rh, rw: LP(h, w[0], y), ValueError, "head_weight"),
    "head_weight float64": (lambda h, w, b, y, rh, rw: LP(h, w.double(), y), TypeError, "head_weight"),
    "ref_head_weight wrong H": (lambda h, w, b, y, rh, rw: DIV(h, w, rh, w), ValueError, "ref_head_weight"),
    "ref_head_weight other V": (lambda h, w, b, y, rh, rw: TERMS(h, w, y, rh, rw[:-1]), ValueError,
                                "ref_head_weight"),
    "head_bias wrong shape": (lambda h, w, b, y, rh, rw: LP(h, w, y, head_bias=b[:-1]), ValueError, "head_bias"),
    "head_bias 2-D": (lambda h, w, b, y, rh, rw: LP(h, w, y, head_bias=b[None]), ValueError, "head_bias"),
    "head_bias integer": (lambda h, w, b, y, rh, rw: LP(h, w, y, head_bias=b.long()), TypeError, "head_bias"),
    "ref_head_bias wrong shape": (lambda h, w, b, y, rh, rw: DIV(h, w, rh, rw, ref_head_bias=b[:7]), ValueError,
                                  "ref_head_bias"),
    "labels shape": (lambda h, w, b, y, rh, rw: LP(h, w, y[:, :2]), ValueError, "labels"),
    "labels float": (lambda h, w, b, y, rh, rw: LP(h, w, y.float()), TypeError, "labels"),
    "labels = V": (lambda h, w, b, y, rh, rw: LP(h, w, torch.full_like(y, 50)), ValueError, "labels"),
    "labels negative": (lambda h, w, b, y, rh, rw: TERMS(h, w, torch.full_like(y, -1), rh, rw), ValueError, "labels"),
    "softcap 0": (lambda h, w, b, y, rh, rw: LP(h, w, y, softcap=0.0), ValueError, "softcap"),
    "softcap negative": (lambda h, w, b, y, rh, rw: LP(h, w, y, softcap=-30.0), ValueError, "softcap"),
    "softcap inf": (lambda h, w, b, y, rh, rw: LP(h, w, y, softcap=math.inf), ValueError, "softcap"),
    "softcap string": (lambda h, w, b, y, rh, rw: LP(h, w, y, softcap="30"), TypeError, "softcap"),
    # Past the fp32 range the tiles' softcap * tanh(z / softcap) is inf * 0 or 0 / 0.
    "softcap beyond fp32": (lambda h, w, b, y, rh, rw: LP(h, w, y, softcap=1e300), ValueError, "softcap"),
    "softcap below fp32 normals": (lambda h, w, b, y, rh, rw: LP(h, w, y, softcap=1e-50), ValueError, "softcap"),
    "labels None": (lambda h, w, b, y, rh, rw: LP(h, w, None), TypeError, "labels"),
    "labels None (terms)": (lambda h, w, b, y, rh, rw: TERMS(h, w, None, rh, rw), TypeError, "labels"),
    "ref_hidden None": (lambda h, w, b, y, rh, rw: DIV(h, w, None, rw), TypeError, "ref_hidden"),
    "ref_hidden None (terms)": (lambda h, w, b, y, rh, rw: TERMS(h, w, y, None, None), TypeError, "ref_hidden"),
    "ref_softcap negative": (lambda h, w, b, y, rh, rw: DIV(h, w, rh, rw, ref_softcap=-1.0), ValueError,
                             "ref_softcap"),
    # logit_scale 0 is legal (the uniform distribution, as TRL: test_logit_scale_zero_is_uniform).
    "logit_scale inf": (lambda h, w, b, y, rh, rw: LP(h, w, y, logit_scale=math.inf), ValueError, "logit_scale"),
    "logit_scale -inf": (lambda h, w, b, y, rh, rw: LP(h, w, y, logit_scale=-math.inf), ValueError, "logit_scale"),
    "logit_scale nan": (lambda h, w, b, y, rh, rw: LP(h, w, y, logit_scale=math.nan), ValueError, "logit_scale"),
    "logit_scale None": (lambda h, w, b, y, rh, rw: LP(h, w, y, logit_scale=None), TypeError, "logit_scale"),
    "logit_scale beyond fp32": (lambda h, w, b, y, rh, rw: LP(h, w, y, logit_scale=1e39), ValueError, "logit_scale"),
    "ref_logit_scale inf": (lambda h, w, b, y, rh, rw: DIV(h, w, rh, rw, ref_logit_scale=math.inf), ValueError,
                            "ref_logit_scale"),
    "return_entropy a string": (lambda h, w, b, y, rh, rw: LP(h, w, y, return_entropy="no"), TypeError,
                                "return_entropy"),
    "return_entropy a string (terms)": (lambda h, w, b, y, rh, rw: TERMS(h, w, y, rh, rw, return_entropy="no"),
                                        TypeError, "return_entropy"),
    "extras unknown": (lambda h, w, b, y, rh, rw: LP(h, w, y, extras=("entropy",)), ValueError, "extras"),
    "extras bare string": (lambda h, w, b, y, rh, rw: LP(h, w, y, extras="is_top1"), TypeError, "extras"),
    "memory_budget 0": (lambda h, w, b, y, rh, rw: LP(h, w, y, memory_budget=0), ValueError, "memory_budget"),
    "memory_budget float": (lambda h, w, b, y, rh, rw: LP(h, w, y, memory_budget=1e6), ValueError, "memory_budget"),
    "batch_invariant a string": (lambda h, w, b, y, rh, rw: LP(h, w, y, batch_invariant="yes"), TypeError,
                                 "batch_invariant"),
    "batch_invariant 1 (divergence)": (lambda h, w, b, y, rh, rw: DIV(h, w, rh, rw, batch_invariant=1), TypeError,
                                       "batch_invariant"),
    "batch_invariant None (terms)": (lambda h, w, b, y, rh, rw: TERMS(h, w, y, rh, rw, batch_invariant=None),
                                     TypeError, "batch_invariant"),
    "ref_hidden leading shape": (lambda h, w, b, y, rh, rw: DIV(h, w, rh[:, :2], rw), ValueError, "ref_hidden"),
    "ref_hidden leading shape (terms)": (lambda h, w, b, y, rh, rw: TERMS(h, w, y, rh[:1], rw), ValueError,
                                         "ref_hidden"),
    "div_weight shape": (lambda h, w, b, y, rh, rw: DIV(h, w, rh, rw, div_weight=torch.ones(3)), ValueError,
                         "div_weight"),
    "divergence unknown": (lambda h, w, b, y, rh, rw: DIV(h, w, rh, rw, divergence="kl"), ValueError, "divergence"),
    "temperature 0": (lambda h, w, b, y, rh, rw: LP(h, w, y, temperature=0.0), ValueError, "temperature"),
    "js beta 1": (lambda h, w, b, y, rh, rw: DIV(h, w, rh, rw, divergence="js", beta=1.0), ValueError, "beta"),
    # The registered ops carry ignore_index as an int64: a wider int must fail the check (a
    # ValueError naming it), not the op schema's conversion (a RuntimeError).
    "ignore_index 2^63": (lambda h, w, b, y, rh, rw: LP(h, w, y, ignore_index=2 ** 63), ValueError, "ignore_index"),
    "ignore_index -2^63-1": (lambda h, w, b, y, rh, rw: LP(h, w, y, ignore_index=-2 ** 63 - 1), ValueError,
                             "ignore_index"),
    "ignore_index 2^70": (lambda h, w, b, y, rh, rw: LP(h, w, y, ignore_index=2 ** 70), ValueError, "ignore_index"),
    "ignore_index 2^63 (terms)": (lambda h, w, b, y, rh, rw: TERMS(h, w, y, h, w, ignore_index=2 ** 63), ValueError,
                                  "ignore_index"),
    "ignore_index -2^63-1 (terms)": (lambda h, w, b, y, rh, rw: TERMS(h, w, y, h, w, ignore_index=-2 ** 63 - 1),
                                     ValueError, "ignore_index"),
    "ignore_index 2^70 (terms)": (lambda h, w, b, y, rh, rw: TERMS(h, w, y, h, w, ignore_index=2 ** 70), ValueError,
                                  "ignore_index"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("no_kernels", BACKENDS, indirect=True)
def test_bad_input_raises_naming_the_argument(case, no_kernels):
    fn, error, argument = BAD[case]
    with pytest.raises(error, match=rf"^{argument}\b"):
        fn(*_bad_inputs())
