"""The sampled ops under ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``: the kept
set travels in the spec and the saved statistics, so dynamo sees one graph with no break and
the compiled step gives eager's outputs and gradients."""

import pytest
import torch

import prefopt_kernels as pk
from prefopt_kernels.spec import OpSpec

V, H = 317, 12
OPTIONS = dict(top_k=40, top_p=0.9, min_p=0.01)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, V, generator=gen) * 2).requires_grad_()
    hidden = torch.randn(2, 5, H, generator=gen).requires_grad_()
    head = (torch.randn(V, H, generator=gen) / H**0.5).requires_grad_()
    labels = logits.detach().argmax(-1)
    labels[0, :2] = -100
    return logits, hidden, head, labels


def _step(logits, hidden, head, labels):
    logp, entropy, mass = pk.token_logprobs(logits, labels, return_entropy=True, return_kept_mass=True, **OPTIONS)
    linear_logp, linear_mass = pk.linear_token_logprobs(hidden, head, labels, return_kept_mass=True,
                                                        memory_budget=6000, **OPTIONS)
    finite = torch.isfinite(logp) & torch.isfinite(linear_logp)
    loss = torch.where(finite, logp + linear_logp, 0.0).sum() - 0.01 * entropy.sum()
    return loss, mass + linear_mass


@pytest.mark.parametrize("spec", [dict(want_logp=True, **OPTIONS, want_kept_mass=True),
                                  dict(want_logp=True, want_entropy=True, top_p=0.5)])
def test_opcheck_sampled_token_forward(spec):
    logits, _, _, labels = _inputs()
    args = (logits, None, labels.reshape(-1), None, OpSpec(**spec).encode(), False, "auto", "")
    torch.library.opcheck(torch.ops.prefopt_kernels.token_forward.default, args)


def test_compiled_sampled_step_is_one_graph_and_matches_eager():
    eager_inputs, compiled_inputs = _inputs(), _inputs()
    explanation = torch._dynamo.explain(_step)(*_inputs())
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    loss, mass = _step(*eager_inputs)
    loss.backward()
    compiled = torch.compile(_step, fullgraph=True)
    compiled_loss, compiled_mass = compiled(*compiled_inputs)
    compiled_loss.backward()
    assert torch.allclose(compiled_loss, loss, rtol=1e-6) and torch.equal(compiled_mass, mass)
    for eager, other in zip(eager_inputs[:3], compiled_inputs[:3]):
        assert torch.allclose(eager.grad, other.grad, rtol=1e-5, atol=1e-7)
