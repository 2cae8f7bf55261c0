r"""PrefOptDPOTrainer against TRL 1.16's DPOTrainer, for every loss type TRL lists.

Tiny random Llamas from configs in code, a WordLevel tokenizer built in code and four
in-memory preference pairs (trl_cases.py); nothing is downloaded. Skipped without TRL (or
transformers).

Every loss type TRL 1.16's ``DPOConfig`` lists goes to TRL's own ``_compute_loss``, on our
fused LM head in ``PrefOptDPOTrainer`` and on TRL's in ``DPOTrainer``. Each alone (with the
``label_smoothing`` that ``exo_pair`` and ``robust`` need), mixes with ``loss_weights``, the
f-divergences (alpha, JS, forward KL), WPO ``use_weighting``, ``ld_alpha``,
``label_smoothing``, precomputed reference log-probs and TR-DPO's synced reference: three
plain-SGD steps (fp32, lr 0.1, same seed and data, copies of one policy and of a different
reference) of a stock ``DPOTrainer`` and of ``PrefOptDPOTrainer`` log the same values, take the
same parameter gradients at every step and leave the same policy and reference (``1e-5``
relative in each tensor's norm). Every logged key but the timings is compared within a bound
on fp32 rounding, not a measured tolerance (``dpo_rounding``): both heads' worst-case rounding
of each token's outputs plus the exact effect of the runs' parameter drift, carried through
the way TRL forms the key (a reward, a difference of log-prob sums of magnitude ~10, gets a
tolerance proportional to those magnitudes); counts, the step and the gradient norm to
``rel=1e-5``. A case that stock TRL itself fails is an expected failure naming the cause. One
bf16 mixed-precision step, and LoRA without a reference model, log the same values too; the
precomputed reference log-probs are those of float64 full logits.
"""

from __future__ import annotations

import copy
import math
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("datasets")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
import trl.trainer.dpo_trainer as trl_dpo_module  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from dpo_rounding import HeadCapture, assert_logs_match, logged_tolerances  # noqa: E402
from prefopt_kernels.integrations import trl as pk_trl  # noqa: E402
from prefopt_kernels.integrations.trl_dpo import PrefOptDPOConfig, PrefOptDPOTrainer  # noqa: E402
from trl_cases import (PROMPTS, lora_config, make_dataset, make_tokenizer, make_word_llama,  # noqa: E402
                       training_args)


def _greedy_chosen(model, tokenizer):
    """Chosen completions of the default lengths made of ``model``'s greedy tokens: top-1 at the
    first step, so ``mean_token_accuracy`` is not 0."""
    chosen = []
    for prompt, length in zip(PROMPTS, (2, 1, 3, 2)):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=length, do_sample=False, pad_token_id=0, eos_token_id=None,
                             bad_words_ids=[[0], [1], [2]])
        chosen.append(" " + tokenizer.decode(out[0, ids.shape[1]:]))
    return chosen


