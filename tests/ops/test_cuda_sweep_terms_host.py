"""The CUDA kernels' second-sweep terms (csrc/cuda/sweep_terms.h) compiled for the host, where
``ex2``/``lg2`` are ``std::exp2``/``std::log2``, against float64: the row sums of alpha,
hellinger and chi2 (value and centred ``sum p (f'(t) - f'(t_k))``) and js's gradient terms
``p (f'(t) - S)``, on rows formed as the kernels form them (raw logits less a max, base-2
logs). The device code cannot run here; this checks its arithmetic and series. Needs nvcc."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from cuda_host import build_host_driver

DRIVER = r"""
#include <cstdio>
#include <cmath>
#include <vector>
#include "cuda/sweep_terms.h"
using namespace prefopt;
using namespace prefopt::cuda;

template <int DIV>
void sums(const std::vector<float>& a, const std::vector<float>& b, float inv_t, LogProbShift sa,
          LogProbShift sb, float ref_at_argmax, const DivParams& prm) {
  const float scale = kLog2e * inv_t, off_a = sa.offset * kLog2e, off_b = sb.offset * kLog2e;
  const float fprime_k = div_fprime<DIV>(-sa.offset, lq_at_argmax(ref_at_argmax, sb, inv_t), prm);
  const SweepConsts c = sweep_consts<DIV>(fprime_k, prm, inv_t, ref_at_argmax, sb.shift);
  const float off_bc = fmaf(sb.shift - c.ref_centre, scale, off_b);
  float value = 0.f, centred = 0.f;
  for (size_t j = 0; j < a.size(); ++j) {
    const float xs = a[j] - sa.shift, zs = b[j] - c.ref_centre;
    const float ap = fmaf(xs, scale, -off_a), aq = fmaf(zs, scale, -off_bc);
    sweep_term<DIV>(ap, aq, ex2(ap), ex2(aq), zs - xs, c, value, centred);
  }
  sweep_finish<DIV>(c, value, centred);
  std::printf("%.9g %.9g\n", value, centred);
}

void js_gradient(const std::vector<float>& a, const std::vector<float>& b, float inv_t, LogProbShift sa,
                 LogProbShift sb, float ref_at_argmax, const DivParams& prm) {
  const float scale = kLog2e * inv_t, off_a = sa.offset * kLog2e, off_b = sb.offset * kLog2e;
  const bool q_main = prm.js_q_main > 0.f;
  const JsSweepConsts c = js_sweep_consts(prm, -off_a, fmaf(ref_at_argmax - sb.shift, scale, -off_b));
  JsSums s{0.f, 0.f, 0.f, 0.f};
  for (size_t j = 0; j < a.size(); ++j) {
    const float lp = fmaf(a[j] - sa.shift, scale, -off_a), lq = fmaf(b[j] - sb.shift, scale, -off_b);
    js_term(q_main ? lq : lp, q_main ? lp : lq, c, s);
  }
  float value, centred;
  js_finish(s, c, q_main, prm.one_minus_beta, value, centred);
  for (size_t j = 0; j < a.size(); ++j) {
    const float ap = fmaf(a[j] - sa.shift, scale, -off_a), aq = fmaf(b[j] - sb.shift, scale, -off_b);
    const float p = ex2(ap);
    const float g = p > 0.f ? p * fmaf(prm.one_minus_beta * kLn2, js_fprime_gap(ap, aq, c), -centred) : 0.f;
    std::printf("%.9g\n", g);
  }
}

