"""What the TRL integration tests share; every test module skips without TRL (or transformers)
before importing it. Models are tiny Llamas built from configs in code; nothing is downloaded.

* Our fused LM head beside TRL 1.16's own (``trl.trainer.utils.add_fused_lm_head``, captured at
  import, before any test rebinds the name): the models and inputs, the two heads patched on
  copies of one model, and the comparison of their outputs and parameter gradients.
* Patching the trainers: ``restore_trl`` records every TRL trainer module's
  ``add_fused_lm_head`` so that a test may call ``use_in_trl()``; ``head_file`` tells whose head
  a model runs.
* Training: a WordLevel tokenizer over ``WORDS``, four in-memory preference pairs, plain-SGD
  training arguments, a LoRA config, and the package's own DPO loss types (``LOSS_CASES``, which
  trl_ddp_worker.py runs under DDP too).

The tests: test_trl_fused_head.py (our head against TRL's, field by field), test_trl_patching.py
(``head_transform``, what patching leaves alone, ``use_in_trl`` and ``apply_to_trainer``),
test_trl_trainers.py (stock DPO, SFT, KTO, GRPO and RLOO trainers on our head),
test_trl_dpo_parity.py (``PrefOptDPOTrainer`` against TRL's ``DPOTrainer``),
test_trl_dpo_losses.py (the package's loss types in ``PrefOptDPOTrainer``), test_trl_kto.py
(``PrefOptKTOTrainer`` against TRL's ``KTOTrainer``) and test_integrations_bad_input.py.
"""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer import utils as trl_utils

from prefopt_kernels.integrations import trl as pk_trl

# TRL's own head, captured at import, before any test rebinds the name.
TRL_ADD_FUSED_LM_HEAD = trl_utils.add_fused_lm_head
FusedCausalLMOutput = trl_utils.FusedCausalLMOutput
FIELDS = ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
OURS_FILE = pk_trl.__file__
TRL_FILE = trl_utils.__file__

VOCAB, HIDDEN, BATCH, SEQ = 1000, 32, 3, 12


# --------------------------------------------------------------------------- models and inputs


def llama_config(vocab_size=VOCAB, **extra):
    # initializer_range 0.2: logits of std ~1, so distributions are peaked and soft caps bite.
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    for name, value in extra.items():
        setattr(config, name, value)
    return config


