"""What the tests of the losses share: float64 inputs (per-sequence log-probs of five pairs,
token-level log-ratios, KLs and masks), the float64 formulas' building blocks, the check of a
loss against its formula, and the running of a bad-input table's rows.

The tests: test_sequence_losses.py (the DPO family, SimPO, INPO, f-DPG),
test_token_losses.py (TDPO, SparsePO) and test_kto.py (KTO, with its bad input, and against
TRL's KTOTrainer) against formulas written out in float64; the bad-input
tables test_sequence_losses_bad_input.py, test_token_losses_bad_input.py and
test_preference_loss_bad_input.py.
"""

import math
import re

import pytest
import torch

import prefopt_kernels as pk

INF, NAN = math.inf, math.nan

# Five pairs, the chosen and rejected completions' lengths, and six tokens per sequence.
B = 5
T = 6
LEN_W = torch.tensor([3.0, 4.0, 1.0, 7.0, 2.0], dtype=torch.float64)
LEN_L = torch.tensor([2.0, 5.0, 6.0, 1.0, 3.0], dtype=torch.float64)


def leaf(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)


def t64(rows, **kw):
    return torch.tensor(rows, dtype=torch.float64, **kw)


def empty64(*shape):
    return torch.zeros(*shape, dtype=torch.float64)


def dpo_logps():
    """policy chosen, policy rejected, reference chosen, reference rejected: [B] each."""
    return [leaf(B, seed=s) for s in range(4)]


def token_inputs(seed=0):
    """Token log-ratios, token KLs and masks of B pairs of T tokens: ``lw, ll, kw, kl, mw, ml``."""
    lw, ll = leaf(B, T, seed=seed), leaf(B, T, seed=seed + 1)
    kw = (leaf(B, T, seed=seed + 2).detach().abs()).requires_grad_(True)
    kl = (leaf(B, T, seed=seed + 3).detach().abs()).requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 4)
    mw = (torch.rand(B, T, generator=g) > 0.3).double()
    ml = (torch.rand(B, T, generator=g) > 0.3).double()
    mw[2] = 0.0  # a sequence with no valid token contributes 0, never NaN
    return lw, ll, kw, kl, mw, ml


# --------------------------------------------------------------------------- formulas


def logsig(x):
    # log σ(x) = -log(1 + e^-x), written without F.logsigmoid
    return -torch.log1p(torch.exp(-x))


def sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def check_formula(fn_lib, fn_ref, inputs, atol=1e-10):
    """Same value and same gradient wrt every input."""
    out = fn_lib(*inputs)
    grads = torch.autograd.grad(out, inputs, allow_unused=True)
    ref = fn_ref(*inputs)
    ref_grads = torch.autograd.grad(ref, inputs, allow_unused=True)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-9)
    for g, r in zip(grads, ref_grads):
        g = torch.zeros_like(inputs[0]) if g is None else g
        r = torch.zeros_like(inputs[0]) if r is None else r
        torch.testing.assert_close(g, r, atol=atol, rtol=1e-9)


# --------------------------------------------------------------------------- bad-input tables
#
# A table maps a row's name to ``(call, exception type, message fragment)``; the fragment is a
# regular expression searched in the message, or a tuple of them that must all be found.


def given(inputs, f):
    """A row's call that takes its inputs apart: ``f`` on fresh ``inputs()``."""
    return lambda: f(*inputs())


def add_row(cases, name, call, error, fragment):
    assert name not in cases, f"two rows named {name!r}"
    cases[name] = (call, error, fragment)


def check_bad_input(row, backend=None):
    """The row's call raises its exception type, naming what is wrong (on ``backend``, if given)."""
    call, error, fragment = row
    with pytest.raises(error) as info:
        if backend is None:
            call()
        else:
            with pk.use_backend(backend):
                call()
    for pattern in (fragment,) if isinstance(fragment, str) else fragment:
        assert re.search(pattern, str(info.value)), f"{pattern!r} not in {str(info.value)!r}"
