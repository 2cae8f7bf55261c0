"""Run by ``torch.distributed.run`` from ``test_distributed_batch_invariance.py``: the fused linear
ops with ``batch_invariant=True`` on a head sharded by vocabulary (``process_group=``; gloo, CPU).

Every rank holds its shard of a policy and a reference head (uneven shards, each wider than one
4096-column tile on rank 0) and runs ``linear_token_logprobs`` and ``linear_token_terms`` (js) on
a pool of 1500 tokens and on batches of one and of three tokens from it. Rank 0 writes, per op,
whether every output and the hidden gradient of the tracked token are the same bits in all three
calls, and the largest difference from one process holding the whole heads.
"""

import sys

import torch
import torch.distributed as dist

import prefopt_kernels as pk

from launch import finish_worker

V, H, N, TRACKED = 5000, 32, 1500, 1234
CUTS = (0, 4300, V)


def _run(op, index, hidden, ref_hidden, labels, heads, group):
    h = hidden[index].clone().requires_grad_(True)
    with pk.use_backend("native"):
        if op == "logprobs":
            outputs = pk.linear_token_logprobs(h, heads[0], labels[index], return_entropy=True, batch_invariant=True,
                                               process_group=group)
        else:
            terms = pk.linear_token_terms(h, heads[0], labels[index], ref_hidden[index], heads[1], divergence="js",
                                          return_entropy=True, batch_invariant=True, process_group=group)
            outputs = (terms.logp, terms.ref_logp, terms.div, terms.entropy)
    sum((k + 1) * out.sum() for k, out in enumerate(outputs)).backward()
    return [out.detach() for out in outputs] + [h.grad]


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    weight, ref_weight = torch.randn(V, H, generator=g) * 0.3, torch.randn(V, 24, generator=g) * 0.3
    hidden, ref_hidden = torch.randn(N, H, generator=g), torch.randn(N, 24, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    shard = (weight[CUTS[rank]:CUTS[rank + 1]], ref_weight[CUTS[rank]:CUTS[rank + 1]])
    results = {}
    for op in ("logprobs", "terms"):
        pool = _run(op, torch.arange(N), hidden, ref_hidden, labels, shard, dist.group.WORLD)
        alone = _run(op, torch.tensor([TRACKED]), hidden, ref_hidden, labels, shard, dist.group.WORLD)
        three = _run(op, torch.tensor([3, TRACKED, 7]), hidden, ref_hidden, labels, shard, dist.group.WORLD)
        results[f"{op}_invariant"] = all(torch.equal(p[TRACKED], a[0]) and torch.equal(p[TRACKED], t[1])
                                         for p, a, t in zip(pool, alone, three))
        whole = _run(op, torch.arange(N), hidden, ref_hidden, labels, (weight, ref_weight), None)
        results[f"{op}_vs_one_process"] = max(((p - w).abs().max() / w.abs().max().clamp(min=1)).item()
                                              for p, w in zip(pool, whole))
    finish_worker(out, results)


if __name__ == "__main__":
    main(sys.argv[1])
