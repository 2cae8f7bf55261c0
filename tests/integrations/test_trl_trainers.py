r"""Stock TRL 1.16 trainers on our fused LM head log what they log on TRL's: a ``DPOTrainer``
patched by ``apply_to_trainer`` or built after ``use_in_trl()``, and SFT, KTO, GRPO and RLOO
trainers built after ``use_in_trl()``. Same seed, data and model copies; tiny Llamas over a
WordLevel vocabulary built in code (trl_cases.py). Skipped without TRL (or transformers).

Tolerances (fp32 unless bf16 is named, CPU):

* the end-to-end DPO runs take two plain-SGD steps (lr 1, constant), so the final
  parameters are linear in the gradients. (With AdamW, the first update ``lr g / (|g| + eps)``
  amplifies the rounding of gradients with ``|g| ~ eps = 1e-8`` to ~1e-5 changes: measured,
  not a defect.) Logged metrics: within the bound on fp32 rounding of ``dpo_rounding`` (both
  heads' worst-case rounding of each token's outputs, the exact effect of the runs'
  parameter drift, carried through the way TRL forms each metric: a reward, a difference of
  log-prob sums, gets a tolerance proportional to the sums' magnitudes); counts and the
  gradient norm ``rel=1e-5``. Parameters: the updates ``final - initial`` agree to
  ``1e-5 * max|update|`` plus ``4 eps max|p|`` (each run rounds ``p + update`` once per step);
  measured <= 20% of that, while the updates are > 1000 times the rounding term.
* SFT, KTO, GRPO and RLOO built after ``use_in_trl()`` take three plain-SGD steps and log what
  the stock trainers log (``rel=1e-5, abs=1e-5``: RLOO's surrogate loss is 0 in exact
  arithmetic and keeps ~2e-6 of rounding); GRPO and RLOO run at temperature 0.7, so a head
  that dropped the trainer's temperature fails them.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from dpo_rounding import TIMING, HeadCapture, assert_logs_match, logged_tolerances  # noqa: E402
from prefopt_kernels.integrations import trl as pk_trl  # noqa: E402
from trl_cases import OURS_FILE, TRL_FILE, WORDS, head_file, llama_config, make_tokenizer  # noqa: E402
from trl_cases import restore_trl  # noqa: E402,F401 - a fixture: pytest finds it among the module's names


# --------------------------------------------------------------------------- end to end: DPOTrainer


def _dataset(model, tokenizer):
    """Four preference pairs; each chosen completion is the model's own greedy continuation, so at
    step 1 its tokens are top-1 (the mean_token_accuracy metric, from is_top1, is neither 0 nor 1)."""
    import datasets

    prompts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]
    chosen = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None,
                             bad_words_ids=[[0], [1], [2]])
        chosen.append(" " + tokenizer.decode(out[0, ids.shape[1]:]))
    return datasets.Dataset.from_dict({
        "prompt": prompts,
        "chosen": chosen,
        "rejected": [" w20", " w21 w22 w23", " w24", " w25 w26"],
    })


def _train_dpo(base, tokenizer, dataset, output_dir, ref=None, steps=2, bf16=False, patch=False):
    """A stock DPOTrainer trained ``steps`` steps; returns it, its heads' files and a
    :class:`HeadCapture` of every LM-head call (for the logged values' tolerances)."""
    from trl import DPOConfig, DPOTrainer

    # Plain SGD (see the module docstring): the final parameters are then linear in the gradients.
    args = DPOConfig(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2, logging_steps=1,
                     optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                     bf16=bf16, save_strategy="no", seed=0, disable_tqdm=True)
    capture = HeadCapture()
    trainer = DPOTrainer(model=capture.watch(copy.deepcopy(base)),
                         ref_model=capture.watch(copy.deepcopy(base if ref is None else ref)),
                         args=args, train_dataset=dataset, processing_class=tokenizer)
    capture.wrap(trainer)
    if patch:
        pk_trl.apply_to_trainer(trainer)
    heads = (head_file(trainer.model), head_file(trainer.ref_model))
    trainer.train()
    return trainer, heads, capture


def test_apply_to_trainer_keeps_mixed_precision(tmp_path, monkeypatch):
    """bf16 autocast: a stock DPOTrainer patched after construction scores its (already prepared)
    reference on our head inside the accelerator's autocast, as TRL's head does; one step logs TRL's
    values."""
    calls = []
    counted = pk_trl.linear_token_logprobs
    monkeypatch.setattr(pk_trl, "linear_token_logprobs", lambda *a, **k: calls.append(1) or counted(*a, **k))
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(vocab_size=len(WORDS))).eval()
    torch.manual_seed(1)
    reference = LlamaForCausalLM(llama_config(vocab_size=len(WORDS))).eval()
    tokenizer = make_tokenizer()
    dataset = _dataset(base, tokenizer)
    stock, _, stock_heads = _train_dpo(base, tokenizer, dataset, tmp_path / "stock", ref=reference, steps=1,
                                       bf16=True)
    assert not calls
    ours, heads, our_heads = _train_dpo(base, tokenizer, dataset, tmp_path / "ours", ref=reference, steps=1,
                                        bf16=True, patch=True)
    assert heads == (OURS_FILE, OURS_FILE)
    assert len(calls) == 2  # the step's policy and reference forwards, both on our head
    logs = stock.state.log_history
    assert_logs_match(ours.state.log_history, logs, logged_tolerances(stock, our_heads, stock_heads, logs))


