"""The implementations of a case: what each op runs, and the notes on those left out.

:func:`implementations` lists them for a run, each an :class:`Impl` whose ``build(case)``
returns ``forward(inputs) -> outputs``:

``prefopt:B``, ``prefopt:B+inplace``, ``prefopt:B-unfused``
    the package's op on backend ``B`` (:func:`prefopt_forward`); the logits ops with
    ``inplace_backward`` in fwd+bwd mode; the linear ops as explicit logits and the package's
    logits op on them.
``eager`` (the baseline of every ratio), ``eager-trl``, ``torch-ce``
    the suite's eager PyTorch code (:func:`eager_forward`, ``eager``); for ``logprobs`` also
    TRL's ``selective_log_softmax`` strategy and PyTorch's cross-entropy.
``gemm``
    the LM head's GEMMs alone: the floor of the linear ops.
``trl-chunked``, ``compile``, the peers
    TRL's chunked LM-head functions, ``torch.compile`` of the eager code, and the peer
    libraries where installed (``peers``).

The tensor-parallel ranks build theirs from :func:`prefopt_forward` and :func:`eager_forward`
(``tensor_parallel_rank``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import eager
from .cases import LINEAR_OPS, LOGIT_OPS, SAMPLER, SEQ_LEN, Case
from .peers import available_peers, trl_chunked

EAGER = "eager"  # the implementation every ratio is taken against
UNFUSED = "-unfused"  # suffix of a backend's explicit-logits path for the linear ops
TRL_CHUNKED = "trl-chunked"
INTERPRETED_MAX_ELEMS = 64 * 4096  # N*V up to which interpreted Triton is run on a CPU


@dataclass
class Impl:
    """One way of computing a case. ``build(case)`` returns ``forward(inputs) -> outputs``."""

    name: str
    build: Callable[[Case], Callable[[dict], tuple]]
    ops: Optional[frozenset] = None  # ops it implements; None: all
    modes: Optional[frozenset] = None  # modes it runs in; None: all
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    mutates_input: bool = False  # overwrites the logits: runs after the others in a case
    max_elems: Optional[int] = None  # largest N*V it runs at (interpreted Triton)
    only: Optional[Callable[[Case], bool]] = None  # a further restriction, e.g. to bound compiles
    # Specialised to each shape (torch.compile, dynamic=False): warmed up on the case itself.
    compiles_per_shape: bool = False

    def warm_up_case(self, case: Case) -> Case:
        """The case to warm up on before ``case`` is measured: a tiny copy, or ``case`` itself
        when a new shape would compile again."""
        return case if self.compiles_per_shape else case.small()

    def applies(self, case: Case) -> bool:
        """Whether it runs ``case``: its op, mode and size, and any further restriction."""
        return ((self.ops is None or case.op in self.ops)
                and (self.modes is None or case.mode in self.modes)
                and (self.max_elems is None or case.n * case.v <= self.max_elems)
                and (self.only is None or self.only(case)))


def prefopt_forward(case: Case, inplace: bool, process_group=None) -> Callable[[dict], tuple]:
    """The package's op for the case; ``process_group`` shards it by vocabulary (the inputs are
    then this rank's shards: see ``tensor_parallel``)."""
    import prefopt_kernels as pk

    op, div, group = case.op, case.divergence, process_group
    if op == "logprobs":
        return lambda x: (pk.token_logprobs(x["logits"], x["labels"], inplace_backward=inplace,
                                            process_group=group),)
    if op == "logprobs+entropy":
        return lambda x: tuple(pk.token_logprobs(x["logits"], x["labels"], return_entropy=True,
                                                 inplace_backward=inplace, process_group=group))
    if op == "logprobs+sampler":
        return lambda x: (pk.token_logprobs(x["logits"], x["labels"], inplace_backward=inplace,
                                            process_group=group, **SAMPLER),)
    if op.startswith("divergence:"):
        return lambda x: (pk.token_divergence(x["logits"], x["ref_logits"], divergence=div,
                                              inplace_backward=inplace, process_group=group),)
    if op.startswith("terms:"):
        return lambda x: tuple(t for t in pk.token_terms(
            x["logits"], x["labels"], x["ref_logits"], divergence=div,
            inplace_backward=inplace, process_group=group) if t is not None)
    if op == "sparse_po":
        # The KL mask, fixed (it needs no gradient), goes in as div_weight: the op skips the
        # divergence where it is 0.
        return lambda x: _sparse_po_step(pk.token_terms(
            x["logits"], x["labels"], x["ref_logits"], divergence=div, div_weight=x["mask"],
            inplace_backward=inplace, process_group=group), x)
    if op == "linear:logprobs":
        return lambda x: (pk.linear_token_logprobs(x["hidden"], x["weight"], x["labels"],
                                                   process_group=group),)
    if op == "linear:logprobs+sampler":
        return lambda x: (pk.linear_token_logprobs(x["hidden"], x["weight"], x["labels"],
                                                   process_group=group, **SAMPLER),)
    if op == "linear:terms":
        return lambda x: _given(pk.linear_token_terms(x["hidden"], x["weight"], x["labels"],
                                                      x["ref_hidden"], x["ref_weight"],
                                                      divergence=div, process_group=group))
    raise ValueError(op)


