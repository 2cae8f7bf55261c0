r"""``PrefOptGRPOTrainer``: ``kl_estimator="k3"`` is the stock trainer, ``"full"`` is the exact
full-vocabulary KL with its exact gradient, and bad options fail naming the argument.

Tiny Llamas over the WordLevel vocabulary of trl_cases.py, built in code; skipped without TRL.

* k3 and sampler-matched log-probs off: three plain-SGD steps log exactly what a stock
  ``GRPOTrainer`` built after ``use_in_trl()`` logs (the same head, so the same bits), and end
  at the same parameters. (Stock on our head against stock on TRL's is test_trl_trainers.py.)
* full: one ``compute_loss`` on a hand-built micro-batch (a left-padded prompt, a right-padded
  completion, old log-probs away from the current ones so that ratios clip) against the GRPO
  loss written out in float64 from a float64 copy of both models' full ``[B, T, V]`` logits:
  ``KL_t = Σ_v p_v (log p_v - log q_v)``, the clipped surrogate, the importance-ratio
  correction of the KL term, the reduction of each loss type with that surrogate (grpo, bnpo,
  dr_grpo, dapo; luspo with sequence-level ratios). The loss, the logged ``kl`` and every
  parameter gradient agree to fp32 rounding of the 2-layer backbone: ``2e-5`` relative on the
  loss and the metric (measured 1e-6), ``3e-5 · max|g|`` per gradient tensor (measured 3e-6);
  half of the tokens' ratios lie outside the clip range.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

import torch  # noqa: E402

from prefopt_kernels.integrations import trl as pk_trl  # noqa: E402
from prefopt_kernels.integrations.trl_grpo import PrefOptGRPOConfig, PrefOptGRPOTrainer  # noqa: E402
from trl_cases import restore_trl  # noqa: E402,F401 - a fixture: pytest finds it among the module's names
from trl_grpo_cases import TEMPERATURE, build, grpo_args, policy_dir  # noqa: E402,F401 - policy_dir: a fixture


# --------------------------------------------------------------------------- k3: the stock trainer


def test_k3_without_sampler_matching_is_the_stock_trainer(tmp_path, policy_dir, restore_trl):
    import trl

    pk_trl.use_in_trl()  # the stock trainer on the same head (undone by the restore_trl fixture)
    stock = build(trl.GRPOTrainer, grpo_args(trl.GRPOConfig, tmp_path / "stock"), policy_dir)
    stock.train()
    ours = build(PrefOptGRPOTrainer, grpo_args(PrefOptGRPOConfig, tmp_path / "ours"), policy_dir)
    assert (ours.kl_estimator, ours.args.sampler_matched_logprobs) == ("k3", False)
    ours.train()
    assert len(stock.state.log_history) == len(ours.state.log_history) == 4
    for step, (a, b) in enumerate(zip(ours.state.log_history, stock.state.log_history)):
        assert a.keys() == b.keys(), step
        for key, value in b.items():
            if key in ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"):
                continue
            assert a[key] == value, (step, key, a[key], value)
    assert stock.state.log_history[2]["kl"] > 0 and any(logs["loss"] != 0 for logs in stock.state.log_history[:3])
    stock_params = dict(stock.model.named_parameters())
    for name, param in ours.model.named_parameters():
        assert torch.equal(param, stock_params[name]), name


# --------------------------------------------------------------------------- full: against float64


def micro_batch(vocab: int):
    """A GRPO micro-batch as ``_generate_and_score_completions`` hands it over (old log-probs set later)."""
    g = torch.Generator().manual_seed(3)
    prompt_ids = torch.randint(3, vocab, (4, 3), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_ids[1, 0], prompt_mask[1, 0] = 0, 0  # TRL left-pads prompts
    completion_ids = torch.randint(3, vocab, (4, 5), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_ids[2, -2:], completion_mask[2, -2:] = 0, 0  # and right-pads completions
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 0.7, -1.2]),
            "num_items_in_batch": completion_mask.sum().float()}


def float64_logprobs(model, inputs):
    """``log softmax(z / T)`` ``[B, K, V]`` of the completion positions, from the model's full logits in float64."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    k = inputs["completion_ids"].size(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -k - 1:-1]
    return torch.log_softmax(logits / TEMPERATURE, dim=-1)


