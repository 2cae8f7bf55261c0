"""Checks that only a GPU can run: real Triton at production sizes.

Each compares with a float64 computation of the same rounded inputs, done in chunks so the
check itself fits in memory.
"""

import pytest
import torch

import prefopt_kernels as pk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _float64_logprobs(logits, labels, chunk=4096):
    out = []
    for start in range(0, logits.shape[0], chunk):
        rows = logits[start:start + chunk].double()
        out.append(torch.log_softmax(rows, -1).gather(-1, labels[start:start + chunk, None])[:, 0])
    return torch.cat(out)


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_row_offsets_beyond_int32(backend):
    """N * V > 2^31 elements: offsets must be computed in int64."""
    if backend not in pk.available_backends():
        pytest.skip(f"{backend} not available")
    vocab = 131_072
    n = 2 ** 31 // vocab + 64
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * vocab * 2:
        pytest.skip("not enough GPU memory")
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device="cuda")
    with pk.use_backend(backend):
        logp = pk.token_logprobs(logits, labels)
    tail = slice(n - 128, n)  # rows past element 2^31
    want = _float64_logprobs(logits[tail], labels[tail])
    torch.testing.assert_close(logp[tail].double(), want, rtol=0, atol=2e-4)
    del logits


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("divergence", ["forward_kl", "js"])
def test_largest_vocabulary(backend, divergence):
    if backend not in pk.available_backends():
        pytest.skip(f"{backend} not available")
    vocab, n = 262_144, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = (torch.randn(n, vocab, device="cuda", generator=gen) * 4).to(torch.bfloat16).requires_grad_(True)
    b = (torch.randn(n, vocab, device="cuda", generator=gen) * 4).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    with pk.use_backend(backend):
        terms = pk.token_terms(a, labels, b, divergence=divergence)
        (terms.logp.sum() + terms.div.sum()).backward()
    a64, b64 = a.detach().double().requires_grad_(True), b.double()
    lp, lq = torch.log_softmax(a64, -1), torch.log_softmax(b64, -1)
    if divergence == "forward_kl":
        div = (lq.exp() * (lq - lp)).sum(-1)
    else:
        lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
        div = 0.5 * (lq.exp() * (lq - lm)).sum(-1) + 0.5 * (lp.exp() * (lp - lm)).sum(-1)
    logp = lp.gather(-1, labels[:, None])[:, 0]
    (logp.sum() + div.sum()).backward()
    torch.testing.assert_close(terms.logp.double(), logp.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms.div.double(), div.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=0, atol=2e-3 * a64.grad.abs().max().item())
