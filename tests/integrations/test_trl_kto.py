r"""PrefOptKTOTrainer against TRL 1.16's KTOTrainer, and its first step against float64 logits.

Tiny random Llamas from configs in code, a WordLevel tokenizer built in code and six in-memory
unpaired completions (trl_cases.py); nothing is downloaded. Skipped without TRL (or transformers).

* Three plain-SGD steps (fp32, lr 0.5, same seed, data and model copies, a reference different
  from the policy) of a stock ``KTOTrainer`` on TRL's head and of ``PrefOptKTOTrainer`` on ours
  log the same values (``rel=1e-5, abs=1e-5``, as the stock trainers on our head in
  test_trl_trainers.py) and leave the same policy (updates within ``1e-5`` of their largest
  entry plus ``4 eps |p|``: each run rounds ``p + update`` once per step). The batches hold one
  desirable and one undesirable, two desirable, and two undesirable completions, so a step with an empty side is run.
* A LoRA policy without a reference model (the reference is its base model, adapter off) logs the
  same values as stock too.
* The first step's loss and ``kl`` are the KTO formula on float64 full-logit log-probs of both
  models over that step's batch, completions and mismatched KL pairs as TRL's collator builds them.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("datasets")

import datasets  # noqa: E402
import torch  # noqa: E402
import trl.trainer.kto_trainer as trl_kto_module  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from trl import KTOConfig, KTOTrainer  # noqa: E402

from prefopt_kernels.integrations.trl_kto import PrefOptKTOConfig, PrefOptKTOTrainer  # noqa: E402
from trl_cases import (OURS_FILE, TRL_FILE, WORDS, head_file, llama_config, lora_config,  # noqa: E402
                       make_tokenizer, training_args)

STEPS = 3
LABELS = [True, False, True, True, False, False]
CASES = {
    "kto": dict(loss_type="kto", beta=0.5, desirable_weight=1.3, undesirable_weight=0.8),
    "apo_zero_unpaired": dict(loss_type="apo_zero_unpaired", beta=0.5),
    "kto_precomputed_reference": dict(loss_type="kto", precompute_ref_log_probs=True),
}


def _dataset():
    return datasets.Dataset.from_dict({
        "prompt": ["w1 w2", "w3", "w4 w5 w6", "w7", "w8 w9", "w10 w11 w12"],
        "completion": [" w20", " w21 w22", " w23", " w24 w25 w26", " w27 w28", " w29"],
        "label": LABELS,
    })


def _models():
    torch.manual_seed(0)
    policy = LlamaForCausalLM(llama_config(vocab_size=len(WORDS))).eval()
    torch.manual_seed(1)
    reference = LlamaForCausalLM(llama_config(vocab_size=len(WORDS))).eval()
    with torch.no_grad():  # a peakier reference: random completions are less likely under it, so z > 0
        reference.lm_head.weight.mul_(3.0)
    return policy, reference


def _train(trainer_class, config_class, output_dir, options, peft_config=None):
    """``STEPS`` steps; with ``peft_config`` a LoRA policy whose reference is its base model (no ``ref_model``)."""
    policy, reference = _models()
    args = training_args(config_class, output_dir, STEPS, learning_rate=0.5, **options)
    trainer = trainer_class(model=policy, ref_model=None if peft_config else reference, args=args,
                            train_dataset=_dataset(), processing_class=make_tokenizer(), peft_config=peft_config)
    if peft_config is None:
        heads = (head_file(trainer.model), head_file(trainer.accelerator.unwrap_model(trainer.ref_model)))
    else:
        heads = (head_file(trainer.model.get_base_model()),)
    trainer.train()
    return trainer, heads


def _assert_logs_match(ours, stock):
    logs_stock, logs_ours = stock.state.log_history, ours.state.log_history
    assert len(logs_stock) == len(logs_ours) == STEPS + 1
    for step, (a, b) in enumerate(zip(logs_ours, logs_stock)):
        assert a.keys() == b.keys(), step
        for key, value in b.items():
            if isinstance(value, float) and "runtime" not in key and "per_second" not in key and key != "step_time":
                assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (step, key, a[key], value)
    return logs_stock


@pytest.mark.parametrize("case", list(CASES))
def test_kto_trainer_matches_stock(tmp_path, case):
    initial = {k: v.clone() for k, v in _models()[0].state_dict().items()}
    stock, stock_heads = _train(KTOTrainer, KTOConfig, tmp_path / "stock", CASES[case])
    ours, our_heads = _train(PrefOptKTOTrainer, PrefOptKTOConfig, tmp_path / "ours", CASES[case])
    assert stock_heads == (TRL_FILE, TRL_FILE) and our_heads == (OURS_FILE, OURS_FILE)
    assert trl_kto_module.add_fused_lm_head.__code__.co_filename == TRL_FILE  # rebound for construction only

    logs_stock = _assert_logs_match(ours, stock)
    assert "rewards/margins" in logs_stock[0] and "rewards/margins" not in logs_stock[1]  # one-sided batches
    assert "logps/chosen" in logs_stock[1] and "logps/rejected" not in logs_stock[1]
    assert "logps/rejected" in logs_stock[2] and "logps/chosen" not in logs_stock[2]
    if CASES[case]["loss_type"] == "kto":
        assert all(logs["kl"] > 0.1 for logs in logs_stock[:STEPS])  # the KL term entered every loss

    final_stock, final_ours = stock.model.state_dict(), ours.model.state_dict()
    eps = torch.finfo(torch.float32).eps
    for name, start in initial.items():
        update_stock, update_ours = final_stock[name] - start, final_ours[name] - start
        tol = 1e-5 * update_stock.abs().max() + 4 * eps * start.abs().max()
        assert (update_ours - update_stock).abs().max() <= tol, name
    head_update = final_stock["lm_head.weight"] - initial["lm_head.weight"]
    assert head_update.abs().max() > 1e3 * 4 * eps * initial["lm_head.weight"].abs().max()


def test_kto_trainer_with_lora_matches_stock(tmp_path):
    """A LoRA policy, no ref_model: the reference is the base model with the adapter off, on our head too."""
    stock, stock_heads = _train(KTOTrainer, KTOConfig, tmp_path / "stock", CASES["kto"], lora_config())
    ours, our_heads = _train(PrefOptKTOTrainer, PrefOptKTOConfig, tmp_path / "ours", CASES["kto"], lora_config())
    assert stock_heads == (TRL_FILE,) and our_heads == (OURS_FILE,) and ours.ref_model is None
    logs_stock = _assert_logs_match(ours, stock)
    assert logs_stock[1]["kl"] > 0.0 and logs_stock[1]["rewards/chosen"] != 0.0  # the adapter has trained


def _float64_logps(model, ids, attention_mask, completion_mask):
    """Summed completion log-probs ``[B]`` from float64 full logits (log_softmax, gather)."""
    model = model.double()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1]
    token = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.where(completion_mask[:, 1:].bool(), token, 0.0).sum(1)


def test_first_kto_step_is_the_formula_on_float64_logits(tmp_path):
    beta, ld, lu = 0.5, 1.3, 0.8
    trainer, _ = _train(PrefOptKTOTrainer, PrefOptKTOConfig, tmp_path, CASES["kto"])
    first = trainer.state.log_history[0]
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["label"].tolist() == LABELS[:2]
    policy, reference = _models()
    logps, kl_logps = {}, {}
    for name, model in (("policy", policy), ("reference", reference)):
        logps[name] = _float64_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        kl_logps[name] = _float64_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"],
                                        batch["KL_completion_mask"])
    z0 = max(0.0, (kl_logps["policy"] - kl_logps["reference"]).mean().item())
    assert z0 > 0.1  # the KL term is in the loss
    losses = []
    for label, r in zip(LABELS[:2], (logps["policy"] - logps["reference"]).tolist()):
        if label:
            losses.append(ld * (1 - 1 / (1 + math.exp(-beta * (r - z0)))))
        else:
            losses.append(lu * (1 - 1 / (1 + math.exp(-beta * (z0 - r)))))
    # The step's values in fp32 against float64: rounding of logits of magnitude ~1 over a few tokens.
    assert first["kl"] == pytest.approx(z0, abs=1e-5)
    assert first["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert first["logps/chosen"] == pytest.approx(logps["policy"][batch["label"]].mean().item(), rel=1e-5)
    assert first["logps/rejected"] == pytest.approx(logps["policy"][~batch["label"]].mean().item(), rel=1e-5)


@pytest.mark.parametrize("field, value, message", [
    ("loss_type", "bco", "loss_type must be one of"),
    ("beta", math.nan, "beta must be finite"),
    ("beta", 0.0, "beta must be > 0"),
    ("desirable_weight", -0.5, "desirable_weight must be >= 0"),
    ("undesirable_weight", math.inf, "undesirable_weight must be finite"),
])
def test_kto_options_are_checked(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        PrefOptKTOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{field: value})
    # A plain KTOConfig accepts them; the trainer refuses them before building anything.
    args = KTOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{field: value})
    policy, reference = _models()
    with pytest.raises(ValueError, match=message):
        PrefOptKTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=_dataset(),
                          processing_class=make_tokenizer())
