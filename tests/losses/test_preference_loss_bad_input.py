"""Bad input to ``PreferenceLoss`` fails loudly, naming the argument: its constructor, then the
tensors of a call.

``CASES`` is its table of bad input: name -> (call, exception type, message fragment); the
fragment is a regular expression searched in the message, or a tuple of them that must all be
found (``losses_cases.check_bad_input``). ``PreferenceLoss`` runs the logits ops, so every row
runs on every backend that runs on CPU tensors. The loss functions' tables are in
test_sequence_losses_bad_input.py and test_token_losses_bad_input.py.
"""

import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels import losses as L

from contract import backends_on

from losses_cases import check_bad_input, given


def _batch():
    """Stacked logits [4, 7, 11] (two pairs), reference logits and labels with a prompt and padding."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g).requires_grad_(True)
    ref = torch.randn(4, 7, 11, generator=g)
    labels = torch.randint(0, 11, (4, 7), generator=g)
    labels[:, :2] = -100
    labels[1, 5:] = -100
    return logits, ref, labels


CASES = {
    # The constructor.
    "PreferenceLoss: unknown loss_type": (lambda: L.PreferenceLoss("dpo++"), ValueError, "loss_type"),
    "PreferenceLoss: beta 0": (lambda: L.PreferenceLoss(beta=0), ValueError, "beta"),
    "PreferenceLoss: loss_type None": (lambda: L.PreferenceLoss(None), ValueError, "loss_type"),
    "PreferenceLoss: gamma for sigmoid": (lambda: L.PreferenceLoss("sigmoid", gamma=0.5), TypeError,
                                          "takes no argument 'gamma'"),
    "PreferenceLoss: gamma for a list loss_type": (lambda: L.PreferenceLoss(["sigmoid", "hinge"], gamma=0.5),
                                                   TypeError, "takes no argument 'gamma'"),
    "PreferenceLoss: variant for tdpo1": (lambda: L.PreferenceLoss("tdpo1", variant=2), TypeError,
                                          "must not set 'variant'"),
    "PreferenceLoss: inpo without eta and tau": (lambda: L.PreferenceLoss("inpo"), TypeError,
                                                 r"needs loss_kwargs \['eta', 'tau'\]"),
    "PreferenceLoss: beta a bool": (lambda: L.PreferenceLoss(beta=True), TypeError, "beta.*bool"),
    "PreferenceLoss: temperature nan": (lambda: L.PreferenceLoss(temperature=float("nan")), ValueError,
                                        "temperature"),
    "PreferenceLoss: ignore_index a float": (lambda: L.PreferenceLoss(ignore_index=-100.0), TypeError,
                                             "ignore_index"),
    # The registered ops carry ignore_index as an int64: a wider int is refused up front.
    "PreferenceLoss: ignore_index 2^63": (lambda: pk.losses.PreferenceLoss(ignore_index=2 ** 63), ValueError,
                                          "ignore_index"),
    "PreferenceLoss: shift_labels an int": (lambda: L.PreferenceLoss(shift_labels=1), TypeError, "shift_labels"),
    "PreferenceLoss: list loss_type mixing simpo": (lambda: L.PreferenceLoss(["sigmoid", "simpo"]), ValueError,
                                                    r"list loss_type mixes DPOTrainer loss types.*'simpo'"),
    "PreferenceLoss: empty list loss_type": (lambda: L.PreferenceLoss([]), ValueError, r"list loss_type.*got \[\]"),

    # The tensors of a call.
    "PreferenceLoss: tdpo1 without ref_logits": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss("tdpo1")(logits, labels, ref_logps=torch.zeros(4))),
        ValueError, "ref_logits"),
    "PreferenceLoss: neither ref_logits nor ref_logps": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels)), ValueError,
        "ref_logits and ref_logps"),
    "PreferenceLoss: odd number of rows": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits[:3], labels[:3], ref[:3])), ValueError,
        "2B rows"),
    "PreferenceLoss: empty batch": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits[:0], labels[:0], ref[:0])), ValueError,
        r"logits must hold at least one pair.*\(0, 7, 11\)"),
    "PreferenceLoss: kl_mask shape": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss("sparse_po")(logits, labels, ref,
                                                                                kl_mask=torch.ones(4, 6))),
        ValueError, r"kl_mask must have the labels' shape \(4, 7\), got \(4, 6\)"),
    "PreferenceLoss: reward_mask shape": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss("sparse_po")(logits, labels, ref,
                                                                                reward_mask=torch.ones(2, 7))),
        ValueError, r"reward_mask must have the labels' shape \(4, 7\)"),
    "PreferenceLoss: complex kl_mask": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss("sparse_po")(
            logits, labels, ref, kl_mask=torch.ones(4, 7, dtype=torch.complex64))),
        TypeError, "kl_mask must be a bool, integer or real tensor"),
    "PreferenceLoss: ref_logps per sequence of another length": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels, ref_logps=torch.zeros(3))),
        ValueError, r"ref_logps must be \[2B\] = \[4\] per sequence"),
    "PreferenceLoss: ref_logps per token of another shape": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels, ref_logps=torch.zeros(4, 8))),
        ValueError, r"ref_logps must have the labels' shape \(4, 7\)"),
    "PreferenceLoss: integer ref_logps": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels,
                                                                     ref_logps=torch.zeros(4, dtype=torch.long))),
        TypeError, "ref_logps must be a floating-point"),
    "PreferenceLoss: labels shape": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels[:, :5], ref)), ValueError,
        r"labels must be \[2B, T\] = \(4, 7\)"),
    "PreferenceLoss: ref_logits shape": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels, ref[:, :, :5])), ValueError,
        r"ref_logits must have the logits' shape \(4, 7, 11\)"),
    "PreferenceLoss: reward_mask for tdpo1": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss("tdpo1")(logits, labels, ref,
                                                                            reward_mask=torch.ones(4, 7))),
        ValueError, "reward_mask is only used by loss_type 'sparse_po'"),
    "PreferenceLoss: prev_logps for sigmoid": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels, ref, prev_logps=torch.zeros(4))),
        ValueError, "prev_logps is only used by loss_type 'inpo'"),
    "PreferenceLoss: prev_logps shape": (
        given(_batch, lambda logits, ref, labels: L.PreferenceLoss("inpo", eta=0.5, tau=1.0)(
            logits, labels, ref, prev_logps=torch.zeros(4, 1))),
        ValueError, r"prev_logps must be \[2B\] = \[4\]"),
}


BACKENDS = backends_on(torch.device("cpu"))
PARAMS = [pytest.param(name, backend, id=f"{backend}-{name}") for name in CASES for backend in BACKENDS]


@pytest.mark.parametrize("name, backend", PARAMS)
def test_bad_input_raises_naming_the_argument(name, backend):
    check_bad_input(CASES[name], backend)
