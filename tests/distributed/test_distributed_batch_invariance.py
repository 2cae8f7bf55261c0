"""``batch_invariant=True`` under tensor parallelism: two gloo ranks, each with its vocabulary
shard (batch_invariant_tp_worker.py)."""

from launch import run_workers


def test_sharded_token_bits_do_not_depend_on_the_batch(tmp_path):
    """A token's outputs and hidden gradient (global on every rank; rank 0 reports) are the same
    bits in a pool of 1500 tokens, alone and among three; and they agree with one process holding
    the whole heads to fp32 rounding (the shards' states merge in another order than one
    process's tiles)."""
    results = run_workers("distributed/batch_invariant_tp_worker.py", tmp_path)
    assert results["logprobs_invariant"] and results["terms_invariant"], results
    assert results["logprobs_vs_one_process"] < 1e-5 and results["terms_vs_one_process"] < 1e-5, results
