"""The backends' ``kept_tokens``: one launch writing the kept tokens' indices (-1 padded to
``[N]``) and ``[count, least kept label, greatest kept label]``, against a plain torch oracle
(``nonzero``, ``aminmax``) written from the rule itself: a label not ``ignore_index``; without
labels, a non-zero weight; without either, every token. Then what the fused linear call makes
of it: the first bad label named, the range left unchecked while a graph is captured."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels import checks
from prefopt_kernels.backends import native, reference
from prefopt_kernels.backends import triton as triton_backend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cuda_tools_available() -> bool:
    from benchmarks import sass
    try:
        sass.cuda_tools()
        return True
    except RuntimeError:
        return False


BACKENDS = [
    pytest.param(native, id="native", marks=pytest.mark.skipif(not native.is_available(), reason="needs the native build")),
    pytest.param(triton_backend, id="triton", marks=pytest.mark.skipif(not triton_backend.is_available(), reason="needs Triton")),
    pytest.param(reference, id="reference"),
]
# Around the Triton program's block of 2048 and the CUDA tile, none a power of two but 2048.
SIZES = [0, 1, 7, 2047, 2048, 2049, 3001, 4097]
VOCAB = 50
IGNORE = -100
INT64_MAX, INT64_MIN = 2 ** 63 - 1, -2 ** 63


def oracle(labels, weight, ignore_index, n):
    """``(index [N], [count, low, high])`` from torch alone."""
    if labels is not None:
        keep = labels != ignore_index
    elif weight is not None:
        keep = weight != 0
    else:
        keep = torch.ones(n, dtype=torch.bool)
    kept = keep.nonzero()[:, 0]
    index = torch.cat([kept, torch.full((n - kept.numel(),), -1, dtype=torch.int64)])
    low, high = INT64_MAX, INT64_MIN
    if labels is not None and kept.numel():
        low, high = (int(v) for v in torch.aminmax(labels[kept]))
    return index, [kept.numel(), low, high]


def _labels(kind, n, generator):
    if kind == "all kept":
        return torch.randint(0, VOCAB, (n,), generator=generator)
    if kind == "none kept":
        return torch.full((n,), IGNORE, dtype=torch.int64)
    # Negative and >= V labels are kept (the range check is the caller's), ignored ones dropped.
    labels = torch.randint(-7, VOCAB + 7, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < 0.4] = IGNORE
    return labels


def _weight(n, generator):
    """Zeros (+0 and -0 dropped), NaN (kept) and ordinary values."""
    weight = torch.randn(n, generator=generator)
    draw = torch.rand(n, generator=generator)
    weight[draw < 0.3] = 0.0
    weight[(draw >= 0.3) & (draw < 0.4)] = -0.0
    weight[(draw >= 0.4) & (draw < 0.45)] = float("nan")
    return weight


def _check(backend, labels, weight, ignore_index, n):
    index, summary = backend.kept_tokens(labels, weight, ignore_index, n, torch.device("cpu"))
    expected_index, expected_summary = oracle(labels, weight, ignore_index, n)
    assert index.dtype == torch.int64 and summary.dtype == torch.int64
    assert summary.tolist() == expected_summary
    assert torch.equal(index, expected_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["all kept", "none kept", "random"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_labels_against_the_oracle(backend, n, kind, with_weight):
    """With labels a zero weight keeps its token: only the label decides."""
    generator = torch.Generator().manual_seed(n)
    labels = _labels(kind, n, generator)
    _check(backend, labels, _weight(n, generator) if with_weight else None, IGNORE, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_weight_alone_and_neither(backend, n):
    generator = torch.Generator().manual_seed(n + 1)
    _check(backend, None, _weight(n, generator), IGNORE, n)
    _check(backend, None, torch.zeros(n), IGNORE, n)
    _check(backend, None, None, IGNORE, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_ignore_index_and_extreme_labels(backend):
    """int64 throughout: an ignore_index past 32 bits, labels at the int64 ends kept as they are."""
    n, ignore = 3001, 2 ** 40 + 3
    labels = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(5))
    labels[::3] = ignore  # 1001 ignored tokens, one of which is then kept:
    labels[3] = INT64_MIN
    labels[2000] = INT64_MAX
    labels[1] = ignore - 2 ** 32  # equal to ignore_index in its low 32 bits only
    _check(backend, labels, None, ignore, n)
    index, summary = backend.kept_tokens(labels, None, ignore, n, torch.device("cpu"))
    assert summary.tolist() == [n - 1000, INT64_MIN, INT64_MAX]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_example(backend):
    """A worked case: tokens 1, 3, 4 kept (labels 9, 0, 4), two ignored, then -1 padding."""
    labels = torch.tensor([IGNORE, 9, IGNORE, 0, 4])
    index, summary = backend.kept_tokens(labels, None, IGNORE, 5, torch.device("cpu"))
    assert index.tolist() == [1, 3, 4, -1, -1] and summary.tolist() == [3, 0, 9]


# --------------------------------------------------------------------------- the fused call


def _head(n, hidden=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=generator).requires_grad_()
    w = (torch.randn(VOCAB, hidden, generator=generator) * hidden ** -0.5).requires_grad_()
    return h, w


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_the_first_bad_kept_label_is_named(backend):
    """Ignored tokens are passed over; the error names the first label out of range in token
    order, whichever bound it breaks, with the text of ``check_label_range``."""
    if backend == "native" and not native.is_available():
        pytest.skip("needs the native build")
    h, w = _head(6)
    labels = torch.tensor([3, IGNORE, VOCAB + 4, 2, -3, VOCAB])
    with pk.use_backend(backend):
        with pytest.raises(ValueError, match=rf"^labels must lie in \[0, {VOCAB}\) or equal "
                                             rf"ignore_index={IGNORE}; found {VOCAB + 4}$"):
            pk.linear_token_logprobs(h, w, labels)
        with pytest.raises(ValueError, match=r"found -3$"):
            pk.linear_token_logprobs(h, w, labels.clamp(max=VOCAB - 1))
        # A negative ignore_index other than -100: -100 is then a bad label.
        with pytest.raises(ValueError, match=r"ignore_index=-1; found -100$"):
            pk.linear_token_logprobs(h, w, labels, ignore_index=-1)


def test_while_capturing_every_token_is_computed(monkeypatch):
    """No read back while a graph is captured: every token goes through the tiles, the kernels
    skip the dropped ones, so the outputs and gradients are those of the eager call; the
    range is not checked."""
    if not native.is_available():
        pytest.skip("needs the native build")
    n = 37
    labels = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(1))
    labels[::4] = IGNORE
    weight = torch.rand(n, generator=torch.Generator().manual_seed(2))
    weight[1::3] = 0.0

    def run():
        h, w = _head(n, seed=3)
        h_ref, w_ref = _head(n, seed=4)
        logp = pk.linear_token_logprobs(h, w, labels)
        div = pk.linear_token_divergence(h, w, h_ref.detach(), w_ref.detach(), div_weight=weight)
        (logp.sum() + div.sum()).backward()
        return [logp.detach(), div.detach(), h.grad, w.grad]

    with pk.use_backend("native"):
        eager = run()
        monkeypatch.setattr(checks, "capturing", lambda: True)
        captured = run()
        bad = labels.clone()
        bad[1] = VOCAB + 1
        pk.linear_token_logprobs(*_head(n), bad)  # unchecked: no error
    assert (eager[0][::4] == 0).all() and (eager[1][1::3] == 0).all()
    for a, b in zip(eager, captured):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


# Each specialisation of the launch: labels (an ignore_index within 32 bits and past them),
# weight alone, neither.
SM90_SCRIPT = """
import sys, tempfile, torch
from benchmarks import static_gpu
from prefopt_kernels.backends import triton as backend
n = 5000
for labels, weight, ignore_index in ((torch.zeros(n, dtype=torch.int64), None, -100), (None, torch.ones(n), -100),
                                     (torch.zeros(n, dtype=torch.int64), None, 2 ** 40), (None, None, -100)):
    with static_gpu.recorded_launches() as launches:
        backend.kept_tokens(labels, weight, ignore_index, n, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as workdir:
        _, name, threads = static_gpu.compile_sm90(launches[0], workdir)
    print(name, threads)
"""


@pytest.mark.skipif(shutil.which("ptxas") is None and not _cuda_tools_available(),
                    reason="no CUDA binary tools (Triton's wheel bundles them)")
def test_triton_kernel_compiles_for_sm90():
    """The interpreter runs what the compiler may refuse (a global that is not a constexpr, say):
    each specialisation of the launch is compiled for sm_90, without a GPU, outside the
    interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SM90_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["kept_tokens_kernel", "256"] * 4
