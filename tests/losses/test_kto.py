"""``pk.losses.kto_loss`` against the KTO paper's formula written out here in float64 (values and
hand-derived gradients), against TRL 1.16's own ``KTOTrainer._compute_loss`` on the same inputs,
and its bad-input table.

TRL is not replicated: ``KTOTrainer._compute_loss`` runs unbound on a stand-in trainer (plain
attributes for the fields it reads, an identity accelerator) and a stand-in model whose forward
returns the given per-token log-probs (those of the completions, or of the mismatched KL pairs,
by which ``input_ids`` it is called with); reference log-probs go in as precomputed.
"""

import math
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from prefopt_kernels import losses as L

from losses_cases import leaf

BETA, LAMBDA_D, LAMBDA_U = 0.7, 1.3, 0.8


def _sigma(x):
    return 1.0 / (1.0 + math.exp(-x))


def _paper(loss_type, pc, pr, rc, rr, kl_pairs, beta=BETA, ld=LAMBDA_D, lu=LAMBDA_U):
    """Per-completion losses and d loss_i / d policy_logp_i, element by element in float64.

    KTO (Eq. 7 with v of Eq. 6): ``λ_y - v``, ``v = λ_D σ(β(r - z0))`` (desirable) or
    ``λ_U σ(β(z0 - r))`` (undesirable), ``r`` the policy/reference log-ratio, ``z0`` the batch's
    mismatched-pair log-ratio mean clamped at 0 (a constant). APO-zero unpaired:
    ``λ_D (1 - σ(β r))`` and ``λ_U σ(β r)``. ``σ' = σ (1 - σ)``.
    """
    z0 = max(0.0, sum(p - q for p, q in kl_pairs) / len(kl_pairs)) if loss_type == "kto" else 0.0
    losses, grads = [], []
    for p, q in zip(pc, rc):
        s = _sigma(beta * (p - q - z0))
        losses.append(ld * (1 - s))
        grads.append(-ld * beta * s * (1 - s))
    for p, q in zip(pr, rr):
        if loss_type == "kto":
            s = _sigma(beta * (z0 - (p - q)))
            losses.append(lu * (1 - s))
            grads.append(lu * beta * s * (1 - s))
        else:
            s = _sigma(beta * (p - q))
            losses.append(lu * s)
            grads.append(lu * beta * s * (1 - s))
    return losses, grads, z0


def _inputs(n_chosen, n_rejected, kl_shift, seed=0):
    """Float64 summed log-probs (leaves) and KL pairs whose mean log-ratio is about ``kl_shift``."""
    pc, pr = leaf(n_chosen, scale=3.0, seed=seed), leaf(n_rejected, scale=3.0, seed=seed + 1)
    rc, rr = leaf(n_chosen, scale=3.0, seed=seed + 2), leaf(n_rejected, scale=3.0, seed=seed + 3)
    pk = leaf(n_chosen + n_rejected, scale=0.5, seed=seed + 4)
    rk = (leaf(n_chosen + n_rejected, scale=0.5, seed=seed + 5).detach() - kl_shift).requires_grad_(True)
    return pc, pr, rc, rr, pk, rk


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_shift", [1.5, -1.5])  # z0 > 0, and a negative mean clamped to 0
@pytest.mark.parametrize("counts", [(3, 4), (5, 0), (0, 2)])
def test_kto_matches_paper_formula(loss_type, kl_shift, counts):
    pc, pr, rc, rr, pk, rk = _inputs(*counts, kl_shift)
    kl_args = (pk, rk) if loss_type == "kto" else ()
    losses, metrics = L.kto_loss(pc, pr, rc, rr, *kl_args, beta=BETA, desirable_weight=LAMBDA_D,
                                 undesirable_weight=LAMBDA_U, loss_type=loss_type, reduction="none")
    values = [v.tolist() for v in (pc, pr, rc, rr)]
    want, want_grad, z0 = _paper(loss_type, *values, list(zip(pk.tolist(), rk.tolist())))
    assert losses.dtype == torch.float64 and losses.shape == (sum(counts),)
    assert losses.tolist() == pytest.approx(want, rel=1e-13, abs=1e-15)
    if loss_type == "kto":
        assert (z0 > 0) == (kl_shift > 0)
    assert metrics["kl"].item() == pytest.approx(z0, rel=1e-13, abs=0.0)

    mean, _ = L.kto_loss(pc, pr, rc, rr, *kl_args, beta=BETA, desirable_weight=LAMBDA_D,
                         undesirable_weight=LAMBDA_U, loss_type=loss_type)
    assert mean.item() == pytest.approx(sum(want) / len(want), rel=1e-13)
    grads = torch.autograd.grad(mean, [pc, pr, rc, rr] + list(kl_args), allow_unused=True)
    n = len(want)
    got = torch.cat([grads[0], grads[1]]).tolist()
    assert got == pytest.approx([g / n for g in want_grad], rel=1e-12, abs=1e-16)
    # The reference's gradient is the policy's negated; the KL estimate is a constant.
    assert torch.cat([grads[2], grads[3]]).tolist() == pytest.approx([-g / n for g in want_grad], rel=1e-12,
                                                                     abs=1e-16)
    assert all(g is None for g in grads[4:])

    total, _ = L.kto_loss(pc, pr, rc, rr, *kl_args, beta=BETA, desirable_weight=LAMBDA_D,
                          undesirable_weight=LAMBDA_U, loss_type=loss_type, reduction="sum")
    assert total.item() == pytest.approx(sum(want), rel=1e-13)


