"""PreferenceLoss from stacked logits against an eager float64 computation."""

import pytest
import torch

import prefopt_kernels.ops as ops
from prefopt_kernels import dispatch
import prefopt_kernels as pk
from prefopt_kernels import losses as L

from losses_cases import logsig


def _cpu_backends():
    return [n for n in pk.available_backends() if dispatch.backend_module(n).supports(torch.device("cpu"))]


@pytest.fixture(autouse=True, params=_cpu_backends())
def backend(request):
    """The module end to end on every backend that runs on CPU tensors here."""
    with pk.use_backend(request.param):
        yield request.param

B2, T, V = 4, 7, 11  # 2B rows: chosen [0, 2), rejected [2, 4)


def _batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B2, T, V, generator=g).to(dtype).requires_grad_(True)
    ref = torch.randn(B2, T, V, generator=g).to(dtype)
    labels = torch.randint(0, V, (B2, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, 5:] = -100  # padding
    return logits, ref, labels


def _eager_terms(logits, ref, labels):
    """Per-token logp, ref logp and KL(ref || policy) in float64: two log_softmax + gather."""
    lp, lq = torch.log_softmax(logits.double(), -1), torch.log_softmax(ref.double(), -1)
    valid = labels != -100
    safe = labels.clamp(min=0)
    logp = lp.gather(-1, safe[..., None])[..., 0] * valid
    ref_logp = lq.gather(-1, safe[..., None])[..., 0] * valid
    kl = (lq.exp() * (lq - lp)).sum(-1) * valid
    return logp, ref_logp, kl, valid.double()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "tdpo1", "tdpo2", "sparse_po"])
def test_matches_eager(loss_type):
    logits, ref, labels = _batch()
    beta = 0.3
    g = torch.Generator().manual_seed(5)
    reward_mask = torch.rand(B2, T, generator=g, dtype=torch.float64)
    kl_mask = torch.rand(B2, T, generator=g, dtype=torch.float64)
    kl_mask[:, 4] = 0.0  # skipped rows
    module = L.PreferenceLoss(loss_type, beta=beta)
    kwargs = {"reward_mask": reward_mask, "kl_mask": kl_mask} if loss_type == "sparse_po" else {}
    loss, metrics = module(logits, labels, ref, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)

    x = logits.detach().double().requires_grad_(True)
    logp, ref_logp, kl, valid = _eager_terms(x, ref, labels)
    lr = logp - ref_logp
    s, r = slice(0, 2), slice(2, 4)
    n = valid.sum(1)
    if loss_type == "sigmoid":
        ref_loss = -logsig(beta * (lr[s].sum(1) - lr[r].sum(1))).mean()
    elif loss_type == "ipo":
        ref_loss = ((lr[s].sum(1) / n[s] - lr[r].sum(1) / n[r] - 1 / (2 * beta)) ** 2).mean()
    elif loss_type == "simpo":
        ref_loss = -logsig(beta * (logp[s].sum(1) / n[s] - logp[r].sum(1) / n[r]) - 0.5).mean()
    elif loss_type == "tdpo1":
        ref_loss = -logsig(beta * (lr[s].sum(1) - lr[r].sum(1) - (kl[r].sum(1) - kl[s].sum(1)))).mean()
    elif loss_type == "tdpo2":
        d = kl[r].sum(1) - kl[s].sum(1).detach()
        ref_loss = -logsig(beta * (lr[s].sum(1) - lr[r].sum(1) - 0.5 * d)).mean()
    else:
        u = (reward_mask * lr).sum(1)
        dd = (kl_mask * kl).sum(1)
        ref_loss = -logsig(beta * ((u[s] - u[r]) - (dd[r] - dd[s]))).mean()
    (ref_grad,) = torch.autograd.grad(ref_loss, x)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["logps/chosen"].double(), logp[s].sum(1).mean(), atol=1e-5, rtol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/rejected"):
        assert key in metrics


