"""The CUDA forward's candidate rules (csrc/cuda/top_candidates.h) compiled for the host, driven
as candidates_device.cuh drives them: tiles offered against a running threshold, appends of the
values above it, radix selection by 8-bit digit histograms (pick_digit over 32 lanes' bins, as
the block's first warp scans them), compaction by kept_slot when a tile no longer fits, and the
bitonic sort at the end. The result must be torch.topk's values exactly (NaN never entering,
-inf padded past the row); a driver with a broken key or an off-by-one selection must fail.
The device code cannot run here; this checks its rules. Needs nvcc."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cuda_host import build_host_driver

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>
#include "cuda/top_candidates.h"
using namespace prefopt::cuda;

// mode 0: the header's rules; 1: raw fp32 bits as keys (not monotone for negatives);
// 2: the selection asks for one key fewer than kept.
int mode = 0;

uint32_t key_of(float v) {
  if (mode == 1) { uint32_t b; std::memcpy(&b, &v, 4); return b; }
  return order_key(v);
}
float value_of(uint32_t k) {
  if (mode == 1) { float v; std::memcpy(&v, &k, 4); return v; }
  return key_value(k);
}

// Radix selection of the rank-th largest key, as keep_largest runs it; ties is its rank among
// the keys equal to it.
uint32_t select_kth(const std::vector<uint32_t>& keys, uint32_t rank, uint32_t& ties) {
  uint32_t prefix = 0;
  for (int pass = 0; pass < kDigitPasses; ++pass) {
    uint32_t histogram[kDigitCount] = {0};
    for (uint32_t key : keys)
      if ((key & chosen_mask(pass)) == prefix) ++histogram[key_digit(key, pass)];
    constexpr int kPerLane = kDigitCount / 32;
    uint32_t through[32];
    uint32_t running = 0;
    for (int lane = 31; lane >= 0; --lane) {
      for (int d = 0; d < kPerLane; ++d) running += histogram[lane * kPerLane + d];
      through[lane] = running;
    }
    DigitPick pick{-1, rank};
    for (int lane = 0; lane < 32; ++lane) {
      uint32_t own = 0;
      for (int d = 0; d < kPerLane; ++d) own += histogram[lane * kPerLane + d];
      const uint32_t above = through[lane] - own;
      if (above < rank && rank <= through[lane])
        pick = pick_digit(histogram, lane * kPerLane, (lane + 1) * kPerLane, above, rank);
    }
    if (pick.digit < 0) { std::printf("no digit\n"); std::exit(1); }
    prefix |= uint32_t(pick.digit) << digit_shift(pass);
    rank = pick.rank;
  }
  ties = rank;
  return prefix;
}

// The count largest keys, exactly count of them; returns the count-th largest.
uint32_t keep_largest(std::vector<uint32_t>& keys, int64_t count) {
  uint32_t ties = 0;
  const uint32_t kth = select_kth(keys, uint32_t(mode == 2 ? count - 1 : count), ties);
  std::vector<uint32_t> kept(count, 0);
  int64_t above = 0, tied = 0;
  for (uint32_t key : keys) {
    if (key < kth) continue;
    const int64_t slot = kept_slot(key, kth, ties, count, key > kth ? above++ : tied++);
    if (slot >= 0 && slot < count) kept[slot] = key;
  }
  keys = kept;
  return kth;
}

int main() {
  int64_t count, tile, n;
  while (std::scanf("%d %ld %ld %ld", &mode, &count, &tile, &n) == 4) {
    std::vector<float> row(n);
    for (auto& x : row) {
      char word[64];
      std::scanf("%63s", word);
      x = std::strtof(word, nullptr);
    }
    std::vector<uint32_t> buffer;
    float threshold = -INFINITY;
    for (int64_t t0 = 0; t0 < n; t0 += tile) {
      const int64_t t1 = t0 + tile < n ? t0 + tile : n;
      bool hit = false;
      for (int64_t j = t0; j < t1; ++j) hit = hit || row[j] > threshold;
      if (!hit) continue;
      for (int64_t j = t0; j < t1; ++j)
        if (row[j] > threshold) buffer.push_back(key_of(row[j]));
      if (int64_t(buffer.size()) > candidate_capacity(count, tile)) { std::printf("overflow\n"); return 1; }
      if (needs_compaction(buffer.size(), count, tile)) threshold = value_of(keep_largest(buffer, count));
    }
    int64_t kept = buffer.size();
    if (kept > count) {
      keep_largest(buffer, count);
      kept = count;
    }
    const int64_t width = sort_width(count);
    buffer.resize(width, 0);
    for (int64_t k = 2; k <= width; k <<= 1)
      for (int64_t j = k >> 1; j > 0; j >>= 1)
        for (int64_t i = 0; i < width; ++i)
          if ((i ^ j) > i && bitonic_swaps(buffer[i], buffer[i ^ j], i, k)) std::swap(buffer[i], buffer[i ^ j]);
    for (int64_t i = 0; i < count; ++i) std::printf("%.9g ", i < kept ? value_of(buffer[i]) : -INFINITY);
    std::printf("\n");
  }
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build_host_driver(tmp_path_factory, "candidates", DRIVER)


def _run(driver, cases, mode=0):
    """The driver's candidates of each ``(count, tile, row)``, fp32 ``[count]`` each."""
    text = "".join(f"{mode} {count} {tile} {row.size}\n" + " ".join(repr(float(x)) for x in row) + "\n"
                   for count, tile, row in cases)
    done = subprocess.run([driver], input=text, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-500:] + done.stderr[-500:]
    return [np.array([float(x) for x in line.split()], dtype=np.float32) for line in done.stdout.strip().splitlines()]


