r"""PrefOptDPOTrainer against TRL 1.16's DPOTrainer, and its own loss types end to end.

Tiny random Llamas from configs in code, a WordLevel tokenizer built in code and four
in-memory preference pairs; nothing is downloaded. Skipped without TRL (or transformers).

* ``loss_type="sigmoid"`` goes to TRL's own ``_compute_loss``: two plain-SGD steps (fp32,
  same seed, same model copies) log exactly the same values as a stock ``DPOTrainer`` and
  leave exactly the same parameters.
* ``sparse_po`` (each mask kind), ``tdpo1``, ``tdpo2``, ``simpo``, ``inpo`` train 3 steps:
  finite losses, TRL's metric names plus the losses' own, a non-zero gradient for every
  policy parameter tensor that feeds the loss (the learned mask's included) at every step.
* ``tdpo2`` and learned-mask ``sparse_po``: the loss and the LM-head gradient of one batch
  equal the same loss written out over the full fp64 logits (``rel=1e-5`` on the loss: fp32
  tiles against fp64; a KL taken in the wrong direction moves it by ~4%).
* INPO's ``prev_model`` enters the loss; the config and trainer reject unsupported combinations.
"""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from prefopt_kernels.integrations.trl_dpo import (  # noqa: E402
    MASK_MODULE_NAME,
    PrefOptDPOConfig,
    PrefOptDPOTrainer,
)

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
TRL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "entropy", "logits/chosen", "logits/rejected",
               "mean_token_accuracy", "num_tokens")
_TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


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


def _dataset():
    return datasets.Dataset.from_dict({
        "prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"],
        "chosen": [" w11 w12", " w13", " w14 w15 w16", " w17 w18"],
        "rejected": [" w20", " w21 w22 w23", " w24", " w25 w26"],
    })


def _args(config_class, output_dir, steps, **kwargs):
    # Plain SGD, constant lr: the parameters are then a deterministic function of the gradients.
    return config_class(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2,
                        logging_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                        report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=0,
                        disable_tqdm=True, **kwargs)


class GradientProbe(TrainerCallback):
    """Records, before each optimizer step, which trainable parameter tensors have a non-zero gradient."""

    def __init__(self):
        self.zero_grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.zero_grads.append(sorted(name for name, p in model.named_parameters()
                                      if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)))


def test_trl_loss_type_is_stock_dpo(tmp_path):
    """``loss_type="sigmoid"``: the same logged metrics and final parameters as TRL's DPOTrainer."""
    base, tokenizer, dataset = _model(), _tokenizer(), _dataset()
    runs = []
    for trainer_class, config_class in ((DPOTrainer, DPOConfig), (PrefOptDPOTrainer, PrefOptDPOConfig)):
        trainer = trainer_class(model=copy.deepcopy(base), ref_model=copy.deepcopy(base),
                                args=_args(config_class, tmp_path / trainer_class.__name__, 2, beta=0.5),
                                train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        runs.append(trainer)
    stock, ours = runs
    assert len(stock.state.log_history) == len(ours.state.log_history) == 3
    assert stock.state.log_history[1]["rewards/margins"] != 0.0  # step 2 saw a trained policy
    for a, b in zip(ours.state.log_history, stock.state.log_history):
        assert a.keys() == b.keys()
        for key in b.keys() - set(_TIMING):
            assert a[key] == b[key], key
    stock_params, our_params = stock.model.state_dict(), ours.model.state_dict()
    assert stock_params.keys() == our_params.keys()
    for name, value in stock_params.items():
        assert torch.equal(our_params[name], value), name


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


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefopt_loss_types_train(tmp_path, case):
    """Three SGD steps (lr 0.1): finite losses, TRL's and the loss's metrics, every parameter trained."""
    base, tokenizer = _model(), _tokenizer()
    kwargs = dict(CASES[case])
    kwargs.setdefault("beta", 0.5)
    args = _args(PrefOptDPOConfig, tmp_path, 3, **kwargs)
    args.learning_rate = 0.1
    probe = GradientProbe()
    trainer = PrefOptDPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=args,
                                train_dataset=_dataset(), processing_class=tokenizer, callbacks=[probe])
    mask = getattr(trainer.model, MASK_MODULE_NAME, None)
    assert (mask is not None) == (case == "sparse_po_learned")
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()

    steps = trainer.state.log_history[:-1]
    assert len(steps) == 3
    for logs in steps:
        for key in TRL_METRICS + OWN_METRICS[case]:
            assert math.isfinite(logs[key]), (key, logs[key])
    assert len(probe.zero_grads) == 3
    # Llama's embedding rows of unused tokens get no gradient, but each tensor as a whole does.
    assert probe.zero_grads == [[], [], []]
    final = trainer.model.state_dict()
    for name, start in initial.items():
        assert not torch.equal(final[name], start), name
    if case == "sparse_po_learned":
        assert any(name.startswith(MASK_MODULE_NAME) for name in initial)
        assert 0.0 < steps[0]["mask/density"] <= 1.0
    # The reference stays frozen.
    for name, p in trainer.ref_model.state_dict().items():
        assert torch.equal(p, base.state_dict()[name]), name


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


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type=["tdpo1", "sigmoid"]), "used alone"),
    (dict(loss_type="sparse_po", precompute_ref_log_probs=True), "precompute_ref_log_probs"),
    (dict(loss_type="simpo", ld_alpha=0.5), "ld_alpha"),
    (dict(loss_type="sparse_po", sparse_po_mask="dense"), "sparse_po_mask"),
])
def test_config_rejects_unsupported_combinations(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefOptDPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)


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