def _given(terms) -> tuple:
    """The outputs of a ``TokenTerms`` that were asked for."""
    return tuple(t for t in terms if t is not None)


def _unfused_forward(case: Case) -> Callable[[dict], tuple]:
    """A linear op as explicit logits ``hidden @ W.T`` (both heads for terms) and the package's
    logits op on them, with ``inplace_backward`` in fwd+bwd mode: nothing else reads those
    logits (the projection's backward needs ``hidden`` and ``W`` only). Not in bwd mode, whose
    timed backward runs again on one graph: an in-place gradient would overwrite its input."""
    import prefopt_kernels as pk

    inplace = case.mode == "fwd+bwd"
    if case.op == "linear:logprobs":
        return lambda x: (pk.token_logprobs(x["hidden"] @ x["weight"].t(), x["labels"],
                                            inplace_backward=inplace),)
    if case.op == "linear:logprobs+sampler":
        return lambda x: (pk.token_logprobs(x["hidden"] @ x["weight"].t(), x["labels"],
                                            inplace_backward=inplace, **SAMPLER),)
    if case.op == "linear:terms":
        return lambda x: _given(pk.token_terms(
            x["hidden"] @ x["weight"].t(), x["labels"], x["ref_hidden"] @ x["ref_weight"].t(),
            divergence=case.divergence, inplace_backward=inplace))
    raise ValueError(case.op)


def _sparse_po_step(terms, x) -> tuple:
    """The SparsePO loss (``pk.losses.sparse_po_loss``) from per-token terms.

    The N tokens are sequences of ``SEQ_LEN`` tokens (two sequences when N is smaller); the
    first half of the sequences are the chosen responses, the second half the rejected ones.
    One mask serves as reward mask and KL mask, as in SparsePO's shared-mask variant.
    """
    from prefopt_kernels.losses import sparse_po_loss

    logp, ref_logp, kl = terms[0], terms[1], terms[2]
    n = logp.shape[0]
    t = SEQ_LEN if n % (2 * SEQ_LEN) == 0 else n // 2
    pairs = n // (2 * t)

    def halves(v):
        v = v.view(2 * pairs, t)
        return v[:pairs], v[pairs:]
    (lw, ll), (kw, kl_l), (mw, ml) = halves(logp - ref_logp), halves(kl), halves(x["mask"])
    loss, _ = sparse_po_loss(lw, ll, kw, kl_l, mw, ml, mw, ml, beta=0.1)
    return (loss,)


def eager_forward(case: Case) -> Callable[[dict], tuple]:
    """The suite's eager PyTorch code for the case (``eager``): the baseline of every ratio."""
    op, div = case.op, case.divergence
    if op == "logprobs":
        return lambda x: (eager.logprobs(x["logits"], x["labels"]),)
    if op == "logprobs+entropy":
        return lambda x: eager.logprobs_entropy(x["logits"], x["labels"])
    if op == "logprobs+sampler":
        return lambda x: (eager.sampled_logprobs(x["logits"], x["labels"], **SAMPLER),)
    if op.startswith("divergence:"):
        return lambda x: (eager.divergence(x["logits"], x["ref_logits"], div),)
    if op.startswith("terms:"):
        return lambda x: eager.terms_forward_kl(x["logits"], x["labels"], x["ref_logits"])
    if op == "sparse_po":
        return lambda x: _sparse_po_step(
            eager.terms_forward_kl(x["logits"], x["labels"], x["ref_logits"]), x)
    if op == "linear:logprobs":
        return lambda x: (eager.linear_logprobs(x["hidden"], x["weight"], x["labels"]),)
    if op == "linear:logprobs+sampler":
        return lambda x: (eager.sampled_logprobs(x["hidden"] @ x["weight"].t(), x["labels"], **SAMPLER),)
    if op == "linear:terms":
        return lambda x: eager.linear_terms(x["hidden"], x["weight"], x["labels"],
                                            x["ref_hidden"], x["ref_weight"])
    raise ValueError(op)


