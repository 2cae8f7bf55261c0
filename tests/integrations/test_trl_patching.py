"""Patching with our fused LM head: what it leaves alone (the unfused forward, ``generate``), the
logit transform it reads from a model's config (``head_transform``), and how it reaches TRL's
trainers (``use_in_trl``, ``apply_to_trainer``). Fields are compared with TRL's head at the
tolerances of test_trl_fused_head.py. Skipped without TRL (or transformers)."""

from __future__ import annotations

import copy
import types

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from prefopt_kernels.integrations import trl as pk_trl  # noqa: E402
from trl_cases import (ALL_OUTPUTS, OURS_FILE, TRL_ADD_FUSED_LM_HEAD, VOCAB, assert_fields_match,  # noqa: E402
                       head_file, llama_config, make_inputs, make_model, trainer_modules)
from trl_cases import restore_trl  # noqa: E402,F401 - a fixture: pytest finds it among the module's names


# --------------------------------------------------------------------------- unfused path unchanged


def test_unfused_forward_unchanged():
    """Without fused_lm_head the original forward runs: same output type, logits and loss as an
    unpatched copy, with and without labels, and num_items_in_batch still reaches the model's loss."""
    model = make_model("biased_head")
    input_ids, attention_mask, labels = make_inputs(model)
    patched = copy.deepcopy(model)
    pk_trl.add_fused_lm_head(patched, outputs=ALL_OUTPUTS, temperature=0.5)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with torch.no_grad():
        for kwargs in ({}, {"num_items_in_batch": 4}):
            ref, out = model(**call, **kwargs), patched(**call, **kwargs)
            assert type(out) is type(ref)
            assert torch.equal(out.logits, ref.logits)
            assert torch.equal(out.loss, ref.loss)
        # num_items_in_batch reached the model's loss: it differs from the mean over the kept labels.
        assert not torch.allclose(model(**call, num_items_in_batch=4).loss, model(**call).loss)
        bare_ref, bare_out = model(input_ids), patched(input_ids)
    assert type(bare_out) is type(bare_ref) and bare_out.loss is None
    assert torch.equal(bare_out.logits, bare_ref.logits)


def test_generate_unchanged():
    model = make_model("plain")
    patched = copy.deepcopy(model)
    pk_trl.add_fused_lm_head(patched, outputs=ALL_OUTPUTS)
    input_ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = model.generate(input_ids, **kwargs)
    got = patched.generate(input_ids, **kwargs)
    assert expected.shape == (2, 8)
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------- head_transform


@pytest.mark.parametrize("fields, expected", [
    ({}, (1.0, None)),
    ({"model_type": "llama"}, (1.0, None)),
    ({"logit_scale": 0.0625}, (0.0625, None)),
    ({"logit_scale": None}, (1.0, None)),
    ({"logit_scale": 2}, (2.0, None)),
    ({"output_multiplier": 3.0}, (3.0, None)),
    ({"lm_head_multiplier": 0.5}, (0.5, None)),
    ({"logit_scale": None, "output_multiplier": None, "lm_head_multiplier": 0.25}, (0.25, None)),
    # logit_scale wins over output_multiplier, which wins over lm_head_multiplier and logits_scaling
    ({"logit_scale": 2.0, "output_multiplier": 3.0, "lm_head_multiplier": 5.0}, (2.0, None)),
    ({"output_multiplier": 3.0, "lm_head_multiplier": 5.0, "logits_scaling": 8.0}, (3.0, None)),
    ({"lm_head_multiplier": 5.0, "logits_scaling": 8.0, "model_type": "granite"}, (5.0, None)),
    # logits_scaling: divided by (Granite, MiniCPM3), multiplied by (HyperCLOVA X)
    ({"logits_scaling": 8.0, "model_type": "granite"}, (0.125, None)),
    ({"logits_scaling": 4.0, "model_type": "minicpm3"}, (0.25, None)),
    ({"logits_scaling": 8.0, "model_type": "hyperclovax"}, (8.0, None)),
    ({"logits_scaling": None, "model_type": "granite"}, (1.0, None)),
    # an explicit 0.0 is kept, not replaced by a later field or by 1
    ({"logit_scale": 0.0}, (0.0, None)),
    ({"logit_scale": 0.0, "output_multiplier": 3.0}, (0.0, None)),
    ({"output_multiplier": 0.0, "lm_head_multiplier": 5.0}, (0.0, None)),
    ({"lm_head_multiplier": 0.0, "logits_scaling": 4.0, "model_type": "granite"}, (0.0, None)),
    # soft cap
    ({"final_logit_softcapping": 30.0}, (1.0, 30.0)),
    ({"final_logit_softcapping": None}, (1.0, None)),
    ({"final_logit_softcapping": 15.0, "logit_scale": 0.5}, (0.5, 15.0)),
])
def test_head_transform_namespace(fields, expected):
    scale, softcap = pk_trl.head_transform(types.SimpleNamespace(**fields))
    assert (scale, softcap) == expected
    assert type(scale) is float


