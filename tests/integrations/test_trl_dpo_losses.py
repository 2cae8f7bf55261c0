r"""The package's own loss types in PrefOptDPOTrainer, end to end (``LOSS_CASES`` of trl_cases.py).

Tiny random Llamas from configs in code, a WordLevel tokenizer built in code and four
in-memory preference pairs (trl_cases.py); nothing is downloaded. Skipped without TRL (or
transformers).

* ``sparse_po`` (each mask kind), ``tdpo1``, ``tdpo2``, ``simpo``, ``inpo`` train 10 steps:
  finite losses, TRL's metric names plus the losses' own, a non-zero gradient for every
  policy parameter tensor that feeds the loss (the learned mask's included) at every step;
  on a LoRA policy the adapters (and a learned mask) train and the base weights stay frozen.
* ``tdpo2`` and learned-mask ``sparse_po``: the loss and the LM-head gradient of one batch
  equal the same loss written out over the full fp64 logits (``rel=1e-5`` on the loss: fp32
  tiles against fp64; a KL taken in the wrong direction moves it by ~4%).
* INPO's ``prev_model`` enters the loss, SimPO loads no reference, the token-level losses
  score both models alike under bf16 and train under two-rank DDP (trl_ddp_worker.py), and
  the activation mask hooks only a vision-language model's language decoder; the trainer
  rejects unsupported combinations (the config's are rows of test_integrations_bad_input.py).
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("datasets")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
import trl.trainer.dpo_trainer as trl_dpo_module  # noqa: E402

from launch import run_workers  # noqa: E402
from prefopt_kernels.integrations.trl_dpo import (  # noqa: E402
    MASK_MODULE_NAME,
    PrefOptDPOConfig,
    PrefOptDPOTrainer,
)
from trl_cases import (LOSS_CASES, lora_config, make_dataset, make_tokenizer, make_word_llama,  # noqa: E402
                       training_args)


TRL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "entropy", "logits/chosen", "logits/rejected",
               "mean_token_accuracy", "num_tokens")


class GradientProbe(TrainerCallback):
    """Records, before each optimizer step, which trainable parameter tensors have a non-zero gradient."""

    def __init__(self):
        self.zero_grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.zero_grads.append(sorted(name for name, p in model.named_parameters()
                                      if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)))


# The metrics each of LOSS_CASES logs besides TRL's.
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


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_prefopt_loss_types_train(tmp_path, case):
    """Ten SGD steps (lr 0.1): finite losses, TRL's and the loss's metrics, every parameter trained."""
    base, tokenizer = make_word_llama(), make_tokenizer()
    kwargs = dict(LOSS_CASES[case])
    kwargs.setdefault("beta", 0.5)
    args = training_args(PrefOptDPOConfig, tmp_path, TRAIN_STEPS, 0.1, **kwargs)
    probe = GradientProbe()
    reference = None if case == "simpo" else copy.deepcopy(base)  # SimPO has no reference
    trainer = PrefOptDPOTrainer(model=copy.deepcopy(base), ref_model=reference, args=args,
                                train_dataset=make_dataset(), processing_class=tokenizer, callbacks=[probe])
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


@pytest.mark.parametrize("case", ["tdpo1", "sparse_po_learned"])
def test_token_level_losses_under_bf16_score_both_models_alike(tmp_path, case):
    """bf16 autocast with the reference a copy of the policy: both backbones run in autocast (the
    reference's is called past accelerate's wrapper), so the first step's rewards and KL are 0."""
    base, tokenizer = make_word_llama(), make_tokenizer()
    args = training_args(PrefOptDPOConfig, tmp_path, 1, 0.1, bf16=True, beta=0.5, **LOSS_CASES[case])
    trainer = PrefOptDPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=args,
                                train_dataset=make_dataset(), processing_class=tokenizer)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["rewards/chosen"] == logs["rewards/rejected"] == logs["rewards/margins"] == 0.0, logs
    assert logs["kl/chosen"] == logs["kl/rejected"] == 0.0, logs


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_prefopt_loss_types_train_with_peft(tmp_path, case):
    """Each package loss on a LoRA policy: the reference is the adapter-disabled policy, so the first
    step's rewards and KL are 0 (the adapters start as the identity); the adapters (and a learned
    mask) train, the base weights stay frozen."""
    lora = lora_config()
    base, tokenizer = make_word_llama(), make_tokenizer()
    kwargs = dict(LOSS_CASES[case])
    kwargs.setdefault("beta", 0.5)
    probe = GradientProbe()
    torch.manual_seed(0)
    trainer = PrefOptDPOTrainer(model=copy.deepcopy(base),
                                args=training_args(PrefOptDPOConfig, tmp_path, 3, 0.5, **kwargs),
                                train_dataset=make_dataset(), processing_class=tokenizer, peft_config=lora,
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
    base, tokenizer, dataset = make_word_llama(), make_tokenizer(), make_dataset()
    losses = []
    for prev in (None, make_word_llama(seed=1)):
        args = training_args(PrefOptDPOConfig, tmp_path, 1, loss_type="inpo", inpo_eta=0.5, inpo_tau=1.0)
        trainer = PrefOptDPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=args,
                                    train_dataset=dataset, processing_class=tokenizer, prev_model=prev)
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] != losses[1]
    with pytest.raises(ValueError, match="prev_model"):
        PrefOptDPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base),
                          args=training_args(PrefOptDPOConfig, tmp_path, 1, loss_type="tdpo1"), train_dataset=dataset,
                          processing_class=tokenizer, prev_model=make_word_llama(seed=1))


