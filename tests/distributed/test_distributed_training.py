"""Training with the ops across processes: DistributedDataParallel over the 2-rank group of
distributed_cases.py against one process on the full batch, and the fused linear ops on
FSDP2-sharded heads (linear_fsdp_worker.py under ``torch.distributed.run``)."""

import pytest

from distributed_cases import OK, worker_payload
from launch import run_workers


@pytest.mark.parametrize("model", ["logits", "fused_linear"])
def test_ddp_gradients_equal_single_process_full_batch(model):
    """DDP over 2 ranks (half the pairs each, mean loss) == one process on the full batch."""
    results = [worker_payload(2, rank, "ddp")[model] for rank in range(2)]
    for rank, (verdict, _) in enumerate(results):
        assert verdict == OK, f"rank {rank}:\n{verdict}"
    assert results[0][1] == results[1][1], "DDP gradients differ between the ranks"


def test_linear_ops_on_fsdp2_sharded_heads(tmp_path):
    """Two gloo ranks, heads sharded by FSDP2 (``fully_shard``, DTensor parameters, the reference's
    requiring grad as an nn.Linear's do): outputs and gradients equal float64 of the full heads, the
    head's gradient arrives in its shards, and the reference head gets none."""
    results = run_workers("distributed/linear_fsdp_worker.py", tmp_path)
    assert results["sharded"] == "DTensor" and results["ref_grad"], results
    # fp32 tiles against float64: |logp| ~ 6, a few ulp; gradients relative to their largest entry.
    assert results["logp"] < 2e-5 and results["div"] < 2e-5, results
    assert max(results["hidden_grad"], results["weight_grad"], results["bias_grad"]) < 1e-5, results
