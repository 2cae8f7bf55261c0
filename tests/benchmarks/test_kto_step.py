"""``python -m benchmarks --kto-step``: one KTO step per trainer variant (benchmarks/kto_step.py)."""

import pytest
import torch

from step_cli import run_tiny_step


def test_full_logits_head_equals_the_fused_head():
    # The baseline row's head answers TRL's protocol with the values our fused head gives.
    pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.kto_step import add_full_logits_head
    from prefopt_kernels.integrations.trl import add_fused_lm_head

    config = LlamaConfig(vocab_size=301, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, initializer_range=0.2)
    torch.manual_seed(0)
    full, fused = LlamaForCausalLM(config), LlamaForCausalLM(config)
    fused.load_state_dict(full.state_dict())
    outputs = ("log_probs", "entropy", "mean_logits")
    add_full_logits_head(full, outputs=outputs)
    add_fused_lm_head(fused, outputs=outputs)
    ids = torch.randint(3, 301, (2, 7))
    labels = ids.clone()
    labels[0, :3] = -100
    a = full(input_ids=ids, labels=labels, fused_lm_head=True)
    b = fused(input_ids=ids, labels=labels, fused_lm_head=True)
    for name in ("loss",) + outputs:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(a.label_mask, b.label_mask) and (a.log_probs[0, :2] == 0).all()
    # Without fused_lm_head the model's own forward runs.
    assert full(input_ids=ids).logits.shape == (2, 7, 301)


def test_cli_kto_step_tiny(tmp_path):
    # One KTO step per variant at tiny sizes, through the CLI: every row measured, the ratios
    # taken from this run's rows, every row computing the same loss, and the section written
    # beside a suite's results.
    from benchmarks.kto_step import VARIANTS

    rows, _, md, stdout = run_tiny_step(tmp_path, "--kto-step", "kto_step", VARIANTS)
    for r in rows.values():
        assert r["speedup_vs_trl"] == pytest.approx(rows["trl:kto"]["time_ms"] / r["time_ms"])
        assert r["speedup_vs_full_logits"] == pytest.approx(rows["full-logits:kto"]["time_ms"] / r["time_ms"])
        # bf16 autocast: the same loss to bf16 rounding of the logits.
        assert r["loss"] == pytest.approx(rows["trl:kto"]["loss"], rel=5e-3)
    assert "## One KTO step (TRL KTOTrainer)" in md and "## One KTO step" in stdout
    assert "| prefopt:kto | prefopt | prefopt linear_token_logprobs |" in md
