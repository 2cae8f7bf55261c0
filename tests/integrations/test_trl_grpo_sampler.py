r"""``sampler_matched_logprobs``: the importance ratio against a top-p sampler is 1 for identical
policies, where the stock trainer's is the kept mass; off, the trainer is the stock one.

No vLLM: the sampler is emulated in-process from the trainer's own model (``EmulatedSampler``
replaces ``_generate_single_turn``, the one place TRL calls vLLM, and the trainer is told it runs
vLLM with the token-level importance-sampling correction). It samples each token from
``softmax(z / T)`` restricted by top-p, the kept set built in float64 by sorting (vLLM's
``processed_logprobs``), and reports the sampled token's log-prob under that renormalised
distribution. The policy does not change between sampling and scoring (the ratio is computed
before the step), so the trainer's log-probs should equal the sampler's:

* stock (and ``sampler_matched_logprobs=False``, bit for bit the same ratios): the trainer scores
  the full tempered softmax, so each token's ratio is the kept mass ``top_p ≤ Σ_K p < 1``
  (measured 0.80 to 0.81 at top_p = 0.8);
* ``sampler_matched_logprobs=True``, with either KL estimator: every ratio is 1 to fp32 rounding
  (``|r - 1| ≤ 1e-5``; the sampler's float64 log-probs of the model's fp32 logits against the
  fused fp32 tiles).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

import torch  # noqa: E402
import trl  # noqa: E402

from prefopt_kernels.integrations import trl as pk_trl  # noqa: E402
from prefopt_kernels.integrations.trl_grpo import PrefOptGRPOConfig, PrefOptGRPOTrainer, full_kl_terms  # noqa: E402
from trl_cases import restore_trl  # noqa: E402,F401 - a fixture: pytest finds it among the module's names
from trl_grpo_cases import build, grpo_args, policy_dir  # noqa: E402,F401 - policy_dir: a fixture

TOP_P = 0.8


def top_p_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """float64 log-probs of vLLM's processed distribution: ``softmax(z / T)`` renormalised on the
    smallest set of largest tokens whose mass reaches ``top_p`` (ties of the last one kept); -inf
    outside it."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    sorted_logp, _ = logp.sort(descending=True)
    mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
    kept_in_order = mass_before < top_p  # the first token always, then until the mass reaches top_p
    threshold = sorted_logp.masked_fill(~kept_in_order, float("inf")).min(-1, keepdim=True).values
    kept = logp >= threshold
    return torch.where(kept, logp - logp.masked_fill(~kept, float("-inf")).logsumexp(-1, keepdim=True),
                       torch.tensor(float("-inf"), dtype=torch.float64))


class EmulatedSampler:
    """A trainer mix-in: top-p sampling from the trainer's model in place of vLLM, and the
    importance-sampling ratios of every generation batch kept in ``ratios``."""

    ratios: list

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        model = self.accelerator.unwrap_model(self.model)
        g = torch.Generator().manual_seed(len(self.ratios))
        completions, logprobs = [], []
        with torch.no_grad():
            for prompt in prompt_ids:
                ids, scores = list(prompt), []
                for _ in range(self.max_completion_length):
                    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                    processed = top_p_logprobs(logits, self.temperature, TOP_P)
                    token = int(torch.multinomial(processed.exp(), 1, generator=g))
                    ids.append(token)
                    scores.append(processed[token].item())
                completions.append(ids[len(prompt):])
                logprobs.append(scores)
        return completions, logprobs

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.ratios.append(output["importance_sampling_ratio"][output["completion_mask"].bool()])
        return output


class SampledStockTrainer(EmulatedSampler, trl.GRPOTrainer):
    pass


class SampledPrefOptTrainer(EmulatedSampler, PrefOptGRPOTrainer):
    pass


def sampled_run(trainer_class, args, policy_dir):
    trainer = build(trainer_class, args, policy_dir)
    trainer.ratios = []
    trainer.use_vllm = True  # set after construction: no vLLM is started, _generate_single_turn stands in
    trainer.train()
    return trainer.ratios


def test_sampler_matched_ratio_is_one_where_stock_is_the_kept_mass(tmp_path, policy_dir, restore_trl):
    options = dict(steps=2, top_p=TOP_P, vllm_importance_sampling_correction=True,
                   vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=100.0)
    pk_trl.use_in_trl()  # the stock trainer on our head, so that "off" can be compared bit for bit
    stock = sampled_run(SampledStockTrainer, grpo_args(trl.GRPOConfig, tmp_path / "stock", **options), policy_dir)
    off = sampled_run(SampledPrefOptTrainer, grpo_args(PrefOptGRPOConfig, tmp_path / "off", **options), policy_dir)
    on = sampled_run(SampledPrefOptTrainer, grpo_args(PrefOptGRPOConfig, tmp_path / "on",
                                                      sampler_matched_logprobs=True, **options), policy_dir)
    full = sampled_run(SampledPrefOptTrainer, grpo_args(PrefOptGRPOConfig, tmp_path / "full", kl_estimator="full",
                                                        sampler_matched_logprobs=True, **options), policy_dir)
    assert len(stock) == len(off) == len(on) == len(full) == 2
    for stock_ratio, off_ratio, on_ratio, full_ratio in zip(stock, off, on, full):
        assert stock_ratio.numel() == 8  # 2 completions of 4 tokens
        assert torch.equal(off_ratio, stock_ratio)
        # The kept mass: at least top_p by the nucleus' definition, and below 1.
        assert (stock_ratio >= TOP_P - 1e-5).all() and (stock_ratio < 1).all() and stock_ratio.mean() < 0.95
        for ratio in (on_ratio, full_ratio):
            assert (ratio - 1).abs().max() <= 1e-5, ratio


def test_full_kl_terms_score_the_kept_set_and_keep_the_full_kl():
    """With the sampler's top-p, ``full_kl_terms``' log-prob is the processed distribution's (the
    float64 sort above; -inf for a label outside the kept set) while the entropy and the KL stay
    the full distributions' (those of the call without top-p)."""
    torch.manual_seed(0)
    head, ref_head = torch.nn.Linear(8, 301), torch.nn.Linear(8, 301)
    hidden, ref_hidden = 2 * torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    temperature = 0.7
    with torch.no_grad():
        processed = top_p_logprobs(head(hidden), temperature, TOP_P)
        full = torch.log_softmax(head(hidden).double() / temperature, dim=-1)
    labels = torch.multinomial(processed.exp().view(-1, 301), 1, generator=torch.Generator().manual_seed(1))
    labels = labels.view(3, 4)
    labels[2, 3] = int(processed[2, 3].argmin())  # outside the kept set
    labels[0, 0] = -100
    logp, entropy, kl = full_kl_terms(hidden, head, labels, ref_hidden, ref_head, temperature=temperature,
                                      top_p=TOP_P)
    _, full_entropy, full_kl = full_kl_terms(hidden, head, labels, ref_hidden, ref_head, temperature=temperature)
    index = labels.clamp(min=0).unsqueeze(-1)
    expected, unprocessed = processed.gather(-1, index).squeeze(-1), full.gather(-1, index).squeeze(-1)
    kept = labels != -100
    kept[2, 3] = False
    assert logp[2, 3] == float("-inf") and logp[0, 0] == 0
    torch.testing.assert_close(logp[kept].double(), expected[kept], rtol=0, atol=1e-5)
    assert (expected[kept] > unprocessed[kept] + 0.05).all()  # the renormalisation is not lost in rounding
    torch.testing.assert_close(entropy, full_entropy, rtol=0, atol=0)
    torch.testing.assert_close(kl, full_kl, rtol=0, atol=0)
