"""Edge cases of the loss functions: empty batches, garbage at masked tokens, non-finite state
updates, scalar arguments and adversarial shapes/dtypes (the bad ones are rows of the losses'
bad-input tables, test_sequence_losses_bad_input.py and test_token_losses_bad_input.py). Expected
values are worked out here in float64 with ``math``, never taken from the code under test."""

import enum
import math

import numpy as np
import pytest
import torch

from prefopt_kernels import losses as L
from prefopt_kernels.losses.common import sequence_sum

from losses_cases import INF, NAN, t64

def _softplus(x):
    return math.log1p(math.exp(x))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- empty batches


def _empty(*shape):
    return torch.zeros(*shape, dtype=torch.float64)


def test_sequences_without_tokens_are_not_an_empty_batch():
    # T = 0: two pairs whose sequences hold no token: each sums to 0, the loss is log 2.
    loss, _ = L.tdpo_loss(*[_empty(2, 0)] * 4, beta=0.7)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-12)


# --------------------------------------------------------------------------- garbage at masked tokens

# Two pairs, three tokens each; the masked tokens hold inf/NaN, as padding often does.
LW = [[0.5, -0.2, INF], [0.1, NAN, 0.3]]
MW = [[1, 1, 0], [1, 0, 1]]
LL = [[-0.4, 0.7, -INF], [0.2, 0.0, NAN]]
ML = [[1, 1, 0], [1, 1, 0]]
KW = [[0.05, 0.1, NAN], [0.2, INF, 0.02]]
KL = [[0.3, 0.01, INF], [0.07, 0.04, NAN]]


def _masked_sums(x, m):
    return [sum(v for v, k in zip(row, keep) if k) for row, keep in zip(x, m)]


def _flat(rows):
    return [v for row in rows for v in row]


def _tdpo1_expected(beta, alpha=None):
    """Loss and dL/dz per pair of TDPO1 (alpha None) or TDPO2 on the valid tokens only."""
    uw, ul = _masked_sums(LW, MW), _masked_sums(LL, ML)
    dw, dl = _masked_sums(KW, MW), _masked_sums(KL, ML)
    z = [(a - b) - (1.0 if alpha is None else alpha) * (c - d) for a, b, c, d in zip(uw, ul, dl, dw)]
    loss = sum(_softplus(-beta * zi) for zi in z) / len(z)
    dz = [-beta * _sigmoid(-beta * zi) / len(z) for zi in z]
    return loss, dz


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.float32, torch.bool, torch.int64])
def test_tdpo_masked_garbage_neither_reaches_loss_nor_gradient(mask_dtype):
    beta = 0.5
    lw, ll, kw, kl = (t64(x, requires_grad=True) for x in (LW, LL, KW, KL))
    mw, ml = torch.tensor(MW).to(mask_dtype), torch.tensor(ML).to(mask_dtype)
    loss, metrics = L.tdpo_loss(lw, ll, kw, kl, mw, ml, beta=beta)
    expected, dz = _tdpo1_expected(beta)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    grads = torch.autograd.grad(loss, [lw, ll, kw, kl])
    # dz/dl_w = dz/dKL_w = +1, dz/dl_l = dz/dKL_l = -1 at valid tokens; exactly 0 elsewhere.
    for g, sign, mask in zip(grads, (1, -1, 1, -1), (MW, ML, MW, ML)):
        want = t64([[sign * dz[b] * mask[b][t] for t in range(3)] for b in range(2)])
        assert torch.equal(g == 0, want == 0)
        torch.testing.assert_close(g, want, rtol=1e-12, atol=0)
    assert metrics["kl/chosen"].item() == pytest.approx((0.15 + 0.22) / 2, rel=1e-12)