def make_model(variant: str, seed: int = 0) -> LlamaForCausalLM:
    """A tiny fp32 Llama; ``variant`` sets the LM-head transform TRL's fused head reads."""
    extra = {
        "plain": {},
        "softcap": {"final_logit_softcapping": 2.0},
        # tanh(z / 0.05) is exactly 1.0 in fp32 for z >~ 0.45: many exact ties at the top.
        "softcap_saturated": {"final_logit_softcapping": 0.05},
        "logit_scale": {"logit_scale": 2.5},
        "logit_scale_softcap": {"logit_scale": 0.5, "final_logit_softcapping": 1.5},
        "biased_head": {},
        "tied": {"tie_word_embeddings": True},  # the head's gradient lands on the input embedding
    }[variant]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**extra))
    if variant == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if variant == "biased_head":
        head = nn.Linear(HIDDEN, VOCAB, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.copy_(torch.randn(VOCAB) + 0.5)  # non-zero mean: mean_logits ~ 0.5
        model.lm_head = head
    return model.eval()


def make_inputs(model, seed: int = 1):
    """``input_ids``, ``attention_mask`` (row 1 right-padded), ``labels`` with -100 prompt prefixes,
    row 2 fully ignored, and the label set to the model's argmax at every other position."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    input_ids[1, -3:] = 0
    labels = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
    with torch.no_grad():
        top1 = model(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)  # [B, T]
    labels[:, 2::2] = top1[:, 1:-1:2]  # the label of position t is predicted at t - 1
    labels[0, :4] = -100
    labels[1, :6] = -100
    labels[1, -3:] = -100
    labels[2, :] = -100
    return input_ids, attention_mask, labels


def patched_pair(model, **kwargs):
    """Deep copies of ``model`` patched by ours and by TRL's ``add_fused_lm_head`` with the same arguments."""
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    pk_trl.add_fused_lm_head(ours, **kwargs)
    TRL_ADD_FUSED_LM_HEAD(theirs, **kwargs)
    return ours, theirs


def objective(out, seed: int = 2):
    """The loss plus random-weighted log_probs and entropy: gradients through every differentiable field."""
    g = torch.Generator().manual_seed(seed)
    total = out.loss + (out.log_probs * torch.randn(out.log_probs.shape, generator=g)).sum()
    if out.entropy is not None:
        total = total + (out.entropy * torch.randn(out.entropy.shape, generator=g)).sum()
    return total


def assert_fields_match(ours, theirs, outputs):
    assert type(ours) is FusedCausalLMOutput
    for name in FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        if name in ALL_OUTPUTS[1:] and name not in outputs:
            assert a is None and b is None, name
            continue
        assert a is not None and b is not None, name
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        assert a.requires_grad == b.requires_grad, name
        if b.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert ours.aux_loss is None and theirs.aux_loss is None


def assert_grads_match(ours_model, trl_model):
    named = dict(trl_model.named_parameters())
    for name, p in ours_model.named_parameters():
        q = named[name]
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is None:
            continue
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def run_and_compare(model, call, outputs=ALL_OUTPUTS, **head_kwargs):
    ours_model, trl_model = patched_pair(model, outputs=outputs, **head_kwargs)
    ours, theirs = ours_model(**call, fused_lm_head=True), trl_model(**call, fused_lm_head=True)
    assert_fields_match(ours, theirs, outputs)
    objective(ours).backward()
    objective(theirs).backward()
    assert_grads_match(ours_model, trl_model)
    return ours, theirs


# --------------------------------------------------------------------------- patching the trainers


def trainer_modules():
    import importlib

    return [importlib.import_module(name) for name in pk_trl.TRL_TRAINER_MODULES]


@pytest.fixture
def restore_trl(monkeypatch):
    """Record every TRL module's ``add_fused_lm_head`` so that monkeypatch puts it back afterwards."""
    for module in trainer_modules():
        if hasattr(module, "add_fused_lm_head"):
            monkeypatch.setattr(module, "add_fused_lm_head", module.add_fused_lm_head)
    yield
    # (monkeypatch's own teardown, which runs after this, restores the originals)


def head_file(model):
    """The file of the forward ``model`` runs: ours (``OURS_FILE``) once patched, TRL's (``TRL_FILE``)
    where TRL's head is on."""
    return model.forward.__func__.__code__.co_filename


# --------------------------------------------------------------------------- training


WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def make_word_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config)


PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]


def make_dataset(chosen=(" w11 w12", " w13", " w14 w15 w16", " w17 w18")):
    return datasets.Dataset.from_dict({
        "prompt": PROMPTS,
        "chosen": list(chosen),
        "rejected": [" w20", " w21 w22 w23", " w24", " w25 w26"],
    })


def training_args(config_class, output_dir, steps, learning_rate=1.0, bf16=False, **kwargs):
    # Plain SGD, constant lr: the parameters are then a deterministic function of the gradients.
    return config_class(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2,
                        logging_steps=1, optim="sgd", learning_rate=learning_rate, lr_scheduler_type="constant",
                        report_to=[], use_cpu=True, bf16=bf16, save_strategy="no", seed=0,
                        disable_tqdm=True, **kwargs)


def lora_config():
    peft = pytest.importorskip("peft")
    # TRL refuses an adapter on lm_head: its log-probs read lm_head.weight directly.
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


# The package's own DPO loss types, each with the settings it needs.
LOSS_CASES = {
    "sparse_po_learned": dict(loss_type="sparse_po", sparse_po_mask="learned", sparse_po_l1_reward=1e-3,
                              sparse_po_l1_kl=1e-3, sparse_po_separate_kl_mask=True),
    "sparse_po_activation": dict(loss_type="sparse_po", sparse_po_mask="activation"),
    "sparse_po_none": dict(loss_type="sparse_po", sparse_po_mask="none"),
    "tdpo1": dict(loss_type="tdpo1"),
    "tdpo2": dict(loss_type="tdpo2", tdpo_alpha=0.5),
    "simpo": dict(loss_type="simpo", simpo_gamma=0.5, beta=2.0),
    "inpo": dict(loss_type="inpo", inpo_eta=0.5, inpo_tau=1.0),
}
