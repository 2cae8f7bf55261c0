r"""PrefOptDPOTrainer against TRL 1.16's DPOTrainer, and its own loss types end to end.

Tiny random Llamas from configs in code, a WordLevel tokenizer built in code and four
in-memory preference pairs; nothing is downloaded. Skipped without TRL (or transformers).

* Every loss type TRL 1.16's ``DPOConfig`` lists goes to TRL's own ``_compute_loss``, on our
  fused LM head in ``PrefOptDPOTrainer`` and on TRL's in ``DPOTrainer``. Each
  alone (with the ``label_smoothing`` that ``exo_pair`` and ``robust`` need), mixes with
  ``loss_weights``, the f-divergences (alpha, JS, forward KL), WPO ``use_weighting``,
  ``ld_alpha``, ``label_smoothing``, precomputed reference log-probs and TR-DPO's synced
  reference: three plain-SGD steps (fp32, lr 0.1, same seed and data, copies of one policy
  and of a different reference) of a stock ``DPOTrainer`` and of ``PrefOptDPOTrainer`` log
  the same values, take the same parameter gradients at every step and leave the same
  policy and reference (``1e-5`` relative in each tensor's norm). Every logged key but the
  timings is compared within a bound on fp32 rounding, not a measured tolerance
  (``dpo_rounding``): both heads' worst-case rounding of each token's outputs plus the
  exact effect of the runs' parameter drift, carried through the way TRL forms the key (a
  reward, a difference of log-prob sums of magnitude ~10, gets a tolerance proportional to
  those magnitudes); counts, the step and the gradient norm to ``rel=1e-5``. A case that
  stock TRL itself fails is an expected failure naming the cause. One bf16 mixed-precision
  step, and LoRA without a reference model, log the same values too.
* ``sparse_po`` (each mask kind), ``tdpo1``, ``tdpo2``, ``simpo``, ``inpo`` train 10 steps:
  finite losses, TRL's metric names plus the losses' own, a non-zero gradient for every
  policy parameter tensor that feeds the loss (the learned mask's included) at every step.
* ``tdpo2`` and learned-mask ``sparse_po``: the loss and the LM-head gradient of one batch
  equal the same loss written out over the full fp64 logits (``rel=1e-5`` on the loss: fp32
  tiles against fp64; a KL taken in the wrong direction moves it by ~4%).
* INPO's ``prev_model`` enters the loss; the trainer rejects unsupported combinations (the
  config's are rows of test_integrations_bad_input.py).
"""

from __future__ import annotations

import copy
import inspect
import math
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402
import trl.trainer.dpo_trainer as trl_dpo_module  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from dpo_rounding import HeadCapture, assert_logs_match, logged_tolerances  # noqa: E402
from launch import run_workers  # noqa: E402
from prefopt_kernels.integrations import trl as pk_trl  # noqa: E402
from prefopt_kernels.integrations.trl_dpo import (  # noqa: E402
    MASK_MODULE_NAME,
    PrefOptDPOConfig,
    PrefOptDPOTrainer,
)

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
TRL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "entropy", "logits/chosen", "logits/rejected",
               "mean_token_accuracy", "num_tokens")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config)


PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]


def _dataset(chosen=(" w11 w12", " w13", " w14 w15 w16", " w17 w18")):
    return datasets.Dataset.from_dict({
        "prompt": PROMPTS,
        "chosen": list(chosen),
        "rejected": [" w20", " w21 w22 w23", " w24", " w25 w26"],
    })


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


def _args(config_class, output_dir, steps, learning_rate=1.0, bf16=False, **kwargs):
    # Plain SGD, constant lr: the parameters are then a deterministic function of the gradients.
    return config_class(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2,
                        logging_steps=1, optim="sgd", learning_rate=learning_rate, lr_scheduler_type="constant",
                        report_to=[], use_cpu=True, bf16=bf16, save_strategy="no", seed=0,
                        disable_tqdm=True, **kwargs)


class GradientProbe(TrainerCallback):
    """Records, before each optimizer step, which trainable parameter tensors have a non-zero gradient."""

    def __init__(self):
        self.zero_grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.zero_grads.append(sorted(name for name, p in model.named_parameters()
                                      if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)))


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


