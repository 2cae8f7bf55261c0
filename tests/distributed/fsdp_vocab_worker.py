"""Run by ``torch.distributed.run`` from ``test_fsdp_vocab_sharded.py``: the fused linear ops and the
sparse-teacher op on LM heads sharded by FSDP2 (``fully_shard``; gloo, CPU, 3 ranks), run by
vocabulary without gathering the head.

Each rank holds its own tokens (data parallel: a different batch and a different number of
tokens per rank). Heads with a vocabulary that 3 does not divide (FSDP2's last shards shorter,
one empty). Each rank's outputs and hidden gradient are compared with float64 on its own tokens
and the full heads; the head's gradient (gathered from its shards) with FSDP2's semantics, the
mean over the ranks of each rank's float64 gradient, and with the same call on the head gathered
whole (``full_tensor``). Also the dense distillation loss on an FSDP2 student head, and a head
replicated as a ``DTensor`` (gathered whole, its gradient averaged). Rank 0 writes every rank's
verdicts to ``OUT/results.json``.
"""

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

import prefopt_kernels as pk

from launch import finish_worker
from sparse_teacher_oracle import sparse_divergence, sparse_oracle

H = 16


def heads(vocab, ref_hidden_size, shard_ref=True):
    """A policy head with bias and a reference head, the same on every rank, both sharded by
    fully_shard (the reference whole with ``shard_ref=False``); and their float64 values."""
    torch.manual_seed(0)
    head, ref_head = torch.nn.Linear(H, vocab), torch.nn.Linear(ref_hidden_size, vocab)
    full = [p.detach().double().clone() for p in (head.weight, head.bias, ref_head.weight, ref_head.bias)]
    fully_shard(head)
    if shard_ref:
        fully_shard(ref_head)
    return head, ref_head, full


def tokens(rank, vocab, ref_hidden_size):
    """This rank's batch: ``[2, 3 + rank]`` tokens, one ignored."""
    g = torch.Generator().manual_seed(100 + rank)
    lead = (2, 3 + rank)
    hidden, ref_hidden = torch.randn(*lead, H, generator=g), torch.randn(*lead, ref_hidden_size, generator=g)
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[0, 1] = -100
    return hidden, ref_hidden, labels


def terms64(hidden, ref_hidden, labels, full):
    """float64 logp, js and entropy of the full heads, and the loss the ops' backward uses."""
    w, b, rw, rb = full
    lp = torch.log_softmax(hidden.double() @ w.t() + b, -1)
    lq = torch.log_softmax(ref_hidden.double() @ rw.t() + rb, -1)
    keep = labels != -100
    logp = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * keep
    m = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    js = (0.5 * (lp.exp() * (lp - m)).sum(-1) + 0.5 * (lq.exp() * (lq - m)).sum(-1)) * keep
    entropy = -(lp.exp() * lp).sum(-1) * keep
    return logp, js, entropy


def loss_of(logp, js, entropy):
    return logp.sum() + 0.5 * js.sum() - 0.1 * entropy.sum()


def mean_over_ranks(x):
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def relative(ours, expected):
    return ((ours.double() - expected).abs().max() / expected.abs().max()).item()


def whole(t):
    return t.detach().full_tensor() if hasattr(t, "full_tensor") else t.detach()


