"""TRL's fused head on our kernels with ``batch_invariant``: a sequence's log-probs are the same
bits alone and inside a larger batch.

Each of the first sequences of a batch of 24 (one right-padded) keeps exactly one label, so
alone it is a one-row projection, which this CPU's GEMM rounds differently from a many-row one
(tests/linear/test_batch_invariance.py): the plain head moves some of them, the batch-invariant
head none. The premise, asserted first: the tiny Llama's backbone gives each sequence the same
hidden states alone and in the batch, so any difference is the head's.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

import torch  # noqa: E402

from prefopt_kernels.integrations import trl as pk_trl  # noqa: E402
from trl_cases import SEQ, VOCAB, make_model, restore_trl, trainer_modules  # noqa: E402, F401

BATCH_SIZE, SINGLES = 24, 8


def _batch():
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(2, VOCAB, (BATCH_SIZE, SEQ), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[SINGLES, -4:] = 0
    input_ids[SINGLES, -4:] = 0
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[SINGLES, -4:] = -100
    labels[:SINGLES, :-1] = -100  # the first sequences keep their last label alone
    return input_ids, attention_mask, labels


def _log_probs(model, input_ids, attention_mask, labels):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True).log_probs


def _moved(batch_invariant):
    """The sequences whose log-probs differ alone and inside the batch."""
    model = copy.deepcopy(make_model("plain"))
    pk_trl.add_fused_lm_head(model, batch_invariant=batch_invariant)
    input_ids, attention_mask, labels = _batch()
    whole = _log_probs(model, input_ids, attention_mask, labels)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    moved = []
    for i in list(range(SINGLES + 1)):
        one = slice(i, i + 1)
        with torch.no_grad():
            hidden_alone = model.model(input_ids=input_ids[one], attention_mask=attention_mask[one]).last_hidden_state
        assert torch.equal(hidden_alone[0], hidden[i]), "the backbone itself is not batch-invariant here"
        if not torch.equal(_log_probs(model, input_ids[one], attention_mask[one], labels[one])[0], whole[i]):
            moved.append(i)
    return moved


def test_fused_head_log_probs_do_not_depend_on_the_batch():
    assert _moved(batch_invariant=True) == []


def test_plain_fused_head_log_probs_depend_on_the_batch():
    """Negative control: the plain head's one-row projections round differently."""
    assert _moved(batch_invariant=False) != []


def test_use_in_trl_passes_batch_invariant(restore_trl):  # noqa: F811
    """``use_in_trl(batch_invariant=True)`` binds a head that patches with the option; the
    default binds our function itself; a non-bool fails naming the argument."""
    pk_trl.use_in_trl(batch_invariant=True)
    modules = [m for m in trainer_modules() if hasattr(m, "add_fused_lm_head")]
    for module in modules:
        assert module.add_fused_lm_head.func is pk_trl.add_fused_lm_head
        assert module.add_fused_lm_head.keywords == {"batch_invariant": True}
    pk_trl.use_in_trl()
    assert all(m.add_fused_lm_head is pk_trl.add_fused_lm_head for m in modules)
    with pytest.raises(TypeError, match="batch_invariant"):
        pk_trl.use_in_trl(batch_invariant="yes")
    with pytest.raises(TypeError, match="batch_invariant"):
        pk_trl.add_fused_lm_head(make_model("plain"), batch_invariant=1)