@pytest.mark.parametrize("case", ["tdpo1", "sparse_po_learned"])
def test_token_level_losses_under_bf16_score_both_models_alike(tmp_path, case):
    """bf16 autocast with the reference a copy of the policy: both backbones run in autocast (the
    reference's is called past accelerate's wrapper), so the first step's rewards and KL are 0."""
    base, tokenizer = _model(), _tokenizer()
    args = _args(PrefOptDPOConfig, tmp_path, 1, 0.1, bf16=True, beta=0.5, **CASES[case])
    trainer = PrefOptDPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=args,
                                train_dataset=_dataset(), processing_class=tokenizer)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["rewards/chosen"] == logs["rewards/rejected"] == logs["rewards/margins"] == 0.0, logs
    assert logs["kl/chosen"] == logs["kl/rejected"] == 0.0, logs


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
    base, reference, tokenizer = _model(), _model(seed=1), _tokenizer()
    runs = []
    for trainer_class, config_class in ((DPOTrainer, DPOConfig), (PrefOptDPOTrainer, PrefOptDPOConfig)):
        args = _args(config_class, tmp_path / trainer_class.__name__, 1, 0.1, bf16=True, beta=0.5)
        capture = HeadCapture()
        trainer = _captured(trainer_class, capture, model=copy.deepcopy(base), ref_model=copy.deepcopy(reference),
                            args=args, train_dataset=_dataset(), processing_class=tokenizer)
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
    base, reference, tokenizer = _model(), _model(seed=1), _tokenizer()
    chosen = _greedy_chosen(base, tokenizer)
    kwargs = dict(TRL_CASES[case])
    kwargs.setdefault("beta", 0.5)
    runs = []
    for trainer_class, config_class in ((DPOTrainer, DPOConfig), (PrefOptDPOTrainer, PrefOptDPOConfig)):
        recorder, capture = GradientRecorder(), HeadCapture()
        trainer = _captured(trainer_class, capture, model=copy.deepcopy(base), ref_model=copy.deepcopy(reference),
                            args=_args(config_class, tmp_path / trainer_class.__name__, 3, PARITY_LR, **kwargs),
                            train_dataset=_dataset(chosen), processing_class=tokenizer, callbacks=[recorder])
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


CASES = {
    "sparse_po_learned": dict(loss_type="sparse_po", sparse_po_mask="learned", sparse_po_l1_reward=1e-3,
                              sparse_po_l1_kl=1e-3, sparse_po_separate_kl_mask=True),
    "sparse_po_activation": dict(loss_type="sparse_po", sparse_po_mask="activation"),
    "sparse_po_none": dict(loss_type="sparse_po", sparse_po_mask="none"),
    "tdpo1": dict(loss_type="tdpo1"),
    "tdpo2": dict(loss_type="tdpo2", tdpo_alpha=0.5),
    "simpo": dict(loss_type="simpo", simpo_gamma=0.5, beta=2.0),
    "inpo": dict(loss_type="inpo", inpo_eta=0.5, inpo_tau=1.0),
}
OWN_METRICS = {
    "sparse_po_learned": ("kl/chosen", "kl/rejected", "mask/density", "mask/kl_density"),
    "sparse_po_activation": ("kl/chosen", "kl/rejected", "mask/density", "mask/kl_density"),
    "sparse_po_none": ("kl/chosen", "kl/rejected", "mask/density"),
    "tdpo1": ("kl/chosen", "kl/rejected"),
    "tdpo2": ("kl/chosen", "kl/rejected"),
    "simpo": (),
    "inpo": (),
}


TRAIN_STEPS = 10


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefopt_loss_types_train(tmp_path, case):
    """Ten SGD steps (lr 0.1): finite losses, TRL's and the loss's metrics, every parameter trained."""
    base, tokenizer = _model(), _tokenizer()
    kwargs = dict(CASES[case])
    kwargs.setdefault("beta", 0.5)
    args = _args(PrefOptDPOConfig, tmp_path, TRAIN_STEPS, 0.1, **kwargs)
    probe = GradientProbe()
    reference = None if case == "simpo" else copy.deepcopy(base)  # SimPO has no reference
    trainer = PrefOptDPOTrainer(model=copy.deepcopy(base), ref_model=reference, args=args,
                                train_dataset=_dataset(), processing_class=tokenizer, callbacks=[probe])
    mask = getattr(trainer.model, MASK_MODULE_NAME, None)
    assert (mask is not None) == (case == "sparse_po_learned")
    # Our patches keep the forward's signature (Trainer reads it to pick the dataset columns).
    assert list(inspect.signature(trainer.model.forward).parameters)[:2] == ["input_ids", "attention_mask"]
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()

    steps = trainer.state.log_history[:-1]
    assert len(steps) == TRAIN_STEPS
    for logs in steps:
        for key in TRL_METRICS + OWN_METRICS[case]:
            assert math.isfinite(logs[key]), (key, logs[key])
    assert len(probe.zero_grads) == TRAIN_STEPS
    # Llama's embedding rows of unused tokens get no gradient, but each tensor as a whole does.
    assert probe.zero_grads == [[]] * TRAIN_STEPS
    final = trainer.model.state_dict()
    for name, start in initial.items():
        assert not torch.equal(final[name], start), name
    if case == "sparse_po_learned":
        assert any(name.startswith(MASK_MODULE_NAME) for name in initial)
        assert 0.0 < steps[0]["mask/density"] <= 1.0
    # The reference stays frozen.
    assert (trainer.ref_model is None) == (case == "simpo")
    for name, p in (trainer.ref_model.state_dict().items() if reference is not None else ()):
        assert torch.equal(p, base.state_dict()[name]), name