class GradientRecorder(TrainerCallback):
    """Clones every parameter's gradient before each optimizer step: the (clipped) step the optimizer takes."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({name: None if p.grad is None else p.grad.detach().clone()
                           for name, p in model.named_parameters()})


# Every loss type TRL 1.16's DPOTrainer implements, each alone with the settings it needs, then
# mixes and the options that change its loss or reference. Each goes to TRL's own _compute_loss.
TRL_CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "hinge": dict(loss_type="hinge", beta=0.1),  # margins stay under 1/β: a gradient at every step
    "ipo": dict(loss_type="ipo"),
    "exo_pair": dict(loss_type="exo_pair", label_smoothing=1e-3),  # TRL refuses ε = 0
    "nca_pair": dict(loss_type="nca_pair"),
    "robust": dict(loss_type="robust", label_smoothing=0.1),
    "bco_pair": dict(loss_type="bco_pair"),
    "sppo_hard": dict(loss_type="sppo_hard"),
    "aot": dict(loss_type="aot"),
    "aot_unpaired": dict(loss_type="aot_unpaired"),
    "apo_zero": dict(loss_type="apo_zero"),
    "apo_down": dict(loss_type="apo_down"),
    "discopop": dict(loss_type="discopop"),
    "sft": dict(loss_type="sft"),
    "sigmoid_norm": dict(loss_type="sigmoid_norm"),
    "mix_sigmoid_sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "mix_mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "sigmoid_alpha_divergence": dict(loss_type="sigmoid", f_divergence_type="alpha_divergence",
                                     f_alpha_divergence_coef=0.3),
    "robust_js_divergence": dict(loss_type="robust", label_smoothing=0.1, f_divergence_type="js_divergence"),
    "ipo_forward_kl": dict(loss_type="ipo", f_divergence_type="forward_kl"),
    "sigmoid_wpo": dict(loss_type="sigmoid", use_weighting=True),
    "mix_sigmoid_bco_pair_wpo": dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[1.0, 0.5],
                                     use_weighting=True),
    "sigmoid_ld_alpha": dict(loss_type="sigmoid", ld_alpha=0.5),
    # PrefOptDPOConfig reads label_smoothing as SimPO's ε; TRL's sigmoid ignores it.
    "sigmoid_label_smoothing": dict(loss_type="sigmoid", label_smoothing=0.1),
    "aot_label_smoothing": dict(loss_type="aot", label_smoothing=0.1),
    "sigmoid_precomputed_ref": dict(loss_type="sigmoid", precompute_ref_log_probs=True),
    "sigmoid_synced_ref": dict(loss_type="sigmoid", sync_ref_model=True, ref_model_sync_steps=1,
                               ref_model_mixup_alpha=0.5),
    "sft_wpo": dict(loss_type="sft", use_weighting=True),
}
# Stock TRL itself fails these; strict, so that a TRL that runs them turns the case back on.
TRL_FAILS = {
    "sft_wpo": "TRL 1.16: the sft loss is one scalar expanded over the batch, which use_weighting then multiplies "
               "in place (RuntimeError: more than one element of the written-to tensor refers to a single memory "
               "location)",
}


def _trl_loss_types():
    """The loss types TRL's own ``DPOConfig.loss_type`` help lists."""
    return set(re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]))


def test_trl_cases_cover_every_trl_loss_type():
    single = {case["loss_type"] for case in TRL_CASES.values() if isinstance(case["loss_type"], str)}
    assert len(_trl_loss_types()) >= 15
    assert single == _trl_loss_types()


# Both trainers round in fp32, differently (TRL's head against ours): a step's rounding
# difference (~1e-7 relative) moves the next step's parameters. The logged values' tolerances
# include that drift exactly (dpo_rounding); lr 0.1 keeps it small enough over three steps for
# the gradients' and parameters' 1e-5 in norm.
PARITY_LR = 0.1


def _captured(trainer_class, capture, **kwargs):
    """``trainer_class(**kwargs)`` with every LM-head call of its models recorded by ``capture``: the
    models are watched before the trainer is built (so a precompute pass is seen), a PEFT model once built."""
    peft = "peft_config" in kwargs
    for name in ("model", "ref_model"):
        if kwargs.get(name) is not None and not peft:
            capture.watch(kwargs[name])
    trainer = trainer_class(**kwargs)
    if peft:
        capture.watch(trainer.model)
    return capture.wrap(trainer)


def _assert_close_in_norm(mine, theirs, what):
    """``|mine - theirs| <= 1e-5 |theirs|`` in the Frobenius norm: entries that cancel to ~0 in a
    gradient have no relative scale of their own, the tensor does."""
    error = (mine - theirs).norm()
    assert error <= 1e-5 * theirs.norm(), f"{what}: |mine - theirs| = {error:.3g}, |theirs| = {theirs.norm():.3g}"


