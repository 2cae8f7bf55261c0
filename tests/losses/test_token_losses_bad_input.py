"""Bad input to the token-level losses (``tdpo_loss``, ``sparse_po_loss``) fails loudly, naming
the argument.

``CASES`` is their table of bad input: name -> (call, exception type, message fragment);
the fragment is a regular expression searched in the message, or a tuple of them that must all
be found (``losses_cases.check_bad_input``). The per-sequence losses' table is in
test_sequence_losses_bad_input.py.
"""

import pytest
import torch

from prefopt_kernels import losses as L

from losses_cases import NAN, add_row, check_bad_input, empty64, given, t64, token_inputs


def _small_tokens():
    """Token log-ratios and KLs of two pairs of three tokens: ``lw, ll, kw, kl``."""
    return [torch.randn(2, 3, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in range(4)]


PACKED = [t64([0.1] * 6) for _ in range(4)]  # six packed tokens
GOOD_CU = torch.tensor([0, 2, 6])


CASES = {
    # Empty batches.
    "tdpo_loss: empty batch": (lambda: L.tdpo_loss(*[empty64(0, 4)] * 4), ValueError,
                               "chosen_logratios.*(at least one|S \\+ 1 >= 2)"),
    "sparse_po_loss: empty batch": (lambda: L.sparse_po_loss(*[empty64(0, 4)] * 4), ValueError,
                                    "chosen_logratios.*(at least one|S \\+ 1 >= 2)"),
    "tdpo_loss: empty packed batch": (
        lambda: L.tdpo_loss(*[empty64(0)] * 4, chosen_cu_seqlens=[0], rejected_cu_seqlens=[0]), ValueError,
        "chosen_cu_seqlens.*(at least one|S \\+ 1 >= 2)"),
    "tdpo_loss: empty batch states the shape": (lambda: L.tdpo_loss(*[empty64(0, 3)] * 4), ValueError,
                                                r"must hold at least one pair; got shape \(0, 3\)"),

    # Scalar arguments.
    "tdpo_loss: negative alpha": (lambda: L.tdpo_loss(*[t64([[0.1]])] * 4, alpha=-0.1, variant=2),
                                  (TypeError, ValueError), "alpha"),
    "sparse_po_loss: l1_reward nan": (lambda: L.sparse_po_loss(*[t64([[0.1]])] * 4, l1_reward=NAN),
                                      (TypeError, ValueError), "l1_reward"),

    # tdpo_loss and sparse_po_loss: token-level arguments.
    "tdpo_loss: chosen_mask of three tokens": (
        given(token_inputs, lambda lw, ll, kw, kl, mw, ml: L.tdpo_loss(lw, ll, kw, kl, mw[:, :3], ml)), ValueError,
        "chosen_mask"),
    "tdpo_loss: variant 3 (masks given)": (lambda: L.tdpo_loss(*token_inputs(), variant=3), ValueError, "variant"),
    "sparse_po_loss: negative beta": (lambda: L.sparse_po_loss(*token_inputs()[:4], beta=-0.1), ValueError, "beta"),
    "sparse_po_loss: chosen_reward_mask shape": (
        given(token_inputs, lambda lw, ll, kw, kl, mw, ml: L.sparse_po_loss(lw, ll, kw, kl, mw[:2])), ValueError,
        "chosen_reward_mask"),
    "sparse_po_loss: negative l1_kl": (lambda: L.sparse_po_loss(*token_inputs()[:4], l1_kl=-1.0), ValueError, "l1_kl"),
    "tdpo_loss: three rejected sequences of five": (
        given(token_inputs, lambda lw, ll, kw, kl, mw, ml: L.tdpo_loss(lw, ll[:3], kw, kl[:3])), ValueError,
        "number of sequences"),
    "tdpo_loss: cu_seqlens short of the tokens": (
        lambda: L.tdpo_loss(*[t.flatten() for t in token_inputs()[:4]], chosen_cu_seqlens=torch.tensor([0, 4])),
        ValueError, "cu_seqlens"),
    "tdpo_loss: packed values not flat": (
        lambda: L.tdpo_loss(*_small_tokens(), chosen_cu_seqlens=[0, 3, 6], rejected_cu_seqlens=[0, 3, 6]),
        ValueError, r"chosen_logratios must be \[N\] when chosen_cu_seqlens"),
    "tdpo_loss: reduction None": (lambda: L.tdpo_loss(*_small_tokens(), reduction=None), ValueError, "reduction"),
}


# tdpo_loss's variant must be 1 or 2.
for _variant in [True, False, 0, 3, 1.0, 2.0, "1", None]:
    add_row(CASES, f"tdpo_loss: variant {_variant!r}",
            lambda variant=_variant: L.tdpo_loss(*[t64([[0.1, 0.2]])] * 4, variant=variant), ValueError, "variant")

# Token-level shapes and dtypes, for both token-level losses.
for _loss in (L.tdpo_loss, L.sparse_po_loss):
    _n = _loss.__name__
    for _name, _row in {
        # chosen_kl of another shape used to be summed silently.
        f"{_n}: chosen_kl shape": (
            given(_small_tokens, lambda lw, ll, kw, kl, f=_loss: f(lw, ll, torch.cat([kw, kw], 1), kl)), ValueError,
            "chosen_kl"),
        f"{_n}: rejected_kl shape": (
            given(_small_tokens, lambda lw, ll, kw, kl, f=_loss: f(lw, ll, kw, kl[:, :2])), ValueError,
            "rejected_kl"),
        f"{_n}: integer chosen_kl": (
            given(_small_tokens, lambda lw, ll, kw, kl, f=_loss: f(lw, ll, kw.long(), kl)), TypeError, "chosen_kl"),
        f"{_n}: complex rejected_logratios": (
            given(_small_tokens, lambda lw, ll, kw, kl, f=_loss: f(lw, ll.to(torch.complex128), kw, kl)),
            TypeError, "rejected_logratios"),
        f"{_n}: chosen_logratios not B x T": (
            given(_small_tokens, lambda lw, ll, kw, kl, f=_loss: f(lw.flatten(), ll, kw.flatten(), kl)),
            ValueError, r"chosen_logratios must be \[B, T\]"),
        f"{_n}: number of sequences": (
            given(_small_tokens, lambda lw, ll, kw, kl, f=_loss: f(lw, ll[:1], kw, kl[:1])), ValueError,
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
        add_row(CASES, _name, *_row)

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
    add_row(CASES, f"tdpo_loss: chosen_cu_seqlens {_cu!r}",
            lambda cu=_cu: L.tdpo_loss(*PACKED, chosen_cu_seqlens=cu, rejected_cu_seqlens=GOOD_CU),
            (TypeError, ValueError), f"chosen_cu_seqlens.*{_reason}")
    add_row(CASES, f"sparse_po_loss: rejected_cu_seqlens {_cu!r}",
            lambda cu=_cu: L.sparse_po_loss(*PACKED, chosen_cu_seqlens=GOOD_CU, rejected_cu_seqlens=cu),
            (TypeError, ValueError), "rejected_cu_seqlens")


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in CASES])
def test_bad_input_raises_naming_the_argument(name):
    check_bad_input(CASES[name])
