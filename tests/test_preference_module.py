"""PreferenceLoss from stacked logits against an eager float64 computation."""

import pytest
import torch

import prefopt_kernels.ops as ops
import prefopt_kernels as pk
from prefopt_kernels import losses as L


def _cpu_backends():
    return [n for n in pk.available_backends() if ops._backend_module(n).supports(torch.device("cpu"))]


@pytest.fixture(autouse=True, params=_cpu_backends())
def backend(request):
    """The module end to end on every backend that runs on CPU tensors here."""
    with ops.use_backend(request.param):
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


def _logsig(x):
    return -torch.log1p(torch.exp(-x))


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
        ref_loss = -_logsig(beta * (lr[s].sum(1) - lr[r].sum(1))).mean()
    elif loss_type == "ipo":
        ref_loss = ((lr[s].sum(1) / n[s] - lr[r].sum(1) / n[r] - 1 / (2 * beta)) ** 2).mean()
    elif loss_type == "simpo":
        ref_loss = -_logsig(beta * (logp[s].sum(1) / n[s] - logp[r].sum(1) / n[r]) - 0.5).mean()
    elif loss_type == "tdpo1":
        ref_loss = -_logsig(beta * (lr[s].sum(1) - lr[r].sum(1) - (kl[r].sum(1) - kl[s].sum(1)))).mean()
    elif loss_type == "tdpo2":
        d = kl[r].sum(1) - kl[s].sum(1).detach()
        ref_loss = -_logsig(beta * (lr[s].sum(1) - lr[r].sum(1) - 0.5 * d)).mean()
    else:
        u = (reward_mask * lr).sum(1)
        dd = (kl_mask * kl).sum(1)
        ref_loss = -_logsig(beta * ((u[s] - u[r]) - (dd[r] - dd[s]))).mean()
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


def test_bad_inputs():
    logits, ref, labels = _batch()
    with pytest.raises(ValueError, match="loss_type"):
        L.PreferenceLoss("dpo++")
    with pytest.raises(ValueError, match="beta"):
        L.PreferenceLoss(beta=0)
    with pytest.raises(ValueError, match="ref_logits"):
        L.PreferenceLoss("tdpo1")(logits, labels, ref_logps=torch.zeros(B2))
    with pytest.raises(ValueError, match="ref_logits and ref_logps"):
        L.PreferenceLoss()(logits, labels)
    with pytest.raises(ValueError, match="2B rows"):
        L.PreferenceLoss()(logits[:3], labels[:3], ref[:3])
    empty = labels.clone()
    empty[0] = -100
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.PreferenceLoss("ipo")(logits, empty, ref)
