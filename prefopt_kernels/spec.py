"""What one call computes, as frozen dataclasses built once from the public arguments.

:class:`OpSpec` describes the math (temperature, ignored label, divergence and its
parameters, outputs wanted); :class:`HeadSpec` one LM head's logit transform and GEMM dtype;
:class:`LinearSpec` a fused linear call (its ``OpSpec``, one ``HeadSpec`` per head — the
policy's first, the reference's second — and the tiling options). A spec is validated where
it is built (the public functions, through :mod:`prefopt_kernels.checks`) and carried whole
to the kernels and the backward.

Registered ops take tensors and scalars only, so a spec crosses them as one ``Scalar[]``
argument: :func:`encode` and :func:`decode` walk the dataclass fields (their annotated types
say how each is written), so a new field needs no plumbing. :func:`fingerprint` names every
encoded value, which is what the ranks of a sharded call compare.
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
OUTPUTS = ("logp", "ref_logp", "entropy", "div")
# The extra per-token fields of the fused linear ops (TRL's ``FusedCausalLMOutput``).
EXTRAS = ("mean_logits", "is_top1", "log_sum_sq_probs")
# dtypes a spec may hold, by the index it is encoded as.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# How a registered op's schema spells an encoded spec.
Encoded = List[Union[int, float, bool]]


@dataclass(frozen=True)
class OpSpec:
    """The math of one call, handed to every backend's forward and backward.

    ``divergence`` is a :class:`~prefopt_kernels.divergences.Divergence` code (0 for none);
    ``beta`` (js) and ``alpha`` (alpha) are its parameters, read only by those divergences.
    """

    temperature: float = 1.0
    ignore_index: int = -100
    divergence: int = 0
    beta: float = 0.5
    alpha: float = 0.5
    want_logp: bool = False  # the label's log-prob under the policy (needs labels)
    want_ref_logp: bool = False  # the label's log-prob under the reference
    want_entropy: bool = False  # the policy's entropy

    @property
    def member(self) -> Optional[Divergence]:
        """The divergence as its registry member, ``None`` for none."""
        return Divergence(self.divergence) if self.divergence else None

    def outputs(self) -> Tuple[str, ...]:
        """The per-token outputs a call of this spec returns, in :data:`OUTPUTS` order."""
        wanted = {"logp": self.want_logp, "ref_logp": self.want_ref_logp, "entropy": self.want_entropy,
                  "div": bool(self.divergence)}
        return tuple(name for name in OUTPUTS if wanted[name])


@dataclass(frozen=True)
class HeadSpec:
    """One LM head as a fused linear call applies it: ``z = scale (h W^T + c)``, then
    ``softcap tanh(z / softcap)`` when set; the GEMM runs in ``compute_dtype``."""

    hidden_size: int
    compute_dtype: torch.dtype = torch.float32
    scale: float = 1.0
    softcap: Optional[float] = None
    has_bias: bool = False


@dataclass(frozen=True)
class LinearSpec:
    """One fused linear call: its math, its heads (policy, then reference when there is one)
    and how it tiles. ``hidden_needs_grad`` is the caller's ``hidden.requires_grad`` under
    grad mode: a sharded backward all-reduces the hidden gradient exactly where it is set."""

    op: OpSpec
    heads: Tuple[HeadSpec, ...]
    extras: Tuple[str, ...] = field(default=(), metadata={"choices": EXTRAS})
    memory_budget: int = field(default=64 * 2**20, metadata={"fingerprint": False})
    hidden_needs_grad: bool = False

    @property
    def policy(self) -> HeadSpec:
        return self.heads[0]

    @property
    def reference(self) -> Optional[HeadSpec]:
        return self.heads[1] if len(self.heads) > 1 else None


# --------------------------------------------------------------------------- encoding


def encode(spec) -> list:
    """``spec`` as the flat list of scalars a registered op's ``Scalar[]`` argument carries."""
    return [value for _, value, _ in _leaves(spec, type(spec), "")]


def decode(cls, values):
    """The inverse of :func:`encode`: a ``cls`` spec from its encoded ``values``."""
    values = list(values)
    spec, rest = _read(cls, values)
    if rest:
        raise ValueError(f"{len(rest)} values left over decoding a {cls.__name__}")
    return spec


def fingerprint(spec) -> List[Tuple[str, int]]:
    """``(name, int64)`` for every field the ranks of a sharded call must agree on.

    Floats enter by their float64 bits (equal exactly when the floats are); fields marked
    ``fingerprint=False`` (the memory budget: tiling never changes what is exchanged) are left out.
    """
    return [(name, _as_int64(value)) for name, value, counted in _leaves(spec, type(spec), "") if counted]


def float_bits(x: float) -> int:
    """The bits of a float64, as an int64: equal exactly when the floats are."""
    return int(torch.tensor([x], dtype=torch.float64).view(torch.int64))


def _as_int64(value) -> int:
    return float_bits(value) if isinstance(value, float) else int(value)


@functools.lru_cache(maxsize=None)
def _fields(cls) -> tuple:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name], f.metadata) for f in dataclasses.fields(cls))


def _leaves(value, kind, name: str, counted: bool = True):
    """``(dotted name, scalar, counted)`` for every scalar ``value`` of type ``kind`` encodes to."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        for field_name, field_kind, metadata in _fields(kind):
            yield from _encode_field(getattr(value, field_name), field_kind, metadata,
                                     f"{name}.{field_name}" if name else field_name,
                                     counted and metadata.get("fingerprint", True))
    elif origin is Union:  # Optional[X]: a presence flag, then X when present
        yield name, value is not None, counted
        if value is not None:
            yield from _leaves(value, args[0], name, counted)
    elif origin is tuple:  # Tuple[X, ...]: the count, then each item
        yield f"{name}.count", len(value), counted
        for i, item in enumerate(value):
            yield from _leaves(item, args[0], f"{name}[{i}]", counted)
    elif kind is torch.dtype:
        yield name, DTYPES.index(value), counted
    elif kind in (bool, int, float):
        yield name, kind(value), counted
    else:
        raise TypeError(f"a spec field of type {kind} has no encoding")


def _encode_field(value, kind, metadata, name: str, counted: bool):
    choices = metadata.get("choices")
    if choices is not None:  # a tuple of names among ``choices``: one bitmask
        yield name, sum(1 << i for i, choice in enumerate(choices) if choice in value), counted
    else:
        yield from _leaves(value, kind, name, counted)


def _read(kind, values: list, metadata=None):
    """``(value of type kind, the values after it)``: one step of :func:`decode`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if metadata and metadata.get("choices") is not None:
        mask, choices = int(values[0]), metadata["choices"]
        return tuple(choice for i, choice in enumerate(choices) if mask >> i & 1), values[1:]
    if dataclasses.is_dataclass(kind):
        fields = {}
        for field_name, field_kind, field_metadata in _fields(kind):
            fields[field_name], values = _read(field_kind, values, field_metadata)
        return kind(**fields), values
    if origin is Union:
        if not values[0]:
            return None, values[1:]
        return _read(args[0], values[1:])
    if origin is tuple:
        count, values = int(values[0]), values[1:]
        items = []
        for _ in range(count):
            item, values = _read(args[0], values)
            items.append(item)
        return tuple(items), values
    if kind is torch.dtype:
        return DTYPES[int(values[0])], values[1:]
    return kind(values[0]), values[1:]
