"""One rank of the tensor-parallel sampling check (``test_sampling_shards.py``): every rank holds a
random contiguous vocabulary shard (an empty one included), runs the sampled logits and linear
ops with ``process_group=`` and checks its outputs and its shard's gradient against the sorting
float64 oracle on the full rows. The logits ops run on every backend here; where the backend's
fold gathers the candidates, the worker also counts the reads of the shard: one fold, and the
rows read again are those of the path that sweeps every row once more, less that sweep (with the
same outputs, bit for bit). Writes every rank's verdicts to ``results.json``."""

import contextlib
import sys
import traceback

import torch
import torch.distributed as dist

import prefopt_kernels as pk
from launch import finish_worker
from prefopt_kernels import sampled_rows, sampling
from prefopt_kernels.dispatch import available_backends, backend_module
from prefopt_kernels.spec import OpSpec
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


class Reads:
    """Counts the reads of the rows during a ``with``: the backend's folds (with and without
    candidates) and the rows the sampled forward's sweeps read (``Candidates.fold``)."""

    def __init__(self, backend: str):
        self.module = backend_module(backend)
        self.folds = self.gathering_folds = self.swept_rows = 0

    @contextlib.contextmanager
    def counting(self):
        module, originals = self.module, {}

        def counted(name, counter):
            original = getattr(module, name)
            originals[name] = original

            def wrapper(*args, **kwargs):
                setattr(self, counter, getattr(self, counter) + 1)
                return original(*args, **kwargs)
            setattr(module, name, wrapper)

        counted("fold", "folds")
        if hasattr(module, "fold_with_candidates"):
            counted("fold_with_candidates", "gathering_folds")
        sweep_fold = sampling.Candidates.fold

        def swept(candidates, x, *args):
            self.swept_rows += x.shape[0]
            return sweep_fold(candidates, x, *args)
        sampling.Candidates.fold = swept
        try:
            yield self
        finally:
            sampling.Candidates.fold = sweep_fold
            for name, original in originals.items():
                setattr(module, name, original)


def sampled_logprobs(shard, labels, upstream, backend, group, options, gathering=True):
    """``(logp, log_kept_mass, gradient of the shard, Reads)`` of one sharded call."""
    shard = shard.clone().requires_grad_()
    reads = Reads(backend)
    with contextlib.ExitStack() as stack:
        stack.enter_context(pk.use_backend(backend))
        stack.enter_context(reads.counting())
        if not gathering:  # the path that sweeps every row again for its first candidates
            original = sampled_rows.gathered_count
            sampled_rows.gathered_count = lambda *args: 0
            stack.callback(setattr, sampled_rows, "gathered_count", original)
        logp, mass = pk.token_logprobs(shard, labels, return_kept_mass=True, process_group=group, **options)
        logp.backward(upstream)
    return logp, mass, shard.grad, reads


def gathers(backend, options, vocab) -> bool:
    """Whether ``backend``'s fold gathers this call's first candidates (the op's own rule)."""
    spec = OpSpec(want_logp=True, **options)
    return bool(sampled_rows.gathered_count(backend_module(backend), spec, vocab, torch.device("cpu"),
                                            "fold_with_candidates"))


def check_logits(seed, rank, world, group, backend):
    gen = torch.Generator().manual_seed(seed)
    vocab = [517, 2053, 3001][seed % 3]
    options = OPTIONS[seed % len(OPTIONS)]
    x = torch.randn(2, 4, vocab, generator=gen) * (0.05 if seed % 4 == 1 else 2.0)
    labels = torch.where(torch.rand(2, 4, generator=gen) < 0.5, x.argmax(-1), torch.randint(0, vocab, (2, 4), generator=gen))
    labels[1, 0] = -100
    v0, v1 = cuts(vocab, world, gen)[rank]
    upstream = torch.rand(2, 4, generator=gen) + 0.5
    logp, mass, shard_grad, reads = sampled_logprobs(x[..., v0:v1].contiguous(), labels, upstream, backend, group,
                                                     options)
    if gathers(backend, options, vocab):
        again = sampled_logprobs(x[..., v0:v1].contiguous(), labels, upstream, backend, group, options,
                                 gathering=False)
        for name, one, two in zip(("logp", "log_kept_mass", "gradient"), (logp, mass, shard_grad), again):
            assert torch.equal(one, two), f"{name}: the one-read path differs from the two-read path"
        assert (reads.gathering_folds, reads.folds) == (1, 0), "the shard is folded once, with its candidates"
        read_rows = int((labels != -100).sum())
        assert reads.swept_rows == again[3].swept_rows - read_rows, "only unsettled rows are read again"
        if options in (dict(top_k=20, top_p=0.9, min_p=0.05), dict(top_k=3)):
            assert reads.swept_rows == 0, "a kept set within the top_k + 1 candidates is settled by the fold"
    top_k, top_p, min_p = options.get("top_k"), options.get("top_p"), options.get("min_p")
    want_logp, want_mass, want_grad = oracle(x, labels, 1.0, top_k, top_p, min_p)
    clear = ~ambiguous_rows(x, 1.0, top_k, top_p, min_p)
    logp, mass = logp.reshape(-1), mass.reshape(-1)
    assert torch.equal(logp.isinf()[clear], want_logp.isinf()[clear])
    finite = clear & want_logp.isfinite()
    close(logp[finite], want_logp[finite], "logp")
    close(mass[clear], want_mass[clear], "log_kept_mass")
    grad = (want_grad * upstream.reshape(-1, 1).double())[:, v0:v1]
    close(shard_grad.reshape(8, v1 - v0)[clear], grad[clear], "logits gradient")
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


def checks_to_run():
    """``(key, seed, check)``: the logits ops on every backend that runs CPU tensors here (the
    interpreted Triton only on the seeds whose ``top_k`` its fold gathers, few: each compaction is
    slow there), then the linear ops."""
    cpu = torch.device("cpu")
    backends = [b for b in available_backends() if backend_module(b).supports(cpu)]
    checks = []
    for backend in backends:
        seeds = (0, 3) if backend == "triton" else range(6)
        checks += [(f"logits-{backend}-{seed}", seed, lambda *a, b=backend: check_logits(*a, b)) for seed in seeds]
    return checks + [(f"linear-{seed}", seed, check_linear) for seed in range(6)]


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    verdicts, digests = {}, {}
    for key, seed, check in checks_to_run():
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
