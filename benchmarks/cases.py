"""What the suite measures: cases, their inputs, and the work each one must do.

A *case* is one op in one mode at one shape and dtype. Every implementation (the package's
backends, the eager baselines, the peers) runs the same case on the same inputs, so the
ratios between them are like for like.

The logits ops read ``[N, V]`` logits and are bound by memory traffic (``bytes_moved``). The
linear ops (``linear:*``) start one step earlier, from ``[N, H]`` hidden states and the
``[V, H]`` LM head, and are bound by the head's GEMMs (``gemm_flops``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from prefopt_kernels.divergences import DIVERGENCES
# op name -> whether it reads reference logits
LOGIT_OPS = {
    "logprobs": False,
    "logprobs+entropy": False,
    "logprobs+sampler": False,
    **{f"divergence:{d}": True for d in DIVERGENCES},
    "terms:forward_kl": True,
    "sparse_po": True,
}
# op name -> whether it reads a reference model's hidden states and head. linear:logprobs
# is the label log-prob of the policy; linear:terms is pk.linear_token_terms with the
# forward KL (logp, ref_logp, KL(q||p)).
LINEAR_OPS = {
    "linear:logprobs": False,
    "linear:logprobs+sampler": False,
    "linear:terms": True,
}
OPS = {**LOGIT_OPS, **LINEAR_OPS}
# The sampler of the ``+sampler`` ops (sampler-matched log-probs: vLLM's processed_logprobs).
SAMPLER = dict(top_k=50, top_p=0.9, min_p=0.05)
# ``--ops sampler``: the sampled ops beside their plain counterparts. Named only: the default
# grids and ``--ops linear`` leave them out.
SAMPLER_OPS = ("logprobs", "logprobs+sampler", "linear:logprobs", "linear:logprobs+sampler")
PLAIN_LINEAR_OPS = tuple(op for op in LINEAR_OPS if not op.endswith("+sampler"))
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Real vocabularies: Llama-2/Mistral, Llama-3, Qwen2/2.5, Gemma-3.
GPU_VOCABS = (32000, 128256, 151936, 262144)
GPU_TOKENS = (4096, 8192, 16384, 32768)
SEQ_LEN = 1024  # tokens per sequence when an implementation wants [B, T, V] (TRL loops over B)
# Hidden sizes of the linear ops: Qwen3-0.6B's on a CPU; Qwen3-8B's on a GPU, whose LM head
# is [151936, 4096].
CPU_HIDDEN = 1024
GPU_HIDDEN = 4096
GPU_LINEAR_VOCAB = 151936


@dataclass(frozen=True)
class Case:
    """One op, one mode, one shape, one dtype; ``h`` is the hidden size of the linear ops only."""

    op: str
    mode: str
    n: int
    v: int
    dtype: str
    h: Optional[int] = None

    def __post_init__(self):
        if (self.h is not None) != self.linear:
            raise ValueError(f"{self.op}: the hidden size h is set for the linear ops and only "
                             "for them")

    @property
    def linear(self) -> bool:
        """Whether the op starts from hidden states and the LM head (``LINEAR_OPS``)."""
        return self.op in LINEAR_OPS

    @property
    def has_ref(self) -> bool:
        """Whether the op reads the reference's logits (linear ops: its hidden states and head)."""
        return OPS[self.op]

    @property
    def divergence(self) -> Optional[str]:
        """The divergence the op computes (``forward_kl`` for the terms, SparsePO and
        ``linear:terms``), None for the ops without one."""
        if self.linear:
            return "forward_kl" if self.has_ref else None
        if self.op.startswith(("divergence:", "terms:")):
            return self.op.split(":", 1)[1]
        return "forward_kl" if self.op == "sparse_po" else None

    @property
    def torch_dtype(self) -> torch.dtype:
        """The inputs' dtype as a ``torch.dtype``."""
        return DTYPES[self.dtype]

    @property
    def grad_inputs(self) -> Tuple[str, ...]:
        """Names of the inputs the backward differentiates: what a training step needs next."""
        return ("hidden", "weight") if self.linear else ("logits",)

    @property
    def key(self) -> str:
        """The case as one string, e.g. ``logprobs|fwd|N=4|V=10|fp32`` (``H=`` for a linear op)."""
        if self.linear:
            return f"{self.op}|{self.mode}|N={self.n}|H={self.h}|V={self.v}|{self.dtype}"
        return f"{self.op}|{self.mode}|N={self.n}|V={self.v}|{self.dtype}"

    def small(self) -> "Case":
        """A tiny copy of the case, for warming up an implementation (libraries, kernels)."""
        h = None if self.h is None else min(self.h, 64)
        return replace(self, n=64, v=min(self.v, 512), h=h)

    def as_dict(self) -> dict:
        """The fields a result row starts with (no ``h`` for the logits ops)."""
        d = asdict(self)
        if d["h"] is None:
            del d["h"]  # the logits ops' rows keep their fields
        return d