def test_bf16_mixed_precision_matches_stock_dpo(tmp_path):
    """``bf16=True`` (autocast): accelerate wraps each model's forward in autocast when it prepares
    it; our head goes on before that wrapping, as TRL's does, so the reference is scored under
    autocast too and one step logs TRL's values (scored outside it, the rewards moved by ~5%)."""
    base, reference, tokenizer = make_word_llama(), make_word_llama(seed=1), make_tokenizer()
    runs = []
    for trainer_class, config_class in ((DPOTrainer, DPOConfig), (PrefOptDPOTrainer, PrefOptDPOConfig)):
        args = training_args(config_class, tmp_path / trainer_class.__name__, 1, 0.1, bf16=True, beta=0.5)
        capture = HeadCapture()
        trainer = _captured(trainer_class, capture, model=copy.deepcopy(base), ref_model=copy.deepcopy(reference),
                            args=args, train_dataset=make_dataset(), processing_class=tokenizer)
        trainer.train()
        runs.append((trainer.state.log_history, capture))
    (stock, stock_heads), (ours, our_heads) = runs
    assert_logs_match(ours, stock, logged_tolerances(trainer, our_heads, stock_heads, stock))


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=pytest.mark.xfail(raises=RuntimeError, strict=True, reason=TRL_FAILS[case]))
    if case in TRL_FAILS else case for case in TRL_CASES
])
def test_trl_loss_types_match_stock_dpo(tmp_path, monkeypatch, case):
    """Three plain-SGD steps of TRL's DPOTrainer and of PrefOptDPOTrainer (same seed, data, model copies):
    every logged value, every parameter's gradient at every step and the final parameters agree to 1e-5."""
    fused_calls = []
    counted = pk_trl.linear_token_logprobs
    monkeypatch.setattr(pk_trl, "linear_token_logprobs", lambda *a, **k: fused_calls.append(1) or counted(*a, **k))
    # A reference unlike the policy: non-zero rewards from the first step, and aot_unpaired's sort
    # reorders some batch.
    base, reference, tokenizer = make_word_llama(), make_word_llama(seed=1), make_tokenizer()
    chosen = _greedy_chosen(base, tokenizer)
    kwargs = dict(TRL_CASES[case])
    kwargs.setdefault("beta", 0.5)
    runs = []
    for trainer_class, config_class in ((DPOTrainer, DPOConfig), (PrefOptDPOTrainer, PrefOptDPOConfig)):
        recorder, capture = GradientRecorder(), HeadCapture()
        trainer = _captured(trainer_class, capture, model=copy.deepcopy(base), ref_model=copy.deepcopy(reference),
                            args=training_args(config_class, tmp_path / trainer_class.__name__, 3, PARITY_LR, **kwargs),
                            train_dataset=make_dataset(chosen), processing_class=tokenizer, callbacks=[recorder])
        calls_before = len(fused_calls)
        trainer.train()
        runs.append((trainer, recorder.steps, len(fused_calls) - calls_before, capture))
    (stock, stock_grads, stock_calls, stock_heads), (ours, our_grads, our_calls, our_heads) = runs
    # TRL's run never touches our head; ours scores the policy (and the reference) on it every step.
    assert stock_calls == 0 and our_calls >= 3

    assert len(stock.state.log_history) == len(ours.state.log_history) == 4  # three steps and the summary
    assert_logs_match(ours.state.log_history, stock.state.log_history,
                      logged_tolerances(stock, our_heads, stock_heads, stock.state.log_history))
    assert all(logs["rewards/margins"] != 0.0 for logs in stock.state.log_history[:3])
    assert stock.state.log_history[0]["mean_token_accuracy"] > 0.0

    assert len(stock_grads) == len(our_grads) == 3
    assert all(any(g is not None and g.abs().sum() > 0 for g in grads.values()) for grads in stock_grads)
    for step, (mine, theirs) in enumerate(zip(our_grads, stock_grads)):
        assert mine.keys() == theirs.keys()
        for name, grad in theirs.items():
            assert (mine[name] is None) == (grad is None), (step, name)
            if grad is not None:
                _assert_close_in_norm(mine[name], grad, f"step {step}, {name}")

    # The reference too: TR-DPO (sync_ref_model) moves it; otherwise it stays as given.
    moved = [name for name, value in ours.ref_model.state_dict().items()
             if not torch.equal(value, reference.state_dict()[name])]
    assert bool(moved) == bool(kwargs.get("sync_ref_model")), moved
    for model_name in ("model", "ref_model"):
        mine, theirs = getattr(ours, model_name).state_dict(), getattr(stock, model_name).state_dict()
        assert mine.keys() == theirs.keys()
        for name, value in theirs.items():
            _assert_close_in_norm(mine[name], value, f"{model_name}.{name}")


