"""One rank of the tensor-parallel sampling check (``test_sampling_shards.py``): every rank holds a
random contiguous vocabulary shard (an empty one included), runs the sampled logits and linear
ops with ``process_group=`` and checks its outputs and its shard's gradient against the sorting
float64 oracle on the full rows. Writes every rank's verdicts to ``results.json``."""

import sys
import traceback

import torch
import torch.distributed as dist

import prefopt_kernels as pk
from launch import finish_worker
from sampling_cases import ambiguous_rows, oracle

OPTIONS = [dict(top_k=20, top_p=0.9, min_p=0.05), dict(top_p=0.95), dict(min_p=0.02), dict(top_k=3),
           dict(top_k=1100, top_p=0.97), dict(top_p=0.5, min_p=0.3)]


def cuts(vocab, world, gen):
    """``world`` contiguous shards in rank order, one of them empty."""
    points = sorted(torch.randint(0, vocab + 1, (world - 2,), generator=gen).tolist())
    bounds = [0, 0] + points + [vocab]
    return [(bounds[r], bounds[r + 1]) for r in range(world)]


def close(got, want, what, rtol=1e-5):
    got, want = got.double(), want.double()
    if want.numel() and (got - want).abs().max() > rtol * (1 + want.abs().max()):
        raise AssertionError(f"{what}: off by {(got - want).abs().max().item()}")


def check_logits(seed, rank, world, group):
    gen = torch.Generator().manual_seed(seed)
    vocab = [517, 2053, 3001][seed % 3]
    options = OPTIONS[seed % len(OPTIONS)]
    x = torch.randn(2, 4, vocab, generator=gen) * (0.05 if seed % 4 == 1 else 2.0)
    labels = torch.where(torch.rand(2, 4, generator=gen) < 0.5, x.argmax(-1), torch.randint(0, vocab, (2, 4), generator=gen))
    labels[1, 0] = -100
    v0, v1 = cuts(vocab, world, gen)[rank]
    shard = x[..., v0:v1].contiguous().requires_grad_()
    logp, mass = pk.token_logprobs(shard, labels, return_kept_mass=True, process_group=group, **options)
    upstream = torch.rand(2, 4, generator=gen) + 0.5
    logp.backward(upstream)
    top_k, top_p, min_p = options.get("top_k"), options.get("top_p"), options.get("min_p")
    want_logp, want_mass, want_grad = oracle(x, labels, 1.0, top_k, top_p, min_p)
    clear = ~ambiguous_rows(x, 1.0, top_k, top_p, min_p)
    logp, mass = logp.reshape(-1), mass.reshape(-1)
    assert torch.equal(logp.isinf()[clear], want_logp.isinf()[clear])
    finite = clear & want_logp.isfinite()
    close(logp[finite], want_logp[finite], "logp")
    close(mass[clear], want_mass[clear], "log_kept_mass")
    grad = (want_grad * upstream.reshape(-1, 1).double())[:, v0:v1]
    close(shard.grad.reshape(8, v1 - v0)[clear], grad[clear], "logits gradient")
    return [logp, mass]


def check_linear(seed, rank, world, group):
    gen = torch.Generator().manual_seed(100 + seed)
    vocab = [733, 1501][seed % 2]
    options = OPTIONS[seed % len(OPTIONS)]
    h = (torch.randint(-8, 9, (9, 16), generator=gen).float() / 8).requires_grad_()
    w = torch.randint(-8, 9, (vocab, 16), generator=gen).float() / 8
    logits = h.detach().double() @ w.double().t()
    labels = torch.where(torch.rand(9, generator=gen) < 0.5, logits.argmax(-1), torch.randint(0, vocab, (9,), generator=gen))
    v0, v1 = cuts(vocab, world, gen)[rank]
    w_shard = w[v0:v1].clone().requires_grad_()
    logp, mass = pk.linear_token_logprobs(h, w_shard, labels, return_kept_mass=True, memory_budget=5000,
                                          process_group=group, **options)
    logp.backward(torch.ones(9))
    top_k, top_p, min_p = options.get("top_k"), options.get("top_p"), options.get("min_p")
    want_logp, want_mass, want_dz = oracle(logits, labels, 1.0, top_k, top_p, min_p)
    clear = ~ambiguous_rows(logits, 1.0, top_k, top_p, min_p)
    assert torch.equal(logp.isinf()[clear], want_logp.isinf()[clear])
    finite = clear & want_logp.isfinite()
    close(logp[finite], want_logp[finite], "linear logp")
    close(mass[clear], want_mass[clear], "linear log_kept_mass")
    if bool(clear.all()):
        close(h.grad, want_dz @ w.double(), "hidden gradient")
        close(w_shard.grad, (want_dz.t() @ h.detach().double())[v0:v1], "weight shard gradient")
    return [logp, mass, h.grad]


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    verdicts, digests = {}, {}
    for seed in range(6):
        for name, check in (("logits", check_logits), ("linear", check_linear)):
            key = f"{name}-{seed}"
            try:
                outputs = check(seed, rank, world, group)
                digests[key] = [t.detach().reshape(-1).tolist() for t in outputs]
                verdicts[key] = "ok"
            except Exception:  # noqa: BLE001 - reported to the test
                verdicts[key] = traceback.format_exc(limit=3)[-1500:]
    every = [None] * world
    dist.all_gather_object(every, {"verdicts": verdicts, "digests": digests}, group=group)
    finish_worker(out_dir, {"ranks": every})


if __name__ == "__main__":
    main(sys.argv[1])
