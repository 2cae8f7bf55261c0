"""What one call computes, as frozen dataclasses built once from the public arguments.

:class:`OpSpec` describes the math (temperature, ignored label, divergence and its
parameters, outputs wanted); :class:`HeadSpec` one LM head's logit transform and GEMM dtype;
:class:`LinearSpec` a fused linear call (its ``OpSpec``, one ``HeadSpec`` per head — the
policy's first, the reference's second — and the tiling options). A spec is validated where
it is built (the public functions, through :mod:`prefopt_kernels.checks`) and carried whole
to the kernels and the backward.

Registered ops take tensors and scalars only, so a spec crosses them as one ``Scalar[]``
argument: :meth:`Spec.encode` and :meth:`Spec.decode` walk the dataclass fields (their
annotated types say how each is written), so a new field needs no plumbing.
:meth:`Spec.fingerprint` names every encoded value: what the ranks of a sharded call compare.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch

from .divergences import Divergence

# The per-token outputs an op can return, in the order it returns them.
OUTPUTS = ("logp", "ref_logp", "entropy", "div", "log_kept_mass")
# The extra per-token fields of the fused linear ops (TRL's ``FusedCausalLMOutput``).
EXTRAS = ("mean_logits", "is_top1", "log_sum_sq_probs")
DEFAULT_MEMORY_BUDGET = 64 * 2**20  # bytes of a fused linear call's tiles and per-tile temporaries
# dtypes a spec may hold, by the index it is encoded as.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# How a registered op's schema spells an encoded spec.
Encoded = List[Union[int, float, bool]]


class Spec:
    """What every spec class can do: cross a registered op and be compared across ranks."""

    def encode(self) -> list:
        """This spec as the flat list of scalars a registered op's ``Scalar[]`` argument carries."""
        return [value for _, value, _ in _leaves(self, _PLANS[type(self)], "", True)]

    @classmethod
    def decode(cls, values):
        """The inverse of :meth:`encode`: a spec of this class from its encoded ``values``."""
        values = tuple(values)
        if any(isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) for v in values):
            # Symbolic values belong to one trace: a cached spec must never outlive it.
            return _decode.__wrapped__(cls, values)
        return _decode(cls, values)

    def fingerprint(self) -> List[Tuple[str, int]]:
        """``(name, int64)`` for every field the ranks of a sharded call must agree on.

        Floats enter by their float64 bits (equal exactly when the floats are); fields marked
        ``fingerprint=False`` (the memory budget: tiling never changes what is exchanged) are
        left out.
        """
        return [(name, _as_int64(value)) for name, value, counted in _leaves(self, _PLANS[type(self)], "", True)
                if counted]