def test_kto_metrics_are_trl_named_side_means():
    pc, pr, rc, rr, pk, rk = _inputs(3, 2, 0.5)
    _, m = L.kto_loss(pc, pr, rc, rr, pk, rk, beta=BETA)
    chosen = [BETA * (p - q) for p, q in zip(pc.tolist(), rc.tolist())]
    rejected = [BETA * (p - q) for p, q in zip(pr.tolist(), rr.tolist())]
    assert m["rewards/chosen"].item() == pytest.approx(sum(chosen) / 3, rel=1e-13)
    assert m["rewards/rejected"].item() == pytest.approx(sum(rejected) / 2, rel=1e-13)
    assert m["rewards/margins"].item() == pytest.approx(sum(chosen) / 3 - sum(rejected) / 2, rel=1e-13)
    assert m["logps/chosen"].item() == pytest.approx(sum(pc.tolist()) / 3, rel=1e-13)
    assert m["logps/rejected"].item() == pytest.approx(sum(pr.tolist()) / 2, rel=1e-13)
    assert not any(v.requires_grad for v in m.values())
    _, only_chosen = L.kto_loss(pc, pr[:0], rc, rr[:0], pk, rk, beta=BETA)
    assert set(only_chosen) == {"kl", "rewards/chosen", "logps/chosen"}


def test_kto_kl_is_gathered_before_the_clamp():
    """Two processes: this one's KL pairs average +0.5, the other's -2.0; z0 = max(0, -0.75) = 0."""
    pc, pr, rc, rr = (leaf(2, seed=s) for s in range(4))
    pk, rk = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 0.0], dtype=torch.float64)
    seen = []

    def gather(local):
        seen.append(local.item())
        return torch.stack([local, torch.tensor(-2.0, dtype=local.dtype)])

    _, local_only = L.kto_loss(pc, pr, rc, rr, pk, rk)
    _, gathered = L.kto_loss(pc, pr, rc, rr, pk, rk, kl_gather=gather)
    assert local_only["kl"].item() == 0.5 and seen == [0.5] and gathered["kl"].item() == 0.0


def test_kto_low_precision_inputs_compute_in_fp32():
    values = [torch.tensor([-3.0, -5.5], dtype=torch.bfloat16) for _ in range(6)]
    loss, metrics = L.kto_loss(*values)
    assert loss.dtype == torch.float32 and metrics["kl"].dtype == torch.float32