def _gemm_forward(case: Case) -> Callable[[dict], tuple]:
    return lambda x: (eager.gemm_floor(x["hidden"], x["weight"], x.get("ref_hidden"),
                                       x.get("ref_weight")),)


_COMPILED: Dict[str, Callable] = {}


def _compiled_forward(case: Case) -> Callable[[dict], tuple]:
    """``torch.compile`` of the eager code, one compiled function per op (recompiled per shape)."""
    fn = _COMPILED.get(case.op)
    if fn is None:
        eager_fn = eager_forward(case)
        fn = _COMPILED[case.op] = torch.compile(lambda x: eager_fn(x), dynamic=False)
    return fn


def implementations(device: torch.device, backends: Sequence[str], *, compile_eager: bool,
                    compile_only: Optional[Callable[[Case], bool]] = None,
                    peers: bool = True) -> Tuple[List[Impl], List[str]]:
    """The implementations to run on ``device`` and the notes on those left out.

    ``compile_only`` restricts the ``torch.compile`` baseline to some cases (each new shape
    costs a compilation of tens of seconds)."""
    notes: List[str] = []
    impls: List[Impl] = []
    logit_ops = frozenset(LOGIT_OPS)
    linear = frozenset(LINEAR_OPS)
    all_ops = logit_ops | linear
    for b in backends:
        def ctx(b=b):
            import prefopt_kernels as pk
            return pk.use_backend(b)
        interpreted = b == "triton" and device.type != "cuda"
        if interpreted:
            notes.append("triton on CPU runs under the Triton interpreter, only at tiny shapes: "
                         "its times measure the Python interpreter and say nothing about speed.")
        cap = INTERPRETED_MAX_ELEMS if interpreted else None
        impls.append(Impl(f"prefopt:{b}", lambda c: prefopt_forward(c, False), all_ops,
                          context=ctx, max_elems=cap))
        # Not the sampled op: its repeats would read logits overwritten by the previous gradient,
        # rows of ties whose kept set grows to the whole vocabulary, not the op on real logits.
        impls.append(Impl(f"prefopt:{b}+inplace", lambda c: prefopt_forward(c, True),
                          frozenset(op for op in logit_ops if not op.endswith("+sampler")),
                          modes=frozenset({"fwd+bwd"}), context=ctx, mutates_input=True,
                          max_elems=cap))
        impls.append(Impl(f"prefopt:{b}{UNFUSED}", _unfused_forward, linear, context=ctx,
                          max_elems=cap))
    impls.append(Impl(EAGER, eager_forward, all_ops))
    impls.append(Impl("eager-trl", lambda c: (lambda x: (eager.logprobs_trl(x["logits"],
                                                                          x["labels"]),)),
                      frozenset({"logprobs"})))
    impls.append(Impl("torch-ce", lambda c: (lambda x: (eager.logprobs_ce(x["logits"],
                                                                        x["labels"]),)),
                      frozenset({"logprobs"})))
    impls.append(Impl("gemm", _gemm_forward, linear))
    trl, trl_notes = trl_chunked(device)
    notes.extend(trl_notes)
    if trl is not None:
        impls.append(Impl(TRL_CHUNKED, lambda c: trl[c.op](c), frozenset(trl)))
    if compile_eager:
        impls.append(Impl("compile", _compiled_forward, all_ops, only=compile_only, compiles_per_shape=True))
    else:
        notes.append("torch.compile baseline: off (--no-compile, or --quick without --compile).")
    if peers:
        found, peer_notes = available_peers(device)
        notes.extend(peer_notes)
        for name, builders in found.items():
            impls.append(Impl(name, lambda c, bs=builders: bs[c.op](c), frozenset(builders),
                              mutates_input=True))
    return impls, notes
