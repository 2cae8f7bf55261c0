"""Every per-sequence loss (the DPO family, SimPO, INPO, f-DPG) against an independent float64
formula written here, values and gradients."""

import math

import pytest
import torch

from prefopt_kernels import losses as L

from losses_cases import B, LEN_L, LEN_W, check_formula, dpo_logps, leaf, logsig, sig


# --------------------------------------------------------------------------- DPO family

BETA, EPS, TAU_DP = 0.3, 0.2, 0.05


def _ref_dpo(lt, pc, pr, rc, rr):
    """TRL 1.16's per-pair loss (sigmoid without smoothing, bco_pair with δ = 0)."""
    b, e = BETA, EPS
    rw, rl = pc - rc, pr - rr
    d = rw - rl
    z = b * d
    if lt == "sigmoid":
        return -logsig(z)
    if lt == "hinge":
        return torch.clamp(1 - z, min=0)
    if lt == "ipo":
        return (rw / LEN_W - rl / LEN_L - 1 / (2 * b)) ** 2
    if lt == "exo_pair":
        return sig(z) * (logsig(z) - math.log(1 - e)) + sig(-z) * (logsig(-z) - math.log(e))
    if lt == "nca_pair":
        return -logsig(b * rw) - 0.5 * logsig(-b * rw) - 0.5 * logsig(-b * rl)
    if lt == "robust":
        return ((1 - e) * -logsig(z) - e * -logsig(-z)) / (1 - 2 * e)
    if lt == "bco_pair":
        return -logsig(b * rw) - logsig(-b * rl)
    if lt == "sppo_hard":
        return (rw - 1 / (2 * b)) ** 2 + (rl + 1 / (2 * b)) ** 2
    if lt == "aot":
        dd = (pc - pr).sort().values - (rc - rr).sort().values
        return -(1 - e) * logsig(b * dd) - e * logsig(-b * dd)
    if lt == "aot_unpaired":
        dd = rw.sort().values - rl.sort().values
        return -(1 - e) * logsig(b * dd) - e * logsig(-b * dd)
    if lt == "apo_zero":
        return (1 - sig(b * rw)) + sig(b * rl)
    if lt == "apo_down":
        return sig(b * rw) + (1 - sig(b * (rw - rl)))
    if lt == "discopop":
        m = sig(z / TAU_DP)
        return (1 - m) * -logsig(z) + m * torch.exp(-z)
    if lt == "sft":
        return (-pc.sum() / LEN_W.sum()).expand(pc.shape)
    if lt == "sigmoid_norm":
        return -logsig(b * (rw / LEN_W - rl / LEN_L))
    raise AssertionError(lt)


@pytest.mark.parametrize("loss_type", L.DPO_LOSS_TYPES)
def test_dpo_loss_types_match_formula(loss_type):
    def lib(*x):
        return L.dpo_loss(
            *x,
            beta=BETA,
            loss_type=loss_type,
            label_smoothing=EPS,
            chosen_lengths=LEN_W,
            rejected_lengths=LEN_L,
            discopop_tau=TAU_DP,
        )[0]

    check_formula(lib, lambda *x: _ref_dpo(loss_type, *x).mean(), dpo_logps())


@pytest.mark.parametrize(
    "div,score",
    [
        ("reverse_kl", lambda r: r),
        ("forward_kl", lambda r: 1 - 1 / torch.exp(r)),
        ("js_divergence", lambda r: torch.log(2 * torch.exp(r) / (1 + torch.exp(r)))),
        ("alpha_divergence", lambda r: (torch.exp(r) ** (0.3 - 1) - 1) / (0.3 - 1)),
    ],
)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "sigmoid_norm"])
def test_dpo_f_divergence_scores(div, score, loss_type):
    def ref(pc, pr, rc, rr):
        sw, sl = score(pc - rc), score(pr - rr)
        if loss_type == "sigmoid":
            return (-logsig(BETA * (sw - sl))).mean()
        if loss_type == "hinge":
            return torch.clamp(1 - BETA * (sw - sl), min=0).mean()
        return (-logsig(BETA * (sw / LEN_W - sl / LEN_L))).mean()

    def lib(*x):
        return L.dpo_loss(
            *x,
            beta=BETA,
            loss_type=loss_type,
            f_divergence=div,
            f_alpha=0.3,
            chosen_lengths=LEN_W,
            rejected_lengths=LEN_L,
        )[0]

    check_formula(lib, ref, dpo_logps())


def test_dpo_alpha_one_is_reverse_kl():
    x = dpo_logps()
    a = L.dpo_loss(*x, f_divergence="alpha_divergence", f_alpha=1.0)[0]
    b = L.dpo_loss(*x)[0]
    torch.testing.assert_close(a, b)