# --------------------------------------------------------------------------- against TRL's KTOTrainer

LABELS = [True, False, False, True, False, True]
N, T = len(LABELS), 7


class _Model:
    """Stands in for a model under TRL's fused LM head: per-token log-probs by the ids it is called with."""

    training = True

    def __init__(self, by_ids):
        self.by_ids = by_ids

    def __call__(self, **kwargs):
        assert kwargs["fused_lm_head"]
        lp = next(value for ids, value in self.by_ids if kwargs["input_ids"] is ids)
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               aux_loss=None)


def _trl_kto(log_probs, kl_log_probs, ref_logps, ref_kl_logps, labels, *, loss_type, beta, desirable_weight,
             undesirable_weight):
    """TRL 1.16's ``KTOTrainer._compute_loss`` on per-token log-probs ``[N, T-1]``; ``(loss, logged metrics)``."""
    kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=log_probs.device, gather_for_metrics=lambda x: x),
        calculate_KL=loss_type == "kto", precompute_ref_logps=True, aux_loss_enabled=False, loss_type=loss_type,
        beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    trainer._compute_kl_logps = types.MethodType(kto_trainer.KTOTrainer._compute_kl_logps, trainer)
    n = len(labels)
    ids, kl_ids = torch.zeros(n, T, dtype=torch.long), torch.ones(n, T, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(n, T, dtype=torch.long),
              "completion_mask": torch.ones(n, T, dtype=torch.long), "label": torch.tensor(labels),
              "ref_logps": ref_logps}
    if loss_type == "kto":
        inputs.update(KL_input_ids=kl_ids, KL_attention_mask=torch.ones(n, T, dtype=torch.long),
                      KL_completion_mask=torch.ones(n, T, dtype=torch.long), ref_KL_logps=ref_kl_logps)
    model = _Model([(ids, log_probs), (kl_ids, kl_log_probs)])
    loss = kto_trainer.KTOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_shift", [0.8, -0.8])
@pytest.mark.parametrize("labels", [LABELS, [True] * 3, [False] * 2])
def test_kto_matches_trl(loss_type, kl_shift, labels):
    n = len(labels)
    g = torch.Generator().manual_seed(7)
    log_probs = (-2.0 * torch.rand(n, T - 1, generator=g)).requires_grad_(True)
    kl_log_probs = -2.0 * torch.rand(n, T - 1, generator=g)
    ref_logps = (log_probs.detach().sum(1) + torch.randn(n, generator=g)).requires_grad_(True)
    ref_kl_logps = kl_log_probs.sum(1) + kl_shift * (T - 1) + 0.3 * torch.randn(n, generator=g)
    options = dict(loss_type=loss_type, beta=0.4, desirable_weight=1.2, undesirable_weight=0.9)
    theirs, logged = _trl_kto(log_probs, kl_log_probs, ref_logps, ref_kl_logps, labels, **options)
    their_grads = torch.autograd.grad(theirs, [log_probs, ref_logps])

    chosen = torch.tensor(labels)
    seq = log_probs.sum(1)
    kl_args = (kl_log_probs.sum(1), ref_kl_logps) if loss_type == "kto" else ()
    ours, metrics = L.kto_loss(seq[chosen], seq[~chosen], ref_logps[chosen], ref_logps[~chosen], *kl_args, **options)
    our_grads = torch.autograd.grad(ours, [log_probs, ref_logps])

    # The same fp32 operations on the same values: a few ulps at most.
    torch.testing.assert_close(ours, theirs, rtol=4e-7, atol=0.0)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=4e-7, atol=1e-9)
    if loss_type == "kto" and kl_shift < 0:
        assert logged["kl"] > 0.5  # the KL estimate enters the loss
    for key, value in logged.items():
        if key in metrics:
            assert metrics[key].item() == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert {key for key in logged if key.startswith(("rewards/", "logps/"))} | {"kl"} == set(metrics)


# --------------------------------------------------------------------------- bad input


