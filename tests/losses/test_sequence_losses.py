"""Every loss against an independent float64 formula written here, values and gradients."""

import math

import pytest
import torch

from prefopt_kernels import losses as L

B = 5


def _leaf(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)


def _logsig(x):
    # log σ(x) = -log(1 + e^-x), written without F.logsigmoid
    return -torch.log1p(torch.exp(-x))


def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _check(fn_lib, fn_ref, inputs, atol=1e-10):
    """Same value and same gradient wrt every input."""
    out = fn_lib(*inputs)
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    ref = fn_ref(*inputs)
    ref_grads = torch.autograd.grad(ref, inputs, allow_unused=True)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-9)
    for g, r in zip(grads, ref_grads):
        g = torch.zeros_like(inputs[0]) if g is None else g
        r = torch.zeros_like(inputs[0]) if r is None else r
        torch.testing.assert_close(g, r, atol=atol, rtol=1e-9)


# --------------------------------------------------------------------------- DPO family

BETA, EPS, TAU_DP = 0.3, 0.2, 0.05
LEN_W = torch.tensor([3.0, 4.0, 1.0, 7.0, 2.0], dtype=torch.float64)
LEN_L = torch.tensor([2.0, 5.0, 6.0, 1.0, 3.0], dtype=torch.float64)


def _ref_dpo(lt, pc, pr, rc, rr):
    """TRL 1.16's per-pair loss (sigmoid without smoothing, bco_pair with δ = 0)."""
    b, e = BETA, EPS
    rw, rl = pc - rc, pr - rr
    d = rw - rl
    z = b * d
    if lt == "sigmoid":
        return -_logsig(z)
    if lt == "hinge":
        return torch.clamp(1 - z, min=0)
    if lt == "ipo":
        return (rw / LEN_W - rl / LEN_L - 1 / (2 * b)) ** 2
    if lt == "exo_pair":
        return _sig(z) * (_logsig(z) - math.log(1 - e)) + _sig(-z) * (_logsig(-z) - math.log(e))
    if lt == "nca_pair":
        return -_logsig(b * rw) - 0.5 * _logsig(-b * rw) - 0.5 * _logsig(-b * rl)
    if lt == "robust":
        return ((1 - e) * -_logsig(z) - e * -_logsig(-z)) / (1 - 2 * e)
    if lt == "bco_pair":
        return -_logsig(b * rw) - _logsig(-b * rl)
    if lt == "sppo_hard":
        return (rw - 1 / (2 * b)) ** 2 + (rl + 1 / (2 * b)) ** 2
    if lt == "aot":
        dd = (pc - pr).sort().values - (rc - rr).sort().values
        return -(1 - e) * _logsig(b * dd) - e * _logsig(-b * dd)
    if lt == "aot_unpaired":
        dd = rw.sort().values - rl.sort().values
        return -(1 - e) * _logsig(b * dd) - e * _logsig(-b * dd)
    if lt == "apo_zero":
        return (1 - _sig(b * rw)) + _sig(b * rl)
    if lt == "apo_down":
        return _sig(b * rw) + (1 - _sig(b * (rw - rl)))
    if lt == "discopop":
        m = _sig(z / TAU_DP)
        return (1 - m) * -_logsig(z) + m * torch.exp(-z)
    if lt == "sft":
        return (-pc.sum() / LEN_W.sum()).expand(pc.shape)
    if lt == "sigmoid_norm":
        return -_logsig(b * (rw / LEN_W - rl / LEN_L))
    raise AssertionError(lt)


def _dpo_inputs():
    return [_leaf(B, seed=s) for s in range(4)]


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

    _check(lib, lambda *x: _ref_dpo(loss_type, *x).mean(), _dpo_inputs())


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
            return (-_logsig(BETA * (sw - sl))).mean()
        if loss_type == "hinge":
            return torch.clamp(1 - BETA * (sw - sl), min=0).mean()
        return (-_logsig(BETA * (sw / LEN_W - sl / LEN_L))).mean()

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

    _check(lib, ref, _dpo_inputs())