def test_tdpo2_masked_garbage_packed_layout():
    beta, alpha = 0.4, 0.6
    lw, ll, kw, kl = (t64(x, requires_grad=True) for x in (_flat(LW), _flat(LL), _flat(KW), _flat(KL)))
    mw, ml = torch.tensor(_flat(MW)).bool(), torch.tensor(_flat(ML)).bool()
    cu = torch.tensor([0, 3, 6])
    loss, _ = L.tdpo_loss(lw, ll, kw, kl, mw, ml, beta=beta, alpha=alpha, variant=2,
                          chosen_cu_seqlens=cu, rejected_cu_seqlens=cu)
    expected, _ = _tdpo1_expected(beta, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    g = torch.autograd.grad(loss, [lw, ll, kl])
    for grad, mask in zip(g, (mw, ml, ml)):
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all() and (grad[mask] != 0).all()


def test_discopop_extreme_margin_stays_finite():
    """z = beta (rho_w - rho_l) = -100 in fp32: the logistic term is 100 and the exponential term
    sigma(z / tau) e^{-z} = e^{log sigma(-2000) + 100} = 0, so the loss is 100 and dL/dpi_w = -beta."""
    pw, pl = torch.tensor([-50.0], requires_grad=True), torch.tensor([50.0], requires_grad=True)
    zero = torch.zeros(1)
    loss, _ = L.dpo_loss(pw, pl, zero, zero, beta=1.0, loss_type="discopop")
    gw, gl = torch.autograd.grad(loss, [pw, pl])
    assert loss.item() == pytest.approx(100.0, rel=1e-6)
    assert gw.item() == pytest.approx(-1.0, rel=1e-6) and gl.item() == pytest.approx(1.0, rel=1e-6)


def test_forward_kl_scores_of_a_far_rejected_log_ratio_stay_finite():
    """f'(t) = 1 - 1/t at rho_l = -90 in fp32: e^{90} overflows; the exponent is capped at 80 as the
    alpha divergence's, so the margin is huge, the loss 0 and every gradient finite (and 0)."""
    pw, pl = torch.tensor([10.0], requires_grad=True), torch.tensor([-90.0], requires_grad=True)
    zero = torch.zeros(1)
    for loss_type in ("sigmoid", "hinge"):
        loss, _ = L.dpo_loss(pw, pl, zero, zero, beta=0.1, loss_type=loss_type, f_divergence="forward_kl")
        grads = torch.autograd.grad(loss, [pw, pl])
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads), loss_type
    loss, _ = L.dpo_loss(pw, pl, zero, zero, beta=0.1, loss_type="sigmoid", f_divergence="forward_kl")
    assert loss.item() == 0.0


def test_tdpo2_alpha_zero_is_the_reward_margin_alone():
    """TDPO2 with alpha = 0: -log sigma(beta u), u the summed log-ratio margin; the KL gets no gradient."""
    lw, ll = t64([[0.3, -0.2]], requires_grad=True), t64([[0.5, 0.1]], requires_grad=True)
    kw, kl = t64([[0.4, 0.2]], requires_grad=True), t64([[0.7, 0.3]], requires_grad=True)
    loss, _ = L.tdpo_loss(lw, ll, kw, kl, beta=2.0, alpha=0.0, variant=2)
    u = (0.3 - 0.2) - (0.5 + 0.1)  # -0.5
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0 * u)), rel=1e-12)
    assert torch.equal(torch.autograd.grad(loss, kl)[0], torch.zeros_like(kl))


def test_sparse_po_masked_garbage_in_values_and_masks():
    beta, l1u, l1d = 0.3, 0.01, 0.02
    lw, ll, kw, kl = (t64(x, requires_grad=True) for x in (LW, LL, KW, KL))
    # Weight masks hold garbage at the invalid tokens, and a 0 at valid token (0, 1) of m_u(y_w).
    uw = t64([[0.8, 0.0, NAN], [0.5, INF, 1.0]], requires_grad=True)
    ul = t64([[0.2, 0.9, INF], [0.6, 0.4, NAN]], requires_grad=True)
    dw = t64([[1.0, 0.5, NAN], [0.25, NAN, 0.75]], requires_grad=True)
    dl = t64([[0.1, 0.3, -INF], [0.9, 0.2, INF]], requires_grad=True)
    vw, vl = torch.tensor(MW, dtype=torch.float64), torch.tensor(ML, dtype=torch.float64)
    loss, m = L.sparse_po_loss(lw, ll, kw, kl, uw, ul, dw, dl, chosen_mask=vw, rejected_mask=vl,
                               beta=beta, l1_reward=l1u, l1_kl=l1d)

    def s(x, w, v):
        return [sum(a * b for a, b, k in zip(r1, r2, rv) if k) for r1, r2, rv in zip(x, w, v)]
    U_w, U_l = s(LW, uw.tolist(), MW), s(LL, ul.tolist(), ML)
    D_w, D_l = s(KW, dw.tolist(), MW), s(KL, dl.tolist(), ML)
    ones = [[1.0] * 3] * 2
    n1 = [a + b for a, b in zip(s(uw.tolist(), ones, MW), s(ul.tolist(), ones, ML))]
    n2 = [a + b for a, b in zip(s(dw.tolist(), ones, MW), s(dl.tolist(), ones, ML))]
    per_pair = [_softplus(-beta * ((U_w[b] - U_l[b]) - (D_l[b] - D_w[b]))) + l1u * n1[b] + l1d * n2[b]
                for b in range(2)]
    assert loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-12)
    # 4 valid chosen + 4 valid rejected tokens; m_u > 0 on 3 + 4 of them.
    assert m["mask/density"].item() == pytest.approx(7 / 8, rel=1e-12)
    grads = torch.autograd.grad(loss, [lw, ll, kw, kl, uw, ul, dw, dl])
    for g, v in zip(grads, (vw, vl) * 4):
        assert torch.isfinite(g).all()
        assert (g[v == 0] == 0).all()
    # m_u(y_w) is 0 at the valid token (0, 1): the log-ratio gets no gradient there, the mask its
    # term's (-c l_t, test_token_losses.py holds it to a reference).
    assert grads[0][0, 1] == 0 and grads[4][0, 1] != 0


