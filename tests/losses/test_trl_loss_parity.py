"""``pk.losses.dpo_loss`` and ``PreferenceLoss`` against TRL 1.16's own DPO loss code.

TRL is not replicated here: ``DPOTrainer._compute_loss`` itself runs, unbound, on a stand-in
trainer (plain attributes for the config fields it reads, an identity accelerator) and a
stand-in model whose forward returns the given per-token label log-probabilities, the
``outputs.log_probs`` TRL's fused LM head hands that method. Reference log-probs go in as
precomputed (``precompute_ref_log_probs``), so no reference model runs. Both sides see the
same per-token tensor: values, gradients and TRL's logged reward metrics must agree.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from prefopt_kernels import losses as L

dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")

from dpo_rounding import FORMING_OPS, gamma  # noqa: E402

B, T = 4, 9
BETA = 0.3


class _Model:
    """Stands in for the policy under TRL's fused LM head: returns the given token log-probs."""

    training = True

    def __init__(self, log_probs):
        self.log_probs = log_probs

    def __call__(self, **kwargs):
        assert kwargs["fused_lm_head"] and kwargs["labels"].shape == (2 * B, T)
        lp = self.log_probs
        return SimpleNamespace(
            log_probs=lp,
            entropy=torch.zeros_like(lp),
            mean_logits=torch.zeros_like(lp),
            log_sum_sq_probs=torch.zeros_like(lp),
            is_top1=torch.zeros(lp.shape, dtype=torch.bool),
            aux_loss=None,
        )