def _good():
    pc, pr, rc, rr, pk, rk = _inputs(2, 3, 0.5)
    return dict(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                ref_rejected_logps=rr, policy_kl_logps=pk, ref_kl_logps=rk)


def _empty():
    return torch.zeros(0, dtype=torch.float64)


BAD = [
    ({"policy_chosen_logps": _empty(), "ref_chosen_logps": _empty(),
      "policy_rejected_logps": _empty(), "ref_rejected_logps": _empty()}, ValueError, "both empty"),
    ({"beta": math.nan}, ValueError, "beta must be finite"),
    ({"beta": math.inf}, ValueError, "beta must be finite"),
    ({"beta": 0.0}, ValueError, "beta must be > 0"),
    ({"beta": True}, TypeError, "beta must be a real number"),
    ({"desirable_weight": -1.0}, ValueError, "desirable_weight must be >= 0"),
    ({"undesirable_weight": math.nan}, ValueError, "undesirable_weight must be finite"),
    ({"loss_type": "bco"}, ValueError, "loss_type must be one of"),
    ({"reduction": "max"}, ValueError, "reduction must be one of"),
    ({"ref_chosen_logps": torch.zeros(3, dtype=torch.float64)}, ValueError, "ref_chosen_logps has shape"),
    ({"ref_rejected_logps": torch.zeros(2, dtype=torch.float64)}, ValueError,
     "ref_rejected_logps has shape"),
    ({"policy_chosen_logps": torch.zeros(2, 1, dtype=torch.float64)}, ValueError,
     "policy_chosen_logps must have 1 dimension"),
    ({"policy_rejected_logps": torch.zeros(3, dtype=torch.long)}, TypeError,
     "policy_rejected_logps must be a floating-point tensor"),
    ({"policy_kl_logps": None}, ValueError, "policy_kl_logps is required"),
    ({"ref_kl_logps": torch.zeros(4, dtype=torch.float64)}, ValueError, "ref_kl_logps has shape"),
    ({"policy_kl_logps": _empty(), "ref_kl_logps": _empty()}, ValueError,
     "policy_kl_logps must hold at least one"),
    ({"kl_gather": 3}, TypeError, "kl_gather must be a callable"),
    ({"loss_type": "apo_zero_unpaired"}, ValueError, "policy_kl_logps must be None"),
    ({"loss_type": "apo_zero_unpaired", "policy_kl_logps": None, "ref_kl_logps": None,
      "kl_gather": lambda x: x}, ValueError, "kl_gather must be None"),
]


@pytest.mark.parametrize("change, error, message", BAD, ids=[row[2] for row in BAD])
def test_kto_bad_input(change, error, message):
    with pytest.raises(error, match=message):
        L.kto_loss(**{**_good(), **change})


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("loss_type", L.KTO_LOSS_TYPES)
def test_registry_entry_is_kto_loss(loss_type):
    """Each KTO type is one unpaired registry entry: called on the named inputs it picks exactly
    the ones its type reads (the KL pairs for ``kto`` only) and gives ``kto_loss``'s result; the
    pairwise module refuses it."""
    entry = L.LOSSES[loss_type]
    assert not entry.paired and entry.needs_reference and entry.level == "sequence"
    inputs = _good()
    expected_inputs = dict(inputs)
    if loss_type != "kto":
        expected_inputs.update(policy_kl_logps=None, ref_kl_logps=None)
    loss, metrics = entry(inputs, beta=BETA, desirable_weight=LAMBDA_D, undesirable_weight=LAMBDA_U)
    want, want_metrics = L.kto_loss(**expected_inputs, beta=BETA, desirable_weight=LAMBDA_D,
                                    undesirable_weight=LAMBDA_U, loss_type=loss_type)
    assert torch.equal(loss, want)
    assert metrics.keys() == want_metrics.keys()
    with pytest.raises(ValueError, match=f"loss_type '{loss_type}' is unpaired"):
        L.PreferenceLoss(loss_type)
