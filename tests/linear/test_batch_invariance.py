"""``batch_invariant=True`` on the fused linear ops: a token's outputs and its row of the hidden
gradient are bit-identical (``torch.equal``) whatever else the call holds.

A pool of tokens (policy and reference hidden states, labels, ``div_weight`` and upstream
gradients, all per token) is run whole and in other batches: one token, three, a hundred in
reverse order, a thousand permuted, as a ``[B, T]`` batch, with ignored neighbours (labels set
to ``ignore_index``, or ``div_weight`` 0 for the divergence alone) and under a small memory
budget. Every tracked token must get the bits it gets in the whole pool. The pool spans several
1024-row token chunks and two 4096-wide vocabulary chunks (V = 4300, the last chunk 204 wide).

The premise, checked first: on this CPU, torch's matmul gives a row the same bits at every
position of a GEMM of fixed shape (while a 1-row GEMM, a GEMV, rounds differently). The
negative control shows that the plain path (``batch_invariant=False``) is not invariant at
these shapes; the oracle tests show that the invariant path still meets the numerics contract.
"""

import pytest
import torch

import prefopt_kernels as pk
from linear_cases import Call, check, make_head, make_labels, make_pair, make_weight
from prefopt_kernels.linear.tiles import INVARIANT_TOKEN_CHUNK, INVARIANT_VOCAB_CHUNK, TilePlan, padded_row_count
from prefopt_kernels.linear.heads import Head
from prefopt_kernels.spec import HeadSpec

VOCAB = 4300
TRACKED = (0, 5, 777, 1099)
# The native pool spans five token chunks; the float64 reference backend's, two (it runs the
# batches that move a token across chunks, ignore neighbours or change the budget, and leaves
# the js second sweep, its slowest, to the native backend and the oracle test).
POOL_SIZE = {"native": 4100, "reference": 1100}
REFERENCE_BATCHES = ("three", "a thousand, permuted", "ignored neighbours", "1 MiB budget")
OPS = ("logprobs", "js", "terms")