def trl_loss(log_probs, completion_mask, ref_chosen, ref_rejected, *, loss_type, loss_weights=None,
             label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
             discopop_tau=0.05):
    """TRL 1.16's ``DPOTrainer._compute_loss`` on ``log_probs`` ``[2B, T-1]`` (chosen rows first).

    Returns ``(loss, logged metrics)``; the fields below are the ones that method reads.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=log_probs.device, gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        beta=BETA,
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * B, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(trainer, _Model(log_probs), inputs, False)
    return loss, trainer._metrics["train"]


def _batch(seed, empty_rows=False, scale=1.0):
    """Per-token policy log-probs (a leaf), completion mask, reference sums, and our inputs.

    Row 0 of the mask is prompt; completions start after a prompt of 1-3 tokens. With
    ``empty_rows`` one chosen and one rejected completion hold no token (truncated away).
    """
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for row in range(2 * B):
        start = int(torch.randint(1, 4, (), generator=g))
        length = int(torch.randint(1, T - start + 1, (), generator=g))
        mask[row, start:start + length] = 1
    if empty_rows:
        mask[1] = 0
        mask[B + 2] = 0
    shift = mask[:, 1:].bool()
    leaf = (-3.0 * torch.rand(2 * B, T - 1, generator=g) * scale).requires_grad_(True)
    ref_tok = -3.0 * torch.rand(2 * B, T - 1, generator=g) * scale
    # The fused head gives 0 at positions without a label; TRL sums every position.
    log_probs = torch.where(shift, leaf, 0.0)
    ref = torch.where(shift, ref_tok, 0.0).sum(1)
    return leaf, log_probs, mask, ref[:B], ref[B:]


def _ours(log_probs, mask, ref_c, ref_r, **kwargs):
    seq = log_probs.sum(1)
    lengths = mask[:, 1:].sum(1)
    return L.dpo_loss(seq[:B], seq[B:], ref_c, ref_r, beta=BETA, chosen_lengths=lengths[:B],
                      rejected_lengths=lengths[B:], **kwargs)


# Both sides get the same per-token log-probs, so they differ only by how each forms a value from
# them in fp32: by (*) of dpo_rounding with e_t = 0, at most 2 γ_K (|X| + Σ_t |∂X/∂x_t| (|x_t| + 1)
# + Σ_i |∂X/∂R_i| (|R_i| + n_i)) for a value X of the token log-probs x_t and reference sums R_i
# (n_i tokens): K roundings (a row's sum, a mean over the batch, the operations after), each
# relative to an intermediate of that magnitude. A reward, a difference of sums of magnitude ~10,
# gets a tolerance proportional to those magnitudes, not to the difference.
FORMING = 2 * gamma(T + 2 * B + FORMING_OPS)


def _compare(seed, trl_kwargs, our_kwargs, empty_rows=False, scale=1.0):
    leaf, log_probs, mask, ref_c, ref_r = _batch(seed, empty_rows, scale)
    refs = torch.cat([ref_c, ref_r]).requires_grad_()
    theirs, logged = trl_loss(log_probs, mask, refs[:B], refs[B:], **trl_kwargs)
    their_grad, ref_grad = torch.autograd.grad(theirs, [leaf, refs], allow_unused=True)
    ref_grad = torch.zeros_like(refs) if ref_grad is None else ref_grad  # sft reads no reference
    leaf, log_probs, mask, ref_c, ref_r = _batch(seed, empty_rows, scale)
    ours, metrics = _ours(log_probs, mask, ref_c, ref_r, **our_kwargs)
    (our_grad,) = torch.autograd.grad(ours, leaf)
    assert torch.isfinite(theirs)
    # Per row: Σ_t (|x_t| + 1), and that plus |R_i| + n_i.
    lengths = mask[:, 1:].sum(1)
    logps_sizes = torch.where(mask[:, 1:].bool(), log_probs.detach().abs() + 1, 0.0).sum(1).double()
    sizes = logps_sizes + refs.detach().abs() + lengths
    loss_size = abs(theirs.item()) + (their_grad.abs() * (log_probs.detach().abs() + 1)).sum() \
        + (ref_grad.abs() * (refs.detach().abs() + lengths)).sum()
    assert abs(ours.item() - theirs.item()) <= FORMING * float(loss_size), (ours.item(), theirs.item())
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-6)
    metric_sizes = {  # Σ over rows of |∂X/∂(row sum)| times the row's size: chosen rows [0, B), rejected [B, 2B)
        "logps/chosen": logps_sizes[:B].sum() / B, "logps/rejected": logps_sizes[B:].sum() / B,
        "rewards/chosen": BETA * sizes[:B].sum() / B, "rewards/rejected": BETA * sizes[B:].sum() / B,
        "rewards/margins": BETA * sizes.sum() / B,
    }
    for key, size in metric_sizes.items():
        value = logged[key][0]
        assert abs(metrics[key].item() - value) <= FORMING * (abs(value) + float(size)), (key, metrics[key], value)
    assert metrics["rewards/accuracies"].item() == logged["rewards/accuracies"][0]  # the same comparisons
    return ours


@pytest.mark.parametrize("empty_rows", [False, True], ids=["full", "empty-rows"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("loss_type", L.DPO_LOSS_TYPES)
def test_every_loss_type_matches_trl(loss_type, label_smoothing, empty_rows):
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        pytest.skip("exo_pair needs label_smoothing > 0 (TRL's DPOTrainer rejects 0)")
    kwargs = dict(loss_type=loss_type, label_smoothing=label_smoothing, discopop_tau=0.2)
    _compare(7, kwargs, kwargs, empty_rows=empty_rows)


@pytest.mark.parametrize("empty_rows", [False, True], ids=["full", "empty-rows"])
@pytest.mark.parametrize(
    "loss_type,loss_weights",
    [
        (["sigmoid", "bco_pair"], [0.8, 0.2]),
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO, TRL's documented example
        (["ipo", "robust"], None),
    ],
)
def test_weighted_mix_matches_trl(loss_type, loss_weights, empty_rows):
    kwargs = dict(loss_type=loss_type, loss_weights=loss_weights, label_smoothing=0.15)
    _compare(11, kwargs, kwargs, empty_rows=empty_rows)


F_DIV_LOSS_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]


@pytest.mark.parametrize(
    "div,alpha",
    [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
     ("alpha_divergence", 1.0), ("alpha_divergence", 1.7)],
)
@pytest.mark.parametrize("loss_type", F_DIV_LOSS_TYPES)
def test_f_divergences_match_trl_under_trl_names(loss_type, div, alpha):
    kwargs = dict(loss_type=loss_type, label_smoothing=0.1, f_divergence_type=div, f_alpha_divergence_coef=alpha)
    _compare(3, kwargs, kwargs)


@pytest.mark.parametrize("loss_type", ["sigmoid", ["hinge", "sft"]])
def test_our_f_divergence_names_equal_trls(loss_type):
    trl_kwargs = dict(loss_type=loss_type, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    ours = dict(loss_type=loss_type, f_divergence="alpha_divergence", f_alpha=0.3)
    _compare(4, trl_kwargs, ours)


def test_alpha_divergence_exponent_cap_matches_trl():
    # (α-1)·rho reaches ~100 > 80 with α = 3 and log-ratios of ~50: both cap the exponent at 80.
    kwargs = dict(loss_type="hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=3.0)
    leaf, log_probs, mask, ref_c, ref_r = _batch(5, scale=30.0)
    assert (2.0 * (log_probs.sum(1)[:B] - ref_c)).max() > 80 or (2.0 * (log_probs.sum(1)[B:] - ref_r)).max() > 80
    _compare(5, kwargs, kwargs, scale=30.0)


def test_sft_is_the_token_mean_nll_of_the_chosen_rows():
    # TRL: -chosen_per_token_logps[chosen_mask].mean(); here from sums and counts.
    leaf, log_probs, mask, ref_c, ref_r = _batch(2, empty_rows=True)
    chosen = log_probs[:B][mask[:B, 1:].bool()]
    loss, _ = _ours(log_probs, mask, ref_c, ref_r, loss_type="sft")
    torch.testing.assert_close(loss, -chosen.mean())
    none, _ = _ours(log_probs, mask, ref_c, ref_r, loss_type="sft", reduction="none")
    torch.testing.assert_close(none, (-chosen.mean()).expand(B))


def test_sft_without_any_chosen_token_is_zero_not_nan():
    # Every chosen completion truncated away: TRL's token mean is over nothing (NaN); ours is 0.
    leaf, log_probs, mask, ref_c, ref_r = _batch(2)
    mask[:B] = 0
    log_probs = torch.where(mask[:, 1:].bool(), leaf, 0.0)
    theirs, _ = trl_loss(log_probs, mask, ref_c, ref_r, loss_type="sft")
    assert torch.isnan(theirs)
    ours, _ = _ours(log_probs, mask, ref_c, ref_r, loss_type="sft")
    assert ours.item() == 0.0
    (grad,) = torch.autograd.grad(ours, leaf)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("shift_labels", [False, True])
def test_preference_loss_module_with_a_list_matches_trl(shift_labels):
    """Stacked logits through ``PreferenceLoss(["sigmoid", "bco_pair", "sft"])`` against TRL fed
    the same label log-probs (log_softmax + gather, 0 at ignored labels); one chosen and one
    rejected row hold no completion token."""
    g = torch.Generator().manual_seed(9)
    vocab = 13
    _, _, mask, _, _ = _batch(9, empty_rows=True)
    input_ids = torch.randint(0, vocab, (2 * B, T), generator=g)
    logits = torch.randn(2 * B, T, vocab, generator=g, requires_grad=True)
    ref_logits = torch.randn(2 * B, T, vocab, generator=g)
    labels = input_ids.masked_fill(mask == 0, -100)
    shifted = labels[:, 1:]
    safe = shifted.clamp(min=0)[..., None]

    def label_logps(x):
        return torch.where(shifted != -100, x[:, :-1].log_softmax(-1).gather(-1, safe)[..., 0], 0.0)

    ref_seq = label_logps(ref_logits).sum(1)
    kwargs = dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    theirs, logged = trl_loss(label_logps(logits), mask, ref_seq[:B], ref_seq[B:], **kwargs)
    (their_grad,) = torch.autograd.grad(theirs, logits)

    module = L.PreferenceLoss(kwargs["loss_type"], beta=BETA, loss_weights=kwargs["loss_weights"],
                              shift_labels=shift_labels)
    if shift_labels:
        ours, metrics = module(logits, labels, ref_logits)
    else:
        ours, metrics = module(logits[:, :-1], shifted, ref_logits[:, :-1])
    (our_grad,) = torch.autograd.grad(ours, logits)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(logged["rewards/margins"][0], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_preference_loss_module_clamps_empty_rows_like_trl(loss_type):
    g = torch.Generator().manual_seed(1)
    vocab = 7
    _, _, mask, _, _ = _batch(1, empty_rows=True)
    labels = torch.randint(0, vocab, (2 * B, T), generator=g).masked_fill(mask == 0, -100)
    logits = torch.randn(2 * B, T, vocab, generator=g, requires_grad=True)
    ref_logits = torch.randn(2 * B, T, vocab, generator=g)
    shifted = labels[:, 1:]
    safe = shifted.clamp(min=0)[..., None]

    def label_logps(x):
        return torch.where(shifted != -100, x[:, :-1].log_softmax(-1).gather(-1, safe)[..., 0], 0.0)

    ref_seq = label_logps(ref_logits).sum(1)
    theirs, _ = trl_loss(label_logps(logits), mask, ref_seq[:B], ref_seq[B:], loss_type=loss_type)
    ours, _ = L.PreferenceLoss(loss_type, beta=BETA, shift_labels=True)(logits, labels, ref_logits)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- paper variants


def test_sigmoid_label_smoothing_is_opt_in_and_differs_from_trl():
    leaf, log_probs, mask, ref_c, ref_r = _batch(6)
    theirs, _ = trl_loss(log_probs, mask, ref_c, ref_r, loss_type="sigmoid", label_smoothing=0.2)
    plain, _ = _ours(log_probs, mask, ref_c, ref_r, loss_type="sigmoid", label_smoothing=0.2)
    cdpo, _ = _ours(log_probs, mask, ref_c, ref_r, loss_type="sigmoid", label_smoothing=0.2,
                    sigmoid_label_smoothing=True)
    torch.testing.assert_close(plain, theirs)
    assert abs(cdpo.item() - theirs.item()) > 1e-3
    seq = log_probs.sum(1)
    z = BETA * ((seq[:B] - ref_c) - (seq[B:] - ref_r))
    expected = (-0.8 * torch.nn.functional.logsigmoid(z) - 0.2 * torch.nn.functional.logsigmoid(-z)).mean()
    torch.testing.assert_close(cdpo, expected)
    # At ε = 0 the option changes nothing.
    same, _ = _ours(log_probs, mask, ref_c, ref_r, loss_type="sigmoid", sigmoid_label_smoothing=True)
    torch.testing.assert_close(same, _ours(log_probs, mask, ref_c, ref_r)[0])


@pytest.mark.parametrize("bco_delta", ["batch_mean", "running_mean"])
def test_bco_delta_is_opt_in_and_differs_from_trl(bco_delta):
    leaf, log_probs, mask, ref_c, ref_r = _batch(8)
    theirs, _ = trl_loss(log_probs, mask, ref_c, ref_r, loss_type="bco_pair")
    default, metrics = _ours(log_probs, mask, ref_c, ref_r, loss_type="bco_pair")
    torch.testing.assert_close(default, theirs)
    assert "bco/delta" not in metrics
    state = L.RunningMean(mean=1.0, count=1) if bco_delta == "running_mean" else None
    paper, metrics = _ours(log_probs, mask, ref_c, ref_r, loss_type="bco_pair", bco_delta=bco_delta,
                           bco_state=state)
    seq = log_probs.sum(1).detach()
    cw, cl = BETA * (seq[:B] - ref_c), BETA * (seq[B:] - ref_r)
    batch_mean = torch.cat([cw, cl]).mean().item()
    delta = batch_mean if state is None else (1.0 + batch_mean) / 2
    assert metrics["bco/delta"].item() == pytest.approx(delta, rel=1e-6)
    assert abs(paper.item() - theirs.item()) > 1e-4
