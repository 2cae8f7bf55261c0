"""Run by ``torch.distributed.run`` from ``test_sparse_teacher_sharded.py``: the sparse-teacher op with
its student head sharded by vocabulary (``process_group=``; gloo, CPU, 3 ranks).

The vocabulary is cut into random uneven shards (one scenario with an empty shard). Every rank
calls ``linear_sparse_teacher_divergence`` on its rows of the head and the replicated hidden
states and teacher, backpropagates a random weighting of the outputs, and compares with the float64
oracle over the full logits (``sparse_teacher_oracle.py``): values, entropy, the hidden states'
gradient and its own rows of the weight and bias gradients. Then calls on which one rank (or
every rank) passes a bad argument. Every rank's verdicts, and digests of its outputs and hidden
gradient, go to rank 0, which writes them to ``OUT/results.json``.
"""

import hashlib
import random
import sys

import torch
import torch.distributed as dist

import prefopt_kernels as pk

from launch import finish_worker
from sparse_teacher_oracle import sparse_oracle

V, H, K = 211, 16, 5
LEAD = (3, 4)
# name: (divergence, add_tail, absent ids, temperature, logit_scale, softcap, entropy, shard cut seed)
SCENARIOS = {
    "forward_kl": ("forward_kl", True, False, 1.0, 1.0, None, True, 1),
    "reverse_kl": ("reverse_kl", True, True, 0.7, 1.0, None, False, 2),
    "js": ("js", True, False, 1.0, 1.3, 20.0, True, 3),
    "tv": ("tv", True, True, 1.0, 1.0, None, False, 4),
    "hellinger": ("hellinger", True, False, 1.3, 1.0, None, False, 5),
    "chi2": ("chi2", True, False, 1.0, 1.0, None, False, 6),
    "alpha": ("alpha", True, True, 1.0, 1.0, None, True, 7),
    "forward_kl_no_tail": ("forward_kl", False, True, 1.0, 1.0, None, False, 8),
    "js_no_tail": ("js", False, False, 0.8, 1.0, None, True, 9),
    "empty_shard": ("reverse_kl", True, True, 1.0, 1.0, None, True, None),
}
BETA, ALPHA = 0.3, 1.7
# name: what one rank (rank 1) or every rank ("all") passes differently.
BAD_CALLS = ("k", "ids", "logprobs", "mask", "add_tail", "divergence", "needs_grad", "vocab_size_one_rank",
             "id_out_of_range", "teacher_vocab_size", "duplicate_id")


def cuts(world, seed):
    """Shard edges ``[0, c_1, ..., V]``: random uneven cuts, or (``seed`` None) one shard empty."""
    if seed is None:
        return [0] + [90] * (world - 1) + [V] if world > 2 else [0, 0, V]
    inner = sorted(random.Random(seed).sample(range(1, V), world - 1))
    return [0] + inner + [V]