def test_head_transform_transformers_configs():
    import transformers

    assert pk_trl.head_transform(transformers.CohereConfig(logit_scale=0.0625)) == (0.0625, None)
    assert pk_trl.head_transform(transformers.GraniteConfig(logits_scaling=8.0)) == (0.125, None)
    assert pk_trl.head_transform(transformers.Gemma2Config(final_logit_softcapping=30.0)) == (1.0, 30.0)
    assert pk_trl.head_transform(transformers.FalconH1Config(lm_head_multiplier=0.5)) == (0.5, None)
    assert pk_trl.head_transform(llama_config()) == (1.0, None)
    assert pk_trl.head_transform(llama_config(final_logit_softcapping=2.0, logit_scale=2.5)) == (2.5, 2.0)


# --------------------------------------------------------------------------- use_in_trl / apply_to_trainer


def test_use_in_trl_rebinds_every_trainer_module(restore_trl):
    import trl.trainer.dpo_trainer as dpo_trainer

    modules = [m for m in trainer_modules() if hasattr(m, "add_fused_lm_head")]
    assert dpo_trainer in modules
    for name in ("dpo", "kto", "grpo", "rloo", "sft"):
        assert f"trl.trainer.{name}_trainer" in {m.__name__ for m in modules}
    for module in modules:
        assert module.add_fused_lm_head is TRL_ADD_FUSED_LM_HEAD, module.__name__
    pk_trl.use_in_trl()
    pk_trl.use_in_trl()  # idempotent
    for module in modules:
        assert module.add_fused_lm_head is pk_trl.add_fused_lm_head, module.__name__


def test_use_in_trl_undone_by_monkeypatch_records():
    """The restore mechanism the other tests rely on: recording the names first, then use_in_trl,
    and leaving the context puts TRL's own function back in every module."""
    modules = [m for m in trainer_modules() if hasattr(m, "add_fused_lm_head")]
    with pytest.MonkeyPatch.context() as mp:
        for module in modules:
            mp.setattr(module, "add_fused_lm_head", module.add_fused_lm_head)
        pk_trl.use_in_trl()
        assert all(m.add_fused_lm_head is pk_trl.add_fused_lm_head for m in modules)
    for module in modules:
        assert module.add_fused_lm_head is TRL_ADD_FUSED_LM_HEAD, module.__name__


class _PeftLike(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def get_base_model(self):
        return self.base


@pytest.mark.parametrize("peft_like", [False, True])
def test_apply_to_trainer_lightweight(peft_like):
    """apply_to_trainer patches the (PEFT base) policy with the given outputs and the reference with
    log_probs only, both at the trainer's temperature: as TRL's head does with those arguments."""
    model = make_model("softcap")
    input_ids, attention_mask, labels = make_inputs(model)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    policy, ref = copy.deepcopy(model), copy.deepcopy(model)
    trainer = types.SimpleNamespace(model=_PeftLike(policy) if peft_like else policy, ref_model=ref,
                                    temperature=0.8)
    pk_trl.apply_to_trainer(trainer)
    assert head_file(policy) == OURS_FILE and head_file(ref) == OURS_FILE
    default_outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    trl_policy, trl_ref = copy.deepcopy(model), copy.deepcopy(model)
    TRL_ADD_FUSED_LM_HEAD(trl_policy, temperature=0.8, outputs=default_outputs)
    TRL_ADD_FUSED_LM_HEAD(trl_ref, temperature=0.8)
    with torch.no_grad():
        assert_fields_match(policy(**call, fused_lm_head=True), trl_policy(**call, fused_lm_head=True),
                            default_outputs)
        assert_fields_match(ref(**call, fused_lm_head=True), trl_ref(**call, fused_lm_head=True), ("log_probs",))

    # No reference model, no temperature attribute: temperature 1, outputs as given.
    policy = copy.deepcopy(model)
    pk_trl.apply_to_trainer(types.SimpleNamespace(model=policy, ref_model=None), outputs=("log_probs",))
    trl_policy = copy.deepcopy(model)
    TRL_ADD_FUSED_LM_HEAD(trl_policy)
    with torch.no_grad():
        assert_fields_match(policy(**call, fused_lm_head=True), trl_policy(**call, fused_lm_head=True),
                            ("log_probs",))


def test_apply_to_trainer_follows_wpo_and_the_fp32_head():
    """A trainer with WPO's ``use_weighting`` gets ``log_sum_sq_probs`` by default, and
    ``cast_lm_head_to_fp32`` holds for the reference too (GRPO installs both heads with it): a
    bf16 model's fields match TRL's heads installed that way, at the fp32 tolerance."""
    model = make_model("biased_head").to(torch.bfloat16)
    input_ids, attention_mask, labels = make_inputs(model)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    policy, ref = copy.deepcopy(model), copy.deepcopy(model)
    trainer = types.SimpleNamespace(model=policy, ref_model=ref, use_weighting=True,
                                    args=types.SimpleNamespace(cast_lm_head_to_fp32=True))
    pk_trl.apply_to_trainer(trainer)
    wpo_outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    trl_policy, trl_ref = copy.deepcopy(model), copy.deepcopy(model)
    TRL_ADD_FUSED_LM_HEAD(trl_policy, cast_lm_head_to_fp32=True, outputs=wpo_outputs)
    TRL_ADD_FUSED_LM_HEAD(trl_ref, cast_lm_head_to_fp32=True)
    with torch.no_grad():
        assert_fields_match(policy(**call, fused_lm_head=True), trl_policy(**call, fused_lm_head=True),
                            wpo_outputs)
        assert_fields_match(ref(**call, fused_lm_head=True), trl_ref(**call, fused_lm_head=True), ("log_probs",))