@pytest.mark.parametrize("by_name", [False, True])
def test_simpo_loads_no_reference(tmp_path, monkeypatch, by_name):
    """SimPO is reference-free: no reference is loaded from the policy's name, and one passed is refused.
    The other loss types still get TRL's reference from the policy's name."""
    base, tokenizer = make_word_llama(), make_tokenizer()
    model = base
    if by_name:
        base.save_pretrained(tmp_path / "policy")
        model = str(tmp_path / "policy")
    loads = []
    load = trl_dpo_module.create_model_from_path
    monkeypatch.setattr(trl_dpo_module, "create_model_from_path", lambda path, **k: loads.append(path) or load(path, **k))
    simpo = training_args(PrefOptDPOConfig, tmp_path / "simpo", 2, loss_type="simpo", beta=2.0)
    trainer = PrefOptDPOTrainer(model=model, args=simpo, train_dataset=make_dataset(), processing_class=tokenizer)
    assert trainer.ref_model is None
    assert loads == ([model] if by_name else [])
    trainer.train()
    assert all(math.isfinite(logs["loss"]) for logs in trainer.state.log_history[:-1])
    with pytest.raises(ValueError, match="ref_model"):
        PrefOptDPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=simpo,
                          train_dataset=make_dataset(), processing_class=tokenizer)
    if by_name:
        loads.clear()
        sigmoid = training_args(PrefOptDPOConfig, tmp_path / "sigmoid", 1, loss_type="sigmoid")
        trainer = PrefOptDPOTrainer(model=model, args=sigmoid, train_dataset=make_dataset(), processing_class=tokenizer)
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
    text = make_word_llama().config
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=8, patch_size=4)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                     image_token_id=image_token_id))


def test_activation_mask_hooks_the_language_decoder_only(tmp_path):
    """A vision-language reference names its vision tower's layers in ``_no_split_modules`` too; the
    activation mask hooks only the language decoder's layers, and text-only training runs."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    tokenizer = make_tokenizer()
    image_token = tokenizer.convert_tokens_to_ids("w60")  # not in the data
    policy, reference = _tiny_llava(image_token), _tiny_llava(image_token)
    assert any("CLIP" in name for name in reference._no_split_modules)
    args = training_args(PrefOptDPOConfig, tmp_path, 2, 0.1, loss_type="sparse_po", sparse_po_mask="activation",
                         beta=0.5)
    trainer = PrefOptDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=make_dataset(),
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
    policy, reference, tokenizer = make_word_llama(seed=0), make_word_llama(seed=1), make_tokenizer()
    args = training_args(PrefOptDPOConfig, tmp_path, 1, beta=0.5, **LOSS_CASES[case])
    trainer = PrefOptDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=make_dataset(),
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
