"""Every backend's ``finalize`` and ``finish_sweep`` (one launch each) against float64 math.

States are drawn at random with the rows a fold leaves behind: finite maxima with ``Z >= 1``,
all ``-inf`` rows (``Z = 0``), NaN and ``+inf`` sums (a NaN or ``+inf`` logit), a reference
logit at the argmax that is ``-inf``, ignored labels, zero weights; every mask (labels or not,
weight or not, ``every_row_read``) and two temperatures. The expected statistics are formed
here in float64 from the formulas of ``backends/row_state.py``'s docstring, not from its code.
The CUDA kernels' per-row math (``csrc/include/prefopt/finalize_state.h`` in fp32 with
``fast_log``) cannot run here: it is compiled for the host by nvcc and held to the same values.
"""

import itertools
import math

import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels.backends import OpSpec, row_state
from prefopt_kernels.divergences import Divergence

from contract import DEVICE, with_cpu_isas

IGNORE = -100
N = 300  # more than one CUDA block and not a multiple of a Triton block


def _backend(name):
    return __import__(f"prefopt_kernels.backends.{name}", fromlist=["finalize"])


BACKENDS = with_cpu_isas([name for name in pk.available_backends() if hasattr(_backend(name), "finalize")])
# No divergence, the two completed by finalize, and a centred second-sweep one (finish_sweep's).
DIVERGENCES = [None, Divergence.FORWARD_KL, Divergence.REVERSE_KL, Divergence.JS]
# (labels, weight, every_row_read): every mask finalize applies.
LAYOUTS = list(itertools.product([False, True], repeat=3))


def _random_state(gen, n: int, spec: OpSpec, has_ref: bool) -> row_state.RowState:
    """A state a fold could leave, with the special rows every 10th row or so."""
    def normal(scale=1.0):
        return torch.randn(n, generator=gen, dtype=torch.float64) * scale

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    pick = torch.randint(0, 20, (n,), generator=gen)
    state = row_state.empty(n, spec, has_ref, "cpu", torch.float64)
    values = {}
    values["max"] = torch.where(pick == 0, -math.inf, normal(30.0))
    # Z >= 1 (the max's own term), 0 for an all -inf row, NaN or +inf for a NaN / +inf logit.
    z = torch.where(pick == 0, 0.0, uniform(1.0, 4000.0))
    z = torch.where(pick == 1, math.nan, torch.where(pick == 2, math.inf, z))
    values["sum_exp"] = z
    values["label_logit"] = values["max"].nan_to_num(neginf=0.0) - uniform(0.0, 20.0)
    values["ent_acc"] = -uniform(0.0, 8.0) * z.nan_to_num(posinf=1.0)
    zb = torch.where(pick == 0, 0.0, uniform(1.0, 4000.0))
    zb = torch.where(pick == 3, math.nan, zb)
    values["ref_max"] = torch.where(pick == 0, -math.inf, normal(30.0))
    values["ref_sum_exp"] = zb
    values["ref_label_logit"] = values["ref_max"].nan_to_num(neginf=0.0) - uniform(0.0, 20.0)
    values["ref_at_argmax"] = torch.where(pick == 4, -math.inf, values["ref_max"].nan_to_num(neginf=0.0)
                                          - uniform(0.0, 15.0))
    values["fkl_acc"] = normal(5.0) * zb.nan_to_num(posinf=1.0)
    # rkl_acc is +inf where the reference excludes the argmax; a large finite value elsewhere.
    values["rkl_acc"] = torch.where(pick == 4, math.inf, normal(5.0) * z.nan_to_num(posinf=1.0))
    for name, field in state.tensors().items():
        if name == "argmax":
            field.copy_(torch.randint(-1, 1000, (n,), generator=gen))
        else:
            field.copy_(values[name])
    return row_state.RowState(**{name: t.to(torch.float32) if t.is_floating_point() else t
                                 for name, t in state.tensors().items()})


def _masks(labels, weight, every_row_read, n):
    """``(read, div_on)`` by the backend interface's rules, written out here."""
    zero_weight = torch.zeros(n, dtype=torch.bool) if weight is None else weight == 0
    if every_row_read:
        return torch.ones(n, dtype=torch.bool), ~zero_weight if labels is not None else torch.ones(n, dtype=torch.bool)
    if labels is None:
        return ~zero_weight, ~zero_weight
    read = labels != IGNORE
    return read, read & ~zero_weight


