r"""Our fused LM head (prefopt_kernels.integrations.trl) against TRL 1.16's own, field by field.

Every expected value comes from TRL itself (``trl.trainer.utils.add_fused_lm_head``, run on a
deep copy of the same model) or from the model's own forward; the models (tiny Llamas, a
Mixtral, a JetMoE) and the comparison are in trl_cases.py. The whole module is skipped when
TRL (or transformers) is absent.

Tolerances (fp32 throughout, CPU). Ours and TRL's compute the same math with different
tilings and reduction orders (TRL: one ``[N, 32768]`` tile, online logsumexp in torch; ours:
compacted rows, the planner's tiles, the backend's fold), so results differ by rounding only:

* per-token values (``log_probs`` ~ -7, ``entropy`` ~ 6, ``log_sum_sq_probs``,
  ``mean_logits``) are sums/logsumexps over V = 1000 fp32 terms: a few ulp of the largest
  term, ~1e-6 absolute at most for |x| ~ 10. We allow ``rtol=1e-5, atol=1e-6``;
  measured <= 15% of that. A real error (a missed temperature, scale, softcap or bias, an
  off-by-one shift, a wrong normaliser) moves them by ~1e-3 or more.
* parameter gradients are accumulated over tokens and vocabulary in fp32; their rounding is
  relative to the tensor's own scale, not per entry (entries near 0 come from
  cancellation). We allow ``rtol=1e-5`` plus ``atol = 1e-5 * max|g_TRL|`` per tensor;
  measured <= 14% of that.
* ``is_top1`` / ``label_mask`` (bool) must be equal exactly; the test inputs put the label
  on the argmax at half the positions (and the saturated soft cap produces exact ties), so
  both values occur.
"""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from prefopt_kernels.integrations import trl as pk_trl  # noqa: E402
from trl_cases import (ALL_OUTPUTS, BATCH, HIDDEN, SEQ, TRL_ADD_FUSED_LM_HEAD, VOCAB, assert_fields_match,  # noqa: E402
                       assert_grads_match, llama_config, make_inputs, make_model, objective, patched_pair,
                       run_and_compare)


VARIANTS = ("plain", "softcap", "softcap_saturated", "logit_scale", "logit_scale_softcap", "biased_head", "tied")


CASES = [(variant, "default") for variant in VARIANTS] + [
    (variant, "temperature") for variant in ("plain", "softcap", "logit_scale_softcap", "biased_head")
] + [(variant, "shift_labels") for variant in ("plain", "logit_scale_softcap", "tied")]


@pytest.mark.parametrize("variant, mode", CASES)
def test_fused_head_matches_trl(variant, mode):
    """Every FusedCausalLMOutput field and every parameter gradient, ours vs TRL's head."""
    model = make_model(variant)
    input_ids, attention_mask, labels = make_inputs(model)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    head_kwargs = {}
    expected_shape = (BATCH, SEQ - 1)
    if mode == "temperature":
        head_kwargs = dict(temperature=0.7, cast_lm_head_to_fp32=True)
    elif mode == "shift_labels":
        # Pre-shifted labels are scored as given: [B, T], the last position included.
        shift_labels = torch.cat([labels[:, 1:], torch.full((BATCH, 1), -100)], dim=1)
        shift_labels[0, -1] = 7
        call = dict(input_ids=input_ids, attention_mask=attention_mask, shift_labels=shift_labels)
        head_kwargs = dict(temperature=1.3)
        expected_shape = (BATCH, SEQ)
    ours, theirs = run_and_compare(model, call, **head_kwargs)
    assert ours.log_probs.shape == expected_shape
    kept = theirs.label_mask
    assert kept.any() and not kept.all()
    if variant != "softcap_saturated":
        # The argmax labels make both is_top1 values occur, so the exact comparison bites.
        assert theirs.is_top1[kept].any() and not theirs.is_top1[kept].all()


@pytest.mark.parametrize("variant", ["softcap", "logit_scale", "logit_scale_softcap"])
def test_fused_head_under_cpu_bf16_autocast_matches_trl(variant):
    """TRL's default ``bf16=True`` on a CPU: both heads round the bf16 GEMM's output, then apply the
    scale and soft cap in fp32, so the log-probs agree as in fp32 (a transform applied in bf16
    fails this for every variant)."""
    model = make_model(variant)
    input_ids, attention_mask, labels = make_inputs(model)
    ours_model, trl_model = patched_pair(model, outputs=("log_probs", "entropy"))
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = ours_model(**call), trl_model(**call)
    kept = theirs.label_mask
    assert kept.any()
    for name in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(ours, name)[kept], getattr(theirs, name)[kept], rtol=1e-5, atol=1e-5,
                                   msg=f"{variant} {name}")


