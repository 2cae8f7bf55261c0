"""The logits ops inside CUDA graphs, and what becomes of the label check there.

The label range check reads a reduction back to the host, which a capturing CUDA stream
refuses, so the ops skip it while the current stream captures (``checks.check_label_range``);
the kernels then keep an out-of-range label from reading out of bounds.

* Without a GPU the capture is simulated (``torch.cuda.is_current_stream_capturing``
  answers True): an out-of-range label neither raises nor reads a tensor back to the host,
  and every other token's outputs and gradient row are those of a checked call.
* On a GPU a ``torch.cuda.CUDAGraph`` captures the op and replays it on new data, and
  ``torch.compile(mode="reduce-overhead")`` runs it inside Inductor's CUDA graphs (forward
  alone, and forward with backward) with no CUDA graph skipped.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from torch._dynamo.utils import counters

import prefopt_kernels as pk
from contract import DEVICE, backends_under_test

ALL_BACKENDS = backends_under_test() + ["reference"]
V = 50
EXACT = dict(rtol=0, atol=0)  # the same kernels on the same rows


@contextlib.contextmanager
def _simulated_capture(monkeypatch, forbid_host_reads: bool = True):
    """The current CUDA stream is capturing; any read of a tensor's value on the host fails."""
    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host during capture")

    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        if forbid_host_reads:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
                patch.setattr(torch.Tensor, name, host_read)
        yield


def _inputs():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, V, generator=gen) * 3, torch.randn(2, 6, V, generator=gen) * 3
    labels = torch.randint(0, V, (2, 6), generator=gen)
    labels[0, 1] = -100
    bad = labels.clone()
    bad[0, 2], bad[1, 4] = V, -1  # past the vocabulary, and negative but not ignore_index
    return *(x.to(DEVICE) for x in (a, b, labels, bad)), (bad == labels).to(DEVICE)


def _terms_and_grad(a, labels, b):
    a = a.detach().clone().requires_grad_(True)
    terms = pk.token_terms(a, labels, b, divergence="js", return_entropy=True)
    (terms.logp.sum() + terms.div.sum() + terms.entropy.sum()).backward()
    return terms, a.grad


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_label_check_is_skipped_while_capturing(backend, monkeypatch):
    a, b, labels, bad, others = _inputs()
    with pk.use_backend(backend):
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {V}\)"):
            pk.token_terms(a, bad, b)  # not capturing: checked
        want, want_grad = _terms_and_grad(a, labels, b)
        with _simulated_capture(monkeypatch):
            got, got_grad = _terms_and_grad(a, bad, b)
    for name in ("logp", "ref_logp"):
        torch.testing.assert_close(getattr(got, name)[others], getattr(want, name)[others], **EXACT, msg=name)
    # Neither depends on the label: the same at every token.
    torch.testing.assert_close(got.entropy, want.entropy, **EXACT)
    torch.testing.assert_close(got.div, want.div, **EXACT)
    torch.testing.assert_close(got_grad[others], want_grad[others], **EXACT)
    assert bool(torch.isfinite(got_grad).all())


@pytest.mark.parametrize("batch_invariant", [False, True])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_linear_label_check_is_skipped_while_capturing(backend, batch_invariant, monkeypatch):
    """While capturing, the fused linear ops read nothing back: they compute every token (no
    compaction, no range check), zero the dropped ones' outputs, and their slice kernels guard
    an unchecked label all the same. Computing the dropped rows too changes the GEMMs' row
    counts, so the other tokens match the uncaptured call to fp32 rounding, and bit for bit
    under ``batch_invariant`` (fixed tiles)."""
    _, _, labels, bad, others = _inputs()
    gen = torch.Generator().manual_seed(1)
    hidden, head = torch.randn(2, 6, 8, generator=gen).to(DEVICE), torch.randn(V, 8, generator=gen).to(DEVICE)
    tolerance = EXACT if batch_invariant else dict(rtol=1e-6, atol=1e-6)
    with pk.use_backend(backend):
        want = pk.linear_token_logprobs(hidden, head, labels, return_entropy=True, batch_invariant=batch_invariant)
        with _simulated_capture(monkeypatch):
            got = pk.linear_token_logprobs(hidden, head, bad, return_entropy=True, batch_invariant=batch_invariant)
    torch.testing.assert_close(got[0][others], want[0][others], **tolerance)
    torch.testing.assert_close(got[1], want[1], **tolerance)
    assert (got[0][labels == -100] == 0).all() and (got[1][labels == -100] == 0).all()


# --------------------------------------------------------------------------- on a GPU

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _skip_unless_on_cuda(backend: str) -> None:
    module = importlib.import_module(f"prefopt_kernels.backends.{backend}")
    if not (module.is_available() and module.supports(torch.device("cuda"))):
        pytest.skip(f"{backend} does not run on CUDA tensors here")


def _cuda_inputs(gen, n=256, vocab=32_000):
    logits = torch.randn(n, vocab, device="cuda", generator=gen) * 3
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    labels[::5] = -100
    return logits, labels