def test_precomputed_reference_logps_per_sequence_and_per_token():
    logits, ref, labels = _batch(seed=1)
    _, ref_logp, _, _ = _eager_terms(logits.detach(), ref, labels)
    module = L.PreferenceLoss("hinge", beta=0.2)
    a, _ = module(logits, labels, ref)
    b, _ = module(logits, labels, ref_logps=ref_logp.float())
    c, _ = module(logits, labels, ref_logps=ref_logp.sum(1).float())
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_shift_labels_reads_a_view_without_copy(monkeypatch):
    logits, ref, input_ids = _batch(seed=2)
    seen = {}
    original = ops.token_terms

    def spy(lg, lb, rf, **kw):
        seen["ptr"], seen["shape"] = lg.data_ptr(), tuple(lg.shape)
        return original(lg, lb, rf, **kw)

    monkeypatch.setattr(ops, "token_terms", spy)
    shifted, _ = L.PreferenceLoss("tdpo1", shift_labels=True)(logits, input_ids, ref)
    assert seen["ptr"] == logits.data_ptr() and seen["shape"] == (B2, T - 1, V)
    manual, _ = L.PreferenceLoss("tdpo1")(logits[:, :-1].contiguous(), input_ids[:, 1:], ref[:, :-1].contiguous())
    torch.testing.assert_close(shifted, manual)


def test_bf16_logits():
    logits, ref, labels = _batch(seed=3, dtype=torch.bfloat16)
    loss, _ = L.PreferenceLoss("sparse_po")(logits, labels, ref)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_inpo_through_module():
    logits, ref, labels = _batch(seed=4)
    prev = torch.randn(B2, dtype=torch.float64)
    loss, _ = L.PreferenceLoss("inpo", eta=0.5, tau=1.0)(logits, labels, ref, prev_logps=prev)
    logp, ref_logp, _, _ = _eager_terms(logits.detach(), ref, labels)
    pc, pr = logp[:2].sum(1), logp[2:].sum(1)
    rc, rr = ref_logp[:2].sum(1), ref_logp[2:].sum(1)
    h = (pc - pr) - 0.5 * (rc - rr) - 0.5 * (prev[:2] - prev[2:])
    torch.testing.assert_close(loss.double(), ((h - 0.25) ** 2).mean(), atol=1e-5, rtol=1e-5)


def test_rows_without_tokens_count_as_length_one():
    # As TRL's clamp(min=1): an empty chosen row has log-ratio 0 and keeps the score 0 / 1.
    logits, ref, labels = _batch(seed=8)
    labels[0] = -100
    loss, _ = L.PreferenceLoss("ipo", beta=0.3)(logits, labels, ref)
    logp, ref_logp, _, valid = _eager_terms(logits.detach(), ref, labels)
    lr = (logp - ref_logp).sum(1)
    n = valid.sum(1).clamp(min=1)
    expected = ((lr[:2] / n[:2] - lr[2:] / n[2:] - 1 / 0.6) ** 2).mean()
    assert n[0] == 1 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)

    # SimPO (reference-free) too: the empty rejected row's length-normalised log-prob is 0 / 1.
    labels[3] = -100
    loss, _ = L.PreferenceLoss("simpo", beta=0.3)(logits, labels)
    logp, _, _, valid = _eager_terms(logits.detach(), ref, labels)
    score = logp.sum(1) / valid.sum(1).clamp(min=1)
    expected = -logsig(0.3 * (score[:2] - score[2:]) - 0.5).mean()
    assert score[0] == 0 and score[3] == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)


def test_list_loss_type_is_the_weighted_sum():
    logits, ref, labels = _batch(seed=9)
    mix = L.PreferenceLoss(["sigmoid", "bco_pair", "sft"], beta=0.3, loss_weights=[0.8, 0.2, 1.0])
    loss, metrics = mix(logits, labels, ref)
    parts = [L.PreferenceLoss(lt, beta=0.3)(logits, labels, ref)[0] for lt in ("sigmoid", "bco_pair", "sft")]
    torch.testing.assert_close(loss, 0.8 * parts[0] + 0.2 * parts[1] + parts[2])
    assert mix.loss_type == ["sigmoid", "bco_pair", "sft"] and "rewards/margins" in metrics
    # A tuple works too; the weights default to 1.
    both, _ = L.PreferenceLoss(("hinge", "sft"), beta=0.3)(logits, labels, ref)
    torch.testing.assert_close(both, L.PreferenceLoss("hinge", beta=0.3)(logits, labels, ref)[0] + parts[2])