@pytest.mark.parametrize("num_items", [torch.tensor(23), 5])
def test_num_items_in_batch(num_items):
    """``num_items_in_batch`` (a tensor, as the trainers pass it, or an int) replaces the kept-label count."""
    model = make_model("logit_scale_softcap")
    input_ids, attention_mask, labels = make_inputs(model)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=num_items)
    ours, theirs = run_and_compare(model, call, temperature=0.7)
    torch.testing.assert_close(ours.loss, -ours.log_probs.sum() / num_items, rtol=1e-6, atol=0)
    assert int(theirs.label_mask.sum()) not in (5, 23)  # so the denominator is really the one passed


def test_saturated_softcap_has_ties_not_counted_as_top1():
    """With exact ties at the top, is_top1 is True only for the FIRST maximum, in both heads."""
    model = make_model("softcap_saturated")
    input_ids, attention_mask, labels = make_inputs(model)
    ours_model, trl_model = patched_pair(model, outputs=ALL_OUTPUTS)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    ours, theirs = ours_model(**call, fused_lm_head=True), trl_model(**call, fused_lm_head=True)
    assert torch.equal(ours.is_top1, theirs.is_top1)
    # The setup does produce ties: the model's argmax labels are at the (capped) maximum, yet
    # some are not the first maximum, so they are not counted.
    argmax_positions = torch.zeros_like(theirs.label_mask)
    argmax_positions[:, 1::2] = True
    argmax_positions &= theirs.label_mask
    assert not theirs.is_top1[argmax_positions].all()


@pytest.mark.parametrize("outputs", [
    ("log_probs",),
    ("log_probs", "entropy"),
    ("mean_logits",),
    ("log_sum_sq_probs", "is_top1"),
])
def test_outputs_subsets(outputs):
    """Fields not asked for are None in both; those asked for (and log_probs, always) match."""
    model = make_model("biased_head")
    input_ids, attention_mask, labels = make_inputs(model)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    ours, theirs = run_and_compare(model, call, outputs=outputs, temperature=0.8)
    for name in ALL_OUTPUTS[1:]:
        assert (getattr(ours, name) is None) == (name not in outputs), name


@pytest.mark.parametrize("variant", ["softcap", "logit_scale", "logit_scale_softcap", "biased_head"])
def test_head_variants_change_the_result(variant):
    """Sanity of the setup: each variant's transform really moves TRL's log-probs (so matching it
    is evidence that ours applies the transform), while its unfused Llama logits ignore the
    config fields (so nothing else differs)."""
    plain, other = make_model("plain"), make_model(variant)
    input_ids, attention_mask, labels = make_inputs(plain)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if variant != "biased_head":
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=input_ids).logits, plain(input_ids=input_ids).logits,
                                       rtol=0, atol=0)
    outs = []
    for model in (plain, other):
        model = copy.deepcopy(model)
        TRL_ADD_FUSED_LM_HEAD(model)
        with torch.no_grad():
            outs.append(model(**call, fused_lm_head=True).log_probs)
    assert (outs[0] - outs[1]).abs().max() > 1e-2


@pytest.mark.parametrize("shifted", [False, True])
def test_all_ignored_batch(shifted):
    """Every label -100: loss 0, every field 0/False and finite, backward works, gradients as TRL's (0)."""
    model = make_model("plain")
    input_ids, attention_mask, _ = make_inputs(model)
    ignored = torch.full_like(input_ids, -100)
    call = dict(input_ids=input_ids, attention_mask=attention_mask)
    call["shift_labels" if shifted else "labels"] = ignored
    ours_model, trl_model = patched_pair(model, outputs=ALL_OUTPUTS, temperature=0.9)
    ours, theirs = ours_model(**call, fused_lm_head=True), trl_model(**call, fused_lm_head=True)
    assert_fields_match(ours, theirs, ALL_OUTPUTS)
    assert ours.loss.item() == 0.0
    for name in ALL_OUTPUTS:
        value = getattr(ours, name)
        assert not value.any(), name
        assert value.shape == (BATCH, SEQ if shifted else SEQ - 1)
    assert not ours.label_mask.any()
    objective(ours).backward()
    objective(theirs).backward()
    assert_grads_match(ours_model, trl_model)
    for p in ours_model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and not p.grad.any()