def test_dpo_weighted_loss_types_sum():
    x = dpo_logps()
    combo = L.dpo_loss(
        *x, beta=BETA, label_smoothing=EPS, loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0], chosen_lengths=LEN_W,
    )[0]
    ref = (0.8 * _ref_dpo("sigmoid", *x) + 0.2 * _ref_dpo("bco_pair", *x) + _ref_dpo("sft", *x)).mean()
    torch.testing.assert_close(combo, ref)


def test_sigmoid_label_smoothing_is_conservative_dpo():
    def lib(*x):
        return L.dpo_loss(*x, beta=BETA, label_smoothing=EPS, sigmoid_label_smoothing=True)[0]

    def ref(pc, pr, rc, rr):
        z = BETA * ((pc - rc) - (pr - rr))
        return (-(1 - EPS) * logsig(z) - EPS * logsig(-z)).mean()

    check_formula(lib, ref, dpo_logps())


def test_bco_batch_mean_delta():
    def lib(*x):
        return L.dpo_loss(*x, beta=BETA, loss_type="bco_pair", bco_delta="batch_mean")[0]

    def ref(pc, pr, rc, rr):
        rw, rl = BETA * (pc - rc), BETA * (pr - rr)
        delta = torch.cat([rw, rl]).mean().detach()
        return (-logsig(rw - delta) - logsig(-(rl - delta))).mean()

    check_formula(lib, ref, dpo_logps())


def test_dpo_bco_running_mean_state():
    state = L.RunningMean()
    means = []
    for seed in range(3):
        x = [leaf(B, seed=10 * seed + k) for k in range(4)]
        batch_mean = torch.cat([BETA * (x[0] - x[2]), BETA * (x[1] - x[3])]).mean().item()
        means.append(batch_mean)
        loss, metrics = L.dpo_loss(*x, beta=BETA, loss_type="bco_pair", bco_delta="running_mean",
                                   bco_state=state)
        delta = sum(means) / len(means)
        rw, rl = BETA * (x[0] - x[2]), BETA * (x[1] - x[3])
        ref = (-logsig(rw - delta) - logsig(-(rl - delta))).mean()
        torch.testing.assert_close(loss, ref)
        assert metrics["bco/delta"].item() == pytest.approx(delta)
    restored = L.RunningMean()
    restored.load_state_dict(state.state_dict())
    assert restored.mean == state.mean and restored.count == 3


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_aot_on_one_pair_is_smoothed_sigmoid(eps):
    # Sorting a batch of one is the identity, so aot == sigmoid with conservative-DPO smoothing.
    x = [leaf(1, seed=s) for s in range(4)]
    aot = L.dpo_loss(*x, loss_type="aot", label_smoothing=eps)[0]
    smoothed = L.dpo_loss(*x, loss_type="sigmoid", label_smoothing=eps, sigmoid_label_smoothing=True)[0]
    torch.testing.assert_close(aot, smoothed)
    # The default sigmoid ignores ε (TRL 1.16): there the identity holds only at ε = 0.
    plain = L.dpo_loss(*x, loss_type="sigmoid", label_smoothing=eps)[0]
    if eps == 0.0:
        torch.testing.assert_close(aot, plain)
    else:
        assert not torch.allclose(aot, plain)


def test_dpo_reductions_and_metrics():
    x = dpo_logps()
    none, m = L.dpo_loss(*x, beta=BETA, reduction="none")
    assert none.shape == (B,)
    torch.testing.assert_close(L.dpo_loss(*x, beta=BETA, reduction="sum")[0], none.sum())
    rw, rl = BETA * (x[0] - x[2]), BETA * (x[1] - x[3])
    torch.testing.assert_close(m["rewards/chosen"], rw.mean())
    torch.testing.assert_close(m["rewards/margins"], (rw - rl).mean())
    torch.testing.assert_close(m["rewards/accuracies"], (rw > rl).double().mean())
    torch.testing.assert_close(m["logps/rejected"], x[1].mean())
    assert all(not v.requires_grad for v in m.values())


def test_dpo_low_precision_inputs_compute_in_fp32():
    x = [t.detach().to(torch.bfloat16) for t in dpo_logps()]
    loss, _ = L.dpo_loss(*x)
    assert loss.dtype == torch.float32
    ref = L.dpo_loss(*[t.double() for t in x])[0]
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- SimPO, INPO


def test_simpo_matches_formula():
    beta, gamma, eps = 2.0, 0.5, 0.1

    def ref(pc, pr):
        z = beta * (pc / LEN_W - pr / LEN_L) - gamma
        return (-(1 - eps) * logsig(z) - eps * logsig(-z)).mean()

    def lib(pc, pr):
        return L.simpo_loss(pc, pr, LEN_W, LEN_L, beta=beta, gamma=gamma, label_smoothing=eps)[0]

    check_formula(lib, ref, [leaf(B, seed=1), leaf(B, seed=2)])


