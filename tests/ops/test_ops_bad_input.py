"""Bad input to the logits ops fails loudly, naming the argument, on every backend, before any
kernel runs (conftest.py's ``no_kernels``).

``CASES`` is the logits ops' table of bad input: name -> (call, exception type, message
fragment naming the argument); the linear ops' table is in tests/linear/, the losses' in
tests/losses/, the integrations' in tests/integrations/.
"""

import math

import pytest
import torch

import prefopt_kernels as pk
from contract import DEVICE, backends_under_test

ALL_BACKENDS = backends_under_test() + ["reference"]


def _inputs(dtype=torch.float32, shape=(2, 3, 50)):
    a = torch.randn(shape, device=DEVICE).to(dtype)
    b = torch.randn(shape, device=DEVICE).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], device=DEVICE)
    return a, b, labels


CASES = {
    "logits not a tensor": (lambda a, b, y: pk.token_logprobs(a.tolist(), y), TypeError, "logits"),
    "integer logits": (lambda a, b, y: pk.token_logprobs(a.long(), y), TypeError, "logits"),
    "float64 logits": (lambda a, b, y: pk.token_logprobs(a.double(), y), TypeError, "logits"),
    "scalar logits": (lambda a, b, y: pk.token_logprobs(a[0, 0, 0], y), ValueError, "logits"),
    "non-contiguous vocabulary": (lambda a, b, y: pk.token_logprobs(a.transpose(1, 2), y[:, :1].expand(2, 50)),
                                  ValueError, "contiguous vocabulary"),
    "float labels": (lambda a, b, y: pk.token_logprobs(a, y.float()), TypeError, "labels"),
    "bool labels": (lambda a, b, y: pk.token_logprobs(a, y > 0), TypeError, "labels"),
    "labels shape": (lambda a, b, y: pk.token_logprobs(a, y[:, :2]), ValueError, "labels"),
    "label = V": (lambda a, b, y: pk.token_logprobs(a, torch.full_like(y, 50)), ValueError, "labels"),
    "negative label": (lambda a, b, y: pk.token_logprobs(a, torch.full_like(y, -1)), ValueError, "labels"),
    "label outside with other ignore_index": (
        lambda a, b, y: pk.token_logprobs(a, torch.full_like(y, -100), ignore_index=-1), ValueError, "labels"),
    "ignore_index not int": (lambda a, b, y: pk.token_logprobs(a, y, ignore_index=1.5), TypeError, "ignore_index"),
    "zero temperature": (lambda a, b, y: pk.token_logprobs(a, y, temperature=0.0), ValueError, "temperature"),
    "negative temperature": (lambda a, b, y: pk.token_terms(a, y, b, temperature=-1.0), ValueError, "temperature"),
    "nan temperature": (lambda a, b, y: pk.token_divergence(a, b, temperature=math.nan), ValueError, "temperature"),
    "string temperature": (lambda a, b, y: pk.token_divergence(a, b, temperature="1"), TypeError, "temperature"),
    "ref shape": (lambda a, b, y: pk.token_divergence(a, b[:, :2]), ValueError, "ref_logits"),
    "ref vocabulary": (lambda a, b, y: pk.token_terms(a, y, b[..., :49]), ValueError, "ref_logits"),
    "ref dtype": (lambda a, b, y: pk.token_divergence(a, b.half()), TypeError, "ref_logits"),
    "ref not a tensor": (lambda a, b, y: pk.token_divergence(a, None), TypeError, "ref_logits"),
    "ref non-contiguous vocabulary": (
        lambda a, b, y: pk.token_divergence(a, b.transpose(1, 2).contiguous().transpose(1, 2)),
        ValueError, "ref_logits"),
    "unknown divergence": (lambda a, b, y: pk.token_divergence(a, b, divergence="kl"), ValueError, "divergence"),
    "js beta = 0": (lambda a, b, y: pk.token_divergence(a, b, divergence="js", beta=0.0), ValueError, "beta"),
    "js beta = 1": (lambda a, b, y: pk.token_terms(a, y, b, divergence="js", beta=1.0), ValueError, "beta"),
    "alpha = 1": (lambda a, b, y: pk.token_divergence(a, b, divergence="alpha", alpha=1.0), ValueError, "alpha"),
    "alpha = 0": (lambda a, b, y: pk.token_divergence(a, b, divergence="alpha", alpha=0), ValueError, "alpha"),
    "alpha = inf": (lambda a, b, y: pk.token_divergence(a, b, divergence="alpha", alpha=math.inf), ValueError, "alpha"),
    "temperature whose reciprocal is subnormal": (
        lambda a, b, y: pk.token_logprobs(a, y, temperature=1e38), ValueError, "temperature"),
    "subnormal temperature": (lambda a, b, y: pk.token_logprobs(a, y, temperature=1e-39), ValueError, "temperature"),
    "bool temperature": (lambda a, b, y: pk.token_logprobs(a, y, temperature=True), TypeError, "temperature"),
    "js beta rounds to 1": (lambda a, b, y: pk.token_divergence(a, b, divergence="js", beta=1 - 1e-17),
                            ValueError, "beta"),
    "js beta below the edge": (lambda a, b, y: pk.token_divergence(a, b, divergence="js", beta=1e-31),
                               ValueError, "beta"),
    "alpha within 1e-30 of 1": (lambda a, b, y: pk.token_divergence(a, b, divergence="alpha", alpha=1 + 1e-17),
                                ValueError, "alpha"),
    "alpha within 1e-30 of 0": (lambda a, b, y: pk.token_divergence(a, b, divergence="alpha", alpha=-1e-31),
                                ValueError, "alpha"),
    "alpha beyond 1e6": (lambda a, b, y: pk.token_terms(a, y, b, divergence="alpha", alpha=-2e6), ValueError, "alpha"),
    "alpha nan": (lambda a, b, y: pk.token_divergence(a, b, divergence="alpha", alpha=math.nan), ValueError, "alpha"),
    "beta a string": (lambda a, b, y: pk.token_divergence(a, b, beta="0.5"), TypeError, "beta"),
    "alpha a tensor": (lambda a, b, y: pk.token_divergence(a, b, divergence="alpha", alpha=torch.tensor(0.5)),
                       TypeError, "alpha"),
    "inplace on expanded logits": (
        lambda a, b, y: pk.token_logprobs(a[:, :1].expand(2, 3, 50), y, inplace_backward=True),
        ValueError, "inplace_backward"),
    "inplace on overlapping logits": (
        lambda a, b, y: pk.token_logprobs(a.reshape(-1).as_strided((2, 3, 50), (150, 25, 1)), y,
                                          inplace_backward=True),
        ValueError, "inplace_backward"),
    "weight shape": (lambda a, b, y: pk.token_divergence(a, b, weight=torch.ones(3, device=DEVICE)), ValueError, "weight"),
    "div_weight shape": (lambda a, b, y: pk.token_terms(a, y, b, div_weight=torch.ones(2, 3, 1, device=DEVICE)),
                         ValueError, "div_weight"),
    "weight not a tensor": (lambda a, b, y: pk.token_divergence(a, b, weight=[1.0]), TypeError, "weight"),
    "inplace_backward not bool": (lambda a, b, y: pk.token_logprobs(a, y, inplace_backward="yes"),
                                  TypeError, "inplace_backward"),
    # A string would otherwise be truthy: "no" asking for the entropy.
    "return_entropy a string": (lambda a, b, y: pk.token_logprobs(a, y, return_entropy="no"),
                                TypeError, "return_entropy"),
    "return_entropy a string (terms)": (lambda a, b, y: pk.token_terms(a, y, b, return_entropy="no"),
                                        TypeError, "return_entropy"),
    "unknown backend": (lambda a, b, y: pk.use_backend("cuda"), ValueError, "name"),
    # The registered ops carry ignore_index as an int64: a wider int must fail the check (a
    # ValueError naming it), not the op schema's conversion (a RuntimeError).
    "ignore_index 2^63": (lambda a, b, y: pk.token_logprobs(a, y, ignore_index=2 ** 63), ValueError, "ignore_index"),
    "ignore_index -2^63-1": (lambda a, b, y: pk.token_logprobs(a, y, ignore_index=-2 ** 63 - 1), ValueError,
                             "ignore_index"),
    "ignore_index 2^70": (lambda a, b, y: pk.token_logprobs(a, y, ignore_index=2 ** 70), ValueError, "ignore_index"),
    "ignore_index 2^63 (terms)": (lambda a, b, y: pk.token_terms(a, y, b, ignore_index=2 ** 63), ValueError,
                                  "ignore_index"),
    "ignore_index -2^63-1 (terms)": (lambda a, b, y: pk.token_terms(a, y, b, ignore_index=-2 ** 63 - 1), ValueError,
                                     "ignore_index"),
    "ignore_index 2^70 (terms)": (lambda a, b, y: pk.token_terms(a, y, b, ignore_index=2 ** 70), ValueError,
                                  "ignore_index"),
}
if DEVICE.type == "cuda":
    CASES["labels on another device"] = (lambda a, b, y: pk.token_logprobs(a, y.cpu()), ValueError, "labels")
    CASES["ref on another device"] = (lambda a, b, y: pk.token_divergence(a, b.cpu()), ValueError, "ref_logits")