def case_key(row: dict) -> tuple:
    """The case a result row measured (rows start with ``Case.as_dict``), as a hashable key:
    ``(op, mode, n, h, v, dtype)``, ``h`` None for the logits ops."""
    return (row["op"], row["mode"], row["n"], row.get("h"), row["v"], row["dtype"])


def _elt(case: Case) -> int:
    return torch.tensor([], dtype=case.torch_dtype).element_size()


def bytes_moved(case: Case) -> Optional[int]:
    """Bytes that any implementation must move through memory for this case (logits ops).

    Forward: the logits (and the reference logits) read once. Backward: both read once more
    and the gradient written once (the backward cannot reuse a forward read: nothing of size
    ``[N, V]`` survives between the two). Per-token vectors (labels, outputs, row statistics)
    are below 0.01 % of the total at real vocabularies and are left out.

    None for the linear ops: their time goes to the GEMMs (see ``gemm_flops``).
    """
    if case.linear:
        return None
    row = case.n * case.v * _elt(case)
    reads = row * (2 if case.has_ref else 1)
    fwd = reads
    bwd = reads + row
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def gemm_flops(case: Case) -> Optional[int]:
    """Floating-point operations of the GEMMs any implementation of a linear op must run.

    ``2 N H V`` per GEMM. Forward: one projection per head (the policy's, and the
    reference's for ``linear:terms``). Backward: ``d hidden = dZ W`` and ``d W = dZ^T hidden``
    for the policy (the reference gets no gradient). A backward that projects the logits
    again does more than this; that extra work is what the count leaves out. None for the
    logits ops.
    """
    if not case.linear:
        return None
    gemm = 2 * case.n * case.h * case.v
    fwd = gemm * (2 if case.has_ref else 1)
    bwd = 2 * gemm
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def input_bytes(case: Case) -> int:
    """Bytes of the inputs themselves (what 'memory above the inputs' excludes): the
    ``[N, V]`` logits, or the ``[N, H]`` hidden states and ``[V, H]`` heads (labels aside)."""
    per_side = case.n * (case.h if case.linear else case.v)
    if case.linear:
        per_side += case.v * case.h
    return per_side * _elt(case) * (2 if case.has_ref else 1)


