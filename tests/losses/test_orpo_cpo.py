"""ORPO and CPO: hand-derived float64 formulas, values worked out by hand, TRL 1.16's own loss
methods on the same inputs, ``PreferenceLoss`` end to end, bad input, and a toy loss registered
the way a new loss is."""

import math
from types import SimpleNamespace

import pytest
import torch

from prefopt_kernels import losses as L
from prefopt_kernels.losses.registry import LENGTH_INPUTS, LOSSES, POLICY_INPUTS, LossEntry, register

from toy_margin_loss import toy_margin_loss

CPO_TYPES = {"cpo": "sigmoid", "cpo_hinge": "hinge", "cpo_ipo": "ipo", "cpo_simpo": "simpo"}


def _pairs(seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    lengths_w = torch.randint(1, 9, (b,), generator=g).double()
    lengths_l = torch.randint(1, 9, (b,), generator=g).double()
    # Per-token log-probs in (-3, -0.05): averages on both sides of -log 2 (log1mexp's switch).
    pc = -(torch.rand(b, generator=g, dtype=torch.float64) * 2.95 + 0.05) * lengths_w
    pr = -(torch.rand(b, generator=g, dtype=torch.float64) * 2.95 + 0.05) * lengths_l
    return pc.requires_grad_(True), pr.requires_grad_(True), lengths_w, lengths_l


def _hand_orpo(pc, pr, nw, nl, lam):
    """Hong et al. eq. 6-7: odds(y) = P/(1-P) with P the per-token geometric mean probability."""
    p_w, p_l = torch.exp(pc / nw), torch.exp(pr / nl)
    log_or = torch.log((p_w / (1 - p_w)) / (p_l / (1 - p_l)))
    nll = -pc.sum() / nw.sum()
    return (nll - lam * torch.log(1 / (1 + torch.exp(-log_or)))).mean()


def _hand_cpo(pc, pr, nw, nl, variant, beta, eps, gamma, alpha):
    r_w, r_l = (pc / nw, pr / nl) if variant in ("ipo", "simpo") else (pc, pr)
    u = beta * (r_w - r_l) - (gamma if variant == "simpo" else 0.0)
    log_sig = lambda x: -torch.log1p(torch.exp(-x))  # noqa: E731
    if variant in ("sigmoid", "simpo"):
        pref = -(1 - eps) * log_sig(u) - eps * log_sig(-u)
    elif variant == "hinge":
        pref = torch.clamp(1 - u, min=0)
    else:
        pref = (r_w - r_l - 1 / (2 * beta)) ** 2
    return pref.mean() + alpha * (-pc.sum() / nw.sum())


def test_orpo_matches_hand_derived_float64():
    pc, pr, nw, nl = _pairs()
    loss, metrics = L.orpo_loss(pc, pr, nw, nl, beta=0.25)
    expected = _hand_orpo(pc, pr, nw, nl, 0.25)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    mine = torch.autograd.grad(loss, (pc, pr))
    theirs = torch.autograd.grad(expected, (pc, pr))
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["logps/chosen"], (pc / nw).mean().detach())
    torch.testing.assert_close(metrics["nll_loss"], (-pc.sum() / nw.sum()).detach())


def test_orpo_at_a_point_worked_out_by_hand():
    # P_w = 1/2 (odds 1), P_l = 1/5 (odds 1/4): log OR = log 4, log σ(log 4) = log(4/5).
    pc = torch.tensor([2 * math.log(0.5)], dtype=torch.float64)  # two tokens
    pr = torch.tensor([3 * math.log(0.2)], dtype=torch.float64)  # three tokens
    loss, metrics = L.orpo_loss(pc, pr, [2.0], [3.0], beta=0.5)
    nll = -math.log(0.5)
    assert loss.item() == pytest.approx(nll - 0.5 * math.log(0.8), rel=1e-14)
    assert metrics["log_odds_chosen"].item() == pytest.approx(math.log(4.0), rel=1e-14)
    assert metrics["log_odds_ratio"].item() == pytest.approx(math.log(0.8), rel=1e-14)


