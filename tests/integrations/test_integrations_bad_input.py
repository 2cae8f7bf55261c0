"""Bad input to the TRL integration fails loudly, naming what is wrong.

``CASES`` is the integrations' table of bad input: name -> (call, exception type, message
fragment); a call takes an output directory. Skipped without TRL (or transformers). The
logits ops' table is in tests/ops/test_ops_bad_input.py.
"""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

from prefopt_kernels.integrations import trl as pk_trl  # noqa: E402
from prefopt_kernels.integrations.trl_dpo import PrefOptDPOConfig  # noqa: E402

from trl_cases import make_model  # noqa: E402


def _config(output_dir, **kwargs):
    return PrefOptDPOConfig(output_dir=output_dir, report_to=[], use_cpu=True, **kwargs)


CASES = {
    # PrefOptDPOConfig rejects the combinations it does not support.
    "PrefOptDPOConfig: tdpo1 in a list": (lambda out: _config(out, loss_type=["tdpo1", "sigmoid"]), ValueError,
                                          "used alone"),
    "PrefOptDPOConfig: loss_weights for sparse_po": (
        lambda out: _config(out, loss_type="sparse_po", loss_weights=[2.0]), ValueError, "without loss_weights"),
    "PrefOptDPOConfig: precompute_ref_log_probs for sparse_po": (
        lambda out: _config(out, loss_type="sparse_po", precompute_ref_log_probs=True), ValueError,
        "precompute_ref_log_probs"),
    "PrefOptDPOConfig: ld_alpha for simpo": (lambda out: _config(out, loss_type="simpo", ld_alpha=0.5), ValueError,
                                             "ld_alpha"),
    "PrefOptDPOConfig: unknown sparse_po_mask": (
        lambda out: _config(out, loss_type="sparse_po", sparse_po_mask="dense"), ValueError, "sparse_po_mask"),
    "PrefOptDPOConfig: precompute_ref_log_probs for simpo": (
        lambda out: _config(out, loss_type="simpo", precompute_ref_log_probs=True), ValueError, "no reference model"),
    "PrefOptDPOConfig: sync_ref_model for simpo": (
        lambda out: _config(out, loss_type="simpo", sync_ref_model=True), ValueError, "no reference model"),
    "PrefOptDPOConfig: unknown loss_type": (lambda out: _config(out, loss_type="orpo2"), ValueError,
                                            "loss_type 'orpo2' is unknown"),
    "PrefOptDPOConfig: orpo in a list": (lambda out: _config(out, loss_type=["orpo", "sft"]), ValueError,
                                         "loss_type 'orpo' must be used alone"),
    "PrefOptDPOConfig: precompute_ref_log_probs for cpo": (
        lambda out: _config(out, loss_type="cpo", precompute_ref_log_probs=True), ValueError, "no reference model"),
    # The fused LM head computes the outputs it knows only.
    "add_fused_lm_head: unknown output": (
        lambda out: pk_trl.add_fused_lm_head(make_model("plain"), outputs=("log_probs", "logits")), ValueError,
        "outputs"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_naming_the_argument(tmp_path, name):
    call, error, fragment = CASES[name]
    with pytest.raises(error, match=fragment):
        call(str(tmp_path))