def float64_grpo_loss(policy, reference, inputs, args):
    """TRL's GRPO loss with the exact per-token KL in place of k3, written out in float64 from
    TRL 1.16's documented formulas (clipped surrogate, ``use_bias_correction_kl``, the loss
    type's reduction of one gradient-accumulation step on one process).

    Returns ``(loss, the masked mean of the KL term)``."""
    log_p, log_q = float64_logprobs(policy, inputs), float64_logprobs(reference, inputs)
    logp = log_p.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    mask = inputs["completion_mask"].double()
    log_ratio = logp - inputs["old_per_token_logps"].double()
    if args.importance_sampling_level == "sequence":  # one ratio per sequence, of the mean log-ratio
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    kl = kl * ratio
    advantages = inputs["advantages"].double().unsqueeze(1)
    clipped = ratio.clamp(1 - args.epsilon, 1 + args.epsilon)
    per_token = (-torch.minimum(ratio * advantages, clipped * advantages) + args.beta * kl) * mask
    rows = per_token.size(0)
    loss = {
        "grpo": lambda: (per_token.sum(-1) / mask.sum(-1)).mean(),
        "bnpo": lambda: per_token.sum() / mask.sum(),
        "dr_grpo": lambda: per_token.sum() / (rows * args.max_completion_length),
        "dapo": lambda: per_token.sum() / inputs["num_items_in_batch"],
        "luspo": lambda: per_token.sum(-1).mean(),
    }[args.loss_type]()
    return loss, ((kl * mask).sum() / mask.sum()).item()


@pytest.mark.parametrize("loss_type, level", [("grpo", "token"), ("bnpo", "token"), ("dr_grpo", "token"),
                                              ("dapo", "token"), ("luspo", "sequence")])
def test_full_kl_loss_and_gradient_match_float64(tmp_path, policy_dir, loss_type, level):
    args = grpo_args(PrefOptGRPOConfig, tmp_path, kl_estimator="full", beta=0.3, loss_type=loss_type,
                     importance_sampling_level=level)
    trainer = build(PrefOptGRPOTrainer, args, policy_dir)
    assert args.use_bias_correction_kl and args.epsilon == 0.2
    # A reference away from the policy (it is loaded as a copy of it).
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in trainer.ref_model.parameters():
            param.add_(0.3 * param.abs().mean() * torch.randn(param.shape, generator=g))
    policy64 = copy.deepcopy(trainer.model).double()
    reference64 = copy.deepcopy(trainer.ref_model).double()
    for model in (policy64, reference64):
        del model.forward  # our patched forwards: the class's own gives the full logits
    inputs = micro_batch(trainer.model.config.vocab_size)
    with torch.no_grad():
        current = float64_logprobs(policy64, inputs).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    # Old log-probs 0.3-nats-scale away: ratios on both sides of the clip range [0.8, 1.2].
    inputs["old_per_token_logps"] = (current + 0.3 * torch.randn(current.shape, generator=g)).float()

    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    expected, expected_kl = float64_grpo_loss(policy64, reference64, inputs, args)
    expected.backward()

    assert expected_kl > 1e-2  # the reference is not the policy
    assert loss.item() == pytest.approx(expected.item(), rel=2e-5)
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(expected_kl, rel=2e-5)
    reference_grads = dict(policy64.named_parameters())
    for name, param in trainer.model.named_parameters():
        expected_grad = reference_grads[name].grad
        scale = expected_grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(param.grad.double(), expected_grad, rtol=0, atol=3e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")
    assert not any(p.grad is not None for p in trainer.ref_model.parameters())


def test_full_kl_trains_and_logs_what_stock_logs(tmp_path, policy_dir):
    """Three steps with ``kl_estimator="full"``: the stock trainer's metric names, a positive KL."""
    import trl

    stock = build(trl.GRPOTrainer, grpo_args(trl.GRPOConfig, tmp_path / "stock"), policy_dir)
    stock.train()
    full = build(PrefOptGRPOTrainer, grpo_args(PrefOptGRPOConfig, tmp_path / "full", kl_estimator="full"),
                 policy_dir)
    full.train()
    for a, b in zip(full.state.log_history, stock.state.log_history):
        assert a.keys() == b.keys()
    assert full.state.log_history[2]["kl"] > 0


def test_full_kl_with_a_lora_policy_uses_the_adapter_free_model_as_reference(tmp_path, policy_dir):
    """Under PEFT there is no reference model: the policy with its adapter off is the reference. LoRA
    starts with B = 0, so the first step's policy is the reference (KL exactly 0); then it is not."""
    import datasets

    from trl_cases import lora_config, make_tokenizer
    from trl_grpo_cases import PROMPTS, reward

    torch.manual_seed(0)
    trainer = PrefOptGRPOTrainer(model=str(policy_dir), reward_funcs=reward,
                                 args=grpo_args(PrefOptGRPOConfig, tmp_path, kl_estimator="full"),
                                 train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                                 processing_class=make_tokenizer(), peft_config=lora_config())
    assert trainer.ref_model is None
    trainer.train()
    logs = trainer.state.log_history
    assert logs[0]["kl"] == 0.0 and logs[2]["kl"] > 0.0, [step.get("kl") for step in logs]


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("options, error, fragment", [
    (dict(kl_estimator="k2"), ValueError, "kl_estimator"),
    (dict(kl_estimator="full", beta=0.0), ValueError, "beta"),
    (dict(sampler_matched_logprobs="yes"), TypeError, "sampler_matched_logprobs"),
])
def test_bad_options_raise_naming_the_argument(tmp_path, options, error, fragment):
    with pytest.raises(error, match=fragment):
        grpo_args(PrefOptGRPOConfig, tmp_path, **options)
