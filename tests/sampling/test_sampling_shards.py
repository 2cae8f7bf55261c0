"""Sampler-matched log-probs under tensor parallelism: 3 gloo ranks, random vocabulary shards (one
empty), logits and fused linear ops against the sorting oracle (sampling_shards_worker.py), and
the same outputs (and hidden gradient) on every rank."""

import math

from launch import run_workers


def test_sharded_sampled_ops_match_the_oracle_on_every_rank(tmp_path):
    ranks = run_workers("sampling/sampling_shards_worker.py", tmp_path, nproc=3)["ranks"]
    failures = {f"rank {r} {key}": msg for r, result in enumerate(ranks)
                for key, msg in result["verdicts"].items() if msg != "ok"}
    assert not failures, "\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert len(ranks[0]["verdicts"]) >= 12 + 6  # the logits ops on two backends at least, the linear ops
    for key, values in ranks[0]["digests"].items():
        for other in ranks[1:]:
            same = all(a == b or (math.isnan(a) and math.isnan(b)) for x, y in zip(values, other["digests"][key])
                       for a, b in zip(x, y))
            assert same, f"{key}: the ranks hold different outputs"
