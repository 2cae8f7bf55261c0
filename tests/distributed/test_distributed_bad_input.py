"""Bad input to the sharded ops (``process_group=``) fails on every rank alike, never by a hang
or a crash: each bad call of the spawned groups (distributed_cases.py), ranks that disagree on
an input, a label or what the backward needs, and a process group without
``torch.distributed`` initialised (in this process)."""

import pytest
import torch
import torch.distributed as dist

import prefopt_kernels as pk

from distributed_cases import BAD_INPUT_CASES, DIFFERING_FIELD, MISMATCH_CASES, OK, WORLDS, worker_payload


BAD_CASES = [(w, name) for w in WORLDS for name in BAD_INPUT_CASES]


@pytest.mark.parametrize("world,case", BAD_CASES, ids=[f"w{w}-{n}" for w, n in BAD_CASES])
def test_bad_input_raises_on_every_rank(world, case):
    """Every rank raises a clear error (no rank hangs or returns) for the same bad call."""
    exc_type, text = BAD_INPUT_CASES[case]
    for rank in range(world):
        payload = worker_payload(world, rank, "bad_input")
        text_here = text.format(V=payload["vocab"])
        outcome = payload[case]
        assert outcome.startswith(f"{exc_type.__name__}: "), f"rank {rank}: {outcome}"
        assert text_here in outcome, f"rank {rank}: {outcome!r} lacks {text_here!r}"
        if text_here == "the ranks differ in: ":
            assert DIFFERING_FIELD[case] in outcome.split(text_here)[1], f"rank {rank}: {outcome!r}"


@pytest.mark.parametrize("world", WORLDS)
def test_group_still_works_after_bad_inputs(world):
    for rank in range(world):
        payload = worker_payload(world, rank, "bad_input")
        assert payload["good_call_after"] == OK, f"rank {rank}: {payload['good_call_after']}"


def test_process_group_without_initialised_distributed():
    """Single process: a process_group needs torch.distributed initialised (a clear error)."""
    if dist.is_available() and dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    logits, labels = torch.randn(3, 5), torch.tensor([0, 4, -100])
    with pytest.raises(ValueError, match="init_process_group"):
        pk.token_logprobs(logits, labels, process_group=object())
    with pytest.raises(ValueError, match="init_process_group"):
        pk.token_divergence(logits, logits, process_group="world")
    with pytest.raises(ValueError, match="init_process_group"):
        pk.linear_token_logprobs(torch.randn(3, 4), torch.randn(5, 4), labels, process_group=object())


@pytest.mark.parametrize("case", MISMATCH_CASES)
def test_ranks_disagreeing_on_uncovered_inputs_raise(case):
    for rank in range(2):
        outcome = worker_payload(2, rank, "mismatch")[case]
        field = {"temperature": "temperature", "js_beta": "beta", "labels": "labels", "div_weight": "weight"}[case]
        assert outcome.startswith("ValueError: ") and field in outcome.split("differ in: ")[-1], \
            f"rank {rank}: {outcome}"


def test_label_out_of_range_on_one_rank_raises_on_every_rank():
    for rank in range(2):
        outcome = worker_payload(2, rank, "one_rank_bad_label")["outcome"]
        assert outcome.startswith("ValueError: ") and "labels" in outcome, f"rank {rank}: {outcome}"


@pytest.mark.parametrize("case", ["needs_grad", "hidden_size"])
def test_linear_ranks_disagreeing_on_the_backward_raise_in_the_forward(case):
    """What the backward's all-reduce depends on is in the call check: the same error on every rank."""
    field = {"needs_grad": "hidden_needs_grad", "hidden_size": "hidden_size"}[case]
    for rank in range(2):
        outcome = worker_payload(2, rank, "backward_mismatch")[case]
        assert outcome.startswith("ValueError: ") and field in outcome.split("differ in: ")[-1], \
            f"rank {rank}: {outcome}"


def test_linear_ranks_keeping_different_rows_raise_not_crash():
    for rank in range(2):
        outcome = worker_payload(2, rank, "linear_ignore_mismatch", store="hazards")["outcome"]
        assert outcome.startswith("ValueError: "), f"rank {rank}: {outcome}"
