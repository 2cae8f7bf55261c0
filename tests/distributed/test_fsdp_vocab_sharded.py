"""FSDP2 heads run by vocabulary, without gathering the head (fsdp_vocab_worker.py under
``torch.distributed.run``, 3 gloo ranks, each with its own tokens): outputs and hidden gradients
equal float64 on each rank's tokens, the head's gradient equals FSDP2's (the mean over the ranks)
and the whole-head gather's, for V = 301 (shards 101, 101, 99) and V = 4 (shards 2, 2, 0), with the
reference head sharded alike or whole (its rows sliced); the sparse-teacher op and the dense
distillation loss alike; a head replicated as a ``DTensor`` is gathered whole with its gradient
averaged over the ranks."""

import pytest

from launch import run_workers

# fp32 tiles against float64: per-token values to a few ulp of |x| ~ 6, gradients relative to their
# largest entry.
VALUE_TOLERANCE, GRADIENT_TOLERANCE = 2e-6, 2e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_workers("distributed/fsdp_vocab_worker.py", tmp_path_factory.mktemp("fsdp_vocab"), nproc=3)["ranks"]


def test_shards_are_fsdp2s_uneven_ones_with_an_empty_one(ranks):
    assert [r["terms_V301"]["local_rows"] for r in ranks] == [101, 101, 99]
    assert [r["terms_V4"]["local_rows"] for r in ranks] == [2, 2, 0]


@pytest.mark.parametrize("case", ["terms_V301", "terms_V4", "terms_V301_whole_ref", "logprobs_V301", "sparse_V301",
                                  "distill_V301", "replicated_V301"])
def test_outputs_and_gradients_match_float64_and_fsdp2s_mean(ranks, case):
    for rank, mine in enumerate(ranks):
        found = mine[case]
        values = [found[k] for k in ("logp", "div", "entropy", "loss") if k in found]
        gradients = [found[k] for k in ("hidden_grad", "weight_grad", "bias_grad", "gathered_weight_grad")
                     if k in found]
        assert gradients and max(values, default=0.0) < VALUE_TOLERANCE, (rank, found)
        assert max(gradients) < GRADIENT_TOLERANCE, (rank, found)


@pytest.mark.parametrize("case", ["terms_V301", "terms_V4", "terms_V301_whole_ref"])
def test_same_as_the_whole_head_gather(ranks, case):
    """The vocabulary-sharded call and the ``full_tensor`` call agree: outputs to fp32 rounding, the
    hidden and head gradients relative to their largest entry; the reference head gets no gradient."""
    for rank, mine in enumerate(ranks):
        found = mine[case]
        assert found["vs_gathered_outputs"] < 1e-6 and found["vs_gathered_grads"] < GRADIENT_TOLERANCE, (rank, found)
        assert found["ref_grad_none"] and found["shape"], (rank, found)


@pytest.mark.parametrize("case", ["terms_V301", "terms_V4", "terms_V301_whole_ref"])
def test_no_head_is_gathered_whole(ranks, case):
    assert all(mine[case]["whole_head_gathers"] == 0 for mine in ranks)
