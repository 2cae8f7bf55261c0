r"""``PrefOptDPOTrainer(loss_type="orpo" | "cpo" | ...)`` against TRL 1.16's stock ``ORPOTrainer`` and
``CPOTrainer``.

Three plain-SGD steps (fp32, same seed, data and policy copies; no reference model anywhere) of
the stock trainer and of ours on the fused LM head: the logged loss and TRL-named metrics, and
the final parameters, agree. Both sides round in fp32, differently (a full ``[N, V]``
log-softmax against our tiled head, a different summation order), so values are compared at
``1e-5`` relative (fp32 rounding of a few dozen tokens' log-probs, ~1e-7 each, carried through
three steps), parameters at ``1e-5`` in each tensor's norm as in the DPO parity tests.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("datasets")

import torch  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from prefopt_kernels.integrations import trl as pk_trl  # noqa: E402
from prefopt_kernels.integrations.trl_dpo import PrefOptDPOConfig, PrefOptDPOTrainer  # noqa: E402
from trl_cases import make_dataset, make_tokenizer, make_word_llama, training_args  # noqa: E402

# ours: (loss_type, config fields); stock: (trainer, config class, its fields).
CASES = {
    "orpo": (dict(loss_type="orpo"), (ORPOTrainer, ORPOConfig, {})),
    "cpo": (dict(loss_type="cpo", cpo_alpha=0.5, label_smoothing=0.1),
            (CPOTrainer, CPOConfig, dict(loss_type="sigmoid", cpo_alpha=0.5, label_smoothing=0.1))),
    "cpo_hinge": (dict(loss_type="cpo_hinge"), (CPOTrainer, CPOConfig, dict(loss_type="hinge"))),
    "cpo_ipo": (dict(loss_type="cpo_ipo"), (CPOTrainer, CPOConfig, dict(loss_type="ipo"))),
    "cpo_simpo": (dict(loss_type="cpo_simpo", simpo_gamma=0.3),
                  (CPOTrainer, CPOConfig, dict(loss_type="simpo", simpo_gamma=0.3))),
}
# The TRL-named values both trainers log (logits/* are not compared: TRL's are means over every
# position and vocabulary entry of the full logits, which our head never forms).
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "nll_loss")
ORPO_ONLY = ("log_odds_ratio", "log_odds_chosen")
PARITY_LR = 0.1


@pytest.mark.parametrize("case", CASES)
def test_matches_stock_trainer(tmp_path, monkeypatch, case):
    fused_calls = []
    counted = pk_trl.linear_token_logprobs
    monkeypatch.setattr(pk_trl, "linear_token_logprobs", lambda *a, **k: fused_calls.append(1) or counted(*a, **k))
    base, tokenizer = make_word_llama(), make_tokenizer()
    ours_fields, (stock_class, stock_config, stock_fields) = CASES[case]
    runs = []
    for trainer_class, config_class, fields in ((stock_class, stock_config, stock_fields),
                                                (PrefOptDPOTrainer, PrefOptDPOConfig, ours_fields)):
        args = training_args(config_class, tmp_path / trainer_class.__name__, 3, PARITY_LR, beta=0.5, **fields)
        trainer = trainer_class(model=copy.deepcopy(base), args=args, train_dataset=make_dataset(),
                                processing_class=tokenizer)
        before = len(fused_calls)
        trainer.train()
        runs.append((trainer, len(fused_calls) - before))
    (stock, stock_calls), (ours, our_calls) = runs
    assert stock_calls == 0 and our_calls == 3
    assert ours.ref_model is None

    keys = COMPARED + (ORPO_ONLY if case == "orpo" else ())
    stock_logs, our_logs = stock.state.log_history[:3], ours.state.log_history[:3]
    assert len(stock_logs) == len(our_logs) == 3
    for step, (theirs, mine) in enumerate(zip(stock_logs, our_logs)):
        for key in keys:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (step, key, mine[key], theirs[key])
    assert stock_logs[0]["loss"] != stock_logs[2]["loss"]  # the policy moved

    theirs, mine = stock.model.state_dict(), ours.model.state_dict()
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        error = (mine[name] - value).norm()
        assert error <= 1e-5 * value.norm(), f"{name}: |mine - theirs| = {error:.3g}, |theirs| = {value.norm():.3g}"
    moved = sum(float((value - base.state_dict()[name]).norm()) for name, value in theirs.items())
    assert moved > 0.0


def test_reference_free_loss_refuses_a_reference(tmp_path):
    args = training_args(PrefOptDPOConfig, tmp_path, 1, loss_type="orpo")
    with pytest.raises(ValueError, match="ref_model"):
        PrefOptDPOTrainer(model=make_word_llama(), ref_model=make_word_llama(seed=1), args=args,
                          train_dataset=make_dataset(), processing_class=make_tokenizer())


def test_a_registered_toy_loss_trains_through_the_trainer(tmp_path):
    """One file (toy_margin_loss.py) and one register line: the trainer runs it with no other change."""
    from prefopt_kernels.losses.registry import LENGTH_INPUTS, LOSSES, POLICY_INPUTS, LossEntry, register
    from toy_margin_loss import toy_margin_loss

    register(LossEntry("toy_margin", toy_margin_loss, POLICY_INPUTS + LENGTH_INPUTS, needs_reference=False,
                       min_length=1))
    try:
        args = training_args(PrefOptDPOConfig, tmp_path, 3, 0.5, loss_type="toy_margin", beta=2.0)
        trainer = PrefOptDPOTrainer(model=make_word_llama(), args=args, train_dataset=make_dataset(),
                                    processing_class=make_tokenizer())
        trainer.train()
    finally:
        del LOSSES["toy_margin"]
    logs = trainer.state.log_history[:3]
    assert trainer.ref_model is None
    assert all("toy/gap" in step for step in logs)
    assert logs[2]["toy/gap"] > logs[0]["toy/gap"]  # the margin it pushes grew