def grad_bytes(case: Case) -> int:
    """Bytes of the gradients every implementation of a linear op must return (``d hidden``,
    ``d W``, in the inputs' dtype) in a mode with a backward; memory is reported above them.
    0 for the logits ops: their gradient is the ``[N, V]`` tensor whose cost is measured."""
    if not case.linear or case.mode == "fwd":
        return 0
    return (case.n + case.v) * case.h * _elt(case)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Deterministic inputs for a case, created directly in the target dtype on ``device``.

    Logits have the spread of a trained LM head (std 2); the reference is the policy plus a
    small perturbation, as it is early in preference training. No label is ignored: ignored
    rows would let the fused kernels skip work the eager baselines cannot, flattering them.
    """
    if case.linear:
        return _make_linear_inputs(case, device, seed)
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


def _make_linear_inputs(case: Case, device: torch.device, seed: int) -> Dict[str, torch.Tensor]:
    """Hidden states ``[N, H]`` of unit variance and a head ``[V, H]`` scaled so that the
    logits have std 2, as in ``make_inputs``. The reference model has its own head (a copy of
    the policy's) and hidden states perturbed so that its logits differ by about 0.5 std."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype
    hidden = torch.randn(case.n, case.h, device=device, dtype=dt, generator=g)
    weight = torch.randn(case.v, case.h, device=device, dtype=dt, generator=g)
    weight.mul_(2.0 / case.h ** 0.5)
    out = {
        "hidden": hidden.requires_grad_(True),
        "weight": weight.requires_grad_(True),
        "labels": torch.randint(0, case.v, (case.n,), device=device, generator=g),
    }
    if case.has_ref:
        noise = torch.randn(case.n, case.h, device=device, dtype=dt, generator=g).mul_(0.25)
        out["ref_hidden"] = noise.add_(hidden.detach())
        out["ref_weight"] = weight.detach().clone()
    return out


def _grid(ops, modes, tokens, vocabs, dtypes, hiddens=(None,)) -> List[Case]:
    """Every combination; ``hiddens`` applies to the linear ops, the others get ``h=None``."""
    return [
        Case(op, mode, n, v, dt, h)
        for dt in dtypes
        for v in vocabs
        for n in tokens
        for op in ops
        for h in (hiddens if op in LINEAR_OPS else (None,))
        for mode in modes
    ]


def default_cases(device_type: str, *, quick: bool = False, full: bool = False,
                  ops: Optional[Sequence[str]] = None, modes: Optional[Sequence[str]] = None,
                  tokens: Optional[Sequence[int]] = None, vocabs: Optional[Sequence[int]] = None,
                  dtypes: Optional[Sequence[str]] = None,
                  hiddens: Optional[Sequence[int]] = None) -> List[Case]:
    """The case list for a device. Any explicit option replaces that axis of the default grid
    (``hiddens`` alone selects the linear ops).

    CPU default (a few minutes on two cores): at N=4096, V=32000 fp32, the headline ops, the
    entropy, two divergences and the SparsePO step forward+backward; logprobs forward and
    backward apart, and in bf16; then the linear ops forward+backward at H=1024.
    GPU default (a few minutes on an H100): the headline ops forward+backward over all four
    real vocabularies at N=8192 bf16, the linear ops forward+backward at N=8192, H=4096,
    V=151936 bf16, then every logits op forward+backward at V=128256, fp32 for the headline
    ops, then every logits op forward and backward apart.
    ``full`` on GPU: the whole grid (all N, all V, bf16 and fp32, every op and mode).
    """
    headline = ["logprobs", "terms:forward_kl"]
    linear = list(PLAIN_LINEAR_OPS)
    explicit = any(x is not None for x in (ops, modes, tokens, vocabs, dtypes, hiddens))
    if ops is None and hiddens is not None:
        ops = linear
    if device_type == "cuda":
        if full or explicit:
            return _grid(ops or list(OPS), modes or MODES, tokens or GPU_TOKENS,
                         vocabs or GPU_VOCABS, dtypes or ("bf16", "fp32"), hiddens or [GPU_HIDDEN])
        if quick:
            return _grid(headline, ["fwd+bwd"], [8192], [32000, 128256], ["bf16"])
        # Most telling first: a run cut short by a time limit keeps what matters most.
        cases = _grid(headline, ["fwd+bwd"], [8192], GPU_VOCABS, ["bf16"])
        cases += _grid(linear, ["fwd+bwd"], [8192], [GPU_LINEAR_VOCAB], ["bf16"], [GPU_HIDDEN])
        cases += _grid(list(LOGIT_OPS), ["fwd+bwd"], [8192], [128256], ["bf16"])
        cases += _grid(headline, ["fwd+bwd"], [8192], [128256], ["fp32"])
        cases += _grid(list(LOGIT_OPS), ["fwd", "bwd"], [8192], [128256], ["bf16"])
        return _dedup(cases)
    if explicit:
        return _grid(ops or list(OPS), modes or ["fwd+bwd"], tokens or [4096],
                     vocabs or [32000], dtypes or ["fp32"], hiddens or [CPU_HIDDEN])
    if quick:
        return _grid(headline, ["fwd+bwd"], [2048], [32000], ["fp32"])
    # Two representative divergences (one single-sweep, one two-sweep): the eager versions of
    # all seven take many seconds each on a small CPU; --ops divergence runs them all.
    cpu_ops = ["logprobs", "logprobs+entropy", "divergence:forward_kl", "divergence:js",
               "terms:forward_kl", "sparse_po"]
    cases = _grid(cpu_ops, ["fwd+bwd"], [4096], [32000], ["fp32"])
    cases += _grid(["logprobs"], ["fwd", "bwd"], [4096], [32000], ["fp32"])
    cases += _grid(["logprobs"], ["fwd+bwd"], [4096], [32000], ["bf16"])
    cases += _grid(linear, ["fwd+bwd"], [4096], [32000], ["fp32"], [CPU_HIDDEN])
    return _dedup(cases)


def tiny_cases(ops: Optional[Sequence[str]] = None) -> List[Case]:
    """Shapes small enough for the Triton interpreter on a CPU (correctness, not speed)."""
    return _grid(ops or ["logprobs", "divergence:js", "terms:forward_kl", *LINEAR_OPS],
                 ["fwd+bwd"], [64], [512], ["fp32"], [64])


def _dedup(cases: List[Case]) -> List[Case]:
    seen, out = set(), []
    for c in cases:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out