def _lora():
    peft = pytest.importorskip("peft")
    # TRL refuses an adapter on lm_head: its log-probs read lm_head.weight directly.
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def test_peft_policy_matches_stock_dpo(tmp_path, monkeypatch):
    """LoRA without a ref_model (the reference is the policy with its adapter disabled): three SGD
    steps of PrefOptDPOTrainer log stock DPOTrainer's values, with our head on the PEFT base model."""
    _lora()
    fused_calls = []
    counted = pk_trl.linear_token_logprobs
    monkeypatch.setattr(pk_trl, "linear_token_logprobs", lambda *a, **k: fused_calls.append(1) or counted(*a, **k))
    base, tokenizer = _model(), _tokenizer()
    runs = []
    for trainer_class, config_class in ((DPOTrainer, DPOConfig), (PrefOptDPOTrainer, PrefOptDPOConfig)):
        torch.manual_seed(0)  # the adapters' initialisation
        capture = HeadCapture()
        trainer = _captured(trainer_class, capture, model=copy.deepcopy(base),
                            args=_args(config_class, tmp_path / trainer_class.__name__, 3, 0.5, beta=0.5),
                            train_dataset=_dataset(), processing_class=tokenizer, peft_config=_lora())
        assert trainer.ref_model is None
        calls_before = len(fused_calls)
        trainer.train()
        runs.append((trainer.state.log_history, len(fused_calls) - calls_before, capture))
    (stock, stock_calls, stock_heads), (ours, our_calls, our_heads) = runs
    assert stock_calls == 0 and our_calls >= 6  # policy and adapter-disabled reference, every step
    assert stock[-2]["rewards/margins"] != 0.0  # the adapters moved the policy off the reference
    assert_logs_match(ours, stock, logged_tolerances(trainer, our_heads, stock_heads, stock))


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefopt_loss_types_train_with_peft(tmp_path, case):
    """Each package loss on a LoRA policy: the reference is the adapter-disabled policy, so the first
    step's rewards and KL are 0 (the adapters start as the identity); the adapters (and a learned
    mask) train, the base weights stay frozen."""
    lora = _lora()
    base, tokenizer = _model(), _tokenizer()
    kwargs = dict(CASES[case])
    kwargs.setdefault("beta", 0.5)
    probe = GradientProbe()
    torch.manual_seed(0)
    trainer = PrefOptDPOTrainer(model=copy.deepcopy(base), args=_args(PrefOptDPOConfig, tmp_path, 3, 0.5, **kwargs),
                                train_dataset=_dataset(), processing_class=tokenizer, peft_config=lora,
                                callbacks=[probe])
    assert trainer.ref_model is None
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or MASK_MODULE_NAME in name for name in trainable)
    assert any(MASK_MODULE_NAME in name for name in trainable) == (case == "sparse_po_learned")
    trainer.train()
    steps = trainer.state.log_history[:-1]
    assert len(steps) == 3 and all(math.isfinite(logs["loss"]) for logs in steps)
    if case != "simpo":  # SimPO's rewards are the policy's own length-normalised log-probs
        # Policy = reference at first; later the trained adapters separate them (a reference that
        # kept the adapters on would leave every reward at 0).
        assert steps[0]["rewards/margins"] == 0.0 and steps[-1]["rewards/margins"] != 0.0
    for key in ("kl/chosen", "kl/rejected"):
        if key in steps[0]:
            assert abs(steps[0][key]) < 1e-6 < steps[-1][key], (key, steps[0][key], steps[-1][key])
    assert steps[-1]["loss"] != steps[0]["loss"]
    # LoRA's B starts at 0, so A's first gradient is 0; from then on every adapter (and mask)
    # tensor gets one.
    assert probe.zero_grads[0] and all("lora_A" in name for name in probe.zero_grads[0])
    assert probe.zero_grads[1:] == [[]] * 2
    frozen = dict(trainer.model.get_base_model().named_parameters())
    for name, value in base.state_dict().items():
        assert torch.equal(frozen[name.replace("q_proj.weight", "q_proj.base_layer.weight")
                                 .replace("v_proj.weight", "v_proj.base_layer.weight")], value), name


