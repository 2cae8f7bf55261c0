r"""prefopt_kernels.integrations.trl against TRL 1.16's own fused LM head and trainers.

Every expected value comes from TRL itself (``trl.trainer.utils.add_fused_lm_head``, run on a
deep copy of the same model, and a stock ``trl.DPOTrainer``) or is hand-written from the rule
in :func:`head_transform`'s docstring. Models are tiny Llamas built from configs in code;
nothing is downloaded. The whole module is skipped when TRL (or transformers) is absent.

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
* ``is_top1`` / ``label_mask`` (bool) must be equal exactly; the test inputs put the label
  on the argmax at half the positions (and the saturated soft cap produces exact ties), so
  both values occur.
"""

from __future__ import annotations

import copy
import math
import types

import pytest

pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl.trainer import utils as trl_utils  # noqa: E402

from dpo_rounding import TIMING, HeadCapture, assert_logs_match, logged_tolerances  # noqa: E402
from prefopt_kernels.integrations import trl as pk_trl  # noqa: E402

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


# --------------------------------------------------------------------------- fused head vs TRL's


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


def _trainer_modules():
    import importlib

    return [importlib.import_module(name) for name in pk_trl.TRL_TRAINER_MODULES]


@pytest.fixture
def restore_trl(monkeypatch):
    """Record every TRL module's ``add_fused_lm_head`` so that monkeypatch puts it back afterwards."""
    for module in _trainer_modules():
        if hasattr(module, "add_fused_lm_head"):
            monkeypatch.setattr(module, "add_fused_lm_head", module.add_fused_lm_head)
    yield
    # (monkeypatch's own teardown, which runs after this, restores the originals)


def test_use_in_trl_rebinds_every_trainer_module(restore_trl):
    import trl.trainer.dpo_trainer as dpo_trainer

    modules = [m for m in _trainer_modules() if hasattr(m, "add_fused_lm_head")]
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
    modules = [m for m in _trainer_modules() if hasattr(m, "add_fused_lm_head")]
    with pytest.MonkeyPatch.context() as mp:
        for module in modules:
            mp.setattr(module, "add_fused_lm_head", module.add_fused_lm_head)
        pk_trl.use_in_trl()
        assert all(m.add_fused_lm_head is pk_trl.add_fused_lm_head for m in modules)
    for module in modules:
        assert module.add_fused_lm_head is TRL_ADD_FUSED_LM_HEAD, module.__name__


def _head_file(model):
    return model.forward.__func__.__code__.co_filename


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
    assert _head_file(policy) == OURS_FILE and _head_file(ref) == OURS_FILE
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


# --------------------------------------------------------------------------- end to end: DPOTrainer


WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


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
    heads = (_head_file(trainer.model), _head_file(trainer.ref_model))
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
    tokenizer = _tokenizer()
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
    tokenizer = _tokenizer()
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
    tokenizer = _tokenizer()
    base.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    runs = []
    for patched in (False, True):
        if patched:
            pk_trl.use_in_trl()  # undone by the restore_trl fixture
        trainer = _build_trainer(kind, base, tokenizer, tmp_path / f"run{patched}", tmp_path / "policy")
        assert _head_file(trainer.model) == (OURS_FILE if patched else TRL_FILE)
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
