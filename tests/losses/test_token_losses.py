"""The token-level losses (TDPO, SparsePO) against independent float64 formulas written here,
values and gradients: the masks' gradients (at exact zeros too), their metrics, and the packed
layout against the padded one."""

import pytest
import torch

from prefopt_kernels import losses as L

from losses_cases import B, INF, NAN, T, check_formula, leaf, logsig, token_inputs


@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_matches_formula(variant):
    beta, alpha = 0.3, 0.7
    lw, ll, kw, kl, mw, ml = token_inputs()

    def ref(lw, ll, kw, kl):
        u = (lw * mw).sum(1) - (ll * ml).sum(1)
        dw, dl = (kw * mw).sum(1), (kl * ml).sum(1)
        if variant == 1:
            return (-logsig(beta * (u - (dl - dw)))).mean()
        return (-logsig(beta * (u - alpha * (dl - dw.detach())))).mean()

    def lib(lw, ll, kw, kl):
        return L.tdpo_loss(lw, ll, kw, kl, mw, ml, beta=beta, alpha=alpha, variant=variant)[0]

    check_formula(lib, ref, [lw, ll, kw, kl])
    if variant == 2:
        loss = lib(lw, ll, kw, kl)
        assert torch.autograd.grad(loss, kw, allow_unused=True)[0] is None


def test_tdpo_metrics():
    lw, ll, kw, kl, mw, ml = token_inputs()
    _, m = L.tdpo_loss(lw, ll, kw, kl, mw.bool(), ml.bool(), beta=0.2)
    torch.testing.assert_close(m["kl/chosen"], (kw * mw).sum(1).mean())
    torch.testing.assert_close(m["rewards/rejected"], 0.2 * (ll * ml).sum(1).mean())


def test_sparse_po_matches_formula_with_mask_gradients():
    beta, l1u, l1d = 0.4, 0.01, 0.02
    lw, ll, kw, kl, vw, vl = token_inputs(seed=7)
    masks = [leaf(B, T, seed=20 + k).detach().abs().requires_grad_(True) for k in range(4)]

    def ref(lw, ll, kw, kl, uw, ul, dw_m, dl_m):
        Uw, Ul = (uw * lw * vw).sum(1), (ul * ll * vl).sum(1)
        Dw, Dl = (dw_m * kw * vw).sum(1), (dl_m * kl * vl).sum(1)
        loss = -logsig(beta * ((Uw - Ul) - (Dl - Dw)))
        loss = loss + l1u * ((uw.abs() * vw).sum(1) + (ul.abs() * vl).sum(1))
        loss = loss + l1d * ((dw_m.abs() * vw).sum(1) + (dl_m.abs() * vl).sum(1))
        return loss.mean()

    def lib(lw, ll, kw, kl, uw, ul, dw_m, dl_m):
        return L.sparse_po_loss(
            lw, ll, kw, kl, uw, ul, dw_m, dl_m,
            chosen_mask=vw, rejected_mask=vl, beta=beta, l1_reward=l1u, l1_kl=l1d,
        )[0]

    check_formula(lib, ref, [lw, ll, kw, kl, *masks])


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
    per_pair = (-logsig(beta * margin) + l1_reward * (l1(uw, seg_w) + l1(ul, seg_l))
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
    lw, ll, kw, kl, vw, vl = token_inputs(seed=3)
    ones = torch.ones(B, T, dtype=torch.float64)
    sp, msp = L.sparse_po_loss(lw, ll, kw, kl, ones, ones, ones, ones, chosen_mask=vw, rejected_mask=vl, beta=0.3)
    td, _ = L.tdpo_loss(lw, ll, kw, kl, vw, vl, beta=0.3, variant=1)
    torch.testing.assert_close(sp, td)
    assert msp["mask/density"].item() == 1.0
    sp_none, _ = L.sparse_po_loss(lw, ll, kw, kl, chosen_mask=vw, rejected_mask=vl, beta=0.3)
    torch.testing.assert_close(sp_none, td)


def test_sparse_po_mask_density_metric():
    lw, ll, kw, kl, vw, vl = token_inputs(seed=5)
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
    lw, ll, kw, kl, vw, vl = token_inputs(seed=11)
    uw = leaf(B, T, seed=40).detach().abs()
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