def test_inpo_previous_iterate_enters_the_loss(tmp_path):
    """INPO with ``ητ < 1``: a ``prev_model`` unlike the reference changes the loss; other losses refuse one."""
    base, tokenizer, dataset = _model(), _tokenizer(), _dataset()
    losses = []
    for prev in (None, _model(seed=1)):
        args = _args(PrefOptDPOConfig, tmp_path, 1, loss_type="inpo", inpo_eta=0.5, inpo_tau=1.0)
        trainer = PrefOptDPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=args,
                                    train_dataset=dataset, processing_class=tokenizer, prev_model=prev)
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] != losses[1]
    with pytest.raises(ValueError, match="prev_model"):
        PrefOptDPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base),
                          args=_args(PrefOptDPOConfig, tmp_path, 1, loss_type="tdpo1"), train_dataset=dataset,
                          processing_class=tokenizer, prev_model=_model(seed=1))


def _refuse_trl_head(*args, **kwargs):
    raise AssertionError("TRL's own fused LM head was installed")


def test_precomputed_reference_log_probs_come_from_our_head(tmp_path, monkeypatch):
    """``precompute_ref_log_probs``: the reference pass at construction runs on our head (TRL's is
    never installed) and stores the float64 completion log-probs of the reference's full logits."""
    monkeypatch.setattr(trl_dpo_module, "add_fused_lm_head", _refuse_trl_head)
    calls = []
    counted = pk_trl.linear_token_logprobs
    monkeypatch.setattr(pk_trl, "linear_token_logprobs", lambda *a, **k: calls.append(1) or counted(*a, **k))
    policy, reference, tokenizer = _model(seed=0), _model(seed=1), _tokenizer()
    args = _args(PrefOptDPOConfig, tmp_path, 1, loss_type="sigmoid", precompute_ref_log_probs=True,
                 precompute_ref_batch_size=4)
    trainer = PrefOptDPOTrainer(model=policy, ref_model=copy.deepcopy(reference), args=args,
                                train_dataset=_dataset(), processing_class=tokenizer)
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


@pytest.mark.parametrize("by_name", [False, True])
def test_simpo_loads_no_reference(tmp_path, monkeypatch, by_name):
    """SimPO is reference-free: no reference is loaded from the policy's name, and one passed is refused.
    The other loss types still get TRL's reference from the policy's name."""
    base, tokenizer = _model(), _tokenizer()
    model = base
    if by_name:
        base.save_pretrained(tmp_path / "policy")
        model = str(tmp_path / "policy")
    loads = []
    load = trl_dpo_module.create_model_from_path
    monkeypatch.setattr(trl_dpo_module, "create_model_from_path", lambda path, **k: loads.append(path) or load(path, **k))
    simpo = _args(PrefOptDPOConfig, tmp_path / "simpo", 2, loss_type="simpo", beta=2.0)
    trainer = PrefOptDPOTrainer(model=model, args=simpo, train_dataset=_dataset(), processing_class=tokenizer)
    assert trainer.ref_model is None
    assert loads == ([model] if by_name else [])
    trainer.train()
    assert all(math.isfinite(logs["loss"]) for logs in trainer.state.log_history[:-1])
    with pytest.raises(ValueError, match="ref_model"):
        PrefOptDPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=simpo,
                          train_dataset=_dataset(), processing_class=tokenizer)
    if by_name:
        loads.clear()
        sigmoid = _args(PrefOptDPOConfig, tmp_path / "sigmoid", 1, loss_type="sigmoid")
        trainer = PrefOptDPOTrainer(model=model, args=sigmoid, train_dataset=_dataset(), processing_class=tokenizer)
        assert loads == [model, model] and trainer.ref_model is not None