@dataclass(frozen=True)
class OpSpec(Spec):
    """The math of one call, handed to every backend's forward and backward.

    ``divergence`` is a :class:`~prefopt_kernels.divergences.Divergence` code (0 for none);
    ``beta`` (js) and ``alpha`` (alpha) are its parameters, read only by those divergences.
    ``top_k``, ``top_p`` and ``min_p`` restrict the policy's log-prob to the sampler's kept set
    (:mod:`prefopt_kernels.sampling`); their neutral values keep the whole vocabulary.
    """

    temperature: float = 1.0
    ignore_index: int = -100
    divergence: int = 0
    beta: float = 0.5
    alpha: float = 0.5
    want_logp: bool = False  # the label's log-prob under the policy (needs labels)
    want_ref_logp: bool = False  # the label's log-prob under the reference
    want_entropy: bool = False  # the policy's entropy
    top_k: int = 0  # keep the tokens at least the k-th largest (ties kept); 0: no top-k filter
    top_p: float = 1.0  # then the smallest nucleus of that mass (ties of the last kept); 1: none
    min_p: float = 0.0  # first keep z >= max z + log(min_p); 0: no min-p filter
    want_kept_mass: bool = False  # log of the kept set's share of the full distribution

    @property
    def samples(self) -> bool:
        """Whether the policy's log-prob is taken over a sampler's kept set, not the whole vocabulary."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def member(self) -> Optional[Divergence]:
        """The divergence as its registry member, ``None`` for none."""
        return Divergence(self.divergence) if self.divergence else None

    def outputs(self) -> Tuple[str, ...]:
        """The per-token outputs a call of this spec returns, in :data:`OUTPUTS` order."""
        wanted = {"logp": self.want_logp, "ref_logp": self.want_ref_logp, "entropy": self.want_entropy,
                  "div": bool(self.divergence), "log_kept_mass": self.want_kept_mass}
        return tuple(name for name in OUTPUTS if wanted[name])


@dataclass(frozen=True)
class HeadSpec(Spec):
    """One LM head as a fused linear call applies it: ``z = scale (h W^T + c)``, then
    ``softcap tanh(z / softcap)`` when set; the GEMM runs in ``compute_dtype``."""

    compute_dtype: torch.dtype = torch.float32
    scale: float = 1.0
    softcap: Optional[float] = None
    has_bias: bool = False


@dataclass(frozen=True)
class LinearSpec(Spec):
    """One fused linear call: its math, its heads (policy, then reference when there is one)
    and how it tiles. ``hidden_needs_grad`` is the caller's ``hidden.requires_grad`` under
    grad mode: a sharded backward all-reduces the hidden gradient exactly where it is set."""

    op: OpSpec
    heads: Tuple[HeadSpec, ...]
    extras: Tuple[str, ...] = field(default=(), metadata={"choices": EXTRAS})
    memory_budget: int = field(default=DEFAULT_MEMORY_BUDGET, metadata={"fingerprint": False})
    hidden_needs_grad: bool = False

    @property
    def policy(self) -> HeadSpec:
        return self.heads[0]

    @property
    def reference(self) -> Optional[HeadSpec]:
        return self.heads[1] if len(self.heads) > 1 else None


def op_of(spec) -> OpSpec:
    """The :class:`OpSpec` of an ``OpSpec`` or of a ``LinearSpec``."""
    return spec.op if isinstance(spec, LinearSpec) else spec


# --------------------------------------------------------------------------- encoding
#
# Each spec class has a plan, made once from its annotated fields at import: a tuple of
# ``(name, how, detail)`` steps. Encoding walks the plan with plain getattr and arithmetic, so
# dynamo traces it inside a compiled step without a graph break.


def float_bits(x: float) -> int:
    """The bits of a float64, as an int64: equal exactly when the floats are."""
    return int(torch.tensor([x], dtype=torch.float64).view(torch.int64))


def _as_int64(value) -> int:
    return float_bits(value) if isinstance(value, float) else int(value)


_DTYPE_CODES = {dtype: i for i, dtype in enumerate(DTYPES)}


def _plan(kind, metadata=None) -> tuple:
    """How a value of type ``kind`` encodes: ``(how, detail)``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if metadata is not None and metadata.get("choices") is not None:
        return "choices", metadata["choices"]
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return "spec", (kind, tuple((f.name, f.metadata.get("fingerprint", True), _plan(hints[f.name], f.metadata))
                                    for f in dataclasses.fields(kind)))
    if origin is Union:  # Optional[X]: a presence flag, then X when present
        return "optional", _plan(args[0])
    if origin is tuple:  # Tuple[X, ...]: the count, then each item
        return "tuple", _plan(args[0])
    if kind is torch.dtype:
        return "dtype", None
    if kind in (bool, int, float):
        return "scalar", kind
    raise TypeError(f"a spec field of type {kind} has no encoding")


def _leaves(value, plan: tuple, name: str, counted: bool):
    """``(dotted name, scalar, counted)`` for every scalar ``value`` encodes to, following ``plan``."""
    how, detail = plan
    if how == "spec":
        for field_name, field_counted, field_plan in detail[1]:
            yield from _leaves(getattr(value, field_name), field_plan, f"{name}.{field_name}" if name else field_name,
                               counted and field_counted)
    elif how == "choices":  # a tuple of names among ``detail``: one bitmask
        yield name, sum(1 << i for i, choice in enumerate(detail) if choice in value), counted
    elif how == "optional":
        yield name, value is not None, counted
        if value is not None:
            yield from _leaves(value, detail, name, counted)
    elif how == "tuple":
        yield f"{name}.count", len(value), counted
        for i, item in enumerate(value):
            yield from _leaves(item, detail, f"{name}[{i}]", counted)
    elif how == "dtype":
        yield name, _DTYPE_CODES[value], counted
    else:
        yield name, detail(value), counted


@functools.lru_cache(maxsize=256)
def _decode(cls, values: tuple):
    spec, rest = _read(_PLANS[cls], list(values))
    if rest:
        raise ValueError(f"{len(rest)} values left over decoding a {cls.__name__}")
    return spec


def _read(plan: tuple, values: list):
    """``(value, the values after it)``: one step of :meth:`Spec.decode`."""
    how, detail = plan
    if how == "spec":
        fields = {}
        for field_name, _, field_plan in detail[1]:
            fields[field_name], values = _read(field_plan, values)
        return detail[0](**fields), values
    if how == "choices":
        mask = int(values[0])
        return tuple(choice for i, choice in enumerate(detail) if mask >> i & 1), values[1:]
    if how == "optional":
        return (None, values[1:]) if not values[0] else _read(detail, values[1:])
    if how == "tuple":
        count, values = int(values[0]), values[1:]
        items = []
        for _ in range(count):
            item, values = _read(detail, values)
            items.append(item)
        return tuple(items), values
    if how == "dtype":
        return DTYPES[int(values[0])], values[1:]
    if detail is float:
        # As given: a float may be symbolic while a compiled step is traced, and must stay untouched.
        return values[0], values[1:]
    return detail(values[0]), values[1:]


_PLANS = {cls: _plan(cls) for cls in (OpSpec, HeadSpec, LinearSpec)}