def data(seed):
    """A case's tensors, the same on every rank: teacher top-K in random order, a masked token."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*LEAD, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.6
    bias = torch.randn(V, generator=g)
    teacher = torch.randn(*LEAD, V, generator=g, dtype=torch.float64).mul(2.0).log_softmax(-1)
    lp, ids = teacher.topk(K, dim=-1)
    order = torch.argsort(torch.rand(*LEAD, K, generator=g), dim=-1)
    ids, lp = ids.gather(-1, order), lp.gather(-1, order).float()
    mask = torch.ones(LEAD, dtype=torch.bool)
    mask[1, 2] = False
    return hidden, weight, bias, ids, lp, mask


def digest(*tensors):
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)).hexdigest()


def entropy64(hidden, weight, bias, temperature, scale, softcap):
    z = scale * (hidden.double() @ weight.double().t() + bias.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = (z / temperature).log_softmax(-1)
    return -(lp.exp() * lp).sum(-1)


def scenario(name, rank, world):
    divergence, add_tail, absent, temperature, scale, softcap, want_entropy, seed = SCENARIOS[name]
    hidden, weight, bias, ids, lp, mask = data(len(name) * 31 + (seed or 0))
    if absent:
        ids[0, 1, -1] = -1
        ids[2, 3, 0] = -1
    edges = cuts(world, seed)
    v0, v1 = edges[rank], edges[rank + 1]
    h = hidden.clone().requires_grad_(True)
    w = weight[v0:v1].clone().requires_grad_(True)
    b = bias[v0:v1].clone().requires_grad_(True)
    out = pk.linear_sparse_teacher_divergence(h, w, ids, lp, head_bias=b, divergence=divergence, beta=BETA,
                                              alpha=ALPHA, mask=mask, temperature=temperature, logit_scale=scale,
                                              softcap=softcap, add_tail=add_tail, return_entropy=want_entropy,
                                              memory_budget=4096 * (1 + rank), process_group=dist.group.WORLD)
    div, entropy = out if want_entropy else (out, None)
    upstream = torch.rand(LEAD, generator=torch.Generator().manual_seed(seed or 11))
    (div * upstream).sum().backward()
    expected, (h64, w64, b64) = sparse_oracle(hidden, weight, bias, ids, lp, mask, divergence=divergence, beta=BETA,
                                              alpha=ALPHA, temperature=temperature, scale=scale, softcap=softcap,
                                              add_tail=add_tail)
    (expected * upstream.double()).sum().backward()
    problems = []
    if not ((div.double() - expected.detach()).abs() <= 1e-5 * (1 + expected.abs()) + 1e-7).all():
        problems.append(f"div {div.tolist()} vs {expected.tolist()}")
    if entropy is not None:
        ent64 = torch.where(mask, entropy64(hidden, weight, bias, temperature, scale, softcap), 0.0)
        if not ((entropy.double() - ent64).abs() <= 1e-5 * (1 + ent64.abs())).all():
            problems.append(f"entropy {entropy.tolist()} vs {ent64.tolist()}")
    for what, ours, full in (("hidden", h.grad, h64.grad), ("weight", w.grad, w64.grad[v0:v1]),
                             ("bias", b.grad, b64.grad[v0:v1])):
        scale_of = h64.grad.abs().max() if what == "hidden" else w64.grad.abs().max() if what == "weight" \
            else b64.grad.abs().max()
        err = (ours.double() - full).abs().max().item() if full.numel() else 0.0
        if err > 1e-5 * scale_of.item() + 1e-12:
            problems.append(f"{what} gradient off by {err:.3g} (max |g| {scale_of.item():.3g})")
    verdict = "ok" if not problems else "; ".join(problems)
    return verdict, digest(div, h.grad, *(() if entropy is None else (entropy,)))


def bad_call(case, rank, world):
    """One call in which rank 1 (or every rank) passes ``case``'s bad argument; the error text."""
    hidden, weight, bias, ids, lp, mask = data(99)
    edges = cuts(world, 12)
    w = weight[edges[rank]:edges[rank + 1]]
    h = hidden.clone().requires_grad_(True)
    options = dict(mask=mask, process_group=dist.group.WORLD)
    odd = rank == 1
    if case == "k" and odd:
        ids, lp = ids[..., :-1], lp[..., :-1]
    elif case == "ids" and odd:
        ids[0, 0, 0] = next(i for i in range(V) if i not in ids[0, 0].tolist())
    elif case == "logprobs" and odd:
        lp[2, 1, 3] -= 0.01
    elif case == "mask" and odd:
        mask[1, 2], mask[0, 0] = True, False
        options["mask"] = mask
    elif case == "add_tail":
        options["add_tail"] = not odd
    elif case == "divergence":
        options["divergence"] = "reverse_kl" if odd else "forward_kl"
    elif case == "needs_grad" and odd:
        h = hidden
    elif case == "vocab_size_one_rank":
        options["teacher_vocab_size"] = V + odd
    elif case == "id_out_of_range":
        ids[1, 1, 2] = V
    elif case == "teacher_vocab_size":
        options["teacher_vocab_size"] = V + 1
    elif case == "duplicate_id":
        ids[2, 0, 1] = ids[2, 0, 0]
    try:
        pk.linear_sparse_teacher_divergence(h, w, ids, lp, **options)
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {"scenarios": {}, "digests": {}, "bad": {}}
    for name in SCENARIOS:
        mine["scenarios"][name], mine["digests"][name] = scenario(name, rank, world)
    for case in BAD_CALLS:
        mine["bad"][case] = bad_call(case, rank, world)
    mine["good_call_after"] = scenario("js", rank, world)[0]
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    finish_worker(out, {"world": world, "vocab": V, "ranks": everyone,
                        "cuts": {name: cuts(world, seed) for name, (*_, seed) in SCENARIOS.items()}})


if __name__ == "__main__":
    main(sys.argv[1])
