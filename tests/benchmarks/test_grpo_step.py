"""``python -m benchmarks --grpo-step``: one GRPO step per trainer variant (benchmarks/grpo_step.py)."""

import pytest
import torch

from step_cli import run_tiny_step


def test_full_logits_terms_equal_the_fused_terms():
    # The baseline row computes the same per-token terms as the trainer's fused pass.
    pytest.importorskip("trl")
    from benchmarks.grpo_step import full_logits_kl_terms

    from prefopt_kernels.integrations.trl_grpo import full_kl_terms

    torch.manual_seed(0)
    head, ref_head = torch.nn.Linear(8, 301), torch.nn.Linear(8, 301)
    hidden, ref_hidden = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    labels = torch.randint(0, 301, (2, 5))
    labels[1, :2] = -100
    options = dict(temperature=0.7, logit_scale=1.5, softcap=3.0, ref_logit_scale=1.5, ref_softcap=3.0)
    fused = full_kl_terms(hidden, head, labels, ref_hidden, ref_head, **options)
    eager = full_logits_kl_terms(hidden, head, labels, ref_hidden, ref_head, **options)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (fused[2][labels != -100] > 1e-2).all()
    with pytest.raises(ValueError, match="process group"):
        full_logits_kl_terms(hidden, head, labels, ref_hidden, ref_head, process_group=object())


def test_cli_grpo_step_tiny(tmp_path):
    # One GRPO step per variant at tiny sizes, through the CLI: every row measured, the ratios
    # taken from this run's rows, the rows of one KL estimator computing the same loss, and the
    # section written beside a suite's results.
    from benchmarks.grpo_step import VARIANTS

    rows, _, md, stdout = run_tiny_step(tmp_path, "--grpo-step", "grpo_step", VARIANTS)
    for r in rows.values():
        assert r["speedup_vs_trl"] == pytest.approx(rows["trl:k3"]["time_ms"] / r["time_ms"])
        assert r["mem_vs_trl"] == pytest.approx(r["mem_bytes"] / rows["trl:k3"]["mem_bytes"])
    full = rows["full-logits:full"]
    for name in ("prefopt:full", "full-logits:full"):
        assert rows[name]["speedup_vs_full_logits"] == pytest.approx(full["time_ms"] / rows[name]["time_ms"])
    assert "speedup_vs_full_logits" not in rows["prefopt:k3"]
    # bf16 autocast: the same loss to bf16 rounding of the logits.
    assert rows["prefopt:k3"]["loss"] == pytest.approx(rows["trl:k3"]["loss"], rel=5e-3)
    assert rows["prefopt:full"]["loss"] == pytest.approx(full["loss"], rel=5e-3)
    assert "## One GRPO step (TRL GRPOTrainer)" in md and "## One GRPO step" in stdout
    assert "| prefopt:full | prefopt | full | prefopt linear_token_terms |" in md