def terms_case(vocab, rank, shard_ref=True):
    """linear_token_terms on FSDP2 heads by vocabulary, against float64 and the whole-head gather."""
    ref_size = 24
    head, ref_head, full = heads(vocab, ref_size, shard_ref)
    hidden, ref_hidden, labels = tokens(rank, vocab, ref_size)
    local_shape = tuple(head.weight.to_local().shape)

    def run(weight, bias, ref_weight, ref_bias):
        h = hidden.clone().requires_grad_(True)
        t = pk.linear_token_terms(h, weight, labels, ref_hidden, ref_weight, head_bias=bias,
                                  ref_head_bias=ref_bias, divergence="js", return_entropy=True)
        loss_of(t.logp, t.div, t.entropy).backward()
        return t, h.grad

    gathers = []
    full_tensor = DTensor.full_tensor
    DTensor.full_tensor = lambda *a, **k: gathers.append(1) or full_tensor(*a, **k)
    try:
        terms, hidden_grad = run(head.weight, head.bias, ref_head.weight, ref_head.bias)
    finally:
        DTensor.full_tensor = full_tensor
    grads = [head.weight.grad.full_tensor(), head.bias.grad.full_tensor()]
    ref_gets_none = ref_head.weight.grad is None
    head.weight.grad = head.bias.grad = None
    avg = [Partial("avg")]
    gathered_terms, gathered_hidden_grad = run(head.weight.full_tensor(grad_placements=avg),
                                               head.bias.full_tensor(grad_placements=avg),
                                               whole(ref_head.weight), whole(ref_head.bias))
    gathered_grads = [head.weight.grad.full_tensor(), head.bias.grad.full_tensor()]

    h64 = hidden.double().requires_grad_(True)
    w64, b64 = (full[0].clone().requires_grad_(True), full[1].clone().requires_grad_(True))
    logp, js, entropy = terms64(h64, ref_hidden, labels, [w64, b64, full[2], full[3]])
    loss_of(logp, js, entropy).backward()
    fsdp_grads = [mean_over_ranks(w64.grad), mean_over_ranks(b64.grad)]
    return {
        "local_rows": local_shape[0],
        "logp": (terms.logp.double() - logp.detach()).abs().max().item(),
        "div": (terms.div.double() - js.detach()).abs().max().item(),
        "entropy": (terms.entropy.double() - entropy.detach()).abs().max().item(),
        "hidden_grad": relative(hidden_grad, h64.grad),
        "weight_grad": relative(grads[0], fsdp_grads[0]),
        "bias_grad": relative(grads[1], fsdp_grads[1]),
        "gathered_weight_grad": relative(gathered_grads[0], fsdp_grads[0]),
        "vs_gathered_outputs": max((a.double() - b.double()).abs().max().item() for a, b in
                                   ((terms.logp, gathered_terms.logp), (terms.div, gathered_terms.div))),
        "vs_gathered_grads": max(relative(hidden_grad, gathered_hidden_grad.double()),
                                 relative(grads[0], gathered_grads[0].double())),
        "ref_grad_none": ref_gets_none,
        "whole_head_gathers": len(gathers),
        "shape": list(terms.logp.shape) == list(labels.shape),
    }


def logprobs_case(vocab, rank):
    """linear_token_logprobs (no bias, temperature) by vocabulary, against float64."""
    head, _, full = heads(vocab, H)
    head.bias = None
    hidden, _, labels = tokens(rank, vocab, H)
    h = hidden.clone().requires_grad_(True)
    logp = pk.linear_token_logprobs(h, head.weight, labels, temperature=0.7)
    logp.sum().backward()
    h64, w64 = hidden.double().requires_grad_(True), full[0].clone().requires_grad_(True)
    lp = torch.log_softmax((h64 @ w64.t()) / 0.7, -1)
    expected = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    expected.sum().backward()
    return {"logp": (logp.double() - expected.detach()).abs().max().item(),
            "hidden_grad": relative(h.grad, h64.grad),
            "weight_grad": relative(head.weight.grad.full_tensor(), mean_over_ranks(w64.grad))}


def sparse_case(vocab, rank):
    """linear_sparse_teacher_divergence (reverse KL with the tail) by vocabulary, against float64."""
    head, _, full = heads(vocab, H)
    hidden, _, _ = tokens(rank, vocab, H)
    g = torch.Generator().manual_seed(200 + rank)
    teacher = torch.randn(*hidden.shape[:-1], vocab, generator=g, dtype=torch.float64).log_softmax(-1)
    lp, ids = teacher.topk(3, dim=-1)
    lp = lp.float()
    mask = torch.ones(hidden.shape[:-1], dtype=torch.bool)
    mask[1, 0] = False
    h = hidden.clone().requires_grad_(True)
    div = pk.linear_sparse_teacher_divergence(h, head.weight, ids, lp, head_bias=head.bias, divergence="reverse_kl",
                                              mask=mask)
    div.sum().backward()
    expected, (h64, w64, b64) = sparse_oracle(hidden, full[0].float(), full[1].float(), ids, lp, mask,
                                              divergence="reverse_kl", beta=0.5, alpha=0.5, temperature=1.0,
                                              scale=1.0, softcap=None, add_tail=True)
    expected.sum().backward()
    return {"div": (div.double() - expected.detach()).abs().max().item(),
            "hidden_grad": relative(h.grad, h64.grad),
            "weight_grad": relative(head.weight.grad.full_tensor(), mean_over_ranks(w64.grad)),
            "bias_grad": relative(head.bias.grad.full_tensor(), mean_over_ranks(b64.grad))}


