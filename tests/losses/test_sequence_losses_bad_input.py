"""Bad input to the per-sequence losses (``dpo_loss``, ``simpo_loss``, ``inpo_loss``,
``fdpg_loss`` and ``FDPGState``) fails loudly, naming the argument.

``CASES`` is their table of bad input: name -> (call, exception type, message fragment);
the fragment is a regular expression searched in the message, or a tuple of them that must all
be found (``losses_cases.check_bad_input``). The token-level losses' table is in
test_token_losses_bad_input.py, ``PreferenceLoss``'s in test_preference_loss_bad_input.py, the
logits ops' in tests/ops/test_ops_bad_input.py.
"""

import numpy as np
import pytest
import torch

from prefopt_kernels import losses as L

from losses_cases import B, INF, LEN_L, LEN_W, NAN, add_row, check_bad_input, dpo_logps, empty64, given, leaf, t64

PAIR = [t64([-1.0]), t64([-2.0]), t64([-1.5]), t64([-1.5])]  # one pair: rho_w = 0.5, rho_l = -0.5
TWO = [t64([-1.0, -2.0]) for _ in range(4)]  # two pairs


CASES = {
    # dpo_loss, simpo_loss, inpo_loss, fdpg_loss: per-sequence arguments.
    "dpo_loss: ref_rejected_logps shape": (given(dpo_logps, lambda pc, pr, rc, rr: L.dpo_loss(pc, pr, rc, rr[:3])),
                                           ValueError, "ref_rejected_logps"),
    "dpo_loss: unknown loss_type": (lambda: L.dpo_loss(*dpo_logps(), loss_type="nope"), ValueError, "loss_type"),
    "dpo_loss: beta 0": (lambda: L.dpo_loss(*dpo_logps(), beta=0.0), ValueError, "beta"),
    "simpo_loss: negative beta": (
        given(dpo_logps, lambda pc, pr, rc, rr: L.simpo_loss(pc, pr, LEN_W, LEN_L, beta=-1.0)), ValueError, "beta"),
    "dpo_loss: negative chosen_lengths": (
        lambda: L.dpo_loss(*dpo_logps(), loss_type="ipo", chosen_lengths=-torch.ones(B), rejected_lengths=LEN_L),
        ValueError, "chosen_lengths"),
    "dpo_loss: sft without chosen_lengths": (lambda: L.dpo_loss(*dpo_logps(), loss_type="sft"), ValueError,
                                             "chosen_lengths"),
    "dpo_loss: sigmoid_norm without chosen_lengths": (lambda: L.dpo_loss(*dpo_logps(), loss_type="sigmoid_norm"),
                                                      ValueError, "chosen_lengths"),
    "simpo_loss: zero rejected_lengths": (
        given(dpo_logps, lambda pc, pr, rc, rr: L.simpo_loss(pc, pr, LEN_W, torch.tensor([1, 2, 0, 1, 1]))), ValueError,
        "rejected_lengths"),
    "dpo_loss: loss_weights of another length": (
        lambda: L.dpo_loss(*dpo_logps(), loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ValueError,
        "loss_weights"),
    "dpo_loss: f_divergence with nca_pair": (
        lambda: L.dpo_loss(*dpo_logps(), loss_type="nca_pair", f_divergence="forward_kl"), ValueError, "f_divergence"),
    "dpo_loss: unknown f_divergence": (lambda: L.dpo_loss(*dpo_logps(), f_divergence="kl"), ValueError, "f_divergence"),
    "dpo_loss: exo_pair without label_smoothing": (lambda: L.dpo_loss(*dpo_logps(), loss_type="exo_pair"), ValueError,
                                                   "label_smoothing"),
    "dpo_loss: unknown reduction": (lambda: L.dpo_loss(*dpo_logps(), reduction="avg"), ValueError, "reduction"),
    "dpo_loss: policy_chosen_logps a list": (given(dpo_logps, lambda pc, pr, rc, rr: L.dpo_loss([0.0] * B, pr, rc, rr)),
                                             TypeError, "policy_chosen_logps"),
    "inpo_loss: eta 0": (lambda: L.inpo_loss(*[leaf(B, seed=s) for s in range(6)], eta=0.0, tau=1.0), ValueError,
                         "eta"),
    "fdpg_loss: divergence hellinger": (
        given(dpo_logps, lambda pc, pr, rc, rr: L.fdpg_loss(pc, pr, divergence="hellinger", state=L.FDPGState())),
        ValueError, "divergence"),
    "fdpg_loss: state None": (given(dpo_logps, lambda pc, pr, rc, rr: L.fdpg_loss(pc, pr, state=None)), TypeError,
                              "state"),
    "dpo_loss: policy_rejected_logps shape": (lambda: L.dpo_loss(TWO[0], TWO[1][:1], TWO[2], TWO[3]), ValueError,
                                              "policy_rejected_logps has shape"),
    "dpo_loss: ref_chosen_logps 2-D": (lambda: L.dpo_loss(TWO[0], TWO[1], TWO[2][None], TWO[3]), ValueError,
                                       "ref_chosen_logps must have 1 dimension"),
    "dpo_loss: integer ref_rejected_logps": (lambda: L.dpo_loss(TWO[0], TWO[1], TWO[2], torch.tensor([1, 2])),
                                             TypeError, "ref_rejected_logps must be a floating-point"),
    "inpo_loss: prev_rejected_logps shape": (lambda: L.inpo_loss(*TWO, TWO[0], TWO[1][:1], eta=0.5, tau=1.0),
                                             ValueError, "prev_rejected_logps"),
    "simpo_loss: policy_rejected_logps on meta": (
        lambda: L.simpo_loss(TWO[0], torch.zeros(2, device="meta"), [1, 1], [1, 1]), ValueError,
        "policy_rejected_logps.*meta"),
    "fdpg_loss: proposal_logps shape": (
        lambda: L.fdpg_loss(TWO[0], TWO[1], proposal_logps=TWO[2][:1], state=L.FDPGState()), ValueError,
        "proposal_logps"),
    "fdpg_loss: integer target_log_scores": (
        lambda: L.fdpg_loss(TWO[0], torch.tensor([1, 2]), state=L.FDPGState()), TypeError, "target_log_scores"),
    "dpo_loss: loss_type None": (lambda: L.dpo_loss(*TWO, loss_type=None), TypeError, "loss_type"),
    "dpo_loss: loss_type 3 in a list": (lambda: L.dpo_loss(*TWO, loss_type=["sigmoid", 3]), ValueError,
                                        "loss_type 3"),
    "dpo_loss: loss_weights a float": (lambda: L.dpo_loss(*TWO, loss_weights=0.5), TypeError, "loss_weights"),
    "dpo_loss: bco_state a dict": (lambda: L.dpo_loss(*TWO, loss_type="bco_pair", bco_state={"mean": 0.0}),
                                   TypeError, "bco_state"),
    "fdpg_loss: divergence a list": (lambda: L.fdpg_loss(TWO[0], TWO[1], divergence=["js"], state=L.FDPGState()),
                                     ValueError, "divergence"),

    # Empty batches.
    "dpo_loss: empty batch": (lambda: L.dpo_loss(*[empty64(0)] * 4), ValueError,
                              "policy_chosen_logps.*(at least one|S \\+ 1 >= 2)"),
    "dpo_loss: empty batch, reduction none": (lambda: L.dpo_loss(*[empty64(0)] * 4, reduction="none"), ValueError,
                                              "policy_chosen_logps.*(at least one|S \\+ 1 >= 2)"),
    "inpo_loss: empty batch": (lambda: L.inpo_loss(*[empty64(0)] * 6, eta=0.5, tau=1.0), ValueError,
                               "policy_chosen_logps.*(at least one|S \\+ 1 >= 2)"),
    "simpo_loss: empty batch": (lambda: L.simpo_loss(empty64(0), empty64(0), empty64(0), empty64(0)), ValueError,
                                "policy_chosen_logps.*(at least one|S \\+ 1 >= 2)"),
    "fdpg_loss: empty batch": (lambda: L.fdpg_loss(empty64(0), empty64(0), state=L.FDPGState()), ValueError,
                               "policy_logps.*(at least one|S \\+ 1 >= 2)"),
    "fdpg_loss: empty batch states the shape": (lambda: L.fdpg_loss(empty64(0), empty64(0), state=L.FDPGState()),
                                                ValueError, r"must hold at least one sample; got shape \(0,\)"),

    # Scalar arguments.
    "dpo_loss: label_smoothing a bool": (lambda: L.dpo_loss(*PAIR, label_smoothing=True), (TypeError, ValueError),
                                         "label_smoothing"),
    "dpo_loss: label_smoothing 1.5": (lambda: L.dpo_loss(*PAIR, label_smoothing=1.5), (TypeError, ValueError),
                                      "label_smoothing"),
    "dpo_loss: f_alpha nan": (lambda: L.dpo_loss(*PAIR, f_divergence="alpha_divergence", f_alpha=NAN),
                              (TypeError, ValueError), "f_alpha"),
    "dpo_loss: discopop_tau 0": (lambda: L.dpo_loss(*PAIR, loss_type="discopop", discopop_tau=0),
                                 (TypeError, ValueError), "discopop_tau"),
    "dpo_loss: negative loss_weights": (
        lambda: L.dpo_loss(*PAIR, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, -1.0]), (TypeError, ValueError),
        r"loss_weights\[1\]"),
    "dpo_loss: nan loss_weights": (lambda: L.dpo_loss(*PAIR, loss_type=["sigmoid"], loss_weights=[NAN]),
                                   (TypeError, ValueError), r"loss_weights\[0\]"),
    "simpo_loss: gamma inf": (lambda: L.simpo_loss(PAIR[0], PAIR[1], [1], [1], gamma=INF), (TypeError, ValueError),
                              "gamma"),
    "simpo_loss: label_smoothing 0.5": (lambda: L.simpo_loss(PAIR[0], PAIR[1], [1], [1], label_smoothing=0.5),
                                        (TypeError, ValueError), "label_smoothing"),
    "inpo_loss: negative tau": (lambda: L.inpo_loss(*PAIR, *PAIR[:2], eta=0.5, tau=-1.0), (TypeError, ValueError),
                                "tau"),
    "inpo_loss: tau nan": (lambda: L.inpo_loss(*PAIR, *PAIR[:2], eta=0.5, tau=NAN), (TypeError, ValueError), "tau"),
    "inpo_loss: eta a bool": (lambda: L.inpo_loss(*PAIR, *PAIR[:2], eta=True, tau=0.5), (TypeError, ValueError),
                              "eta"),
    "FDPGState: baseline_decay 1": (lambda: L.FDPGState(baseline_decay=1.0), (TypeError, ValueError),
                                    "baseline_decay"),
    "FDPGState: baseline_decay a string": (lambda: L.FDPGState(baseline_decay="0.9"), (TypeError, ValueError),
                                           "baseline_decay"),

    # Option combinations of dpo_loss.
    "dpo_loss: f_divergence and f_divergence_type disagree": (
        lambda: L.dpo_loss(*PAIR, f_divergence="js_divergence", f_divergence_type="forward_kl"), ValueError,
        "f_divergence='js_divergence' and f_divergence_type='forward_kl' disagree"),
    "dpo_loss: f_alpha and f_alpha_divergence_coef disagree": (
        lambda: L.dpo_loss(*PAIR, f_alpha=0.3, f_alpha_divergence_coef=0.5), ValueError,
        "f_alpha=0.3 and f_alpha_divergence_coef=0.5 disagree"),
    "dpo_loss: unknown f_divergence_type": (lambda: L.dpo_loss(*PAIR, f_divergence_type="kl"), ValueError,
                                            "f_divergence_type 'kl' is unknown"),
    "dpo_loss: f_alpha_divergence_coef nan": (lambda: L.dpo_loss(*PAIR, f_alpha_divergence_coef=NAN), ValueError,
                                              "f_alpha_divergence_coef must be finite"),
    "dpo_loss: f_divergence_type with bco_pair": (
        lambda: L.dpo_loss(*PAIR, loss_type="bco_pair", f_divergence_type="forward_kl"), ValueError, "only supported"),
    "dpo_loss: sigmoid_label_smoothing an int": (lambda: L.dpo_loss(*PAIR, sigmoid_label_smoothing=1), TypeError,
                                                 "sigmoid_label_smoothing must be a bool"),
    "dpo_loss: sigmoid_label_smoothing with hinge": (
        lambda: L.dpo_loss(*PAIR, loss_type="hinge", sigmoid_label_smoothing=True), ValueError,
        "sigmoid_label_smoothing applies"),
    "dpo_loss: unknown bco_delta": (lambda: L.dpo_loss(*PAIR, loss_type="bco_pair", bco_delta="running"),
                                    ValueError, "bco_delta 'running' is unknown"),
    "dpo_loss: bco_delta with sigmoid": (lambda: L.dpo_loss(*PAIR, loss_type="sigmoid", bco_delta="batch_mean"),
                                         ValueError, "bco_delta applies"),
    "dpo_loss: bco_delta running_mean without bco_state": (
        lambda: L.dpo_loss(*PAIR, loss_type="bco_pair", bco_delta="running_mean"), ValueError, "go together"),
    "dpo_loss: bco_state without bco_delta": (
        lambda: L.dpo_loss(*PAIR, loss_type="bco_pair", bco_state=L.RunningMean()), ValueError, "go together"),
    "dpo_loss: bco_state with bco_delta batch_mean": (
        lambda: L.dpo_loss(*PAIR, loss_type="bco_pair", bco_delta="batch_mean", bco_state=L.RunningMean()),
        ValueError, "go together"),
}