def _expected(row, count):
    """torch.topk's values of the row without its NaN, -inf padded to ``count``."""
    finite = torch.from_numpy(row[~np.isnan(row)])
    top = torch.topk(finite, min(count, finite.numel())).values if finite.numel() else finite
    return torch.cat([top, torch.full((count - top.numel(),), float("-inf"))])


def _rows(seed):
    """Rows of a few thousand values (not powers of two): plain, ascending (the threshold rises on
    every tile), heavy ties on a bf16 grid, with -inf, NaN, +inf and signed zeros, and short."""
    rng = np.random.default_rng(seed)
    plain = (rng.standard_normal(5003) * 4).astype(np.float32)
    rising = np.sort(plain)
    ties = np.round(rng.standard_normal(4099) * 3).astype(np.float32)  # a dozen distinct values
    specials = (rng.standard_normal(3001) * 2).astype(np.float32)
    at = rng.permutation(specials.size)
    specials[at[:300]] = -np.inf
    specials[at[300:330]] = np.nan
    specials[at[330:333]] = np.inf
    specials[at[333:400]] = 0.0
    specials[at[400:460]] = -0.0
    negative = -np.abs(plain[:2047]) - 1  # every key's sign bit set
    short = (rng.standard_normal(37) * 3).astype(np.float32)
    all_nan = np.full(23, np.nan, dtype=np.float32)
    return [plain, rising, ties, specials, negative, short, all_nan]


@pytest.mark.parametrize("count", [1, 51, 1024])
def test_candidates_equal_topk(driver, count):
    # Tiles of 4096 (bf16, 512 threads), 2048 (fp32) and 128 (the scalar path of small rows).
    cases = [(count, tile, row) for tile in (4096, 2048, 128) for row in _rows(count)]
    for (count_, tile, row), got in zip(cases, _run(driver, cases)):
        want = _expected(row, count_)
        assert torch.equal(torch.from_numpy(got), want), (count_, tile, row.size)


def test_candidates_many_compactions(driver):
    # Small tiles and C: the buffer is compacted hundreds of times along the row.
    rng = np.random.default_rng(7)
    row = (rng.standard_normal(6007) * 5).astype(np.float32)
    cases = [(count, tile, row) for count, tile in ((3, 5), (17, 16), (100, 33), (1024, 128))]
    for (count, _, _), got in zip(cases, _run(driver, cases)):
        assert torch.equal(torch.from_numpy(got), _expected(row, count)), count


@pytest.mark.parametrize("mode", [1, 2])
def test_broken_rules_are_caught(driver, mode):
    # Raw fp32 bits as keys order negatives backwards; selecting one key fewer than kept drops a
    # candidate at each compaction. Either must break the equality above somewhere.
    cases = [(count, tile, row) for count in (51, 1024) for tile in (2048, 128) for row in _rows(3)]
    mismatches = sum(not torch.equal(torch.from_numpy(got), _expected(row, count))
                     for (count, _, row), got in zip(cases, _run(driver, cases, mode)))
    assert mismatches > 0


def test_order_key_is_monotone_and_inverted_by_key_value(driver):
    # The largest of each prefix of an ascending row of special values comes back bit for bit
    # (-0 keeps its sign; +0 does not enter over -0, as on the CPU: they compare equal).
    values = np.array([-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38, np.inf], dtype=np.float32)
    cases = [(1, 1, values[:i + 1]) for i in range(values.size)]
    got = np.array([g[0] for g in _run(driver, cases)])
    np.testing.assert_array_equal(got, values)
    assert np.signbit(got[4])


# Several minutes of nvcc on two cores, so opt-in (PREFOPT_CUDA_COMPILE_TEST=1); the committed
# static report (python -m benchmarks --static-gpu) shows the same registers and spills.
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PREFOPT_CUDA_COMPILE_TEST") != "1",
                    reason="set PREFOPT_CUDA_COMPILE_TEST=1 to compile all of row_kernels.cu for sm_90a")
def test_row_kernels_compile_for_sm90_without_spills(tmp_path):
    # Every instantiation of csrc/cuda/row_kernels.cu, the 48 gathering forwards included, with
    # the build's flags for sm_90a: no warning, no spill, no stack frame.
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    from benchmarks.static_gpu import CUDA_FLAGS

    done = subprocess.run([nvcc, "-cubin", "-arch=sm_90a", *CUDA_FLAGS, "-Xptxas", "-v",
                           "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(ROOT, "csrc", "include"),
                           os.path.join(ROOT, "csrc", "cuda", "row_kernels.cu"), "-o", str(tmp_path / "rows.cubin")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "warning" not in log.lower(), log[:3000]
    entries = log.count("Compiling entry function")
    gathering = sum("candidates_forward_kernel" in line for line in log.splitlines()
                    if "Compiling entry function" in line)
    assert gathering == 3 * 8 * 2 and entries > gathering  # dtypes x divergence codes x entropy
    frames = [line for line in log.splitlines() if "bytes stack frame" in line]
    assert len(frames) >= entries
    assert all(line.split()[0] == "0" and "0 bytes spill stores, 0 bytes spill loads" in line for line in frames), \
        [line for line in frames if "0 bytes spill stores, 0 bytes spill loads" not in line][:5]


def test_native_gathers_candidates_on_cuda_when_built_with_it():
    from prefopt_kernels.backends import native

    if not native.is_available():
        pytest.skip("native extension not built")
    on_cpu = native.max_candidates("cpu")
    assert on_cpu == 2048  # csrc/include/prefopt/args.h kMaxCandidates
    assert native.max_candidates("cuda") == (on_cpu if native.has_cuda() else 0)
    assert native.max_candidates("meta") == 0
    assert native.max_candidates("cuda", "fold_with_candidates") == 0  # the CUDA fold gathers none
    assert native.max_candidates("cpu", "fold_with_candidates") == on_cpu