def test_token_level_losses_under_ddp(tmp_path):
    """Two gloo ranks under DDP with ``find_unused_parameters=True``: the token-level losses read the
    LM head and the learned mask inside the wrapped forward, so every step trains and the ranks,
    fed different examples, keep equal parameters (DDP all-reduced every gradient)."""
    results = run_workers("integrations/trl_ddp_worker.py", tmp_path)
    assert sorted(results) == sorted(("tdpo1", "sparse_po_learned", "sparse_po_activation"))
    for case, result in results.items():
        assert result["wrapper"] == "DistributedDataParallel" and result["find_unused_parameters"], case
        assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"]), (case, result)
        assert result["rank_gap"] == 0.0, (case, result)


def _tiny_llava(image_token_id):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = _model().config
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=8, patch_size=4)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                     image_token_id=image_token_id))


def test_activation_mask_hooks_the_language_decoder_only(tmp_path):
    """A vision-language reference names its vision tower's layers in ``_no_split_modules`` too; the
    activation mask hooks only the language decoder's layers, and text-only training runs."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    tokenizer = _tokenizer()
    image_token = tokenizer.convert_tokens_to_ids("w60")  # not in the data
    policy, reference = _tiny_llava(image_token), _tiny_llava(image_token)
    assert any("CLIP" in name for name in reference._no_split_modules)
    args = _args(PrefOptDPOConfig, tmp_path, 2, 0.1, loss_type="sparse_po", sparse_po_mask="activation", beta=0.5)
    trainer = PrefOptDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=_dataset(),
                                processing_class=tokenizer)
    assert trainer._activation_mask.module_types == (LlamaDecoderLayer,)
    trainer.train()
    steps = trainer.state.log_history[:-1]
    assert len(steps) == 2 and all(math.isfinite(logs["loss"]) for logs in steps)
    assert 0.0 < steps[0]["mask/density"] <= 1.0


def _dense_token_terms(policy, reference, batch):
    """Per-token ``log π - log π_ref``, ``KL(π_ref ‖ π)`` and the shifted completion mask, from full logits."""
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["input_ids"][:, 1:]
    logp = torch.log_softmax(policy(**kwargs).logits[:, :-1].double(), dim=-1)
    with torch.no_grad():
        ref_logp = torch.log_softmax(reference(**kwargs).logits[:, :-1].double(), dim=-1)
    logratio = (logp - ref_logp).gather(-1, labels[..., None])[..., 0]
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return logratio, kl, batch["completion_mask"][:, 1:].bool()


@pytest.mark.parametrize("case", ["tdpo2", "sparse_po_learned"])
def test_token_level_loss_matches_dense_logits(tmp_path, case):
    """The fused loss and its policy gradient equal the loss computed from the full logits in fp64."""
    policy, reference, tokenizer = _model(seed=0), _model(seed=1), _tokenizer()
    args = _args(PrefOptDPOConfig, tmp_path, 1, beta=0.5, **CASES[case])
    trainer = PrefOptDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=_dataset(),
                                processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    fused_grad = trainer.model.lm_head.weight.grad.clone()
    trainer.model.zero_grad()

    logratio, kl, mask = _dense_token_terms(trainer.model, trainer.ref_model, batch)
    w, l = mask.chunk(2)
    (lr_w, lr_l), (kl_w, kl_l) = logratio.chunk(2), kl.chunk(2)
    if case == "tdpo2":
        u = (lr_w * w).sum(1) - (lr_l * l).sum(1)
        logits = u - 0.5 * ((kl_l * l).sum(1) - (kl_w * w).sum(1).detach())
        dense = -torch.nn.functional.logsigmoid(0.5 * logits).mean()
    else:
        with torch.no_grad():
            hidden = trainer.ref_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                             output_hidden_states=True).hidden_states
        m_u, m_d = getattr(trainer.model, MASK_MODULE_NAME)(hidden, batch["completion_mask"])
        m_u, m_d = m_u[:, 1:].double() * mask, m_d[:, 1:].double() * mask
        u = (m_u * logratio).sum(1)
        d = (m_d * kl).sum(1)
        (u_w, u_l), (d_w, d_l) = u.chunk(2), d.chunk(2)
        l1 = m_u.sum(1).view(2, -1).sum(0) + m_d.sum(1).view(2, -1).sum(0)
        dense = (-torch.nn.functional.logsigmoid(0.5 * ((u_w - u_l) - (d_l - d_w))) + 1e-3 * l1).mean()
    dense.backward()
    dense_grad = trainer.model.lm_head.weight.grad
    assert loss.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-6)
    assert abs(loss.item()) > 1e-2  # policy and reference differ, so the comparison covers the KL terms
    torch.testing.assert_close(fused_grad, dense_grad.to(fused_grad.dtype), rtol=1e-4,
                               atol=1e-5 * dense_grad.abs().max().item())