def _expected(state: row_state.RowState, labels, weight, spec: OpSpec, every_row_read: bool):
    """``{name: (value, scale)}`` in float64: each statistic and the sum of its terms' magnitudes
    (the size of its rounding error); rows not read (or without the divergence) 0."""
    f = {name: t.to(torch.float64) if t.is_floating_point() else t for name, t in state.tensors().items()}
    n = f["max"].shape[0]
    t_inv = 1.0 / spec.temperature
    read, div_on = _masks(labels, weight, every_row_read, n)
    row_max = torch.where(f["max"] == -math.inf, 0.0, f["max"])
    log_z = torch.log(f["sum_exp"])
    guard_a = log_z - log_z
    out = {"row_max": (row_max, row_max.abs()), "log_norm": (log_z, log_z.abs())}
    if spec.want_logp and labels is not None:
        rel = (f["label_logit"] - row_max) * t_inv
        out["logp"] = (rel - log_z + guard_a, rel.abs() + (f["label_logit"].abs() + row_max.abs()) * t_inv
                       + log_z.abs())
    if spec.want_entropy:
        mean = f["ent_acc"] / f["sum_exp"]
        out["entropy"] = (log_z - mean + guard_a, log_z.abs() + mean.abs())
    if "ref_max" in f:
        ref_row_max = torch.where(f["ref_max"] == -math.inf, 0.0, f["ref_max"])
        log_zb = torch.log(f["ref_sum_exp"])
        guard_b = log_zb - log_zb
        out["ref_row_max"] = (ref_row_max, ref_row_max.abs())
        out["ref_log_norm"] = (log_zb, log_zb.abs())
        if spec.want_ref_logp and labels is not None:
            rel = (f["ref_label_logit"] - ref_row_max) * t_inv
            out["ref_logp"] = (rel - log_zb + guard_b, rel.abs() + (f["ref_label_logit"].abs() + ref_row_max.abs())
                               * t_inv + log_zb.abs())
    out = {name: (torch.where(read, v, 0.0), torch.where(read, s, 0.0)) for name, (v, s) in out.items()}
    member = spec.member if "ref_max" in f else None
    if member is None:
        return out
    if member.centred:
        out["ref_at_argmax"] = (torch.where(div_on, f["ref_at_argmax"], 0.0), torch.zeros(n, dtype=torch.float64))
    if member == Divergence.FORWARD_KL:
        cross = f["fkl_acc"] / f["ref_sum_exp"]
        div = cross - log_zb + log_z + guard_a + guard_b
        div_s = torch.full_like(div, -1.0)
        scale = cross.abs() + log_zb.abs() + log_z.abs()
    elif member == Divergence.REVERSE_KL:
        div_s = f["rkl_acc"] / f["sum_exp"]
        b_k = torch.where(f["ref_at_argmax"] == -math.inf, 0.0, f["ref_at_argmax"])
        div = div_s - log_z - (b_k - ref_row_max) * t_inv + log_zb + guard_a + guard_b
        scale = div_s.abs() + log_z.abs() + (b_k.abs() + ref_row_max.abs()) * t_inv + log_zb.abs()
    else:
        return out
    div_s = torch.where(torch.isfinite(div.to(torch.float32)), div_s, math.nan)
    out["div"] = (torch.where(div_on, div, 0.0), torch.where(div_on, scale, 0.0))
    out["div_s"] = (torch.where(div_on, div_s, 0.0), torch.where(div_on, div_s.abs(), 0.0))
    return out


def _assert_matches(got, want, scale, name):
    """Equal NaN and infinity patterns; finite values within 16 fp32 ulps of the terms' magnitudes
    (plus the 1e-7 absolute error of the CUDA kernels' ``fast_log``)."""
    got = got.detach().cpu().to(torch.float64)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), name
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)]), name
    tolerance = 16 * 2.0**-24 * (scale[finite] + 1.0) + 1e-7
    error = (got[finite] - want[finite]).abs()
    assert bool((error <= tolerance).all()), f"{name}: max error {float((error - tolerance).max())} over tolerance"