def distill_case(vocab, rank):
    """The dense distillation trainer's loss (``distillation_loss``, what ``PrefOptDistillationTrainer``
    calls with the models' output embeddings) on an FSDP2 student head without bias, a whole
    teacher head, the student's config soft-capped, js at beta 0.4, temperature 0.9, the loss over
    the global count of tokens: against float64."""
    from prefopt_kernels.integrations.trl_distill import distillation_loss

    ref_size, beta, temperature, cap = 24, 0.4, 0.9, 5.0
    head, teacher_head, full = heads(vocab, ref_size, shard_ref=False)
    head.bias = None
    hidden, teacher_hidden, labels = tokens(rank, vocab, ref_size)
    loss_mask = (labels != -100).long()
    count = loss_mask.sum().reshape(1)
    dist.all_reduce(count)
    h = hidden.clone().requires_grad_(True)
    loss, entropy_sum, _ = distillation_loss(h, head, SimpleNamespace(final_logit_softcapping=cap), teacher_hidden,
                                             teacher_head, SimpleNamespace(), labels.clamp(min=0), loss_mask,
                                             divergence="js", beta=beta, alpha=0.5, temperature=temperature,
                                             num_items_in_batch=count)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(True), full[0].clone().requires_grad_(True)
    z = h64 @ w64.t()
    ls = (cap * torch.tanh(z / cap) / temperature).log_softmax(-1)
    lt = ((teacher_hidden.double() @ full[2].t() + full[3]) / temperature).log_softmax(-1)
    js = sparse_divergence(ls, lt, "js", beta, 0.5) * loss_mask
    loss64 = js.sum() / count.double()
    loss64.backward()
    entropy64 = (-(ls.exp() * ls).sum(-1) * loss_mask).sum()
    return {"loss": abs(loss.item() - loss64.item()) / abs(loss64.item()),
            "entropy": abs(entropy_sum.item() - entropy64.item()) / abs(entropy64.item()),
            "hidden_grad": relative(h.grad, h64.grad),
            "weight_grad": relative(head.weight.grad.full_tensor(), mean_over_ranks(w64.grad))}


def replicated_case(vocab, rank):
    """A head replicated as a ``DTensor`` (not a vocabulary shard): gathered whole, its gradient the
    mean over the ranks of each rank's own-batch gradient, as data parallelism averages."""
    _, _, full = heads(vocab, H)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weight = torch.nn.Parameter(distribute_tensor(full[0].float(), mesh, [Replicate()]))
    hidden, _, labels = tokens(rank, vocab, H)
    pk.linear_token_logprobs(hidden, weight, labels).sum().backward()
    w64 = full[0].clone().requires_grad_(True)
    lp = torch.log_softmax(hidden.double() @ w64.t(), -1)
    (lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)).sum().backward()
    return {"weight_grad": relative(weight.grad.full_tensor(), mean_over_ranks(w64.grad))}


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mine = {f"terms_V{v}": terms_case(v, rank) for v in (301, 4)}
    mine["terms_V301_whole_ref"] = terms_case(301, rank, shard_ref=False)
    mine["logprobs_V301"] = logprobs_case(301, rank)
    mine["sparse_V301"] = sparse_case(301, rank)
    mine["distill_V301"] = distill_case(301, rank)
    mine["replicated_V301"] = replicated_case(301, rank)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    finish_worker(out, {"ranks": everyone})


if __name__ == "__main__":
    main(sys.argv[1])