def test_beta_as_numpy_scalar_or_0d_tensor():
    import numpy as np

    logits, ref, labels = _batch(seed=6)
    logp, ref_logp, _, _ = _eager_terms(logits.detach(), ref, labels)
    lr = (logp - ref_logp).sum(1)
    expected = -logsig(0.25 * (lr[:2] - lr[2:])).mean()
    for beta in (np.float32(0.25), np.array(0.25), torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64)):
        loss, _ = L.PreferenceLoss(beta=beta)(logits, labels, ref)
        torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)


def test_garbage_at_ignored_tokens_is_ignored():
    logits, ref, labels = _batch(seed=7)
    logp, ref_logp, kl, valid = _eager_terms(logits.detach(), ref, labels)
    ignored = valid == 0
    # Precomputed per-token reference log-probs holding inf/NaN at ignored positions.
    dirty = ref_logp.clone()
    dirty[ignored] = float("inf")
    dirty[0, 0] = float("nan")
    lr = (logp - ref_logp).sum(1)
    loss, _ = L.PreferenceLoss("sigmoid", beta=0.2)(logits, labels, ref_logps=dirty)
    torch.testing.assert_close(loss.double(), -logsig(0.2 * (lr[:2] - lr[2:])).mean(), atol=1e-5, rtol=1e-5)
    # SparsePO masks holding NaN/inf at ignored positions.
    g = torch.Generator().manual_seed(8)
    um, km = (torch.rand(B2, T, generator=g, dtype=torch.float64) for _ in range(2))
    um_dirty, km_dirty = um.clone(), km.clone()
    um_dirty[ignored], km_dirty[ignored] = float("nan"), float("inf")
    x = logits.detach().clone().requires_grad_(True)
    loss, _ = L.PreferenceLoss("sparse_po", beta=0.3)(x, labels, ref, reward_mask=um_dirty, kl_mask=km_dirty)
    (grad,) = torch.autograd.grad(loss, x)
    u = (um * (logp - ref_logp) * valid).sum(1)
    d = (km * kl * valid).sum(1)
    expected = -logsig(0.3 * ((u[:2] - u[2:]) - (d[2:] - d[:2]))).mean()
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(grad).all() and (grad[ignored] == 0).all()


def test_sparse_po_kl_mask_that_requires_grad_gets_the_kl_where_it_is_zero():
    """A KL mask that requires grad has the gradient ±c KL_t at a valid token where it is 0, so the
    op computes the KL there; a detached one lets the op skip those rows, with the same loss."""
    logits, ref, labels = _batch(seed=11)
    logp, ref_logp, kl, valid = _eager_terms(logits.detach(), ref, labels)
    g = torch.Generator().manual_seed(12)
    km = torch.rand(B2, T, generator=g, dtype=torch.float64)
    km[:, 3] = 0.0  # a valid token of every row
    assert (valid[:, 3] == 1).all()
    leaf = km.clone().requires_grad_(True)
    module = L.PreferenceLoss("sparse_po", beta=0.3)
    loss, _ = module(logits, labels, ref, kl_mask=leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    expected_leaf = km.clone().requires_grad_(True)
    u = ((logp - ref_logp) * valid).sum(1)
    d = (expected_leaf * kl * valid).sum(1)
    expected = -logsig(0.3 * ((u[:2] - u[2:]) - (d[2:] - d[:2]))).mean()
    (expected_grad,) = torch.autograd.grad(expected, expected_leaf)
    assert (expected_grad[:, 3].abs() > 1e-3).all()
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    detached, _ = module(logits, labels, ref, kl_mask=km)
    torch.testing.assert_close(detached, loss)


def test_shift_labels_accepts_masks_in_either_layout():
    logits, ref, input_ids = _batch(seed=9)
    g = torch.Generator().manual_seed(10)
    km = torch.rand(B2, T, generator=g)
    module = L.PreferenceLoss("sparse_po", shift_labels=True)
    full, _ = module(logits, input_ids, ref, kl_mask=km)
    shifted, _ = module(logits, input_ids, ref, kl_mask=km[:, 1:])
    torch.testing.assert_close(full, shifted)
    with pytest.raises(ValueError, match=r"kl_mask must have the labels' shape \(4, 7\) \(or the shifted \(4, 6\)\)"):
        module(logits, input_ids, ref, kl_mask=km[:, 2:])
