"""The full-KL GRPO terms on a vocabulary-sharded LM head (``process_group=``): two gloo ranks
(trl_grpo_tp_worker.py under ``torch.distributed.run``) against the whole head in one process.

Both sides run the same fp32 ops; the sharded one merges the two shards' row states (the same
online-softmax merge the tiles of one head use), so values agree to fp32 rounding of the
merge: per-token terms within 1e-5 absolute (|logp| ~ 6), the loss within 1e-6, gradients
within 1e-5 of their largest entry.
"""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

from launch import run_workers  # noqa: E402


def test_full_kl_loss_on_two_vocabulary_shards_equals_the_whole_head(tmp_path):
    ranks = run_workers("integrations/trl_grpo_tp_worker.py", tmp_path)["ranks"]
    assert len(ranks) == 2
    for rank, result in enumerate(ranks):
        assert result["kl_mean"] > 1e-2 and result["loss_value"] != 0.0, (rank, result)
        assert result["loss"] <= 1e-6 and result["terms"] <= 1e-5, (rank, result)
        assert max(result["hidden_grad"], result["weight_grad"], result["bias_grad"]) <= 1e-5, (rank, result)
