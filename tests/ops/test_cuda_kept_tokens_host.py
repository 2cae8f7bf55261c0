"""The CUDA kept-tokens scan's per-thread rules (csrc/cuda/kept_tokens_tile.h) compiled for the
host, driven as kept_tokens.cu drives them: tile by tile, each of the block's threads flags its
consecutive tokens, the threads' counts are scanned exclusively (here in order, on the device
by warp shuffles), each thread writes its indices from the tile's running offset plus its own,
and the rest is -1. The result must be the torch oracle's (``nonzero``, ``aminmax``); a driver
whose offsets are off by one thread's count must fail. The device code cannot run here; this
checks its rules. Needs nvcc."""

from __future__ import annotations

import subprocess

import pytest
import torch

from cuda_host import build_host_driver

DRIVER = r"""
#include <cstdio>
#include <vector>
#include "cuda/kept_tokens_tile.h"
using namespace prefopt;
using namespace prefopt::cuda;

// mode 0: the header's rules; 1: each thread writes from its inclusive count (one too far).
int main() {
  int mode, has_labels, has_weight;
  long long n, ignore_index;
  while (std::scanf("%d %lld %d %d %lld", &mode, &n, &has_labels, &has_weight, &ignore_index) == 5) {
    std::vector<int64_t> labels(n), index(n, -2);
    std::vector<float> weight(n);
    for (auto& x : labels) { long long v; std::scanf("%lld", &v); x = v; }
    for (auto& x : weight) std::scanf("%f", &x);
    KeptTokensArgs a;
    a.n_tokens = n;
    a.labels = has_labels ? labels.data() : nullptr;
    a.weight = has_weight ? weight.data() : nullptr;
    a.ignore_index = ignore_index;
    a.index = index.data();
    KeptSummary range;
    int64_t offset = 0;
    for (int64_t tile = 0; tile < n; tile += kTileTokens) {
      std::vector<unsigned> flags(kKeptThreads);
      std::vector<int64_t> first(kKeptThreads);
      for (int t = 0; t < kKeptThreads; ++t) flags[t] = thread_kept_flags(a, tile, t, first[t], range);
      int64_t before = 0;
      for (int t = 0; t < kKeptThreads; ++t) {
        const int count = kept_count(flags[t]);
        write_kept(a, first[t], flags[t], offset + before + (mode == 1 ? count : 0));
        before += count;
      }
      offset += before;
    }
    for (int64_t i = offset; i < n; ++i) index[i] = -1;
    for (int64_t i = 0; i < n; ++i) std::printf("%lld ", (long long)index[i]);
    std::printf("\n%lld %lld %lld\n", (long long)offset, (long long)range.low, (long long)range.high);
  }
}
"""
IGNORE = -100
INT64_MAX, INT64_MIN = 2 ** 63 - 1, -2 ** 63


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build_host_driver(tmp_path_factory, "kept_tokens", DRIVER)


def _run(driver, labels, weight, mode=0):
    """The driver's ``(index, [count, low, high])`` for ``labels`` / ``weight`` (``None``: absent)."""
    n = (labels if labels is not None else weight).numel()
    text = (f"{mode} {n} {int(labels is not None)} {int(weight is not None)} {IGNORE}\n"
            + " ".join(str(int(v)) for v in (labels if labels is not None else torch.zeros(n, dtype=torch.int64)))
            + "\n" + " ".join(repr(float(v)) for v in (weight if weight is not None else torch.zeros(n))) + "\n")
    done = subprocess.run([driver], input=text, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    index_line, summary_line = done.stdout.split("\n")[:2]
    return [int(v) for v in index_line.split()], [int(v) for v in summary_line.split()]


def _expected(labels, weight):
    keep = labels != IGNORE if labels is not None else weight != 0
    kept = keep.nonzero()[:, 0]
    n = keep.numel()
    low, high = INT64_MAX, INT64_MIN
    if labels is not None and kept.numel():
        low, high = (int(v) for v in torch.aminmax(labels[kept]))
    return kept.tolist() + [-1] * (n - kept.numel()), [kept.numel(), low, high]


# Within one tile, across the tile of 8192 tokens, and not a multiple of a thread's 8 tokens.
@pytest.mark.parametrize("n", [1, 13, 8191, 8192, 8193, 20011])
def test_labels_and_weights_match_the_oracle(driver, n):
    generator = torch.Generator().manual_seed(n)
    labels = torch.randint(-3, 60, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < 0.5] = IGNORE
    weight = torch.randn(n, generator=generator)
    weight[torch.rand(n, generator=generator) < 0.3] = 0.0
    assert _run(driver, labels, None) == _expected(labels, None)
    assert _run(driver, None, weight) == _expected(None, weight)
    assert _run(driver, labels, weight) == _expected(labels, None)


def test_all_and_none_kept(driver):
    n = 9000
    labels = torch.arange(n) % 70
    assert _run(driver, labels, None) == (list(range(n)), [n, 0, 69])
    assert _run(driver, torch.full((n,), IGNORE), None) == ([-1] * n, [0, INT64_MAX, INT64_MIN])


def test_a_broken_offset_is_caught(driver):
    n = 100
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    labels[::2] = IGNORE
    assert _run(driver, labels, None, mode=1) != _expected(labels, None)