def test_peft_policy_matches_stock_dpo(tmp_path, monkeypatch):
    """LoRA without a ref_model (the reference is the policy with its adapter disabled): three SGD
    steps of PrefOptDPOTrainer log stock DPOTrainer's values, with our head on the PEFT base model."""
    lora_config()
    fused_calls = []
    counted = pk_trl.linear_token_logprobs
    monkeypatch.setattr(pk_trl, "linear_token_logprobs", lambda *a, **k: fused_calls.append(1) or counted(*a, **k))
    base, tokenizer = make_word_llama(), make_tokenizer()
    runs = []
    for trainer_class, config_class in ((DPOTrainer, DPOConfig), (PrefOptDPOTrainer, PrefOptDPOConfig)):
        torch.manual_seed(0)  # the adapters' initialisation
        capture = HeadCapture()
        trainer = _captured(trainer_class, capture, model=copy.deepcopy(base),
                            args=training_args(config_class, tmp_path / trainer_class.__name__, 3, 0.5, beta=0.5),
                            train_dataset=make_dataset(), processing_class=tokenizer, peft_config=lora_config())
        assert trainer.ref_model is None
        calls_before = len(fused_calls)
        trainer.train()
        runs.append((trainer.state.log_history, len(fused_calls) - calls_before, capture))
    (stock, stock_calls, stock_heads), (ours, our_calls, our_heads) = runs
    assert stock_calls == 0 and our_calls >= 6  # policy and adapter-disabled reference, every step
    assert stock[-2]["rewards/margins"] != 0.0  # the adapters moved the policy off the reference
    assert_logs_match(ours, stock, logged_tolerances(trainer, our_heads, stock_heads, stock))


def _refuse_trl_head(*args, **kwargs):
    raise AssertionError("TRL's own fused LM head was installed")


def test_precomputed_reference_log_probs_come_from_our_head(tmp_path, monkeypatch):
    """``precompute_ref_log_probs``: the reference pass at construction runs on our head (TRL's is
    never installed) and stores the float64 completion log-probs of the reference's full logits."""
    monkeypatch.setattr(trl_dpo_module, "add_fused_lm_head", _refuse_trl_head)
    calls = []
    counted = pk_trl.linear_token_logprobs
    monkeypatch.setattr(pk_trl, "linear_token_logprobs", lambda *a, **k: calls.append(1) or counted(*a, **k))
    policy, reference, tokenizer = make_word_llama(seed=0), make_word_llama(seed=1), make_tokenizer()
    args = training_args(PrefOptDPOConfig, tmp_path, 1, loss_type="sigmoid", precompute_ref_log_probs=True,
                         precompute_ref_batch_size=4)
    trainer = PrefOptDPOTrainer(model=policy, ref_model=copy.deepcopy(reference), args=args,
                                train_dataset=make_dataset(), processing_class=tokenizer)
    assert calls  # the precompute pass, before any training step
    assert trl_dpo_module.add_fused_lm_head is _refuse_trl_head  # the constructor put TRL's name back

    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    token = log_probs.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    expected = (token * batch["completion_mask"][:, 1:]).sum(1)
    stored = torch.tensor([row["ref_chosen_logps"] for row in rows] + [row["ref_rejected_logps"] for row in rows],
                          dtype=torch.float64)
    torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)
    trainer.train()  # the training step reads the stored values
    assert math.isfinite(trainer.state.log_history[0]["loss"])
