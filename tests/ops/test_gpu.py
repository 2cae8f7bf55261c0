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


def _float64_terms(a, b, labels):
    """``log p(label)`` and ``KL(q ‖ p)`` per row, float64, for policy logits ``a`` and reference ``b``."""
    lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    return lp.gather(-1, labels[:, None])[:, 0], (lq.exp() * (lq - lp)).sum(-1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_tensors_on_a_gpu_that_is_not_the_current_one(backend):
    """``device_map="auto"`` leaves the LM head on another GPU than the current one: the logits
    and linear ops launch on their tensors' GPU, forward and backward."""
    if backend not in pk.available_backends():
        pytest.skip(f"{backend} not available")
    torch.cuda.set_device(0)
    gpu1 = torch.device("cuda", 1)
    gen = torch.Generator().manual_seed(0)
    n, vocab, width = 37, 3001, 64
    a, b = torch.randn(n, vocab, generator=gen) * 3, torch.randn(n, vocab, generator=gen) * 3
    hidden, ref_hidden = torch.randn(n, width, generator=gen), torch.randn(n, width, generator=gen)
    head = torch.randn(vocab, width, generator=gen) * 0.2
    labels = torch.randint(0, vocab, (n,), generator=gen)

    logits = a.to(gpu1, copy=True).requires_grad_(True)
    h = hidden.to(gpu1, copy=True).requires_grad_(True)
    with pk.use_backend(backend):
        terms = pk.token_terms(logits, labels.to(gpu1), b.to(gpu1), divergence="forward_kl")
        (terms.logp.sum() + terms.div.sum()).backward()
        linear = pk.linear_token_terms(h, head.to(gpu1), labels.to(gpu1), ref_hidden.to(gpu1), head.to(gpu1),
                                       divergence="forward_kl")
        (linear.logp.sum() + linear.div.sum()).backward()
    assert torch.cuda.current_device() == 0
    assert terms.logp.device == linear.logp.device == logits.grad.device == h.grad.device == gpu1

    a64 = a.double().requires_grad_(True)
    logp, div = _float64_terms(a64, b, labels)
    (logp.sum() + div.sum()).backward()
    torch.testing.assert_close(terms.logp.cpu().double(), logp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.div.cpu().double(), div.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad.cpu().double(), a64.grad, rtol=1e-5, atol=1e-6)

    h64 = hidden.double().requires_grad_(True)
    logp, div = _float64_terms(h64 @ head.double().t(), ref_hidden.double() @ head.double().t(), labels)
    (logp.sum() + div.sum()).backward()
    torch.testing.assert_close(linear.logp.cpu().double(), logp.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(linear.div.cpu().double(), div.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.grad.cpu().double(), h64.grad, rtol=1e-3, atol=1e-4)