def test_dpo_alpha_one_is_reverse_kl():
    x = _dpo_inputs()
    a = L.dpo_loss(*x, f_divergence="alpha_divergence", f_alpha=1.0)[0]
    b = L.dpo_loss(*x)[0]
    torch.testing.assert_close(a, b)


def test_dpo_weighted_loss_types_sum():
    x = _dpo_inputs()
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
        return (-(1 - EPS) * _logsig(z) - EPS * _logsig(-z)).mean()

    _check(lib, ref, _dpo_inputs())


def test_bco_batch_mean_delta():
    def lib(*x):
        return L.dpo_loss(*x, beta=BETA, loss_type="bco_pair", bco_delta="batch_mean")[0]

    def ref(pc, pr, rc, rr):
        rw, rl = BETA * (pc - rc), BETA * (pr - rr)
        delta = torch.cat([rw, rl]).mean().detach()
        return (-_logsig(rw - delta) - _logsig(-(rl - delta))).mean()

    _check(lib, ref, _dpo_inputs())


def test_dpo_bco_running_mean_state():
    state = L.RunningMean()
    means = []
    for seed in range(3):
        x = [_leaf(B, seed=10 * seed + k) for k in range(4)]
        batch_mean = torch.cat([BETA * (x[0] - x[2]), BETA * (x[1] - x[3])]).mean().item()
        means.append(batch_mean)
        loss, metrics = L.dpo_loss(*x, beta=BETA, loss_type="bco_pair", bco_delta="running_mean",
                                   bco_state=state)
        delta = sum(means) / len(means)
        rw, rl = BETA * (x[0] - x[2]), BETA * (x[1] - x[3])
        ref = (-_logsig(rw - delta) - _logsig(-(rl - delta))).mean()
        torch.testing.assert_close(loss, ref)
        assert metrics["bco/delta"].item() == pytest.approx(delta)
    restored = L.RunningMean()
    restored.load_state_dict(state.state_dict())
    assert restored.mean == state.mean and restored.count == 3


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_aot_on_one_pair_is_smoothed_sigmoid(eps):
    # Sorting a batch of one is the identity, so aot == sigmoid with conservative-DPO smoothing.
    x = [_leaf(1, seed=s) for s in range(4)]
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
    x = _dpo_inputs()
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
    x = [t.detach().to(torch.bfloat16) for t in _dpo_inputs()]
    loss, _ = L.dpo_loss(*x)
    assert loss.dtype == torch.float32
    ref = L.dpo_loss(*[t.double() for t in x])[0]
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- SimPO, INPO


def test_simpo_matches_formula():
    beta, gamma, eps = 2.0, 0.5, 0.1

    def ref(pc, pr):
        z = beta * (pc / LEN_W - pr / LEN_L) - gamma
        return (-(1 - eps) * _logsig(z) - eps * _logsig(-z)).mean()

    def lib(pc, pr):
        return L.simpo_loss(pc, pr, LEN_W, LEN_L, beta=beta, gamma=gamma, label_smoothing=eps)[0]

    _check(lib, ref, [_leaf(B, seed=1), _leaf(B, seed=2)])


def test_inpo_matches_formula():
    eta, tau = 0.5, 0.4

    def ref(pc, pr, rc, rr, tc, tr):
        h = (pc - pr) - eta * tau * (rc - rr) - (1 - eta * tau) * (tc - tr)
        return ((h - eta / 2) ** 2).mean()

    def lib(*x):
        return L.inpo_loss(*x, eta=eta, tau=tau)[0]

    _check(lib, ref, [_leaf(B, seed=s) for s in range(6)])


def test_inpo_with_eta_tau_one_is_ipo():
    eta = 0.5
    x = [_leaf(B, seed=s) for s in range(6)]
    inpo = L.inpo_loss(*x, eta=eta, tau=1.0 / eta)[0]
    ones = torch.ones(B, dtype=torch.float64)
    ipo = L.dpo_loss(*x[:4], beta=1.0 / eta, loss_type="ipo", chosen_lengths=ones, rejected_lengths=ones)[0]
    torch.testing.assert_close(inpo, ipo)
    # The previous iterate has dropped out: no gradient reaches it.
    g = torch.autograd.grad(inpo, x[4:])
    assert all(float(t.abs().max()) == 0.0 for t in g)