def test_sequence_sum_uses_where_not_a_product():
    x = t64([[1.5, INF, NAN], [-2.0, 0.25, -INF]], requires_grad=True)
    w = t64([[2.0, 0.0, 0.0], [0.5, 4.0, 0.0]], requires_grad=True)
    out = sequence_sum(x, w)
    torch.testing.assert_close(out, t64([3.0, 0.0]), rtol=0, atol=0)
    gx, gw = torch.autograd.grad(out.sum(), [x, w])
    torch.testing.assert_close(gx, t64([[2.0, 0.0, 0.0], [0.5, 4.0, 0.0]]), rtol=0, atol=0)
    torch.testing.assert_close(gw, t64([[1.5, 0.0, 0.0], [-2.0, 0.25, 0.0]]), rtol=0, atol=0)


# --------------------------------------------------------------------------- non-finite state updates


def _fdpg_batches():
    good1 = (t64([-0.8, -0.6, -1.5]), t64([1.0, 2.0, 0.5]), t64([-1.0, -0.5, -2.0]))
    good2 = (t64([-1.1, -0.3]), t64([0.2, 1.4]), t64([-0.9, -0.4]))
    return good1, good2


def _fdpg_js_expected(batches, decay):
    """log Z, baseline and the last batch's loss of f-DPG with the js generator, by hand."""
    log_ws, base = [], None
    for log_pi, log_P, log_q in batches:
        log_pi, log_P, log_q = log_pi.tolist(), log_P.tolist(), log_q.tolist()
        log_ws += [p - q for p, q in zip(log_P, log_q)]
        log_z = math.log(sum(math.exp(v) for v in log_ws) / len(log_ws))
        t = [math.exp(a - (p - log_z)) for a, p in zip(log_pi, log_P)]
        R = [math.log((1 + ti) / (2 * ti)) for ti in t]  # -f'(t), f'(t) = log(2t / (1 + t))
        w = [math.exp(a - q) for a, q in zip(log_pi, log_q)]
        mean = sum(wi * ri for wi, ri in zip(w, R)) / len(w)
        used = mean if base is None else base
        loss = -sum(wi * (ri - used) * a for wi, ri, a in zip(w, R, log_pi)) / len(w)
        base = mean if base is None else decay * base + (1 - decay) * mean
    return log_z, base, loss


@pytest.mark.parametrize("bad", ["nan_target", "inf_target", "nan_policy", "nan_proposal"])
def test_fdpg_state_skips_a_non_finite_batch(bad):
    good1, good2 = _fdpg_batches()
    log_pi, log_P, log_q = (x.clone() for x in good1)
    if bad == "nan_target":
        log_P[1] = NAN
    elif bad == "inf_target":
        log_P[0] = INF
    elif bad == "nan_policy":
        log_pi[2] = NAN
    else:
        log_q[0] = NAN

    def run(batches):
        state = L.FDPGState(baseline_decay=0.9)
        for lp, P, q in batches:
            loss, metrics = L.fdpg_loss(lp.requires_grad_(True), P, proposal_logps=q, state=state)
        return state, loss, metrics

    clean, clean_loss, _ = run([good1, good2])
    dirty, dirty_loss, metrics = run([good1, (log_pi, log_P, log_q), good2])
    log_z, base, loss = _fdpg_js_expected([good1, good2], 0.9)
    assert dirty.skipped == 1 and clean.skipped == 0
    assert metrics["fdpg/skipped"].item() == 1.0
    assert dirty.count == clean.count == 5
    assert dirty.log_z == pytest.approx(log_z, rel=1e-12)
    assert dirty.baseline == pytest.approx(base, rel=1e-12)
    assert dirty_loss.item() == pytest.approx(loss, rel=1e-12)
    assert {k: v for k, v in dirty.state_dict().items() if k != "skipped"} == {
        k: v for k, v in clean.state_dict().items() if k != "skipped"
    }
    restored = L.FDPGState()
    restored.load_state_dict(dirty.state_dict())
    assert restored.skipped == 1 and restored.log_z == dirty.log_z


