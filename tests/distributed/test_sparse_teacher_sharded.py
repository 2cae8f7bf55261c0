"""The sparse-teacher op with a vocabulary-sharded student head (``process_group=``), on 3 gloo ranks
(sparse_teacher_tp_worker.py under ``torch.distributed.run``): every divergence, with and without
the tail, absent ids and an empty shard, against the float64 oracle over the full logits; every
rank holds the same bytes; bad input raises on every rank, naming the argument."""

import pytest

from launch import run_workers

WORLD = 3
# case: text every rank's error must hold ("{V}": the global vocabulary).
BAD_CALLS = {
    "k": "the ranks differ in: ",
    "ids": "the ranks differ in: ",
    "logprobs": "the ranks differ in: ",
    "mask": "the ranks differ in: ",
    "add_tail": "the ranks differ in: ",
    "divergence": "the ranks differ in: ",
    "needs_grad": "the ranks differ in: ",
    "vocab_size_one_rank": "the ranks differ in: ",
    "id_out_of_range": "teacher_ids must lie in [0, {V})",
    "teacher_vocab_size": "teacher_vocab_size must equal the student head's vocabulary V = {V}",
    "duplicate_id": "teacher_ids must not repeat an id",
}
# The argument a disagreement must name.
DIFFERING = {"k": "teacher_ids.k", "ids": "teacher_ids", "logprobs": "teacher_logprobs", "mask": "mask",
             "add_tail": "add_tail", "divergence": "op.divergence", "needs_grad": "hidden_needs_grad",
             "vocab_size_one_rank": "teacher_vocab_size"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers("distributed/sparse_teacher_tp_worker.py", tmp_path_factory.mktemp("sparse_tp"), nproc=WORLD)


def test_shards_are_uneven_and_one_is_empty(results):
    """The scenarios below cover what they claim: uneven cuts, and an empty shard."""
    edges = results["cuts"]
    sizes = {name: {b - a for a, b in zip(e, e[1:])} for name, e in edges.items()}
    assert all(len(s) > 1 for s in sizes.values()), sizes
    assert 0 in sizes["empty_shard"]


def test_values_and_gradients_match_float64_on_every_rank(results):
    failures = {(rank, name): verdict for rank, mine in enumerate(results["ranks"])
                for name, verdict in mine["scenarios"].items() if verdict != "ok"}
    assert len(results["ranks"]) == WORLD and not failures, failures


def test_every_rank_holds_bit_identical_outputs_and_hidden_gradient(results):
    first = results["ranks"][0]["digests"]
    for rank, mine in enumerate(results["ranks"][1:], 1):
        assert mine["digests"] == first, f"rank {rank} differs"


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_raises_on_every_rank_naming_the_argument(results, case):
    text = BAD_CALLS[case].format(V=results["vocab"])
    for rank, mine in enumerate(results["ranks"]):
        outcome = mine["bad"][case]
        assert outcome.startswith("ValueError: ") and text in outcome, f"rank {rank}: {outcome}"
        if case in DIFFERING:
            assert DIFFERING[case] in outcome.split(text)[1].split(", "), f"rank {rank}: {outcome}"


def test_group_still_works_after_bad_inputs(results):
    for rank, mine in enumerate(results["ranks"]):
        assert mine["good_call_after"] == "ok", f"rank {rank}: {mine['good_call_after']}"
