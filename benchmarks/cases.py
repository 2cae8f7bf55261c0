"""What the suite measures: cases, their inputs, and the bytes each one must move.

A *case* is one op in one mode at one shape and dtype. Every implementation (the package's
backends, the eager baselines, the peers) runs the same case on the same inputs, so the
ratios between them are like for like.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "js", "tv", "hellinger", "chi2", "alpha")
# op name -> whether it reads reference logits
OPS = {
    "logprobs": False,
    "logprobs+entropy": False,
    **{f"divergence:{d}": True for d in DIVERGENCES},
    "terms:forward_kl": True,
    "sparse_po": True,
}
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Real vocabularies: Llama-2/Mistral, Llama-3, Qwen2/2.5, Gemma-3.
GPU_VOCABS = (32000, 128256, 151936, 262144)
GPU_TOKENS = (4096, 8192, 16384, 32768)
SEQ_LEN = 1024  # tokens per sequence when an implementation wants [B, T, V] (TRL loops over B)


@dataclass(frozen=True)
class Case:
    """One op, one mode, one shape, one dtype."""

    op: str
    mode: str
    n: int
    v: int
    dtype: str

    @property
    def has_ref(self) -> bool:
        return OPS[self.op]

    @property
    def divergence(self) -> Optional[str]:
        if ":" in self.op:
            return self.op.split(":", 1)[1]
        return "forward_kl" if self.op == "sparse_po" else None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def key(self) -> str:
        return f"{self.op}|{self.mode}|N={self.n}|V={self.v}|{self.dtype}"

    def as_dict(self) -> dict:
        return asdict(self)


def bytes_moved(case: Case) -> int:
    """Bytes that any implementation must move through memory for this case.

    Forward: the logits (and the reference logits) read once. Backward: both read once more
    and the gradient written once (the backward cannot reuse a forward read: nothing of size
    ``[N, V]`` survives between the two). Per-token vectors (labels, outputs, row statistics)
    are below 0.01 % of the total at real vocabularies and are left out.
    """
    elt = torch.tensor([], dtype=case.torch_dtype).element_size()
    row = case.n * case.v * elt
    reads = row * (2 if case.has_ref else 1)
    fwd = reads
    bwd = reads + row
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def input_bytes(case: Case) -> int:
    """Bytes of the ``[N, V]`` inputs themselves (what 'memory above the inputs' excludes)."""
    elt = torch.tensor([], dtype=case.torch_dtype).element_size()
    return case.n * case.v * elt * (2 if case.has_ref else 1)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Deterministic inputs for a case, created directly in the target dtype on ``device``.

    Logits have the spread of a trained LM head (std 2); the reference is the policy plus a
    small perturbation, as it is early in preference training. No label is ignored: ignored
    rows would let the fused kernels skip work the eager baselines cannot, flattering them.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype
    logits = torch.randn(case.n, case.v, device=device, dtype=dt, generator=g).mul_(2.0)
    out = {
        # a training forward: autograd records what the backward will need, in every mode
        "logits": logits.requires_grad_(True),
        "labels": torch.randint(0, case.v, (case.n,), device=device, generator=g),
    }
    if case.has_ref:
        ref = torch.randn(case.n, case.v, device=device, dtype=dt, generator=g).mul_(0.5)
        ref.add_(logits.detach())
        out["ref_logits"] = ref
    if case.op == "sparse_po":
        # SparsePO's token mask: a non-negative weight on about half of the tokens
        w = torch.rand(case.n, device=device, generator=g)
        out["mask"] = torch.where(w > 0.5, w, torch.zeros_like(w))
    return out


def _grid(ops, modes, tokens, vocabs, dtypes) -> List[Case]:
    return [
        Case(op, mode, n, v, dt)
        for dt in dtypes
        for v in vocabs
        for n in tokens
        for op in ops
        for mode in modes
    ]


def default_cases(device_type: str, *, quick: bool = False, full: bool = False,
                  ops: Optional[Sequence[str]] = None, modes: Optional[Sequence[str]] = None,
                  tokens: Optional[Sequence[int]] = None, vocabs: Optional[Sequence[int]] = None,
                  dtypes: Optional[Sequence[str]] = None) -> List[Case]:
    """The case list for a device. Any explicit option replaces that axis of the default grid.

    CPU default (a few minutes on two cores): at N=4096, V=32000 fp32, the headline ops, the
    entropy, two divergences and the SparsePO step forward+backward; logprobs forward and
    backward apart, and in bf16.
    GPU default (a few minutes on an H100): the headline ops forward+backward over all four
    real vocabularies at N=8192 bf16, then every op forward+backward at V=128256, fp32 for the
    headline ops, then every op forward and backward apart.
    ``full`` on GPU: the whole grid (all N, all V, bf16 and fp32, every op and mode).
    """
    headline = ["logprobs", "terms:forward_kl"]
    explicit = any(x is not None for x in (ops, modes, tokens, vocabs, dtypes))
    if device_type == "cuda":
        if full or explicit:
            return _grid(ops or list(OPS), modes or MODES, tokens or GPU_TOKENS,
                         vocabs or GPU_VOCABS, dtypes or ("bf16", "fp32"))
        if quick:
            return _grid(headline, ["fwd+bwd"], [8192], [32000, 128256], ["bf16"])
        # Most telling first: a run cut short by a time limit keeps what matters most.
        cases = _grid(headline, ["fwd+bwd"], [8192], GPU_VOCABS, ["bf16"])
        cases += _grid(list(OPS), ["fwd+bwd"], [8192], [128256], ["bf16"])
        cases += _grid(headline, ["fwd+bwd"], [8192], [128256], ["fp32"])
        cases += _grid(list(OPS), ["fwd", "bwd"], [8192], [128256], ["bf16"])
        return _dedup(cases)
    if explicit:
        return _grid(ops or list(OPS), modes or ["fwd+bwd"], tokens or [4096],
                     vocabs or [32000], dtypes or ["fp32"])
    if quick:
        return _grid(headline, ["fwd+bwd"], [2048], [32000], ["fp32"])
    # Two representative divergences (one single-sweep, one two-sweep): the eager versions of
    # all seven take many seconds each on a small CPU; --ops divergence runs them all.
    cpu_ops = ["logprobs", "logprobs+entropy", "divergence:forward_kl", "divergence:js",
               "terms:forward_kl", "sparse_po"]
    cases = _grid(cpu_ops, ["fwd+bwd"], [4096], [32000], ["fp32"])
    cases += _grid(["logprobs"], ["fwd", "bwd"], [4096], [32000], ["fp32"])
    cases += _grid(["logprobs"], ["fwd+bwd"], [4096], [32000], ["bf16"])
    return _dedup(cases)


def tiny_cases(ops: Optional[Sequence[str]] = None) -> List[Case]:
    """Shapes small enough for the Triton interpreter on a CPU (correctness, not speed)."""
    return _grid(ops or ["logprobs", "divergence:js", "terms:forward_kl"], ["fwd+bwd"],
                 [64], [512], ["fp32"])


def _dedup(cases: List[Case]) -> List[Case]:
    seen, out = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out
