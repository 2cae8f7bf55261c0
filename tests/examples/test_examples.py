"""The scripts in ``examples/`` run end to end, with few steps and small sizes.

* ``train_sparse_po.py``: the SparsePO training loop and the memory comparison complete,
  the loss curve is finite.
* ``trl_dpo.py`` (skipped without transformers, TRL or datasets): both runs complete with
  finite losses; the SparsePO run logs its own metrics (``kl/*``, ``mask/*``) next to TRL's,
  the sigmoid + SFT mix goes through TRL's own loss and logs TRL's metrics only; the policy
  starts as the reference (zero reward margin at step 1) and has moved by step 2.

Each example is loaded from its file and its ``main`` called in this process.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TRL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "entropy", "logits/chosen", "logits/rejected",
               "mean_token_accuracy", "num_tokens")
SPARSE_PO_METRICS = ("kl/chosen", "kl/rejected", "mask/density", "mask/kl_density", "mask/reward_mean",
                     "mask/kl_mean")


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_sparse_po(monkeypatch, capsys):
    example = _load_example("train_sparse_po")
    monkeypatch.setattr(sys, "argv", ["train_sparse_po.py", "--steps", "2", "--device", "cpu",
                                      "--vocab-for-memory", "1024"])
    example.main()
    out = capsys.readouterr().out
    curve = re.search(r"mean loss of the first \d+ steps (\S+) -> last \d+ steps (\S+)", out)
    assert curve is not None, out
    assert all(math.isfinite(float(value)) for value in curve.groups())
    assert re.search(r"fused peak .* MiB", out) and re.search(r"eager peak .* MiB", out), out


def test_trl_dpo(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import prefopt_kernels.integrations.trl as pk_trl

    # Both runs score the models on our fused head (SparsePO through linear_token_terms).
    fused_calls = []
    counted = pk_trl.linear_token_logprobs
    monkeypatch.setattr(pk_trl, "linear_token_logprobs", lambda *a, **k: fused_calls.append(1) or counted(*a, **k))
    example = _load_example("trl_dpo")
    results = example.main(["--steps", "2", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out

    assert set(results) == {"sparse_po", "sigmoid+sft"}
    assert fused_calls
    for run, history in results.items():
        assert len(history) == 2, run
        expected = TRL_METRICS + (SPARSE_PO_METRICS if run == "sparse_po" else ())
        for step in history:
            for key in expected:
                assert math.isfinite(step[key]), (run, key, step.get(key))
        assert abs(history[0]["rewards/margins"]) < 1e-6, run  # policy == reference at step 1
        assert history[1]["rewards/margins"] != 0.0, run
    sparse_po, mix = results["sparse_po"], results["sigmoid+sft"]
    assert all(0.0 < step["mask/density"] <= 1.0 for step in sparse_po)
    assert not any(key.startswith(("kl/", "mask/")) for step in mix for key in step)

    for run in example.RUNS.values():
        assert f"== loss_type={run['loss']['loss_type']!r}" in out
        assert "step " + " ".join(f"{name:>{max(len(name), 9)}}" for name in run["columns"]) in out
    assert re.search(r"sparse_po: loss \S+ -> \S+ over 2 steps \(finite\)", out), out
    assert re.search(r"sigmoid\+sft: loss \S+ -> \S+ over 2 steps \(finite\)", out), out