def test_dpo_trainer_end_to_end(tmp_path, restore_trl):
    """A stock DPOTrainer and one built after use_in_trl(): same seed, model copy and data; two SGD
    steps; every logged metric and the final parameters agree (tolerances: module docstring)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(vocab_size=len(WORDS))).eval()
    tokenizer = make_tokenizer()
    dataset = _dataset(base, tokenizer)
    initial = {k: v.clone() for k, v in base.state_dict().items()}

    stock, stock_heads, stock_capture = _train_dpo(base, tokenizer, dataset, tmp_path / "stock")
    assert stock_heads == (TRL_FILE, TRL_FILE)

    import trl.trainer.dpo_trainer as dpo_trainer

    pk_trl.use_in_trl()  # undone by the restore_trl fixture
    assert dpo_trainer.add_fused_lm_head is pk_trl.add_fused_lm_head
    ours, ours_heads, our_capture = _train_dpo(base, tokenizer, dataset, tmp_path / "ours")
    assert ours_heads == (OURS_FILE, OURS_FILE)

    logs_stock, logs_ours = stock.state.log_history, ours.state.log_history
    assert len(logs_stock) == len(logs_ours) == 3  # two logged steps and the summary
    assert "loss" in logs_stock[0] and "logits/chosen" in logs_stock[0]
    assert 0.0 < logs_stock[0]["mean_token_accuracy"] < 1.0  # is_top1 took both values
    assert_logs_match(logs_ours, logs_stock, logged_tolerances(stock, our_capture, stock_capture, logs_stock))
    # The second step saw a trained policy: non-zero rewards, so the comparison covered them.
    assert logs_stock[1]["rewards/margins"] != 0.0

    # Final parameters: compare the updates (final - initial). Each run rounds ``p + update`` once
    # per step (<= 1 ulp of |p| each, 2 steps), on top of the gradients' relative rounding.
    final_stock, final_ours = stock.model.state_dict(), ours.model.state_dict()
    eps = torch.finfo(torch.float32).eps
    for name, start in initial.items():
        update_stock, update_ours = final_stock[name] - start, final_ours[name] - start
        tol = 1e-5 * update_stock.abs().max() + 4 * eps * start.abs().max()
        assert (update_ours - update_stock).abs().max() <= tol, name
    # The updates are far above that tolerance, so the comparison checks the gradients.
    head_update = final_stock["lm_head.weight"] - initial["lm_head.weight"]
    assert head_update.abs().max() > 1e3 * 4 * eps * initial["lm_head.weight"].abs().max()


# --------------------------------------------------------------------------- end to end: SFT, KTO, GRPO, RLOO


def _reward(completions, **kwargs):
    """A reward that varies across completions (so GRPO/RLOO advantages, hence losses, are non-zero)."""
    return [float(sum(map(ord, text)) % 7) for text in completions]


def _build_trainer(kind, base, tokenizer, output_dir, policy_dir):
    import datasets
    import trl

    common = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, logging_steps=1,
                  optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                  bf16=False, save_strategy="no", seed=0, disable_tqdm=True)
    prompts = ["w1 w2", "w3", "w4 w5 w6", "w7"]
    torch.manual_seed(0)
    if kind == "sft":
        data = datasets.Dataset.from_dict({"text": ["w1 w2 w3 w4 w5", "w6 w7 w8", "w9 w10 w11 w12", "w13 w14"]})
        return trl.SFTTrainer(model=copy.deepcopy(base), args=trl.SFTConfig(**common), train_dataset=data,
                              processing_class=tokenizer)
    if kind == "kto":
        torch.manual_seed(1)
        reference = LlamaForCausalLM(llama_config(vocab_size=len(WORDS))).eval()
        data = datasets.Dataset.from_dict({"prompt": prompts, "completion": [" w8", " w9 w10", " w11", " w12 w13"],
                                           "label": [True, False, True, False]})
        return trl.KTOTrainer(model=copy.deepcopy(base), ref_model=reference, args=trl.KTOConfig(**common),
                              train_dataset=data, processing_class=tokenizer)
    # GRPO and RLOO load their reference (beta > 0) from the policy's name: a directory here.
    trainer_class, config_class = {"grpo": (trl.GRPOTrainer, trl.GRPOConfig),
                                   "rloo": (trl.RLOOTrainer, trl.RLOOConfig)}[kind]
    args = config_class(num_generations=2, max_completion_length=4, beta=0.1, temperature=0.7, **common)
    return trainer_class(model=str(policy_dir), reward_funcs=_reward, args=args,
                         train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)


@pytest.mark.parametrize("kind", ["sft", "kto", "grpo", "rloo"])
def test_other_trainers_match_stock(tmp_path, restore_trl, kind):
    """SFT, KTO, GRPO and RLOO built after use_in_trl(): three SGD steps on our head log what the stock
    trainer logs on TRL's (same seed, data and models; generation samples alike, as it runs no head)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(vocab_size=len(WORDS))).eval()
    tokenizer = make_tokenizer()
    base.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    runs = []
    for patched in (False, True):
        if patched:
            pk_trl.use_in_trl()  # undone by the restore_trl fixture
        trainer = _build_trainer(kind, base, tokenizer, tmp_path / f"run{patched}", tmp_path / "policy")
        assert head_file(trainer.model) == (OURS_FILE if patched else TRL_FILE)
        trainer.train()
        runs.append(trainer.state.log_history)
    stock, ours = runs
    assert len(stock) == len(ours) == 4
    for step, (a, b) in enumerate(zip(ours, stock)):
        assert a.keys() == b.keys(), step
        for key, value in b.items():
            if key in TIMING or key == "step_time" or not isinstance(value, float):
                continue
            # abs: a value formed by cancellation (RLOO's surrogate loss is 0 in exact arithmetic,
            # a mean of advantage-sized terms) keeps a few fp32 ulps of those terms.
            assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (step, key, a[key], value)
    if kind != "rloo":  # RLOO's surrogate loss is 0 in value: leave-one-out advantages sum to 0
        assert any(logs["loss"] != 0.0 for logs in stock[:3])
    if kind in ("grpo", "rloo"):
        assert stock[2]["kl"] > 0.0  # the reference's log-probs, from the fused head, entered the logs