def _inputs(gen, n, has_labels, has_weight):
    labels = weight = None
    if has_labels:
        labels = torch.randint(0, 1000, (n,), generator=gen)
        labels[torch.rand(n, generator=gen) < 0.2] = IGNORE
    if has_weight:
        weight = torch.rand(n, generator=gen, dtype=torch.float64).to(torch.float32)
        weight[torch.rand(n, generator=gen) < 0.25] = 0.0
    return labels, weight


def _finalize_case(seed, divergence, has_labels, has_weight, every_row_read):
    """``(spec, has_ref, state, labels, weight, want)`` of one drawn case: the seed picks the
    temperature, the asked-for outputs and whether there is a reference."""
    gen = torch.Generator().manual_seed(seed)
    temperature = 0.7 if seed % 2 else 1.0
    spec = OpSpec(temperature=temperature, ignore_index=IGNORE, divergence=int(divergence or 0), want_logp=True,
                  want_ref_logp=seed % 3 != 0, want_entropy=seed % 4 != 1)
    has_ref = divergence is not None or seed % 5 != 0
    state = _random_state(gen, N, spec, has_ref)
    labels, weight = _inputs(gen, N, has_labels, has_weight)
    return spec, has_ref, state, labels, weight, _expected(state, labels, weight, spec, every_row_read)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=lambda d: "none" if d is None else d.key)