def test_orpo_log_odds_stay_finite_near_probability_one():
    # a = -1e-9: 1 - exp(a) cancels in a naive form; log(-expm1(a)) keeps it.
    pc = torch.tensor([-1e-9], dtype=torch.float32)
    pr = torch.tensor([-5.0], dtype=torch.float32)
    _, metrics = L.orpo_loss(pc, pr, [1], [1], beta=1.0)
    expected = (-1e-9 - math.log(-math.expm1(-1e-9))) - (-5.0 - math.log(-math.expm1(-5.0)))
    assert metrics["log_odds_chosen"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss_type", CPO_TYPES)
def test_cpo_matches_hand_derived_float64(loss_type):
    variant = CPO_TYPES[loss_type]
    pc, pr, nw, nl = _pairs(seed=1)
    kwargs = dict(beta=0.3, label_smoothing=0.1, simpo_gamma=0.4, cpo_alpha=0.7)
    loss, metrics = L.cpo_loss(pc, pr, nw, nl, variant=variant, **kwargs)
    expected = _hand_cpo(pc, pr, nw, nl, variant, 0.3, 0.1 if variant in ("sigmoid", "simpo") else 0.0, 0.4, 0.7)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, (pc, pr)), torch.autograd.grad(expected, (pc, pr))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert metrics["nll_loss"].item() == pytest.approx((-pc.sum() / nw.sum()).item(), rel=1e-12)


def test_cpo_alpha_zero_drops_the_nll():
    pc, pr, nw, nl = _pairs(seed=2)
    loss, metrics = L.cpo_loss(pc, pr, nw, nl, cpo_alpha=0.0)
    expected = -torch.nn.functional.logsigmoid(0.1 * (pc - pr)).mean()
    torch.testing.assert_close(loss, expected)
    assert metrics["nll_loss"].item() == 0.0


# ---------------------------------------------------------------- TRL 1.16's own methods

orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")


def _trl_self(**fields):
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **fields)