int main() {
  int div, v;
  double t, param;
  while (std::scanf("%d %d %lf %lf", &div, &v, &t, &param) == 4) {
    std::vector<float> a(v), b(v);
    for (auto& x : a) std::scanf("%f", &x);
    for (auto& x : b) std::scanf("%f", &x);
    int k = 0;
    float mb = b[0];
    for (int j = 1; j < v; ++j) {
      if (a[j] > a[k]) k = j;
      mb = std::fmax(mb, b[j]);
    }
    double za = 0, zb = 0;
    for (int j = 0; j < v; ++j) {
      za += std::exp((a[j] - a[k]) / t);
      zb += std::exp((b[j] - mb) / t);
    }
    const LogProbShift sa{a[k], static_cast<float>(std::log(za))}, sb{mb, static_cast<float>(std::log(zb))};
    const float inv_t = static_cast<float>(1.0 / t);
    if (div == kJS) js_gradient(a, b, inv_t, sa, sb, b[k], make_div_params(param, 0.5));
    if (div == kHellinger) sums<kHellinger>(a, b, inv_t, sa, sb, b[k], make_div_params(0.5, param));
    if (div == kChi2) sums<kChi2>(a, b, inv_t, sa, sb, b[k], make_div_params(0.5, param));
    if (div == kAlpha) sums<kAlpha>(a, b, inv_t, sa, sb, b[k], make_div_params(0.5, param));
  }
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build_host_driver(tmp_path_factory, "sweep_terms", DRIVER)


def _rows(seed, v=1501):
    """Row pairs: reference near the policy, far from it, and a peaked policy."""
    rng = np.random.default_rng(seed)
    for noise, peak in ((1e-3, 0.0), (0.5, 0.0), (3.0, 15.0)):
        a = (rng.standard_normal(v) * 3).astype(np.float32)
        a[rng.integers(v)] += peak
        yield a, (a + rng.standard_normal(v) * noise).astype(np.float32)


def _run(driver, code, cases):
    text = "".join(f"{code} {a.size} {t!r} {param!r}\n" + " ".join(map(repr, a.tolist())) + "\n"
                   + " ".join(map(repr, b.tolist())) + "\n" for t, param, a, b in cases)
    done = subprocess.run([driver], input=text, capture_output=True, text=True, check=True)
    return np.array([[float(x) for x in line.split()] for line in done.stdout.strip().splitlines()])


def _logs(a, b, t):
    a64, b64 = a.astype(np.float64) / t, b.astype(np.float64) / t
    lp = a64 - a64.max() - np.log(np.exp(a64 - a64.max()).sum())
    lq = b64 - b64.max() - np.log(np.exp(b64 - b64.max()).sum())
    return lp, lq, int(np.argmax(a))


@pytest.mark.parametrize("name,param", [("alpha", 0.5), ("alpha", 1.7), ("alpha", 1 - 1e-3), ("alpha", 1e-3),
                                        ("alpha", -0.5), ("hellinger", 0.5), ("chi2", 0.5)])
def test_sweep_sums_match_float64(driver, name, param):
    from prefopt_kernels.divergences import Divergence

    cases = [(t, param, a, b) for t in (1.0, 0.7) for a, b in _rows(int(param * 1000) % 97)]
    got = _run(driver, int(Divergence[name.upper()]), cases)
    for (t, _, a, b), (value, centred) in zip(cases, got):
        lp, lq, k = _logs(a, b, t)
        p, q, d = np.exp(lp), np.exp(lq), lp - lq
        if name == "alpha":
            near_one = abs(param - 1) <= abs(param)
            base, c = (p, param - 1) if near_one else (q, param)
            want = np.sum(base * np.expm1(c * d)) / (param * (param - 1))
            terms = p * np.exp((param - 1) * d[k]) * np.expm1((param - 1) * (d - d[k])) / (param - 1)
        elif name == "hellinger":
            want = np.sum((np.sqrt(p) - np.sqrt(q)) ** 2)
            terms = -p * np.exp(-0.5 * d[k]) * np.expm1(-0.5 * (d - d[k]))
        else:
            want = np.sum((p - q) ** 2 / q)
            terms = 2 * p * np.exp(d[k]) * np.expm1(d - d[k])
        # Per-token contract for the value; the centred sum against the size of its terms.
        assert abs(value - want) <= 1e-5 * (1 + abs(want)), (name, param, t, value, want)
        assert abs(centred - terms.sum()) <= 1e-5 * np.abs(terms).sum(), (name, param, t, centred, terms.sum())


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9, 1e-3])
def test_js_gradient_terms_match_float64(driver, beta):
    from prefopt_kernels.divergences import Divergence

    cases = [(t, beta, a, b) for t in (1.0, 0.7) for a, b in _rows(int(beta * 1000) + 5)]
    got = _run(driver, int(Divergence.JS), cases)[:, 0]
    at = 0
    for t, _, a, b in cases:
        g, at = got[at:at + a.size], at + a.size
        lp, lq, _ = _logs(a, b, t)
        p = np.exp(lp)
        fprime = (1 - beta) * (lp - np.log(beta * np.exp(lq) + (1 - beta) * p))
        want = p * (fprime - np.sum(p * fprime))
        # The gradient contract with a unit upstream gradient.
        assert np.abs(g - want).max() <= 1e-5 * np.abs(want).max() + 2e-7, (beta, t)
