"""Every op under PyTorch's autograd wrappers that trainers put around a loss.

``torch.utils.checkpoint`` (re-entrant and not) runs the forward again in the backward and
unpacks each saved tensor once; ``torch.autograd.graph.save_on_cpu`` moves the saved tensors
out and back. Both must leave every gradient exactly what the plain call gives: the ops run
the same kernels on the same inputs either way.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import prefopt_kernels as pk
from contract import backends_under_test

V, H, B, T = 53, 10, 2, 4


def _inputs():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = -100
    return dict(
        logits=torch.randn(B, T + 1, V, generator=g)[:, :-1],  # a sliced view, as trainers pass
        ref_logits=torch.randn(B, T, V, generator=g),
        hidden=torch.randn(B, T, H, generator=g),
        head=torch.randn(V, H, generator=g) / H**0.5,
        bias=torch.randn(V, generator=g),
        ref_hidden=torch.randn(B, T, H, generator=g),
        ref_head=torch.randn(V, H, generator=g) / H**0.5,
        labels=labels,
        mask=(torch.rand(B, T, generator=g) > 0.3).float(),
    )


# Each op as a scalar of its differentiable outputs, and the inputs it differentiates.
OPS = {
    "token_logprobs": (lambda x: sum(o.sum() for o in pk.token_logprobs(
        x["logits"], x["labels"], return_entropy=True)), ("logits",)),
    "token_divergence": (lambda x: pk.token_divergence(
        x["logits"], x["ref_logits"], divergence="js", weight=x["mask"]).sum(), ("logits",)),
    "token_terms": (lambda x: (lambda t: (t.logp + 0.5 * t.div - 0.1 * t.entropy).sum())(pk.token_terms(
        x["logits"], x["labels"], x["ref_logits"], divergence="reverse_kl", return_entropy=True)), ("logits",)),
    "linear_token_logprobs": (lambda x: pk.linear_token_logprobs(
        x["hidden"], x["head"], x["labels"], head_bias=x["bias"], softcap=4.0).sum(), ("hidden", "head", "bias")),
    "linear_token_divergence": (lambda x: pk.linear_token_divergence(
        x["hidden"], x["head"], x["ref_hidden"], x["ref_head"], divergence="chi2", div_weight=x["mask"]).sum(),
        ("hidden", "head")),
    "linear_token_terms": (lambda x: (lambda t: (t.logp + 0.3 * t.div).sum())(pk.linear_token_terms(
        x["hidden"], x["head"], x["labels"], x["ref_hidden"], x["ref_head"], divergence="forward_kl",
        logit_scale=0.7)), ("hidden", "head")),
}


def _grads(op: str, wrap, backend: str) -> list:
    fn, differentiated = OPS[op]
    x = _inputs()
    leaves = [x[name].detach().clone().requires_grad_(True) for name in differentiated]
    names = list(differentiated)

    def loss(*tensors):
        return fn(dict(x, **dict(zip(names, tensors))))

    with pk.use_backend(backend):
        value = wrap(loss, leaves)
        value.backward()
    return [value.detach()] + [leaf.grad for leaf in leaves]


WRAPPERS = {
    "checkpoint_non_reentrant": lambda loss, leaves: checkpoint(loss, *leaves, use_reentrant=False),
    "checkpoint_reentrant": lambda loss, leaves: checkpoint(loss, *leaves, use_reentrant=True),
    "save_on_cpu": lambda loss, leaves: _save_on_cpu(loss, leaves),
}


def _save_on_cpu(loss, leaves):
    with torch.autograd.graph.save_on_cpu():
        return loss(*leaves)


@pytest.mark.parametrize("backend", backends_under_test() + ["reference"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("op", list(OPS))
def test_wrapped_op_gives_the_plain_gradients(op, wrapper, backend):
    plain = _grads(op, lambda loss, leaves: loss(*leaves), backend)
    wrapped = _grads(op, WRAPPERS[wrapper], backend)
    assert all(g is not None and g.abs().sum() > 0 for g in plain[1:]), "vacuous: a zero gradient"
    for i, (got, want) in enumerate(zip(wrapped, plain)):
        assert got is not None and torch.equal(got, want), f"{op} under {wrapper}: output {i} differs"