@pytest.mark.parametrize("has_labels,has_weight,every_row_read", LAYOUTS)
def test_finalize_matches_float64(backend, divergence, has_labels, has_weight, every_row_read):
    seed = DIVERGENCES.index(divergence) * 8 + LAYOUTS.index((has_labels, has_weight, every_row_read))
    spec, has_ref, state, labels, weight, want = _finalize_case(seed, divergence, has_labels, has_weight,
                                                                every_row_read)
    on_device = row_state.RowState(**{name: t.to(DEVICE) for name, t in state.tensors().items()})
    to_device = (lambda t: None if t is None else t.to(DEVICE))
    stats = _backend(backend).finalize(on_device, to_device(labels), to_device(weight), spec, every_row_read)
    second_sweep = divergence is not None and divergence.second_sweep
    for name in pk.backends.present_stats(spec, has_labels, has_ref):
        if second_sweep and name in ("div", "div_s"):
            continue
        value, scale = want[name]
        _assert_matches(getattr(stats, name), value, scale, name)
    assert set(want) == {name for name in pk.backends.present_stats(spec, has_labels, has_ref)
                         if not (second_sweep and name in ("div", "div_s"))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("has_labels,has_weight,every_row_read", LAYOUTS)
def test_finish_sweep_matches_float64(backend, has_labels, has_weight, every_row_read):
    gen = torch.Generator().manual_seed(100 + LAYOUTS.index((has_labels, has_weight, every_row_read)))
    spec = OpSpec(ignore_index=IGNORE, divergence=int(Divergence.JS))
    pick = torch.randint(0, 10, (N,), generator=gen)
    log_norm = torch.where(pick == 0, math.nan, torch.randn(N, generator=gen, dtype=torch.float64))
    ref_log_norm = torch.where(pick == 1, math.inf, torch.randn(N, generator=gen, dtype=torch.float64))
    value_sum = torch.where(pick == 2, math.inf, torch.rand(N, generator=gen, dtype=torch.float64))
    centred_sum = torch.randn(N, generator=gen, dtype=torch.float64)
    labels, weight = _inputs(gen, N, has_labels, has_weight)
    _, div_on = _masks(labels, weight, every_row_read, N)
    div = value_sum + (log_norm - log_norm) + (ref_log_norm - ref_log_norm)
    div_s = torch.where(torch.isfinite(div), centred_sum, math.nan)
    stats = pk.backends.RowStats(row_max=torch.zeros(N), log_norm=log_norm.float().to(DEVICE),
                                 ref_row_max=torch.zeros(N), ref_log_norm=ref_log_norm.float().to(DEVICE))
    to_device = (lambda t: None if t is None else t.to(DEVICE))
    out = _backend(backend).finish_sweep(stats, value_sum.float().to(DEVICE), centred_sum.float().to(DEVICE),
                                         to_device(labels), to_device(weight), spec, every_row_read)
    exact = torch.zeros(N, dtype=torch.float64)
    _assert_matches(out.div, torch.where(div_on, div.float().to(torch.float64), 0.0), exact, "div")
    _assert_matches(out.div_s, torch.where(div_on, div_s.float().to(torch.float64), 0.0), exact, "div_s")


@pytest.mark.parametrize("backend", BACKENDS)
def test_finalize_by_hand(backend):
    """One row worked out by hand: m_a = 3, Z_a = 2, ent_acc = -1, a_y = 1 at T = 2; the reference
    m_b = 0, Z_b = 4, b_y = -2, b_k = -1, rkl_acc = 6 (reverse KL)."""
    spec = OpSpec(temperature=2.0, ignore_index=IGNORE, divergence=int(Divergence.REVERSE_KL), want_logp=True,
                  want_ref_logp=True, want_entropy=True)
    state = row_state.empty(1, spec, True, DEVICE)
    for name, value in dict(max=3.0, sum_exp=2.0, ent_acc=-1.0, label_logit=1.0, ref_max=0.0, ref_sum_exp=4.0,
                            ref_label_logit=-2.0, ref_at_argmax=-1.0, rkl_acc=6.0).items():
        getattr(state, name).fill_(value)
    stats = _backend(backend).finalize(state, torch.zeros(1, dtype=torch.int64, device=DEVICE), None, spec)
    ln2 = math.log(2.0)
    want = dict(row_max=3.0, log_norm=ln2, logp=-1.0 - ln2, entropy=ln2 + 0.5, ref_row_max=0.0,
                ref_log_norm=2 * ln2, ref_logp=-1.0 - 2 * ln2, ref_at_argmax=-1.0, div_s=3.0,
                div=3.0 - ln2 + 0.5 + 2 * ln2)
    for name, value in want.items():
        assert abs(float(getattr(stats, name)[0]) - value) <= 4e-7 * (1 + abs(value)), name


# The CUDA kernels' per-row math (csrc/include/prefopt/finalize_state.h in fp32 with fast_log)
# compiled for the host: reads the state fields and rules from a file, writes every statistic.
CUDA_DRIVER = r"""
#include <cstdio>
#include <vector>
#include "prefopt/finalize_state.h"
using namespace prefopt;

int main(int argc, char** argv) {
  FILE* in = std::fopen(argv[1], "rb");
  int64_t head[9];
  double temperature;
  std::fread(head, sizeof(int64_t), 9, in);
  std::fread(&temperature, sizeof(double), 1, in);
  const int64_t n = head[0];
  std::vector<int64_t> labels(n);
  std::vector<float> weight(n), fields(10 * n), out(10 * n, 0.f);
  std::fread(labels.data(), sizeof(int64_t), n, in);
  std::fread(weight.data(), sizeof(float), n, in);
  std::fread(fields.data(), sizeof(float), 10 * n, in);
  std::fclose(in);
  auto field = [&](int i, bool on) { return on ? fields.data() + i * n : nullptr; };
  auto output = [&](int i, bool on) { return on ? out.data() + i * n : nullptr; };
  const int divergence = int(head[1]);
  const bool has_labels = head[3], has_ref = head[5], logp = head[6] && has_labels;
  const bool ref_logp = head[7] && has_labels && has_ref, entropy = head[8];
  const bool first_pass_div = has_ref && first_pass_divergence(divergence) != kNoDivergence;
  FinalizeArgs a;
  a.n_rows = n;
  a.labels = has_labels ? labels.data() : nullptr;
  a.weight = head[4] ? weight.data() : nullptr;
  a.temperature = temperature;
  a.ignore_index = -100;
  a.divergence = has_ref ? divergence : 0;
  a.every_row_read = head[2];
  a.max = field(0, true);
  a.sum_exp = field(1, true);
  a.label_logit = field(2, true);
  a.ent_acc = field(3, entropy);
  a.ref_max = field(4, has_ref);
  a.ref_sum_exp = field(5, has_ref);
  a.ref_label_logit = field(6, has_ref);
  a.ref_at_argmax = field(7, has_ref);
  a.fkl_acc = field(8, has_ref && divergence == kForwardKL);
  a.rkl_acc = field(9, has_ref && divergence == kReverseKL);
  a.row_max = output(0, true);
  a.log_norm = output(1, true);
  a.logp = output(2, logp);
  a.entropy = output(3, entropy);
  a.ref_row_max = output(4, has_ref);
  a.ref_log_norm = output(5, has_ref);
  a.ref_logp = output(6, ref_logp);
  a.div = output(7, first_pass_div);
  a.div_s = output(8, first_pass_div);
  for (int64_t row = 0; row < n; ++row) finalize_row<float>(a, row, static_cast<float>(1.0 / temperature));
  for (int64_t i = 0; i < n; ++i) out[9 * n + i] = fields[7 * n + i];  // ref_at_argmax, masked in place
  FILE* o = std::fopen(argv[2], "wb");
  std::fwrite(out.data(), sizeof(float), 10 * n, o);
  std::fclose(o);
  return 0;
}
"""
STATE_ORDER = ["max", "sum_exp", "label_logit", "ent_acc", "ref_max", "ref_sum_exp", "ref_label_logit",
               "ref_at_argmax", "fkl_acc", "rkl_acc"]
STATS_ORDER = ["row_max", "log_norm", "logp", "entropy", "ref_row_max", "ref_log_norm", "ref_logp", "div", "div_s",
               "ref_at_argmax"]


@pytest.fixture(scope="module")
def cuda_finalize_driver(tmp_path_factory):
    from cuda_host import build_host_driver

    return build_host_driver(tmp_path_factory, "finalize", CUDA_DRIVER), tmp_path_factory.mktemp("finalize_io")


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=lambda d: "none" if d is None else d.key)
def test_cuda_finalize_rows_on_the_host(cuda_finalize_driver, divergence):
    """The CUDA kernels' fp32 math with ``fast_log``, every mask, against the same float64 values."""
    import subprocess

    binary, work = cuda_finalize_driver
    for has_labels, has_weight, every_row_read in LAYOUTS:
        seed = 50 + DIVERGENCES.index(divergence) * 8 + LAYOUTS.index((has_labels, has_weight, every_row_read))
        spec, has_ref, state, labels, weight, want = _finalize_case(seed, divergence, has_labels, has_weight,
                                                                    every_row_read)
        head = torch.tensor([N, int(divergence or 0), every_row_read, has_labels, has_weight, has_ref,
                             spec.want_logp, spec.want_ref_logp, spec.want_entropy], dtype=torch.int64)
        fields = torch.stack([getattr(state, name) if getattr(state, name, None) is not None else torch.zeros(N)
                              for name in STATE_ORDER])
        source, result = work / "in.bin", work / "out.bin"
        source.write_bytes(head.numpy().tobytes() + torch.tensor([spec.temperature], dtype=torch.float64).numpy().tobytes()
                           + (labels if labels is not None else torch.zeros(N, dtype=torch.int64)).numpy().tobytes()
                           + (weight if weight is not None else torch.zeros(N)).numpy().tobytes()
                           + fields.to(torch.float32).numpy().tobytes())
        subprocess.run([binary, str(source), str(result)], check=True)
        got = torch.frombuffer(bytearray(result.read_bytes()), dtype=torch.float32).view(10, N)
        for name, (value, scale) in want.items():
            _assert_matches(got[STATS_ORDER.index(name)], value, scale, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finalize_of_no_rows(backend):
    """No row (every token ignored, compacted away): empty statistics, no error."""
    spec = OpSpec(ignore_index=IGNORE, divergence=int(Divergence.JS), want_logp=True, want_entropy=True)
    module = _backend(backend)
    labels, weight = torch.zeros(0, dtype=torch.int64, device=DEVICE), torch.zeros(0, device=DEVICE)
    stats = module.finalize(row_state.empty(0, spec, True, DEVICE), labels, weight, spec, True)
    stats = module.finish_sweep(stats, torch.zeros(0, device=DEVICE), torch.zeros(0, device=DEVICE), labels, weight,
                                spec, True)
    names = pk.backends.present_stats(spec, True, True)
    assert all(getattr(stats, name).shape == (0,) for name in names)
