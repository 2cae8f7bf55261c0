"""Hypothesis strategies for token-op inputs: shapes, dtypes, scales, masks, ignored labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import settings
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Small, prime, power-of-two and just-past-a-tile vocabularies (the interpreter tile is 1024).
VOCABS = st.one_of(
    st.sampled_from([1, 2, 3, 7, 31, 127, 1000, 1024, 1025, 2053, 3001]),
    st.integers(min_value=1, max_value=3000),
)


def scaled(max_examples: int) -> int:
    """A property test's example count, scaled by the loaded Hypothesis profile.

    The default profile runs ``max_examples``; the ``thorough`` profile
    (``HYPOTHESIS_PROFILE=thorough``, see conftest.py) runs 20 times as many.
    """
    return max(1, max_examples * settings.default.max_examples // 100)


# Values no drawn logit takes otherwise, injected into single rows: the NaN policy of
# prefopt_kernels.ops must hold for them on every backend.
SPECIAL_VALUES = (float("nan"), float("inf"))


@dataclass
class Case:
    logits: torch.Tensor
    ref_logits: torch.Tensor
    labels: torch.Tensor
    weight: Optional[torch.Tensor]
    temperature: float
    dtype: torch.dtype

    def __repr__(self):
        return (f"Case(shape={tuple(self.logits.shape)}, strides={self.logits.stride()}, dtype={self.dtype}, "
                f"T={self.temperature}, ignored={int((self.labels == -100).sum())}, "
                f"weight={'None' if self.weight is None else int((self.weight == 0).sum())} zeros)")


@st.composite
def cases(draw, *, disjoint_support: bool = False, max_tokens: int = 12):
    """Draw a token-op input on the CPU.

    ``disjoint_support``: the reference may have ``-inf`` where the policy is finite and vice
    versa (for divergences that stay finite there: js, tv, hellinger); otherwise both rows
    share their ``-inf`` entries.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    vocab = draw(VOCABS)
    n_lead = draw(st.integers(1, 3))
    lead = draw(st.lists(st.integers(1, 4), min_size=n_lead, max_size=n_lead))
    while torch.Size(lead).numel() > max_tokens:
        lead[lead.index(max(lead))] -= 1
    dtype = draw(st.sampled_from(DTYPES))
    magnitude = draw(st.sampled_from([0.1, 1.0, 4.0, 30.0, 300.0, 1e4]))
    temperature = draw(st.sampled_from([1.0, 1.0, 0.5, 0.7, 2.0]))
    sliced = draw(st.booleans())
    closeness = draw(st.sampled_from([None, 1e-2, 1.0]))

    shape = list(lead) + [vocab]
    full = list(shape)
    if sliced:
        full[-2] += 1  # logits[..., :-1, :] is then a strided view
    a = torch.randn(full, generator=gen, dtype=torch.float64) * magnitude
    if closeness is None:
        b = torch.randn(full, generator=gen, dtype=torch.float64) * magnitude
    else:
        b = a + closeness * magnitude * torch.randn(full, generator=gen, dtype=torch.float64)

    # Finite in every dtype (fp16 tops out at 65504).
    a = a.clamp(-6e4, 6e4)
    b = b.clamp(-6e4, 6e4)
    labels = torch.randint(0, vocab, full[:-1], generator=gen)
    ignore_fraction = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    labels[torch.rand(full[:-1], generator=gen) < ignore_fraction] = -100

    if vocab > 1 and draw(st.booleans()):
        masked = torch.rand(full, generator=gen) < draw(st.sampled_from([0.05, 0.5]))
        # Labels keep a finite logit in both rows (a -inf label log-prob is not a test of the kernels).
        label_hot = torch.zeros(full, dtype=torch.bool)
        label_hot.scatter_(-1, labels.clamp(min=0)[..., None], True)
        masked &= ~label_hot
        a[masked] = float("-inf")
        if disjoint_support:
            b[(torch.rand(full, generator=gen) < 0.3) & ~label_hot] = float("-inf")
        else:
            b[masked] = float("-inf")

    # Now and then a NaN or +inf in one token's policy or reference row.
    if draw(st.integers(0, 7)) == 0:
        value = draw(st.sampled_from(SPECIAL_VALUES))
        target = a if draw(st.booleans()) else b
        flat = target.view(-1, vocab)
        flat[int(torch.randint(0, flat.shape[0], (1,), generator=gen)), int(torch.randint(0, vocab, (1,), generator=gen))] = value

    a = a.to(dtype)
    b = b.to(dtype)
    if sliced:
        a, b, labels = a[..., :-1, :], b[..., :-1, :], labels[..., :-1]

    weight = None
    if draw(st.booleans()):
        weight = (torch.rand(shape[:-1], generator=gen) < 0.6).to(torch.float32) * torch.rand(shape[:-1], generator=gen)
    return Case(a, b, labels, weight, temperature, dtype)