def test_orpo_matches_trl_odds_ratio_loss():
    pc, pr, nw, nl = _pairs(seed=3)
    nll = -pc.sum() / nw.sum()
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = orpo_trainer.ORPOTrainer.odds_ratio_loss(
        _trl_self(beta=0.2), pc / nw, pr / nl)
    theirs = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    loss, metrics = L.orpo_loss(pc, pr, nw, nl, beta=0.2)
    # TRL casts the averages to fp32: equal to fp32 rounding.
    torch.testing.assert_close(loss.float(), theirs.float(), rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(loss, (pc, pr)), torch.autograd.grad(theirs, (pc, pr))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["log_odds_ratio"].float(), ratio, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(metrics["log_odds_chosen"].float(), log_odds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(metrics["rewards/chosen"].float(), chosen_rewards.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(metrics["rewards/rejected"].float(), rejected_rewards.mean(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", CPO_TYPES)
def test_cpo_matches_trl_cpo_loss(loss_type):
    variant = CPO_TYPES[loss_type]
    pc, pr, nw, nl = _pairs(seed=4)
    averaged = variant in ("ipo", "simpo")
    fields = dict(beta=0.3, label_smoothing=0.1, loss_type=variant, simpo_gamma=0.4, alpha=0.0)
    losses, chosen_rewards, rejected_rewards = cpo_trainer.CPOTrainer.cpo_loss(
        _trl_self(**fields), *((pc / nw, pr / nl) if averaged else (pc, pr)))
    theirs = losses.mean() + 0.7 * (-pc.sum() / nw.sum())  # CPOTrainer.get_batch_loss_metrics
    loss, metrics = L.cpo_loss(pc, pr, nw, nl, variant=variant, beta=0.3, label_smoothing=0.1, simpo_gamma=0.4,
                               cpo_alpha=0.7)
    torch.testing.assert_close(loss, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, (pc, pr)), torch.autograd.grad(theirs, (pc, pr))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean())
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_rewards.mean())


@pytest.mark.parametrize("loss_type", ["orpo", *CPO_TYPES])
def test_preference_loss_matches_trl_on_logits(loss_type):
    """``PreferenceLoss`` on stacked logits against TRL's ``get_batch_logps`` and cross-entropy NLL
    over the same completion labels (CPO's NLL; ORPO's trainer also counts the prompt, which the
    trainer passes as ``chosen_nll``)."""
    g = torch.Generator().manual_seed(5)
    b2, t, v = 4, 7, 13
    ours = torch.randn(b2, t, v, generator=g).requires_grad_(True)
    logits = ours.detach().double().requires_grad_(True)  # TRL's side, in float64
    labels = torch.randint(0, v, (b2, t), generator=g)
    labels[:, :2] = -100
    labels[1, 5:] = -100
    loss, _ = L.PreferenceLoss(loss_type, beta=0.3, shift_labels=True)(ours, labels)
    averaged = loss_type in ("orpo", "cpo_ipo", "cpo_simpo")
    logps = orpo_trainer.ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=averaged)
    # TRL's cross_entropy_loss: position t predicts label t + 1, token mean over the chosen rows.
    nll = torch.nn.functional.cross_entropy(logits[:2, :-1].reshape(-1, v), labels[:2, 1:].reshape(-1))
    if loss_type == "orpo":
        losses = orpo_trainer.ORPOTrainer.odds_ratio_loss(_trl_self(beta=0.3), logps[:2], logps[2:])[0]
        theirs = nll - losses.mean()
    else:
        fields = dict(beta=0.3, label_smoothing=0.0, loss_type=CPO_TYPES[loss_type], simpo_gamma=0.5, alpha=0.0)
        theirs = cpo_trainer.CPOTrainer.cpo_loss(_trl_self(**fields), logps[:2], logps[2:])[0].mean() + nll
    torch.testing.assert_close(loss.double(), theirs.double(), rtol=1e-5, atol=1e-6)
    mine, = torch.autograd.grad(loss, ours)
    expected, = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(mine.double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad input

def test_bad_input_raises_naming_the_argument():
    pc, pr, nw, nl = _pairs()
    with pytest.raises(ValueError, match="pair"):
        L.orpo_loss(pc[:0], pr[:0], nw[:0], nl[:0])
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        L.cpo_loss(pc, pr[:3], nw, nl)
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.orpo_loss(pc, pr, torch.zeros_like(nw), nl)
    with pytest.raises(ValueError, match="variant"):
        L.cpo_loss(pc, pr, nw, nl, variant="kto")
    with pytest.raises(TypeError, match="chosen_nll"):
        L.orpo_loss(pc, pr, nw, nl, chosen_nll=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="cpo_alpha"):
        L.cpo_loss(pc, pr, nw, nl, cpo_alpha=-1.0)
    with pytest.raises(ValueError, match="loss_type 'orpo_v2' is unknown"):
        L.PreferenceLoss("orpo_v2")


# ---------------------------------------------------------------- a toy loss, registered

def test_an_unpaired_entry_is_refused_by_the_pairwise_module():
    register(LossEntry("toy_unpaired", toy_margin_loss, POLICY_INPUTS, paired=False, needs_reference=False))
    try:
        with pytest.raises(ValueError, match="loss_type 'toy_unpaired' is unpaired"):
            L.PreferenceLoss("toy_unpaired")
    finally:
        del LOSSES["toy_unpaired"]


def test_registry_refuses_a_taken_name_and_a_bad_level():
    with pytest.raises(ValueError, match="'orpo' is registered already"):
        register(LossEntry("orpo", toy_margin_loss, POLICY_INPUTS))
    with pytest.raises(ValueError, match="level"):
        LossEntry("toy", toy_margin_loss, POLICY_INPUTS, level="document")
    assert L.PREFERENCE_LOSS_TYPES == tuple(name for name, entry in LOSSES.items() if entry.paired)
    assert {"kto", "apo_zero_unpaired"} <= set(LOSSES) - set(L.PREFERENCE_LOSS_TYPES)
    with pytest.raises(ValueError, match="unpaired"):
        L.PreferenceLoss("kto")
    assert set(L.DPO_LOSS_TYPES) == {name for name, entry in LOSSES.items() if entry.trl_dpo}


@pytest.fixture
def toy_registered():
    register(LossEntry("toy_margin", toy_margin_loss, POLICY_INPUTS + LENGTH_INPUTS, needs_reference=False,
                       min_length=1))
    try:
        yield
    finally:
        del LOSSES["toy_margin"]


def test_a_registered_toy_loss_trains_through_preference_loss(toy_registered):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 6, 11, generator=g).requires_grad_(True)
    labels = torch.randint(0, 11, (4, 6), generator=g)
    labels[:, :2] = -100
    module = L.PreferenceLoss("toy_margin", beta=2.0, margin=3.0)
    with pytest.raises(TypeError, match="takes no argument 'gamma'"):
        L.PreferenceLoss("toy_margin", gamma=1.0)

    loss, metrics = module(logits, labels)
    # float64 by hand: log_softmax, gather, mean over the four completion tokens.
    x = logits.detach().double().requires_grad_(True)
    logp = torch.log_softmax(x, -1)[:, 2:].gather(-1, labels[:, 2:, None])[..., 0].mean(1)
    expected = (torch.relu(3.0 - 2.0 * (logp[:2] - logp[2:])) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    assert "toy/gap" in metrics and "logps/chosen" in metrics

    optimizer = torch.optim.SGD([logits], lr=1.0)
    first = loss.item()
    for _ in range(5):
        optimizer.zero_grad()
        step_loss, _ = module(logits, labels)
        step_loss.backward()
        optimizer.step()
    assert module(logits, labels)[0].item() < 0.5 * first
