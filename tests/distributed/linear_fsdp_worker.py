"""Run by ``torch.distributed.run`` from ``test_distributed_training.py``: the fused linear ops on an LM head
sharded by FSDP2 (``fully_shard``; gloo, CPU).

Every rank calls ``linear_token_terms`` with its ``DTensor`` head weights and bias (a policy head
and a reference head), backpropagates a weighted sum of the outputs, and compares with float64 of
the full parameters: the outputs, the hidden states' gradient and the head's gradient (gathered
from its shards). Rank 0 writes the largest errors to ``OUT/results.json``.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import prefopt_kernels as pk

from launch import finish_worker

V, H = 301, 16


def main(out):
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    head, ref_head = torch.nn.Linear(H, V), torch.nn.Linear(H, V)
    hidden, ref_hidden = torch.randn(2, 5, H), torch.randn(2, 5, H)
    labels = torch.randint(0, V, (2, 5))
    labels[0, 1] = -100
    full = {name: p.detach().double().clone() for name, p in (("w", head.weight), ("b", head.bias),
                                                             ("rw", ref_head.weight), ("rb", ref_head.bias))}
    fully_shard(head)
    fully_shard(ref_head)
    sharded = type(head.weight).__name__
    h = hidden.clone().requires_grad_(True)
    terms = pk.linear_token_terms(h, head.weight, labels, ref_hidden, ref_head.weight, head_bias=head.bias,
                                  ref_head_bias=ref_head.bias, divergence="js", return_entropy=True)
    (terms.logp.sum() + 0.5 * terms.div.sum() - 0.1 * terms.entropy.sum()).backward()

    h64 = hidden.double().requires_grad_(True)
    w64, b64 = full["w"].clone().requires_grad_(True), full["b"].clone().requires_grad_(True)
    lp = torch.log_softmax(h64 @ w64.t() + b64, -1)
    lq = torch.log_softmax(ref_hidden.double() @ full["rw"].t() + full["rb"], -1)
    keep = labels != -100
    logp = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * keep
    m = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    js = 0.5 * (lp.exp() * (lp - m)).sum(-1) + 0.5 * (lq.exp() * (lq - m)).sum(-1)
    entropy = -(lp.exp() * lp).sum(-1) * keep
    (logp.sum() + 0.5 * (js * keep).sum() - 0.1 * entropy.sum()).backward()

    results = {
        "sharded": sharded,
        "logp": (terms.logp.double() - logp.detach()).abs().max().item(),
        "div": (terms.div.double() - (js * keep).detach()).abs().max().item(),
        "hidden_grad": ((h.grad.double() - h64.grad).abs().max() / h64.grad.abs().max()).item(),
        "weight_grad": ((head.weight.grad.full_tensor().double() - w64.grad).abs().max()
                        / w64.grad.abs().max()).item(),
        "bias_grad": ((head.bias.grad.full_tensor().double() - b64.grad).abs().max() / b64.grad.abs().max()).item(),
        "ref_grad": ref_head.weight.grad is None,
    }
    finish_worker(out, results)


if __name__ == "__main__":
    main(sys.argv[1])