def test_inpo_matches_formula():
    eta, tau = 0.5, 0.4

    def ref(pc, pr, rc, rr, tc, tr):
        h = (pc - pr) - eta * tau * (rc - rr) - (1 - eta * tau) * (tc - tr)
        return ((h - eta / 2) ** 2).mean()

    def lib(*x):
        return L.inpo_loss(*x, eta=eta, tau=tau)[0]

    check_formula(lib, ref, [leaf(B, seed=s) for s in range(6)])


def test_inpo_with_eta_tau_one_is_ipo():
    eta = 0.5
    x = [leaf(B, seed=s) for s in range(6)]
    inpo = L.inpo_loss(*x, eta=eta, tau=1.0 / eta)[0]
    ones = torch.ones(B, dtype=torch.float64)
    ipo = L.dpo_loss(*x[:4], beta=1.0 / eta, loss_type="ipo", chosen_lengths=ones, rejected_lengths=ones)[0]
    torch.testing.assert_close(inpo, ipo)
    # The previous iterate has dropped out: no gradient reaches it.
    g = torch.autograd.grad(inpo, x[4:])
    assert all(float(t.abs().max()) == 0.0 for t in g)


# --------------------------------------------------------------------------- f-DPG


def test_fdpg_reverse_kl_pseudo_reward_is_rlhf_reward():
    # Target p(x) ∝ a(x) exp(r(x)/β): R = -f'(π/p) = r/β - log(π/a) + const.
    beta = 0.5
    g = torch.Generator().manual_seed(0)
    log_a = torch.randn(16, generator=g, dtype=torch.float64) - 5
    r = torch.randn(16, generator=g, dtype=torch.float64)
    log_pi = (torch.randn(16, generator=g, dtype=torch.float64) - 5).requires_grad_(True)
    state = L.FDPGState()
    _, m = L.fdpg_loss(log_pi, log_a + r / beta, divergence="reverse_kl", state=state)
    log_t = log_pi.detach() - (log_a + r / beta - state.log_z)
    rewards = L.fdpg_pseudo_rewards(log_t, "reverse_kl")
    gap = rewards - (r / beta - (log_pi.detach() - log_a))
    torch.testing.assert_close(gap, torch.full_like(gap, gap[0].item()))
    torch.testing.assert_close(m["fdpg/pseudo_reward"], rewards.mean())


@pytest.mark.parametrize(
    "div,fprime",
    [
        ("forward_kl", lambda t: -1 / t),
        ("reverse_kl", lambda t: torch.log(t) + 1),
        ("js", lambda t: torch.log(2 * t / (1 + t))),
        ("tv", lambda t: 0.5 * torch.sign(t - 1)),
        ("chi2", lambda t: 2 * (t - 1)),
    ],
)
def test_fdpg_loss_matches_formula(div, fprime):
    g = torch.Generator().manual_seed(1)
    n = 8
    log_P = torch.randn(n, generator=g, dtype=torch.float64) * 2 + 30  # large: Z in log space
    log_q = torch.randn(n, generator=g, dtype=torch.float64) - 3
    log_pi = (log_q + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    state = L.FDPGState(baseline_decay=0.9)
    losses = []
    log_ws = []
    base_prev = None
    for step in range(2):
        loss, m = L.fdpg_loss(log_pi, log_P + step, divergence=div, proposal_logps=log_q, state=state)
        log_ws.append(log_P + step - log_q)
        all_w = torch.cat(log_ws)
        log_z = torch.log(torch.exp(all_w - all_w.max()).mean()) + all_w.max()
        t = torch.exp(log_pi.detach() - (log_P + step - log_z))
        R = -fprime(t)
        w = torch.exp(log_pi.detach() - log_q)
        base = (w * R).mean() if base_prev is None else base_prev
        ref = -(w * (R - base) * log_pi).mean()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(torch.autograd.grad(loss, log_pi)[0], torch.autograd.grad(ref, log_pi)[0])
        assert m["fdpg/log_z"].item() == pytest.approx(log_z.item(), rel=1e-12)
        base_prev = (w * R).mean() if base_prev is None else 0.9 * base_prev + 0.1 * (w * R).mean()
        losses.append(loss)
    assert state.baseline == pytest.approx(base_prev.item())


def test_fdpg_on_policy_has_unit_weights():
    log_pi = leaf(6, seed=3)
    _, m = L.fdpg_loss(log_pi, leaf(6, seed=4).detach(), state=L.FDPGState())
    assert m["fdpg/importance_weight"].item() == pytest.approx(1.0)