@pytest.mark.parametrize("variant", ["logit_scale_softcap", "biased_head"])
def test_bf16_model_with_fp32_head(variant):
    """A bf16 model with ``cast_lm_head_to_fp32=True``: both heads project the same bf16 hidden
    states in fp32, so every field still matches at the fp32 tolerance. The gradients then go
    back through the bf16 backbone, where a 1-ulp flip (2^-8) of a borderline value in either
    run propagates: allowed 2^-5 of each tensor's scale (measured <= 0.6%)."""
    model = make_model(variant).to(torch.bfloat16)
    input_ids, attention_mask, labels = make_inputs(model)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    ours_model, trl_model = patched_pair(model, outputs=ALL_OUTPUTS, temperature=0.7, cast_lm_head_to_fp32=True)
    ours, theirs = ours_model(**call, fused_lm_head=True), trl_model(**call, fused_lm_head=True)
    assert_fields_match(ours, theirs, ALL_OUTPUTS)
    objective(ours).backward()
    objective(theirs).backward()
    named = dict(trl_model.named_parameters())
    for name, p in ours_model.named_parameters():
        q = named[name].grad
        assert p.grad.dtype == q.dtype == torch.bfloat16, name
        scale = q.float().abs().max().item()
        torch.testing.assert_close(p.grad.float(), q.float(), rtol=2**-7, atol=2**-5 * scale,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("variant, num_items", [("plain", None), ("biased_head", 9)])
def test_fused_loss_is_the_models_own_loss(variant, num_items):
    """At temperature 1 (and no config transform) the fused loss is the model's own forward loss
    (mean cross-entropy over the kept shifted labels, or its sum over ``num_items_in_batch``)."""
    model = make_model(variant)
    input_ids, attention_mask, labels = make_inputs(model)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if num_items is not None:
        call["num_items_in_batch"] = num_items
    with torch.no_grad():
        expected = model(**call).loss
    patched = copy.deepcopy(model)
    pk_trl.add_fused_lm_head(patched)
    with torch.no_grad():
        got = patched(**call, fused_lm_head=True).loss
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_moe_aux_loss_matches_trl():
    """Mixtral with ``output_router_logits``: aux_loss and the loss (with router_aux_loss_coef x aux_loss)
    as TRL's, the gradients too (the routers get theirs through the aux loss), and at temperature 1
    the fused loss equals the model's own loss, aux term included."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05,
                           initializer_range=0.2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    input_ids, attention_mask, labels = make_inputs(model)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    ours_model, trl_model = patched_pair(model, outputs=ALL_OUTPUTS)
    ours, theirs = ours_model(**call, fused_lm_head=True), trl_model(**call, fused_lm_head=True)
    assert ours.aux_loss is not None and theirs.aux_loss is not None
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss, rtol=1e-5, atol=1e-6)
    ours.aux_loss, theirs.aux_loss = None, None  # compared; assert_fields_match expects None
    assert_fields_match(ours, theirs, ALL_OUTPUTS)
    with torch.no_grad():
        own = model(**call)
    assert own.aux_loss is not None and own.aux_loss.item() > 0
    torch.testing.assert_close(ours.loss, own.loss, rtol=1e-5, atol=1e-6)
    objective(ours).backward()
    objective(theirs).backward()
    assert_grads_match(ours_model, trl_model)


def test_explicit_zero_logit_scale_matches_trl():
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(logit_scale=0.0)).eval()
    input_ids, attention_mask, labels = make_inputs(model)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    ours, theirs = run_and_compare(model, call)
    # TRL: all logits 0, so log p = -log V at every kept token.
    torch.testing.assert_close(theirs.log_probs[theirs.label_mask],
                               torch.full((int(theirs.label_mask.sum()),), -math.log(VOCAB)))


def test_jetmoe_aux_loss_weighted_as_the_model_weights_it():
    """JetMoE names its auxiliary-loss weight ``aux_loss_coef``: the fused loss adds it as the
    model's own forward does (TRL's head cannot run this model)."""
    from transformers import JetMoeConfig, JetMoeForCausalLM

    config = JetMoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, kv_channels=8, output_router_logits=True, aux_loss_coef=0.05)
    assert not hasattr(config, "router_aux_loss_coef")
    torch.manual_seed(0)
    model = JetMoeForCausalLM(config).eval()
    input_ids, attention_mask, labels = make_inputs(model)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    patched = copy.deepcopy(model)
    pk_trl.add_fused_lm_head(patched)
    with torch.no_grad():
        own, ours = model(**call), patched(**call, fused_lm_head=True)
    assert ours.aux_loss is not None and ours.aux_loss.item() > 0
    torch.testing.assert_close(ours.aux_loss, own.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.loss, own.loss, rtol=1e-5, atol=1e-6)
    assert abs(own.loss.item() - (-ours.log_probs.sum() / ours.label_mask.sum()).item()) > 1e-3  # aux counts
