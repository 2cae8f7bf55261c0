"""Sharded logits and linear ops on every rank of the spawned 2- and 3-rank groups
(distributed_cases.py): each scenario's shard meets the numerics contract and matches one
process, every rank holds the same bytes, the outputs are fp32 of the token shape, and a
control shows the checks fail on shards handed over in the wrong order."""

import pytest

from distributed_cases import LEAD, OK, WORLDS, scenarios, worker_payload


NUMERIC_CASES = [(w, name) for w in WORLDS for name in scenarios(w)]


@pytest.mark.parametrize("world,scenario", NUMERIC_CASES, ids=[f"w{w}-{n}" for w, n in NUMERIC_CASES])
def test_sharded_matches_single_process_and_float64(world, scenario):
    """Outputs and gradients of the rank's shard meet the contract and match one process."""
    failures = {}
    for rank in range(world):
        verdicts = worker_payload(world, rank, "numerics")[0]
        assert scenario in verdicts, f"rank {rank} did not run {scenario}"
        if verdicts[scenario] != OK:
            failures[rank] = verdicts[scenario]
    assert not failures, "\n".join(f"rank {r}:\n{msg}" for r, msg in failures.items())


def _family(scenario):
    """The group of scenarios a dtype or bit-identity test covers: a backend, linear or subgroup."""
    kind, _, _, _, backend, _ = scenario
    return "linear" if kind == "linear" else "subgroup" if kind == "subgroup" else backend


FAMILIES = [(w, f) for w in WORLDS for f in dict.fromkeys(_family(sc) for sc in scenarios(w).values())]
FAMILY_PARAMS = [pytest.param(w, f, id=f"w{w}-{f}") for w, f in FAMILIES]


@pytest.mark.parametrize("world,family", FAMILY_PARAMS)
def test_every_rank_holds_bit_identical_outputs(world, family):
    """Per-token outputs, extras and the linear ops' hidden gradient: the same bytes on every rank."""
    digests = [worker_payload(world, rank, "numerics")[1] for rank in range(world)]
    names = [n for n, sc in scenarios(world).items() if _family(sc) == family]
    assert names
    differ = []
    for name in names:
        holders = [r for r in range(world) if name in digests[r]]
        if name.startswith("subgroup"):
            assert holders == [1, 2], (name, holders)
        else:
            assert holders == list(range(world)), f"{name}: ranks {holders} hold a result"
        if len({digests[r][name] for r in holders}) != 1:
            differ.append(name)
    assert not differ, f"the ranks hold different outputs for {differ}"


@pytest.mark.parametrize("world,family", FAMILY_PARAMS)
def test_sharded_outputs_are_fp32_of_the_token_shape(world, family):
    kinds = [worker_payload(world, rank, "numerics")[2] for rank in range(world)]
    wrong = {}
    for name, scenario in scenarios(world).items():
        if _family(scenario) != family:
            continue
        for rank in range(world):
            for key, (dtype, shape) in kinds[rank].get(name, {}).items():
                if dtype != "torch.float32" or shape != LEAD:
                    wrong[(rank, name, key)] = (dtype, shape)
    assert not wrong, f"{len(wrong)} outputs not fp32 {LEAD}: {list(wrong.items())[:6]}"


@pytest.mark.parametrize("world", WORLDS)
def test_checker_rejects_shards_in_the_wrong_order(world):
    """Control: the checks above fail when each rank passes its neighbour's shard."""
    for rank in range(world):
        verdicts = worker_payload(world, rank, "numerics")[0]
        assert verdicts["control"] == OK, f"rank {rank}: {verdicts['control']}"