def _pool(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    policy_weight = torch.randn(VOCAB, 32, generator=g) * 0.5
    ref_weight = torch.randn(VOCAB, 24, generator=g) * 0.5
    return dict(
        hidden=torch.randn(n, 32, generator=g).to(dtype), weight=policy_weight.to(dtype),
        bias=(torch.randn(VOCAB, generator=g) * 0.5).to(dtype),
        ref_hidden=torch.randn(n, 24, generator=g).to(dtype), ref_weight=ref_weight.to(dtype),
        labels=torch.randint(0, VOCAB, (n,), generator=g), div_weight=0.25 + torch.rand(n, generator=g),
        upstream=torch.randn(3, n, generator=g),
    )


def _run(backend, op, pool, index, *, invariant=True, budget=None, lead=None, ignored=None):
    """``(outputs, hidden gradient)`` of the pool's tokens ``index`` run as one call, each ``[len(index), ...]``.

    ``lead``: the call's leading shape (the tokens in flat order); ``ignored``: positions in
    ``index`` whose label is ignored (or whose ``div_weight`` is 0, for the divergence alone).
    """
    lead = (index.numel(),) if lead is None else lead
    hidden = pool["hidden"][index].reshape(*lead, -1).requires_grad_(True)
    ref_hidden = pool["ref_hidden"][index].reshape(*lead, -1)
    labels, div_weight = pool["labels"][index].clone(), pool["div_weight"][index].clone()
    if ignored is not None:
        labels[ignored] = -100
        div_weight[ignored] = 0.0
    labels, div_weight = labels.reshape(lead), div_weight.reshape(lead)
    options = dict(head_bias=pool["bias"], memory_budget=budget, batch_invariant=invariant)
    with pk.use_backend(backend):
        if op == "logprobs":
            outputs = pk.linear_token_logprobs(hidden, pool["weight"], labels, softcap=20.0, return_entropy=True,
                                               **options)
        elif op == "sampled":
            outputs = pk.linear_token_logprobs(hidden, pool["weight"], labels, temperature=0.7, top_p=0.9,
                                               min_p=0.01, return_kept_mass=True, **options)
        elif op == "js":
            outputs = (pk.linear_token_divergence(hidden, pool["weight"], ref_hidden, pool["ref_weight"],
                                                  divergence="js", beta=0.3, div_weight=div_weight, **options),)
        else:
            terms = pk.linear_token_terms(hidden, pool["weight"], labels, ref_hidden, pool["ref_weight"],
                                          divergence="reverse_kl", div_weight=div_weight, return_entropy=True,
                                          **options)
            outputs = (terms.logp, terms.div, terms.entropy, terms.ref_logp)
        upstream = pool["upstream"][:, index].reshape(3, *lead)
        sum((out * g).sum() for out, g in zip(outputs, upstream)).backward()
    return [out.detach().reshape(-1) for out in outputs], hidden.grad.reshape(index.numel(), -1)


def _batches(n):
    """``(name, index, options)``: batches of the pool's tokens that hold some tracked ones."""
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(1000, generator=g)
    every_other = torch.arange(n)
    return [
        ("one token", torch.tensor([5]), {}),
        ("three", torch.tensor([9, 5, 0]), {}),
        ("a hundred, reversed", torch.arange(100).flip(0), {}),
        ("a thousand, permuted", torch.cat([perm, torch.tensor([1099])]), {}),
        ("[B, T] with the pool rotated", torch.roll(every_other, 13), dict(lead=(2, n // 2))),
        ("ignored neighbours", every_other, dict(ignored=torch.tensor([i for i in range(n)
                                                                      if i % 2 and i not in TRACKED]))),
        ("1 MiB budget", every_other, dict(budget=2**20)),
    ]


def _compare(pool_run, index, run):
    """The tracked tokens of ``index`` whose outputs or hidden-gradient row differ from the pool's."""
    (pool_outputs, pool_grad), (outputs, grad) = pool_run, run
    differ = []
    for token in TRACKED:
        where = (index == token).nonzero()
        if where.numel() == 0:
            continue
        i = int(where[0])
        same = all(torch.equal(a[i], b[token]) for a, b in zip(outputs, pool_outputs))
        if not (same and torch.equal(grad[i], pool_grad[token])):
            differ.append(token)
    return differ


def test_sampled_token_bits_do_not_depend_on_the_batch():
    """Sampler-matched log-probs: the candidate read and its re-reads project the same fixed
    tiles, so the kept set, ``logp`` and ``log_kept_mass`` keep their bits too."""
    n = POOL_SIZE["native"]
    pool = _pool(n)
    pool_run = _run("native", "sampled", pool, torch.arange(n))
    for name, index, options in _batches(n)[:4]:
        assert _compare(pool_run, index, _run("native", "sampled", pool, index, **options)) == [], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_shape_gemm_rows_do_not_depend_on_position(dtype):
    """The premise: a row gets the same bits at every position of a ``[1024, H] x [H, 4096]``
    GEMM (the forward's projection) and of the backward's ``acc += dz W`` at that shape, while a
    1-row GEMM (what the plain path runs for a batch of one) rounds the fp32 row differently."""
    g = torch.Generator().manual_seed(0)
    rows, width, hidden_size = INVARIANT_TOKEN_CHUNK, INVARIANT_VOCAB_CHUNK, 256
    weight = torch.randn(width, hidden_size, generator=g).to(dtype)
    others = torch.randn(rows, hidden_size, generator=g).to(dtype)
    row = torch.randn(hidden_size, generator=g).to(dtype)
    dz_others = torch.randn(rows, width, generator=g)
    dz_row = torch.randn(width, generator=g)
    acc_row = torch.randn(hidden_size, generator=g)
    forward, backward = set(), set()
    for position in list(range(0, rows, 37)) + [rows - 1]:
        a = others.clone()
        a[position] = row
        forward.add(tuple(torch.mm(a, weight.t())[position].float().tolist()))
        dz = dz_others.clone()
        dz[position] = dz_row
        acc = acc_row.expand(rows, hidden_size).clone()
        backward.add(tuple(acc.addmm_(dz, weight.float())[position].tolist()))
    assert len(forward) == 1 and len(backward) == 1
    if dtype == torch.float32:
        assert torch.mm(row[None], weight.t())[0].tolist() != list(next(iter(forward)))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", list(POOL_SIZE))
def test_token_bits_do_not_depend_on_the_batch(backend, op):
    if backend == "reference" and op == "js":
        pytest.skip("the float64 second sweep over 1024 x 4096 tiles is slow; js runs on the native backend")
    n = POOL_SIZE[backend]
    pool = _pool(n)
    whole = torch.arange(n)
    pool_run = _run(backend, op, pool, whole)
    for name, index, options in _batches(n):
        if backend == "reference" and name not in REFERENCE_BATCHES:
            continue
        run = _run(backend, op, pool, index, **options)
        if "lead" in options:  # the rotated [B, T] batch: put its rows back in pool order
            run = ([out[torch.argsort(index)] for out in run[0]], run[1][torch.argsort(index)])
            index = whole
        assert _compare(pool_run, index, run) == [], f"{backend} {op}: {name}"


def test_bf16_token_bits_do_not_depend_on_the_batch():
    """bf16 inputs (on a CPU the GEMM writes bf16, widened to the fp32 tile)."""
    pool = _pool(POOL_SIZE["native"], torch.bfloat16)
    pool_run = _run("native", "terms", pool, torch.arange(POOL_SIZE["native"]))
    for name, index, options in _batches(POOL_SIZE["native"])[:4]:
        assert _compare(pool_run, index, _run("native", "terms", pool, index, **options)) == [], name


@pytest.mark.parametrize("backend", list(POOL_SIZE))
def test_policy_bits_do_not_depend_on_the_reference_head(backend):
    """The policy's log-prob and entropy, and its hidden gradient from them, are the same bits
    from ``linear_token_logprobs`` and from ``linear_token_terms`` beside a reference head."""
    pool = _pool(1100)
    hidden = pool["hidden"].clone().requires_grad_(True)
    hidden_terms = pool["hidden"].clone().requires_grad_(True)
    g_logp, g_entropy = pool["upstream"][0], pool["upstream"][1]
    with pk.use_backend(backend):
        logp, entropy = pk.linear_token_logprobs(hidden, pool["weight"], pool["labels"], return_entropy=True,
                                                 batch_invariant=True)
        terms = pk.linear_token_terms(hidden_terms, pool["weight"], pool["labels"], pool["ref_hidden"],
                                      pool["ref_weight"], return_entropy=True, batch_invariant=True)
        ((logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
        ((terms.logp * g_logp).sum() + (terms.entropy * g_entropy).sum()).backward()
    assert torch.equal(logp, terms.logp) and torch.equal(entropy, terms.entropy)
    assert torch.equal(hidden.grad, hidden_terms.grad)


@pytest.mark.parametrize("op", OPS)
def test_plain_path_is_not_batch_invariant(op):
    """Negative control: without ``batch_invariant`` the GEMM shapes and the vocabulary chunks
    follow the number of tokens and the budget, and some tracked token's bits move."""
    n = POOL_SIZE["native"]
    pool = _pool(n)
    pool_run = _run("native", op, pool, torch.arange(n), invariant=False)
    differ = set()
    for name, index, options in _batches(n)[:3]:
        differ.update(_compare(pool_run, index, _run("native", op, pool, index, invariant=False, **options)))
    assert differ, "the plain path happened to be batch-invariant at these shapes"


def test_triton_interpreter_token_bits_do_not_depend_on_the_batch():
    """The Triton kernels (interpreted on a CPU): one token alone and inside 40 (one tile of
    1024 padded rows each; about 25 s in the interpreter)."""
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(40, 16, generator=g), torch.randn(300, 16, generator=g) * 0.3
    labels = torch.randint(0, 300, (40,), generator=g)
    upstream = torch.randn(2, 40, generator=g)

    def run(index):
        h = hidden[index].clone().requires_grad_(True)
        with pk.use_backend("triton"):
            logp, entropy = pk.linear_token_logprobs(h, weight, labels[index], return_entropy=True,
                                                     batch_invariant=True)
            ((logp * upstream[0, index]).sum() + (entropy * upstream[1, index]).sum()).backward()
        return logp.detach(), entropy.detach(), h.grad

    whole, alone = run(torch.arange(40)), run(torch.tensor([17]))
    assert all(torch.equal(a[17], b[0]) for a, b in zip(whole, alone))


def test_invariant_tile_plan_is_fixed():
    """Every pass runs ``[1024, 4096]`` tiles (``[1024, V]`` for a smaller V) over whole padded
    token chunks, whatever the number of rows and the budget."""
    weight = torch.zeros(9000, 8)
    heads = [Head(weight, None, HeadSpec())]
    for rows in (1, 1023, 1024, 1025, 4100):
        for budget in (2**12, 2**20, 2**30):
            plan = TilePlan(heads, rows, 9000, budget, (), backward=False, batch_invariant=True)
            assert (plan.token_chunk, plan.vocab_chunk) == (1024, 4096)
            assert plan.rows == padded_row_count(rows, True) == 1024 * ((rows + 1023) // 1024)
            assert all(t1 - t0 == 1024 for t0, t1 in plan.token_ranges)
            assert plan.vocab_ranges == [(0, 4096), (4096, 8192), (8192, 9000)]
    small = TilePlan(heads, 3, 700, 2**12, (), backward=True, batch_invariant=True)
    assert (small.token_chunk, small.vocab_chunk, small.token_ranges) == (1024, 700, [(0, 1024)])
    assert padded_row_count(0, True) == 0 and padded_row_count(5, False) == 5


@pytest.mark.parametrize("backend", list(POOL_SIZE))
def test_invariant_values_meet_the_contract(backend):
    """The float64 oracle (linear_cases.check) with ``batch_invariant``: two vocabulary chunks,
    bias, scale, softcap, temperature, ignored tokens and zero ``div_weight``."""
    policy = make_head((12,), 32, VOCAB, seed=41, bias=True, scale=0.9, softcap=6.0)
    labels = make_labels((12,), VOCAB, seed=42, ignored=(1, 7))
    check(backend, Call("logprobs", policy, labels, temperature=0.8, return_entropy=True, batch_invariant=True),
          seed=43, explicit=False)
    policy, ref = make_pair((10,), seed=44, vocab=VOCAB, softcaps=(5.0, None), ref_std=2.0)
    weight = make_weight((10,), seed=45)
    check(backend, Call("divergence", policy, ref=ref, div_weight=weight, divergence="js", beta=0.3,
                        batch_invariant=True), seed=46, explicit=False)
    labels = make_labels((10,), VOCAB, seed=47, ignored=(4,))
    check(backend, Call("terms", policy, labels, ref=ref, div_weight=weight, divergence="forward_kl",
                        return_entropy=True, batch_invariant=True), seed=48, explicit=False)