# dpo_loss's beta: every kind of bad scalar, named (the second fragment) with the reason.
for _label, _beta, _error, _reason in [
    ("True", lambda: True, TypeError, "bool"),
    ("numpy bool", lambda: np.bool_(True), TypeError, "beta"),
    ("bool tensor", lambda: torch.tensor(True), TypeError, "beta"),
    ("string", lambda: "0.1", TypeError, "beta"),
    ("complex", lambda: 0.1 + 0j, TypeError, "beta"),
    ("1-element 1-D tensor", lambda: torch.tensor([0.1]), TypeError, "shape"),
    ("tensor requiring grad", lambda: torch.tensor(0.1, requires_grad=True), TypeError, "grad"),
    ("nan", lambda: NAN, ValueError, "finite"),
    ("inf", lambda: INF, ValueError, "finite"),
    ("negative numpy float", lambda: np.float64(-0.1), ValueError, "> 0"),
    ("zero tensor", lambda: torch.tensor(0.0), ValueError, "> 0"),
]:
    add_row(CASES, f"dpo_loss: beta {_label}", lambda beta=_beta: L.dpo_loss(*PAIR, beta=beta()), _error,
            (_reason, "beta"))

# Bad sequence lengths name the argument.
for _lengths, _error, _reason in [
    ([2.0, -1.0], ValueError, ">=? 0"),
    ([2.0, NAN], ValueError, "finite"),
    ([2.0, INF], ValueError, "finite"),
    ([2.0], ValueError, "shape"),
    (torch.tensor([True, True]), TypeError, "dtype"),
    (["a", "b"], TypeError, "token counts"),
]:
    add_row(CASES, f"dpo_loss: ipo rejected_lengths {_lengths!r}",
            lambda n=_lengths: L.dpo_loss(*TWO, loss_type="ipo", chosen_lengths=[1, 2], rejected_lengths=n), _error,
            f"rejected_lengths.*{_reason}")
    add_row(CASES, f"dpo_loss: sft chosen_lengths {_lengths!r}",
            lambda n=_lengths: L.dpo_loss(*TWO, loss_type="sft", chosen_lengths=n), _error,
            f"chosen_lengths.*{_reason}")
    add_row(CASES, f"simpo_loss: chosen_lengths {_lengths!r}",
            lambda n=_lengths: L.simpo_loss(TWO[0], TWO[1], n, [1, 2]), _error, f"chosen_lengths.*{_reason}")


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in CASES])
def test_bad_input_raises_naming_the_argument(name):
    check_bad_input(CASES[name])
