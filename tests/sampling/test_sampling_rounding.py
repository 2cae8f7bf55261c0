"""A half-precision gradient of a sampled ``logp`` beside the entropy (or a divergence) is rounded
once: every element lies within one ulp of the logits' dtype of the exact float64 gradient (a
faithful rounding), plus the fp32 arithmetic's own slack. Rounding the backend's term to the
dtype first and the sum again misses that where the two terms nearly cancel."""

import pytest
import torch

import prefopt_kernels as pk

from contract import backends_on
from sampling_cases import ambiguous_rows, oracle

BACKENDS = backends_on(torch.device("cpu"))
# Significand bits after the point and the least normal exponent of each half-precision dtype.
FORMATS = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}
# The fp32 arithmetic's error, relative to the size of the terms (its fast exp included).
FP32_SLACK = 1e-5


def ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` around each float64 value (subnormals included)."""
    bits, least = FORMATS[dtype]
    exponent = torch.floor(torch.log2(exact.abs())).clamp(min=least)
    return torch.exp2(exponent - bits)


def entropy_gradient(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``dH/dx = -p (log p + H) / T`` of float64 rows ``[n, V]``."""
    logp = torch.log_softmax(x / temperature, 1)
    p = logp.exp()
    entropy = -(p * logp).sum(1, keepdim=True)
    return -p * (logp + entropy) / temperature


def case(dtype, seed=5):
    gen = torch.Generator().manual_seed(seed)
    vocab, temperature = 1531, 0.8
    x = (torch.randn(3, 4, vocab, generator=gen) * 2).to(dtype)
    labels = torch.where(torch.rand(3, 4, generator=gen) < 0.5, x.float().argmax(-1),
                         torch.randint(0, vocab, (3, 4), generator=gen))
    labels[2, 1] = -100
    # Opposite signs, so that the two terms nearly cancel on some entries of every row.
    g_logp = torch.rand(3, 4, generator=gen) + 0.5
    g_other = -(torch.rand(3, 4, generator=gen) + 0.5)
    return x, labels, temperature, g_logp, g_other


def forward_kl_gradient(x: torch.Tensor, ref: torch.Tensor, temperature: float) -> torch.Tensor:
    """``d KL(q || p) / dx = (p - q) / T`` of float64 rows ``[n, V]``."""
    return (torch.softmax(x / temperature, 1) - torch.softmax(ref / temperature, 1)) / temperature


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(FORMATS))
@pytest.mark.parametrize("other", ["entropy", "forward_kl"])
def test_sampled_logp_gradient_beside_another_term_is_rounded_once(backend, dtype, other):
    x, labels, temperature, g_logp, g_other = case(dtype)
    ref = (x.float() + torch.randn(x.shape, generator=torch.Generator().manual_seed(9))).to(dtype)
    options = dict(top_k=40, top_p=0.9)
    xi = x.clone().requires_grad_()
    with pk.use_backend(backend):
        if other == "entropy":
            logp, value = pk.token_logprobs(xi, labels, temperature=temperature, return_entropy=True, **options)
        else:
            terms = pk.token_terms(xi, labels, ref, divergence="forward_kl", temperature=temperature, **options)
            logp, value = terms.logp, terms.div
    (logp * g_logp + value * g_other).sum().backward()

    rows = x.double().reshape(-1, x.shape[-1])
    _, _, logp_grad = oracle(x, labels, temperature, options["top_k"], options["top_p"], None)
    logp_term = logp_grad * g_logp.reshape(-1, 1).double()
    if other == "entropy":
        other_gradient = entropy_gradient(rows, temperature)
    else:
        other_gradient = forward_kl_gradient(rows, ref.double().reshape(rows.shape), temperature)
    other_term = other_gradient * g_other.reshape(-1, 1).double()
    read = (labels != -100).reshape(-1, 1)
    exact = torch.where(read, logp_term + other_term, 0.0)
    clear = ~ambiguous_rows(x, temperature, options["top_k"], options["top_p"], None)
    got = xi.grad.double().reshape(rows.shape)
    error = (got - exact).abs()
    allowed = ulp(exact, dtype) + FP32_SLACK * (logp_term.abs() + other_term.abs())
    worst = (error / allowed)[clear].max().item()
    assert worst <= 1.0, f"off by {worst:.2f} of one {dtype} rounding"
    # The terms do cancel somewhere: a double rounding would show.
    cancelling = (logp_term + other_term).abs() < 0.05 * other_term.abs()
    assert bool((cancelling & read & clear[:, None]).any())