# --------------------------------------------------------------------------- TDPO, SparsePO

T = 6


def _token_inputs(seed=0):
    lw, ll = _leaf(B, T, seed=seed), _leaf(B, T, seed=seed + 1)
    kw = (_leaf(B, T, seed=seed + 2).detach().abs()).requires_grad_(True)
    kl = (_leaf(B, T, seed=seed + 3).detach().abs()).requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 4)
    mw = (torch.rand(B, T, generator=g) > 0.3).double()
    ml = (torch.rand(B, T, generator=g) > 0.3).double()
    mw[2] = 0.0  # a sequence with no valid token contributes 0, never NaN
    return lw, ll, kw, kl, mw, ml


@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_matches_formula(variant):
    beta, alpha = 0.3, 0.7
    lw, ll, kw, kl, mw, ml = _token_inputs()

    def ref(lw, ll, kw, kl):
        u = (lw * mw).sum(1) - (ll * ml).sum(1)
        dw, dl = (kw * mw).sum(1), (kl * ml).sum(1)
        if variant == 1:
            return (-_logsig(beta * (u - (dl - dw)))).mean()
        return (-_logsig(beta * (u - alpha * (dl - dw.detach())))).mean()

    def lib(lw, ll, kw, kl):
        return L.tdpo_loss(lw, ll, kw, kl, mw, ml, beta=beta, alpha=alpha, variant=variant)[0]

    _check(lib, ref, [lw, ll, kw, kl])
    if variant == 2:
        loss = lib(lw, ll, kw, kl)
        assert torch.autograd.grad(loss, kw, allow_unused=True)[0] is None


def test_tdpo_metrics():
    lw, ll, kw, kl, mw, ml = _token_inputs()
    _, m = L.tdpo_loss(lw, ll, kw, kl, mw.bool(), ml.bool(), beta=0.2)
    torch.testing.assert_close(m["kl/chosen"], (kw * mw).sum(1).mean())
    torch.testing.assert_close(m["rewards/rejected"], 0.2 * (ll * ml).sum(1).mean())


def test_sparse_po_matches_formula_with_mask_gradients():
    beta, l1u, l1d = 0.4, 0.01, 0.02
    lw, ll, kw, kl, vw, vl = _token_inputs(seed=7)
    masks = [_leaf(B, T, seed=20 + k).detach().abs().requires_grad_(True) for k in range(4)]

    def ref(lw, ll, kw, kl, uw, ul, dw_m, dl_m):
        Uw, Ul = (uw * lw * vw).sum(1), (ul * ll * vl).sum(1)
        Dw, Dl = (dw_m * kw * vw).sum(1), (dl_m * kl * vl).sum(1)
        loss = -_logsig(beta * ((Uw - Ul) - (Dl - Dw)))
        loss = loss + l1u * ((uw.abs() * vw).sum(1) + (ul.abs() * vl).sum(1))
        loss = loss + l1d * ((dw_m.abs() * vw).sum(1) + (dl_m.abs() * vl).sum(1))
        return loss.mean()

    def lib(lw, ll, kw, kl, uw, ul, dw_m, dl_m):
        return L.sparse_po_loss(
            lw, ll, kw, kl, uw, ul, dw_m, dl_m,
            chosen_mask=vw, rejected_mask=vl, beta=beta, l1_reward=l1u, l1_kl=l1d,
        )[0]

    _check(lib, ref, [lw, ll, kw, kl, *masks])


NAN, INF = float("nan"), float("inf")