def test_fdpg_skipped_first_batch_leaves_state_empty():
    state = L.FDPGState()
    loss, _ = L.fdpg_loss(t64([NAN, -1.0], requires_grad=True), t64([0.0, 0.0]), state=state)
    assert not torch.isfinite(loss)
    assert state.count == 0 and state.baseline is None and state.skipped == 1


def test_fdpg_zero_target_probability_is_not_skipped():
    # P = (1, 0) on two on-policy samples with π = q = 1: Z = (1 + 0)/2; t = π/p = (½, ∞);
    # forward KL's R = 1/t = (2, 0); w = 1; mean(w R) = 1.
    state = L.FDPGState()
    L.fdpg_loss(t64([0.0, 0.0], requires_grad=True), t64([0.0, -INF]), divergence="forward_kl", state=state)
    assert state.skipped == 0 and state.count == 2
    assert state.log_z == pytest.approx(math.log(0.5), rel=1e-12)
    assert state.baseline == pytest.approx(1.0, rel=1e-12)


def test_fdpg_state_loads_checkpoint_without_skipped():
    state = L.FDPGState()
    state.load_state_dict({"log_sum": 1.5, "count": 3, "baseline": 0.25})
    assert state.skipped == 0 and state.log_z == pytest.approx(1.5 - math.log(3))


def test_running_mean_skips_non_finite_batch_means():
    clean, dirty = L.RunningMean(), L.RunningMean()
    for x in (0.2, 0.4):
        clean.update(torch.tensor(x))
    dirty.update(torch.tensor(0.2))
    assert dirty.update(torch.tensor(NAN)) == pytest.approx(0.2)
    dirty.update(torch.tensor(INF))
    assert dirty.update(torch.tensor(0.4)) == pytest.approx(0.3)
    assert (dirty.mean, dirty.count, dirty.skipped) == (clean.mean, clean.count, 2)
    restored = L.RunningMean()
    restored.load_state_dict(dirty.state_dict())
    assert restored.skipped == 2


def test_bco_pair_after_a_nan_batch_matches_without_it():
    beta = 0.5
    # rho_w = (0.4, -0.2), rho_l = (0.1, 0.3): batch mean of β·rho = 0.075 = δ.
    good = [t64([-1.0, -2.0]), t64([-1.5, -0.7]), t64([-1.4, -1.8]), t64([-1.6, -1.0])]
    bad = [t64([NAN, -2.0])] + good[1:]
    state = L.RunningMean()
    L.dpo_loss(*bad, beta=beta, loss_type="bco_pair", bco_delta="running_mean", bco_state=state)
    loss, m = L.dpo_loss(*good, beta=beta, loss_type="bco_pair", bco_delta="running_mean", bco_state=state)
    delta = beta * (0.4 - 0.2 + 0.1 + 0.3) / 4
    expected = sum(_softplus(-(beta * rw - delta)) + _softplus(beta * rl - delta)
                   for rw, rl in ((0.4, 0.1), (-0.2, 0.3))) / 2
    assert m["bco/delta"].item() == pytest.approx(delta, rel=1e-12)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert state.skipped == 1 and state.count == 1


# --------------------------------------------------------------------------- scalar arguments

PAIR = [t64([-1.0]), t64([-2.0]), t64([-1.5]), t64([-1.5])]  # rho_w = 0.5, rho_l = -0.5


@pytest.mark.parametrize(
    "beta", [0.3, np.float32(0.3), np.float64(0.3), np.array(0.3), torch.tensor(0.3, dtype=torch.float64)]
)
def test_real_scalars_of_every_kind_are_accepted(beta):
    loss, _ = L.dpo_loss(*PAIR, beta=beta)
    # Δ = 1: the loss is softplus(-β); float32(0.3) differs from 0.3 by ~1e-8.
    assert loss.item() == pytest.approx(_softplus(-0.3), rel=1e-7)


def test_inpo_scalar_forms():
    x = [t64([-1.0]), t64([-2.0]), t64([-1.5]), t64([-1.5]), t64([-1.2]), t64([-1.9])]
    # h = 1 - 0.25·0 - 0.75·0.7 = 0.475; (h - eta/2)² = 0.225²
    loss, _ = L.inpo_loss(*x, eta=np.float64(0.5), tau=torch.tensor(0.5))
    assert loss.item() == pytest.approx(0.225 ** 2, rel=1e-12)