def _out_of_range(labels, vocab):
    """``labels`` with tokens 3 and 7 (read ones) past the vocabulary and negative, and the
    mask of the other tokens."""
    bad = labels.clone()
    bad[3], bad[7] = vocab, -1
    return bad, bad == labels


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_token_logprobs_captured_in_a_cuda_graph(backend):
    _skip_unless_on_cuda(backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits, labels = _cuda_inputs(gen)
    with pk.use_backend(backend):
        # Warm up on a side stream, as torch.cuda.graph asks: the Triton kernels compile and
        # the labels are checked there, outside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            pk.token_logprobs(logits, labels, return_entropy=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logp, entropy = pk.token_logprobs(logits, labels, return_entropy=True)
        graph.replay()
        want_logp, want_entropy = pk.token_logprobs(logits, labels, return_entropy=True)
        torch.testing.assert_close(logp, want_logp, **EXACT)
        torch.testing.assert_close(entropy, want_entropy, **EXACT)

        # New data in the captured inputs, two labels out of range: the replay checks nothing
        # and reads nothing out of bounds; the other tokens follow the new data.
        fresh_logits, fresh_labels = _cuda_inputs(gen)
        bad, others = _out_of_range(fresh_labels, logits.shape[-1])
        logits.copy_(fresh_logits)
        labels.copy_(bad)
        graph.replay()
        torch.cuda.synchronize()  # a faulting kernel would raise here
        want_logp, want_entropy = pk.token_logprobs(fresh_logits, fresh_labels, return_entropy=True)
        torch.testing.assert_close(logp[others], want_logp[others], **EXACT)
        torch.testing.assert_close(entropy, want_entropy, **EXACT)
        with pytest.raises(ValueError, match="labels must lie"):
            pk.token_logprobs(logits, labels)  # eager calls still check


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_linear_logprobs_captured_in_a_cuda_graph(backend):
    """A fused linear call captures with nothing read back (every token computed, the dropped
    ones zeroed); replays follow new labels, newly ignored ones included, bit for bit with
    eager calls under ``batch_invariant`` (whose tiles do not depend on the kept count)."""
    _skip_unless_on_cuda(backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    vocab, ignore = 32_000, -100
    hidden = torch.randn(256, 64, device="cuda", generator=gen)
    head = torch.randn(vocab, 64, device="cuda", generator=gen) * 0.1
    labels = torch.randint(0, vocab, (256,), device="cuda", generator=gen)
    labels[::5] = ignore

    def call():
        return pk.linear_token_logprobs(hidden, head, labels, return_entropy=True, batch_invariant=True)

    with pk.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logp, entropy = call()
        for every in (5, 3):
            fresh = torch.randint(0, vocab, (256,), device="cuda", generator=gen)
            fresh[::every] = ignore
            labels.copy_(fresh)
            graph.replay()
            want_logp, want_entropy = call()
            torch.testing.assert_close(logp, want_logp, **EXACT)
            torch.testing.assert_close(entropy, want_entropy, **EXACT)
            assert bool((logp[labels == ignore] == 0).all()) and bool((entropy[labels == ignore] == 0).all())


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_token_logprobs_compiled_with_reduce_overhead(backend):
    """Inductor's CUDA graph trees run a compiled function once without a graph (warm-up),
    capture it on the second call and replay it from the third: only the warm-up checks the
    labels."""
    _skip_unless_on_cuda(backend)
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits, labels = _cuda_inputs(gen)

    def logprobs(logits, labels):
        return pk.token_logprobs(logits, labels, return_entropy=True)

    def loss_of(logits, labels):
        logp, entropy = pk.token_logprobs(logits, labels, return_entropy=True)
        return -logp.mean() - 0.1 * entropy.mean()

    compiled = torch.compile(logprobs, mode="reduce-overhead", fullgraph=True)
    compiled_loss = torch.compile(loss_of, mode="reduce-overhead", fullgraph=True)
    with pk.use_backend(backend):
        want_logp, want_entropy = logprobs(logits, labels)
        for _ in range(3):  # warm-up, capture, replay
            torch.compiler.cudagraph_mark_step_begin()
            logp, entropy = compiled(logits, labels)
        torch.testing.assert_close(logp, want_logp, **EXACT)
        torch.testing.assert_close(entropy, want_entropy, **EXACT)

        bad, others = _out_of_range(labels, logits.shape[-1])
        torch.compiler.cudagraph_mark_step_begin()
        logp, entropy = compiled(logits, bad)  # a replay: no check, no out-of-bounds read
        torch.cuda.synchronize()
        torch.testing.assert_close(logp[others], want_logp[others], **EXACT)
        torch.testing.assert_close(entropy, want_entropy, **EXACT)

        eager = logits.clone().requires_grad_(True)
        want_loss = loss_of(eager, labels)
        want_loss.backward()
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            x = logits.clone().requires_grad_(True)
            loss = compiled_loss(x, labels)
            loss.backward()
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, eager.grad, rtol=1e-5, atol=1e-9)
    assert counters["inductor"]["cudagraph_skips"] == 0, "Inductor ran a graph without CUDA graphs"