else:
    CASES["meta device"] = (lambda a, b, y: pk.token_logprobs(a.to("meta"), y), ValueError, "logits")


def _on_backend(name, op, *args):
    with pk.use_backend(name):
        return op(*args)


# A backend that cannot run on this device is refused, naming it (the first such one, if any).
MISSING = [n for n in ("triton", "native") if n not in backends_under_test()]
if MISSING:
    CASES[f"backend {MISSING[0]} that cannot run here"] = (
        lambda a, b, y: _on_backend(MISSING[0], pk.token_logprobs, a, y), ValueError, MISSING[0])


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("no_kernels", ALL_BACKENDS, indirect=True)
def test_bad_input_raises_naming_the_argument(no_kernels, name):
    call, error, fragment = CASES[name]
    a, b, labels = _inputs()
    with pytest.raises(error, match=fragment):
        call(a, b, labels)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_leading_shape_gives_empty_outputs(backend):
    a = torch.randn(0, 7, 30, device=DEVICE, requires_grad=True)
    with pk.use_backend(backend):
        logp = pk.token_logprobs(a, torch.zeros(0, 7, dtype=torch.long, device=DEVICE))
        logp.sum().backward()
    assert logp.shape == (0, 7) and a.grad.shape == a.shape


# Every op taking ignore_index, with the inputs of _inputs and _linear_inputs.
IGNORE_INDEX_CALLS = {
    "token_logprobs": lambda a, b, y, h, w, i: pk.token_logprobs(a, y, ignore_index=i),
    "token_terms": lambda a, b, y, h, w, i: pk.token_terms(a, y, b, ignore_index=i),
    "linear_token_logprobs": lambda a, b, y, h, w, i: pk.linear_token_logprobs(h, w, y, ignore_index=i),
    "linear_token_terms": lambda a, b, y, h, w, i: pk.linear_token_terms(h, w, y, h, w, ignore_index=i),
}


def _linear_inputs(labels, vocab=50, width=8):
    return torch.randn(*labels.shape, width, device=DEVICE), torch.randn(vocab, width, device=DEVICE)


@pytest.mark.parametrize("value", [2 ** 63 - 1, -2 ** 63], ids=["2^63-1", "-2^63"])
@pytest.mark.parametrize("op", sorted(IGNORE_INDEX_CALLS))
def test_ignore_index_at_the_int64_limits_is_accepted(op, value):
    a, b, labels = _inputs()
    labels[0, 0] = value  # one token ignored, the rest read
    out = IGNORE_INDEX_CALLS[op](a, b, labels, *_linear_inputs(labels), value)
    logp = out if isinstance(out, torch.Tensor) else out.logp
    assert logp[0, 0] == 0 and bool(torch.isfinite(logp).all()) and bool((logp[0, 1:] < 0).all())