def _sparse_po_reference(inputs, segments, beta, l1_reward, l1_kl):
    """SparsePO in float64 written out over each sequence's valid tokens alone: the sums gather
    them by index, so an invalid token is never read (its value cannot matter, and its gradient is 0)."""
    lw, ll, kw, kl, uw, ul, dw, dl = (x.reshape(-1) for x in inputs)
    seg_w, seg_l = segments

    def sums(x, m, segs):
        return torch.stack([(m[idx] * x[idx]).sum() for idx in segs])

    def l1(m, segs):
        return torch.stack([m[idx].abs().sum() for idx in segs])

    margin = (sums(lw, uw, seg_w) - sums(ll, ul, seg_l)) - (sums(kl, dl, seg_l) - sums(kw, dw, seg_w))
    per_pair = (-_logsig(beta * margin) + l1_reward * (l1(uw, seg_w) + l1(ul, seg_l))
                + l1_kl * (l1(dw, seg_w) + l1(dl, seg_l)))
    return per_pair.mean()


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sparse_po_mask_gradient_at_exact_zeros(layout):
    """A reward (KL) mask entry of exactly 0 at a valid token keeps its term m l_t (m KL_t) in
    the loss, so the mask's gradient there is -c l_t (-c KL_t) for the chosen side, +c for the
    rejected one; only the validity mask drops a token, with a zero gradient for every input
    even where padding holds inf/NaN. Packed: the same tokens, the padding kept as [N] tokens of
    validity 0."""
    beta, l1u, l1d = 0.4, 0.01, 0.02
    vw = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float64)
    vl = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    g = torch.Generator().manual_seed(31)
    lw, ll = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    kw, kl = (torch.rand(3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    uw, ul, dw, dl = (0.2 + torch.rand(3, 5, generator=g, dtype=torch.float64) for _ in range(4))
    # Exact zeros at valid tokens: both masks at (0, 1) of y_w, one of them elsewhere.
    uw[0, 1] = uw[1, 0] = ul[1, 2] = 0.0
    dw[0, 1] = dw[0, 3] = dl[0, 0] = dl[2, 0] = 0.0
    # Padding holds garbage in every input.
    for x, v, bad in ((lw, vw, NAN), (ll, vl, INF), (kw, vw, INF), (kl, vl, NAN), (uw, vw, NAN), (ul, vl, -INF),
                      (dw, vw, INF), (dl, vl, NAN)):
        x[v == 0] = bad
    inputs = [x.requires_grad_(True) for x in (lw, ll, kw, kl, uw, ul, dw, dl)]
    segments = [[row.nonzero()[:, 0] + b * 5 for b, row in enumerate(v.bool())] for v in (vw, vl)]
    kwargs = dict(chosen_mask=vw, rejected_mask=vl, beta=beta, l1_reward=l1u, l1_kl=l1d)
    if layout == "packed":
        inputs = [x.detach().reshape(-1).requires_grad_(True) for x in inputs]
        cu = torch.tensor([0, 5, 10, 15])
        kwargs.update(chosen_mask=vw.reshape(-1), rejected_mask=vl.reshape(-1), chosen_cu_seqlens=cu,
                      rejected_cu_seqlens=cu)
    loss, _ = L.sparse_po_loss(*inputs, **kwargs)
    grads = torch.autograd.grad(loss, inputs)
    ref = _sparse_po_reference(inputs, segments, beta, l1u, l1d)
    ref_grads = torch.autograd.grad(ref, inputs)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    for name, v, got, want in zip(("lw", "ll", "kw", "kl", "uw", "ul", "dw", "dl"), (vw, vl) * 4, grads, ref_grads):
        invalid = (v == 0).reshape(got.shape)
        assert torch.equal(got[invalid], torch.zeros_like(got[invalid])), name
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15, msg=name)
    # The zeros at valid tokens do get a gradient: the reference's, the log-ratio's or KL's value.
    zeros_w, zeros_l = [(0, 1), (1, 0)], [(1, 2)]
    kl_zeros_w, kl_zeros_l = [(0, 1), (0, 3)], [(0, 0), (2, 0)]
    for grad, where in ((ref_grads[4], zeros_w), (ref_grads[5], zeros_l), (ref_grads[6], kl_zeros_w),
                        (ref_grads[7], kl_zeros_l)):
        assert all(grad.reshape(3, 5)[i, j] != 0 for i, j in where)


def test_sparse_po_unit_masks_equal_tdpo1():
    lw, ll, kw, kl, vw, vl = _token_inputs(seed=3)
    ones = torch.ones(B, T, dtype=torch.float64)
    sp, msp = L.sparse_po_loss(lw, ll, kw, kl, ones, ones, ones, ones, chosen_mask=vw, rejected_mask=vl, beta=0.3)
    td, _ = L.tdpo_loss(lw, ll, kw, kl, vw, vl, beta=0.3, variant=1)
    torch.testing.assert_close(sp, td)
    assert msp["mask/density"].item() == 1.0
    sp_none, _ = L.sparse_po_loss(lw, ll, kw, kl, chosen_mask=vw, rejected_mask=vl, beta=0.3)
    torch.testing.assert_close(sp_none, td)


def test_sparse_po_mask_density_metric():
    lw, ll, kw, kl, vw, vl = _token_inputs(seed=5)
    uw = torch.zeros(B, T, dtype=torch.float64)
    uw[:, :3] = 0.5
    ul = torch.zeros(B, T, dtype=torch.float64)
    _, m = L.sparse_po_loss(lw, ll, kw, kl, uw, ul, chosen_mask=vw, rejected_mask=vl)
    expect = ((uw > 0) * vw).sum() / (vw.sum() + vl.sum())
    torch.testing.assert_close(m["mask/density"], expect)
    torch.testing.assert_close(m["mask/kl_density"], torch.tensor(1.0, dtype=torch.float64))


def _pack(x, mask):
    """[B, T] + 0/1 mask -> packed [N] of the valid tokens and cu_seqlens."""
    rows = [x[b][mask[b] > 0] for b in range(x.shape[0])]
    lengths = torch.tensor([0] + [r.numel() for r in rows])
    return torch.cat(rows), torch.cumsum(lengths, 0)


def test_packed_layout_equals_padded():
    lw, ll, kw, kl, vw, vl = _token_inputs(seed=11)
    uw = _leaf(B, T, seed=40).detach().abs()
    pw, cu_w = _pack(lw, vw)
    pl, cu_l = _pack(ll, vl)
    pkw, _ = _pack(kw, vw)
    pkl, _ = _pack(kl, vl)
    puw, _ = _pack(uw, vw)
    assert cu_w[3] == cu_w[2]  # the empty sequence survives packing
    for variant in (1, 2):
        padded = L.tdpo_loss(lw, ll, kw, kl, vw, vl, variant=variant)[0]
        packed = L.tdpo_loss(pw, pl, pkw, pkl, variant=variant, chosen_cu_seqlens=cu_w, rejected_cu_seqlens=cu_l)[0]
        torch.testing.assert_close(packed, padded)
        gp = torch.autograd.grad(packed, [lw], retain_graph=True)[0]
        gd = torch.autograd.grad(padded, [lw])[0]
        torch.testing.assert_close(gp, gd)
    padded = L.sparse_po_loss(lw, ll, kw, kl, uw, None, chosen_mask=vw, rejected_mask=vl, l1_reward=0.1)[0]
    packed = L.sparse_po_loss(
        pw, pl, pkw, pkl, puw, None, l1_reward=0.1, chosen_cu_seqlens=cu_w, rejected_cu_seqlens=cu_l
    )[0]
    torch.testing.assert_close(packed, padded)
    # A packed validity mask is honoured too.
    half = torch.ones_like(pw)
    half[::2] = 0
    packed_masked = L.tdpo_loss(pw, pl, pkw, pkl, half, None, chosen_cu_seqlens=cu_w, rejected_cu_seqlens=cu_l)[0]
    ref = L.tdpo_loss(pw * half, pl, pkw * half, pkl, chosen_cu_seqlens=cu_w, rejected_cu_seqlens=cu_l)[0]
    torch.testing.assert_close(packed_masked, ref)


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
    log_pi = _leaf(6, seed=3)
    _, m = L.fdpg_loss(log_pi, _leaf(6, seed=4).detach(), state=L.FDPGState())
    assert m["fdpg/importance_weight"].item() == pytest.approx(1.0)
