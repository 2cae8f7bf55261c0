"""Run by ``torch.distributed.run`` from ``test_trl_grpo_sharded.py``: the full-KL GRPO terms on a
vocabulary-sharded LM head (``process_group=``; gloo, CPU).

Every rank builds the same policy and reference heads (``nn.Linear``, biased, V = 301), hidden
states, labels (ignored ones included) and advantages; rank r keeps rows ``SHARDS[r]`` of each
head. :func:`~prefopt_kernels.integrations.trl_grpo.full_kl_terms` on the shards through the
group and on the whole heads without one give the per-token terms; each forms the GRPO loss of
one micro-batch (clipped surrogate on ``exp(logp - old)``, ``beta · KL``, TRL's ``"grpo"``
reduction, minus an entropy bonus) and backpropagates it. Rank 0 writes the largest
differences (loss, terms, the hidden states' gradient, its head shard's gradient against the
same rows of the whole head's) to ``OUT/results.json``.
"""

import sys

import torch
import torch.distributed as dist

from launch import finish_worker

from prefopt_kernels.integrations.trl_grpo import full_kl_terms

V, H, B, T = 301, 16, 3, 7
SHARDS = ((0, 180), (180, 301))  # uneven, in rank order
TEMPERATURE, LOGIT_SCALE, BETA = 0.7, 1.5, 0.2


def grpo_loss(logp, entropy, kl, old, advantages, mask):
    """TRL's ``"grpo"`` reduction of the clipped surrogate plus ``beta · KL``, minus 0.01 entropy."""
    ratio = torch.exp(logp - old)
    surrogate = -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
    per_token = (surrogate + BETA * kl) * mask
    return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean() - 0.01 * (entropy * mask).sum() / mask.sum()


def run(hidden, heads, labels, old, advantages, mask, process_group):
    h = hidden.clone().requires_grad_(True)
    head, ref_head = heads
    terms = full_kl_terms(h, head, labels, hidden.flip(0), ref_head, temperature=TEMPERATURE,
                          logit_scale=LOGIT_SCALE, ref_logit_scale=LOGIT_SCALE, process_group=process_group)
    loss = grpo_loss(*terms, old, advantages, mask)
    loss.backward()
    return loss.detach(), [t.detach() for t in terms], h.grad, head.weight.grad, head.bias.grad


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    whole = (torch.nn.Linear(H, V), torch.nn.Linear(H, V))
    hidden = torch.randn(B, T, H)
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = -100
    labels[2, -3:] = -100
    mask = (labels != -100).float()
    old = -6.0 + torch.randn(B, T)
    advantages = torch.tensor([[1.0], [-0.5], [0.8]])
    # Built after every random draw: the shards' sizes differ between the ranks.
    v0, v1 = SHARDS[rank]
    shards = []
    for layer in whole:
        shard = torch.nn.Linear(H, v1 - v0)
        with torch.no_grad():
            shard.weight.copy_(layer.weight[v0:v1])
            shard.bias.copy_(layer.bias[v0:v1])
        shards.append(shard)

    sharded = run(hidden, shards, labels, old, advantages, mask, dist.group.WORLD)
    single = run(hidden, whole, labels, old, advantages, mask, None)
    results = {
        "loss": (sharded[0] - single[0]).abs().item(),
        "loss_value": single[0].item(),
        "terms": max((a - b).abs().max().item() for a, b in zip(sharded[1], single[1])),
        "kl_mean": single[1][2][mask.bool()].mean().item(),
        "hidden_grad": ((sharded[2] - single[2]).abs().max() / single[2].abs().max()).item(),
        "weight_grad": ((sharded[3] - single[3][v0:v1]).abs().max() / single[3].abs().max()).item(),
        "bias_grad": ((sharded[4] - single[4][v0:v1]).abs().max() / single[4].abs().max()).item(),
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    finish_worker(out, {"ranks": gathered})


if __name__ == "__main__":
    main(sys.argv[1])
