r"""The registered ops under ``torch.library`` and ``torch.compile``.

* ``torch.library.opcheck`` on every registered op: schema, fake (meta) implementation
  against the real one, autograd registration, and AOT dispatch (static and dynamic shapes).
* A training step that calls a logits op, a fused linear op and a loss on their outputs:
  ``torch._dynamo.explain`` finds one graph and no break, and ``torch.compile(fullgraph=True)``
  (Inductor) gives the eager losses and gradients (the ops run the same kernels either way,
  so the tolerance is only Inductor's reassociation of the surrounding arithmetic).
* ``dynamic=True``: one graph serves every batch size and sequence length, for every op
  (ten shapes under ``fullgraph=True`` with recompilation forbidden after the first), and each
  shape's outputs and gradients equal eager's.
* The label check is data-dependent, so it runs inside the op: a compiled step raises the
  eager ``ValueError``.
* The eager-only options are refused under compilation with a message naming them:
  ``inplace_backward=True`` and ZeRO-3 partitioned head weights.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import prefopt_kernels as pk
from prefopt_kernels import spec as specs
from prefopt_kernels.backends import DIVERGENCE_CODES
from prefopt_kernels.spec import HeadSpec, LinearSpec, OpSpec

OPS = torch.ops.prefopt_kernels
V, H, B, T = 61, 12, 2, 5
# On a GPU machine the compiled step also runs on CUDA tensors (the Triton backend inside the ops).
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


def _inputs(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    tensors = dict(
        logits=torch.randn(B, T, V, generator=g), ref_logits=torch.randn(B, T, V, generator=g),
        labels=torch.randint(0, V, (B, T), generator=g), hidden=torch.randn(B, T, H, generator=g),
        head=torch.randn(V, H, generator=g) / H**0.5, ref_hidden=torch.randn(B, T, H, generator=g),
        ref_head=torch.randn(V, H, generator=g) / H**0.5, mask=(torch.rand(B, T, generator=g) > 0.3).float(),
    )
    tensors["labels"][0, :2] = -100
    tensors = {name: x.to(device) for name, x in tensors.items()}
    for name in ("logits", "hidden", "head"):
        tensors[name].requires_grad_(True)
    return tuple(tensors.values())


def _step(logits, ref_logits, labels, hidden, head, ref_hidden, ref_head, mask):
    """A token-level loss over both op families: SparsePO-like terms, an entropy bonus, a KL."""
    terms = pk.token_terms(logits, labels, ref_logits, divergence="js", div_weight=mask, return_entropy=True)
    linear = pk.linear_token_terms(hidden, head, labels, ref_hidden, ref_head, divergence="reverse_kl",
                                   softcap=3.0, extras=("mean_logits", "is_top1"))
    linear_terms, extras = linear
    reward = ((terms.logp - terms.ref_logp) * mask).sum(-1) + (linear_terms.logp - linear_terms.ref_logp).sum(-1)
    kl = (terms.div * mask).sum() + linear_terms.div.sum()
    loss = -torch.nn.functional.logsigmoid(reward[0] - reward[1]) + 0.1 * kl - 0.01 * terms.entropy.sum()
    return loss + 0.0 * extras["mean_logits"].sum(), extras["is_top1"]


def _token_forward_args(logits, ref_logits, labels, mask, **spec):
    labels = None if labels is None else labels.reshape(-1)
    mask = None if mask is None else mask.reshape(-1)
    return (logits, ref_logits, labels, mask, OpSpec(**spec).encode(), False, "auto", "")


@pytest.mark.parametrize("case", ["logprobs_entropy", "terms_js_weighted", "divergence_chi2"])
def test_opcheck_token_forward(case):
    logits, ref_logits, labels, *_, mask = _inputs()
    args = {
        "logprobs_entropy": _token_forward_args(logits, None, labels, None, want_logp=True, want_entropy=True),
        "terms_js_weighted": _token_forward_args(logits, ref_logits, labels, mask, divergence=DIVERGENCE_CODES["js"], want_logp=True,
                                                 want_ref_logp=True),
        "divergence_chi2": _token_forward_args(logits, ref_logits, None, None, divergence=DIVERGENCE_CODES["chi2"]),
    }[case]
    torch.library.opcheck(OPS.token_forward.default, args)


def test_opcheck_token_backward():
    logits, _, labels, *_ = _inputs()
    spec = dict(want_logp=True, want_entropy=True)
    logp, entropy, row_max, log_norm = OPS.token_forward(*_token_forward_args(logits.detach(), None, labels, None,
                                                                               **spec))
    n = logits.shape[:-1].numel()
    args = (logits.detach(), None, labels.reshape(-1), None, [row_max, log_norm, entropy],
            [torch.ones(n), torch.full((n,), 0.5), None], torch.empty_like(logits), OpSpec(**spec).encode(),
            "auto", "", None)
    torch.library.opcheck(OPS.token_backward.default, args)


@pytest.mark.parametrize("with_ref", [False, True], ids=["logprobs", "terms"])
def test_opcheck_linear_forward(with_ref):
    _, _, labels, hidden, head, ref_hidden, ref_head, _ = _inputs()
    bias = torch.randn(V, requires_grad=True)
    spec = dict(want_logp=True, want_entropy=True)
    if with_ref:
        spec.update(divergence=DIVERGENCE_CODES["reverse_kl"], want_ref_logp=True)
    heads = (HeadSpec(torch.float32, scale=1.5, softcap=4.0, has_bias=True),)
    tensors = [hidden, head, bias]
    if with_ref:
        heads += (HeadSpec(torch.float32),)
        tensors += [ref_hidden, ref_head]
    linear = LinearSpec(OpSpec(**spec), heads, extras=("mean_logits", "is_top1", "log_sum_sq_probs"),
                        memory_budget=4096, hidden_needs_grad=True)
    args = (tensors, labels.reshape(-1), None, linear.encode(), "auto", "")
    # The kept tokens are data-dependent: the fake implementation gives them an unbacked size.
    torch.library.opcheck(OPS.linear_forward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_dynamo_sees_one_graph_and_no_break(device):
    explanation = torch._dynamo.explain(_step)(*_inputs(device=device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("device", DEVICES)
def test_fullgraph_compile_matches_eager(device, dynamic):
    """Static and dynamic shapes: the argument checks trace without a graph break either way."""
    torch._dynamo.reset()
    eager_inputs, compiled_inputs = _inputs(device=device), _inputs(device=device)
    loss, top1 = _step(*eager_inputs)
    loss.backward()
    compiled = torch.compile(_step, fullgraph=True, dynamic=dynamic)
    compiled_loss, compiled_top1 = compiled(*compiled_inputs)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(compiled_top1, top1)
    for name, eager, ours in zip(("logits", "hidden", "head"), (eager_inputs[0], *eager_inputs[3:5]),
                                 (compiled_inputs[0], *compiled_inputs[3:5])):
        torch.testing.assert_close(ours.grad, eager.grad, rtol=1e-5, atol=1e-6, msg=name)
    # A batch with other label positions runs the same compiled graph: nothing was specialised on data.
    fresh = _inputs(seed=1, device=device)
    torch.testing.assert_close(compiled(*fresh)[0], _step(*_inputs(seed=1, device=device))[0], rtol=1e-5, atol=1e-6)


# Batch and sequence sizes of ten steps (>= 2: PyTorch specialises sizes 0 and 1 by design).
SHAPES = [(2, 3), (3, 5), (2, 7), (4, 4), (5, 2), (2, 9), (3, 3), (6, 5), (7, 2), (2, 11)]
# Each op as a step over a [B, T + 1, ...] batch, sliced as trainers slice it; the tensors it differentiates.
DYNAMIC_STEPS = {
    "token_logprobs": lambda x: sum(o.sum() for o in pk.token_logprobs(
        x["logits"][:, :-1], x["labels"], return_entropy=True)),
    "token_divergence": lambda x: pk.token_divergence(
        x["logits"][:, :-1], x["ref_logits"][:, :-1], divergence="js", weight=x["mask"]).sum(),
    "token_terms": lambda x: (lambda t: (t.logp - t.ref_logp + t.div).sum())(pk.token_terms(
        x["logits"][:, :-1], x["labels"], x["ref_logits"][:, :-1], divergence="forward_kl")),
    "linear_token_logprobs": lambda x: pk.linear_token_logprobs(
        x["hidden"][:, :-1], x["head"], x["labels"], softcap=5.0).sum(),
    "linear_token_divergence": lambda x: pk.linear_token_divergence(
        x["hidden"][:, :-1], x["head"], x["ref_hidden"][:, :-1], x["ref_head"], divergence="tv",
        div_weight=x["mask"]).sum(),
    "linear_token_terms": lambda x: (lambda t: (t.logp + t.div + t.entropy).sum())(pk.linear_token_terms(
        x["hidden"][:, :-1], x["head"], x["labels"], x["ref_hidden"][:, :-1], x["ref_head"],
        divergence="reverse_kl", return_entropy=True)),
}


def _batch(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (b, t), generator=g)
    labels[0, 0] = -100
    x = dict(logits=torch.randn(b, t + 1, V, generator=g), ref_logits=torch.randn(b, t + 1, V, generator=g),
             hidden=torch.randn(b, t + 1, H, generator=g), head=torch.randn(V, H, generator=g) / H**0.5,
             ref_hidden=torch.randn(b, t + 1, H, generator=g), ref_head=torch.randn(V, H, generator=g) / H**0.5,
             labels=labels, mask=(torch.rand(b, t, generator=g) > 0.3).float())
    for name in ("logits", "hidden", "head"):
        x[name].requires_grad_(True)
    return x


@pytest.mark.parametrize("op", list(DYNAMIC_STEPS))
def test_one_dynamic_graph_serves_every_batch_and_sequence_length(op):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    step = DYNAMIC_STEPS[op]
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    for i, (b, t) in enumerate(SHAPES):
        mine, eager = _batch(b, t, seed=i), _batch(b, t, seed=i)
        # After the first shape, any recompilation raises.
        with contextlib.nullcontext() if i == 0 else torch.compiler.set_stance("fail_on_recompile"):
            loss = compiled(mine)
            loss.backward()
        expected = step(eager)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6, msg=f"{op} at B={b}, T={t}")
        for name in ("logits", "hidden", "head"):
            if eager[name].grad is not None:
                torch.testing.assert_close(mine[name].grad, eager[name].grad, rtol=1e-6, atol=1e-6,
                                           msg=f"{op} d {name} at B={b}, T={t}")
    assert counter.frame_count >= 1


def test_label_out_of_range_raises_inside_a_compiled_step():
    torch._dynamo.reset()
    logits, _, labels, hidden, head, *_ = _inputs()

    def step(logits, labels, hidden, head):
        return pk.token_logprobs(logits, labels).sum() + pk.linear_token_logprobs(hidden, head, labels).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(logits, labels, hidden, head)
    bad = labels.clone()
    bad[1, 3] = V
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {V}\).*found {V}"):
        compiled(logits, bad, hidden, head)


def _refusal(message: str) -> str:
    """The text a refusal under ``fullgraph=True`` must show: dynamo puts the error's own message
    into the one it raises from torch 2.9; before, only that the call was refused."""
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return message if version >= (2, 9) else ""


def test_inplace_backward_is_refused_under_compile():
    torch._dynamo.reset()
    logits, _, labels, *_ = _inputs()
    compiled = torch.compile(lambda x, y: pk.token_logprobs(x, y, inplace_backward=True).sum(),
                             backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=_refusal("inplace_backward=True is an eager-mode option")):
        compiled(logits.detach().clone().requires_grad_(True), labels)


def test_zero3_partitioned_head_is_refused_under_compile():
    """A compiled backward is traced without the ZeRO-3 state, so it could not gather the head again."""
    torch._dynamo.reset()
    _, _, labels, hidden, head, *_ = _inputs()
    partitioned = torch.nn.Parameter(head.detach().clone())
    partitioned.ds_status = types.SimpleNamespace(name="NOT_AVAILABLE")
    compiled = torch.compile(lambda h, y: pk.linear_token_logprobs(h, partitioned, y).sum(),
                             backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=_refusal("ZeRO-3 partitioned head weights are gathered by eager calls only")):
        compiled(hidden, labels)
