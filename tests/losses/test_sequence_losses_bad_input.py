"""Bad input to the losses fails loudly, naming the argument.

``CASES`` is the losses' table of bad input: name -> (call, exception type, message fragment);
the fragment is a regular expression searched in the message, or a tuple of them that must all
be found. The rows of ``PreferenceLoss``, which runs the logits ops, run on every backend that
runs on CPU tensors. The logits ops' table is in tests/ops/test_ops_bad_input.py.
"""

import math
import re

import numpy as np
import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels import losses as L

from contract import backends_on

INF, NAN = math.inf, math.nan


# --------------------------------------------------------------------------- inputs


def _leaf(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


def _t(rows, **kw):
    return torch.tensor(rows, dtype=torch.float64, **kw)


def _empty(*shape):
    return torch.zeros(*shape, dtype=torch.float64)


# Per-sequence log-probs of five pairs, and their lengths.
B = 5
LEN_W = torch.tensor([3.0, 4.0, 1.0, 7.0, 2.0], dtype=torch.float64)
LEN_L = torch.tensor([2.0, 5.0, 6.0, 1.0, 3.0], dtype=torch.float64)


def _dpo():
    """policy chosen, policy rejected, reference chosen, reference rejected: [B] each."""
    return [_leaf(B, seed=s) for s in range(4)]


def _tokens():
    """Token log-ratios, token KLs and masks of five pairs of six tokens: ``lw, ll, kw, kl, mw, ml``."""
    lw, ll = _leaf(B, 6, seed=0), _leaf(B, 6, seed=1)
    kw = (_leaf(B, 6, seed=2).detach().abs()).requires_grad_(True)
    kl = (_leaf(B, 6, seed=3).detach().abs()).requires_grad_(True)
    g = torch.Generator().manual_seed(4)
    mw = (torch.rand(B, 6, generator=g) > 0.3).double()
    ml = (torch.rand(B, 6, generator=g) > 0.3).double()
    mw[2] = 0.0
    return lw, ll, kw, kl, mw, ml


def _small_tokens():
    """Token log-ratios and KLs of two pairs of three tokens: ``lw, ll, kw, kl``."""
    return [torch.randn(2, 3, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in range(4)]


PAIR = [_t([-1.0]), _t([-2.0]), _t([-1.5]), _t([-1.5])]  # one pair: rho_w = 0.5, rho_l = -0.5
TWO = [_t([-1.0, -2.0]) for _ in range(4)]  # two pairs
PACKED = [_t([0.1] * 6) for _ in range(4)]  # six packed tokens
GOOD_CU = torch.tensor([0, 2, 6])


def _batch():
    """Stacked logits [4, 7, 11] (two pairs), reference logits and labels with a prompt and padding."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g).requires_grad_(True)
    ref = torch.randn(4, 7, 11, generator=g)
    labels = torch.randint(0, 11, (4, 7), generator=g)
    labels[:, :2] = -100
    labels[1, 5:] = -100
    return logits, ref, labels


def _given(inputs, f):
    """A row's call that takes its inputs apart: ``f`` on fresh ``inputs()``."""
    return lambda: f(*inputs())


# --------------------------------------------------------------------------- the table


CASES = {
    # dpo_loss, simpo_loss, inpo_loss, fdpg_loss: per-sequence arguments.
    "dpo_loss: ref_rejected_logps shape": (_given(_dpo, lambda pc, pr, rc, rr: L.dpo_loss(pc, pr, rc, rr[:3])),
                                           ValueError, "ref_rejected_logps"),
    "dpo_loss: unknown loss_type": (lambda: L.dpo_loss(*_dpo(), loss_type="nope"), ValueError, "loss_type"),
    "dpo_loss: beta 0": (lambda: L.dpo_loss(*_dpo(), beta=0.0), ValueError, "beta"),
    "simpo_loss: negative beta": (_given(_dpo, lambda pc, pr, rc, rr: L.simpo_loss(pc, pr, LEN_W, LEN_L, beta=-1.0)),
                                  ValueError, "beta"),
    "dpo_loss: negative chosen_lengths": (
        lambda: L.dpo_loss(*_dpo(), loss_type="ipo", chosen_lengths=-torch.ones(B), rejected_lengths=LEN_L),
        ValueError, "chosen_lengths"),
    "dpo_loss: sft without chosen_lengths": (lambda: L.dpo_loss(*_dpo(), loss_type="sft"), ValueError,
                                             "chosen_lengths"),
    "dpo_loss: sigmoid_norm without chosen_lengths": (lambda: L.dpo_loss(*_dpo(), loss_type="sigmoid_norm"),
                                                      ValueError, "chosen_lengths"),
    "simpo_loss: zero rejected_lengths": (
        _given(_dpo, lambda pc, pr, rc, rr: L.simpo_loss(pc, pr, LEN_W, torch.tensor([1, 2, 0, 1, 1]))), ValueError,
        "rejected_lengths"),
    "dpo_loss: loss_weights of another length": (
        lambda: L.dpo_loss(*_dpo(), loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ValueError, "loss_weights"),
    "dpo_loss: f_divergence with nca_pair": (
        lambda: L.dpo_loss(*_dpo(), loss_type="nca_pair", f_divergence="forward_kl"), ValueError, "f_divergence"),
    "dpo_loss: unknown f_divergence": (lambda: L.dpo_loss(*_dpo(), f_divergence="kl"), ValueError, "f_divergence"),
    "dpo_loss: exo_pair without label_smoothing": (lambda: L.dpo_loss(*_dpo(), loss_type="exo_pair"), ValueError,
                                                   "label_smoothing"),
    "dpo_loss: unknown reduction": (lambda: L.dpo_loss(*_dpo(), reduction="avg"), ValueError, "reduction"),
    "dpo_loss: policy_chosen_logps a list": (_given(_dpo, lambda pc, pr, rc, rr: L.dpo_loss([0.0] * B, pr, rc, rr)),
                                             TypeError, "policy_chosen_logps"),
    "inpo_loss: eta 0": (lambda: L.inpo_loss(*[_leaf(B, seed=s) for s in range(6)], eta=0.0, tau=1.0), ValueError,
                         "eta"),
    "fdpg_loss: divergence hellinger": (
        _given(_dpo, lambda pc, pr, rc, rr: L.fdpg_loss(pc, pr, divergence="hellinger", state=L.FDPGState())),
        ValueError, "divergence"),
    "fdpg_loss: state None": (_given(_dpo, lambda pc, pr, rc, rr: L.fdpg_loss(pc, pr, state=None)), TypeError,
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
    "dpo_loss: empty batch": (lambda: L.dpo_loss(*[_empty(0)] * 4), ValueError,
                              "policy_chosen_logps.*(at least one|S \\+ 1 >= 2)"),
    "dpo_loss: empty batch, reduction none": (lambda: L.dpo_loss(*[_empty(0)] * 4, reduction="none"), ValueError,
                                              "policy_chosen_logps.*(at least one|S \\+ 1 >= 2)"),
    "inpo_loss: empty batch": (lambda: L.inpo_loss(*[_empty(0)] * 6, eta=0.5, tau=1.0), ValueError,
                               "policy_chosen_logps.*(at least one|S \\+ 1 >= 2)"),
    "simpo_loss: empty batch": (lambda: L.simpo_loss(_empty(0), _empty(0), _empty(0), _empty(0)), ValueError,
                                "policy_chosen_logps.*(at least one|S \\+ 1 >= 2)"),
    "tdpo_loss: empty batch": (lambda: L.tdpo_loss(*[_empty(0, 4)] * 4), ValueError,
                               "chosen_logratios.*(at least one|S \\+ 1 >= 2)"),
    "sparse_po_loss: empty batch": (lambda: L.sparse_po_loss(*[_empty(0, 4)] * 4), ValueError,
                                    "chosen_logratios.*(at least one|S \\+ 1 >= 2)"),
    "tdpo_loss: empty packed batch": (
        lambda: L.tdpo_loss(*[_empty(0)] * 4, chosen_cu_seqlens=[0], rejected_cu_seqlens=[0]), ValueError,
        "chosen_cu_seqlens.*(at least one|S \\+ 1 >= 2)"),
    "fdpg_loss: empty batch": (lambda: L.fdpg_loss(_empty(0), _empty(0), state=L.FDPGState()), ValueError,
                               "policy_logps.*(at least one|S \\+ 1 >= 2)"),
    "tdpo_loss: empty batch states the shape": (lambda: L.tdpo_loss(*[_empty(0, 3)] * 4), ValueError,
                                                r"must hold at least one pair; got shape \(0, 3\)"),
    "fdpg_loss: empty batch states the shape": (lambda: L.fdpg_loss(_empty(0), _empty(0), state=L.FDPGState()),
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
    "tdpo_loss: negative alpha": (lambda: L.tdpo_loss(*[_t([[0.1]])] * 4, alpha=-0.1, variant=2),
                                  (TypeError, ValueError), "alpha"),
    "sparse_po_loss: l1_reward nan": (lambda: L.sparse_po_loss(*[_t([[0.1]])] * 4, l1_reward=NAN),
                                      (TypeError, ValueError), "l1_reward"),
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

    # tdpo_loss and sparse_po_loss: token-level arguments.
    "tdpo_loss: chosen_mask of three tokens": (
        _given(_tokens, lambda lw, ll, kw, kl, mw, ml: L.tdpo_loss(lw, ll, kw, kl, mw[:, :3], ml)), ValueError,
        "chosen_mask"),
    "tdpo_loss: variant 3 (masks given)": (lambda: L.tdpo_loss(*_tokens(), variant=3), ValueError, "variant"),
    "sparse_po_loss: negative beta": (lambda: L.sparse_po_loss(*_tokens()[:4], beta=-0.1), ValueError, "beta"),
    "sparse_po_loss: chosen_reward_mask shape": (
        _given(_tokens, lambda lw, ll, kw, kl, mw, ml: L.sparse_po_loss(lw, ll, kw, kl, mw[:2])), ValueError,
        "chosen_reward_mask"),
    "sparse_po_loss: negative l1_kl": (lambda: L.sparse_po_loss(*_tokens()[:4], l1_kl=-1.0), ValueError, "l1_kl"),
    "tdpo_loss: three rejected sequences of five": (
        _given(_tokens, lambda lw, ll, kw, kl, mw, ml: L.tdpo_loss(lw, ll[:3], kw, kl[:3])), ValueError,
        "number of sequences"),
    "tdpo_loss: cu_seqlens short of the tokens": (
        lambda: L.tdpo_loss(*[t.flatten() for t in _tokens()[:4]], chosen_cu_seqlens=torch.tensor([0, 4])),
        ValueError, "cu_seqlens"),
    "tdpo_loss: packed values not flat": (
        lambda: L.tdpo_loss(*_small_tokens(), chosen_cu_seqlens=[0, 3, 6], rejected_cu_seqlens=[0, 3, 6]),
        ValueError, r"chosen_logratios must be \[N\] when chosen_cu_seqlens"),
    "tdpo_loss: reduction None": (lambda: L.tdpo_loss(*_small_tokens(), reduction=None), ValueError, "reduction"),
}



def _add(name, call, error, fragment):
    assert name not in CASES, f"two rows named {name!r}"
    CASES[name] = (call, error, fragment)


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
    _add(f"dpo_loss: beta {_label}", lambda beta=_beta: L.dpo_loss(*PAIR, beta=beta()), _error, (_reason, "beta"))

# tdpo_loss's variant must be 1 or 2.
for _variant in [True, False, 0, 3, 1.0, 2.0, "1", None]:
    _add(f"tdpo_loss: variant {_variant!r}",
         lambda variant=_variant: L.tdpo_loss(*[_t([[0.1, 0.2]])] * 4, variant=variant), ValueError, "variant")

# Token-level shapes and dtypes, for both token-level losses.
for _loss in (L.tdpo_loss, L.sparse_po_loss):
    _n = _loss.__name__
    for _name, _row in {
        # chosen_kl of another shape used to be summed silently.
        f"{_n}: chosen_kl shape": (
            _given(_small_tokens, lambda lw, ll, kw, kl, f=_loss: f(lw, ll, torch.cat([kw, kw], 1), kl)), ValueError,
            "chosen_kl"),
        f"{_n}: rejected_kl shape": (
            _given(_small_tokens, lambda lw, ll, kw, kl, f=_loss: f(lw, ll, kw, kl[:, :2])), ValueError,
            "rejected_kl"),
        f"{_n}: integer chosen_kl": (
            _given(_small_tokens, lambda lw, ll, kw, kl, f=_loss: f(lw, ll, kw.long(), kl)), TypeError, "chosen_kl"),
        f"{_n}: complex rejected_logratios": (
            _given(_small_tokens, lambda lw, ll, kw, kl, f=_loss: f(lw, ll.to(torch.complex128), kw, kl)),
            TypeError, "rejected_logratios"),
        f"{_n}: chosen_logratios not B x T": (
            _given(_small_tokens, lambda lw, ll, kw, kl, f=_loss: f(lw.flatten(), ll, kw.flatten(), kl)),
            ValueError, r"chosen_logratios must be \[B, T\]"),
        f"{_n}: number of sequences": (
            _given(_small_tokens, lambda lw, ll, kw, kl, f=_loss: f(lw, ll[:1], kw, kl[:1])), ValueError,
            "number of sequences"),
        f"{_n}: complex chosen_mask": (
            lambda f=_loss: f(*_small_tokens(), chosen_mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError,
            "chosen_mask"),
        f"{_n}: rejected_mask a list": (lambda f=_loss: f(*_small_tokens(), rejected_mask=[[1, 1, 1]] * 2),
                                        TypeError, "rejected_mask"),
        f"{_n}: chosen_mask shape": (lambda f=_loss: f(*_small_tokens(), chosen_mask=torch.ones(2, 4)), ValueError,
                                     "chosen_mask.*shape"),
        f"{_n}: rejected_mask on meta": (
            lambda f=_loss: f(*_small_tokens(), rejected_mask=torch.ones(2, 3, device="meta")), ValueError,
            "rejected_mask.*meta"),
    }.items():
        _add(_name, *_row)

# Packed sequences: bad offsets name the side they were given for.
for _cu, _reason in [
    ([0, 4, 3, 6], "non-decreasing"),
    ([0, 3, 5], "end at the number of tokens of chosen_logratios \\(6\\)"),
    ([0, 3, 7], "end at"),
    ([1, 3, 6], "start at 0"),
    (torch.tensor([0.0, 3.0, 6.0]), "integer"),
    (torch.tensor([False, True]), "integer"),
    (torch.tensor([[0, 3, 6]]), "1-D"),
    ([6], "S \\+ 1 >= 2"),
    (["a", "b"], "offsets"),
]:
    _add(f"tdpo_loss: chosen_cu_seqlens {_cu!r}",
         lambda cu=_cu: L.tdpo_loss(*PACKED, chosen_cu_seqlens=cu, rejected_cu_seqlens=GOOD_CU),
         (TypeError, ValueError), f"chosen_cu_seqlens.*{_reason}")
    _add(f"sparse_po_loss: rejected_cu_seqlens {_cu!r}",
         lambda cu=_cu: L.sparse_po_loss(*PACKED, chosen_cu_seqlens=GOOD_CU, rejected_cu_seqlens=cu),
         (TypeError, ValueError), "rejected_cu_seqlens")

# Bad sequence lengths name the argument.
for _lengths, _error, _reason in [
    ([2.0, -1.0], ValueError, ">=? 0"),
    ([2.0, NAN], ValueError, "finite"),
    ([2.0, INF], ValueError, "finite"),
    ([2.0], ValueError, "shape"),
    (torch.tensor([True, True]), TypeError, "dtype"),
    (["a", "b"], TypeError, "token counts"),
]:
    _add(f"dpo_loss: ipo rejected_lengths {_lengths!r}",
         lambda n=_lengths: L.dpo_loss(*TWO, loss_type="ipo", chosen_lengths=[1, 2], rejected_lengths=n), _error,
         f"rejected_lengths.*{_reason}")
    _add(f"dpo_loss: sft chosen_lengths {_lengths!r}",
         lambda n=_lengths: L.dpo_loss(*TWO, loss_type="sft", chosen_lengths=n), _error, f"chosen_lengths.*{_reason}")
    _add(f"simpo_loss: chosen_lengths {_lengths!r}",
         lambda n=_lengths: L.simpo_loss(TWO[0], TWO[1], n, [1, 2]), _error, f"chosen_lengths.*{_reason}")

# PreferenceLoss: its constructor, then the tensors of a call.
for _name, _row in {
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
    "PreferenceLoss: tdpo1 without ref_logits": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss("tdpo1")(logits, labels, ref_logps=torch.zeros(4))),
        ValueError, "ref_logits"),
    "PreferenceLoss: neither ref_logits nor ref_logps": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels)), ValueError,
        "ref_logits and ref_logps"),
    "PreferenceLoss: odd number of rows": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits[:3], labels[:3], ref[:3])), ValueError,
        "2B rows"),
    "PreferenceLoss: empty batch": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits[:0], labels[:0], ref[:0])), ValueError,
        r"logits must hold at least one pair.*\(0, 7, 11\)"),
    "PreferenceLoss: kl_mask shape": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss("sparse_po")(logits, labels, ref,
                                                                                 kl_mask=torch.ones(4, 6))),
        ValueError, r"kl_mask must have the labels' shape \(4, 7\), got \(4, 6\)"),
    "PreferenceLoss: reward_mask shape": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss("sparse_po")(logits, labels, ref,
                                                                                 reward_mask=torch.ones(2, 7))),
        ValueError, r"reward_mask must have the labels' shape \(4, 7\)"),
    "PreferenceLoss: complex kl_mask": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss("sparse_po")(
            logits, labels, ref, kl_mask=torch.ones(4, 7, dtype=torch.complex64))),
        TypeError, "kl_mask must be a bool, integer or real tensor"),
    "PreferenceLoss: ref_logps per sequence of another length": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels, ref_logps=torch.zeros(3))),
        ValueError, r"ref_logps must be \[2B\] = \[4\] per sequence"),
    "PreferenceLoss: ref_logps per token of another shape": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels, ref_logps=torch.zeros(4, 8))),
        ValueError, r"ref_logps must have the labels' shape \(4, 7\)"),
    "PreferenceLoss: integer ref_logps": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels,
                                                                      ref_logps=torch.zeros(4, dtype=torch.long))),
        TypeError, "ref_logps must be a floating-point"),
    "PreferenceLoss: labels shape": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels[:, :5], ref)), ValueError,
        r"labels must be \[2B, T\] = \(4, 7\)"),
    "PreferenceLoss: ref_logits shape": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels, ref[:, :, :5])), ValueError,
        r"ref_logits must have the logits' shape \(4, 7, 11\)"),
    "PreferenceLoss: reward_mask for tdpo1": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss("tdpo1")(logits, labels, ref,
                                                                             reward_mask=torch.ones(4, 7))),
        ValueError, "reward_mask is only used by loss_type 'sparse_po'"),
    "PreferenceLoss: prev_logps for sigmoid": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss()(logits, labels, ref, prev_logps=torch.zeros(4))),
        ValueError, "prev_logps is only used by loss_type 'inpo'"),
    "PreferenceLoss: prev_logps shape": (
        _given(_batch, lambda logits, ref, labels: L.PreferenceLoss("inpo", eta=0.5, tau=1.0)(
            logits, labels, ref, prev_logps=torch.zeros(4, 1))),
        ValueError, r"prev_logps must be \[2B\] = \[4\]"),
}.items():
    _add(_name, *_row)

# PreferenceLoss runs the logits ops: its rows run on every backend that runs on CPU tensors.
BACKENDS = backends_on(torch.device("cpu"))
PARAMS = [pytest.param(name, None, id=name) for name in CASES if not name.startswith("PreferenceLoss")] + [
    pytest.param(name, backend, id=f"{backend}-{name}")
    for name in CASES if name.startswith("PreferenceLoss") for backend in BACKENDS]


@pytest.mark.parametrize("name, backend", PARAMS)
def test_bad_input_raises_naming_the_argument(name, backend):
    call, error, fragment = CASES[name]
    with pytest.raises(error) as info:
        if backend is None:
            call()
        else:
            with pk.use_backend(backend):
                call()
    for pattern in (fragment,) if isinstance(fragment, str) else fragment:
        assert re.search(pattern, str(info.value)), f"{pattern!r} not in {str(info.value)!r}"