def test_tdpo_variant_accepts_numpy_ints():
    x = [t64([[0.3, -0.1]]), t64([[0.2, 0.4]]), t64([[0.05, 0.1]]), t64([[0.2, 0.3]])]
    loss, _ = L.tdpo_loss(*x, beta=1.0, alpha=0.5, variant=np.int64(2))
    # z = (0.2 - 0.6) - 0.5 (0.5 - 0.15) = -0.575
    assert loss.item() == pytest.approx(_softplus(0.575), rel=1e-12)


# --------------------------------------------------------------------------- adversarial shapes and dtypes

B, T = 2, 3


def _tok(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, generator=g, dtype=torch.float64)


def test_integer_and_bool_masks_equal_float_masks():
    lw, ll, kw, kl = (_tok(s) for s in range(4))
    m = torch.tensor([[1, 0, 1], [1, 1, 0]])
    ref = L.sparse_po_loss(lw, ll, kw, kl, m.double(), None, chosen_mask=m.double(), beta=0.2)[0]
    for dtype in (torch.int32, torch.bool, torch.float16):
        got = L.sparse_po_loss(lw, ll, kw, kl, m.to(dtype), None, chosen_mask=m.to(dtype), beta=0.2)[0]
        assert got.item() == pytest.approx(ref.item(), rel=1e-12)


def test_zero_lengths_clamp_to_one_as_trl():
    # rho_w = (0.5, 0.2), rho_l = (-0.5, 0.4); lengths 0 count as 1 (TRL's clamp(min=1)).
    x = [t64([-1.0, -1.0]), t64([-2.0, -1.0]), t64([-1.5, -1.2]), t64([-1.5, -1.4])]
    beta = 0.5
    ipo, _ = L.dpo_loss(*x, beta=beta, loss_type="ipo", chosen_lengths=[0, 2], rejected_lengths=[4, 0])
    expected = ((0.5 / 1 + 0.5 / 4 - 1.0) ** 2 + (0.2 / 2 - 0.4 / 1 - 1.0) ** 2) / 2
    assert ipo.item() == pytest.approx(expected, rel=1e-12)
    norm, _ = L.dpo_loss(*x, beta=beta, loss_type="sigmoid_norm", chosen_lengths=[0, 2], rejected_lengths=[4, 0])
    expected = (_softplus(-beta * (0.5 + 0.5 / 4)) + _softplus(-beta * (0.2 / 2 - 0.4))) / 2
    assert norm.item() == pytest.approx(expected, rel=1e-12)
    # sft: chosen token mean over the batch, the empty completion adds no token.
    sft, _ = L.dpo_loss(*x, loss_type="sft", chosen_lengths=[0, 2])
    assert sft.item() == pytest.approx(2.0 / 2, rel=1e-12)
    # No chosen token at all: 0 (TRL's mean over no token is NaN).
    empty, _ = L.dpo_loss(*[t64([0.0, 0.0])] * 4, loss_type="sft", chosen_lengths=[0, 0])
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="chosen_lengths must be finite and > 0"):
        L.simpo_loss(x[0], x[1], [0, 2], [1, 1])


class _OldFDivergenceType(enum.Enum):  # the enum older TRL configs hold
    REVERSE_KL = "reverse_kl"
    JS_DIVERGENCE = "js_divergence"
    ALPHA_DIVERGENCE = "alpha_divergence"


def test_trl_argument_names_are_aliases():
    ours, _ = L.dpo_loss(*PAIR, f_divergence="alpha_divergence", f_alpha=0.3)
    for kwargs in (
        dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
        dict(f_divergence_type=_OldFDivergenceType.ALPHA_DIVERGENCE, f_alpha_divergence_coef=np.float64(0.3)),
        dict(f_divergence="alpha_divergence", f_divergence_type="alpha_divergence",
             f_alpha=0.3, f_alpha_divergence_coef=torch.tensor(0.3, dtype=torch.float64)),
    ):
        theirs, _ = L.dpo_loss(*PAIR, **kwargs)
        assert theirs.item() == ours.item()
    # alpha = 0.5 is TRL's default coefficient under either name.
    a, _ = L.dpo_loss(*PAIR, f_divergence_type="alpha_divergence")
    b, _ = L.dpo_loss(*PAIR, f_divergence="alpha_divergence", f_alpha=0.5)
    assert a.item() == b.item()
