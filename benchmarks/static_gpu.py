"""``python -m benchmarks --static-gpu``: every GPU kernel the package launches, compiled for
sm_90 on this machine (no GPU needed), and what its machine code allows on an H100.

Triton: the package's own launch code runs on CPU tensors of each case's shape with the
kernels replaced by a recorder, so each recorded launch carries exactly the arguments, the
constexprs and the launch configuration (``BLOCK_V``, ``num_warps``) the package would use;
Triton then specialises and compiles it for sm_90 as a launch on a GPU would (alignment and
divisibility of the actual strides included). CUDA C++: ``csrc/cuda/*.cu`` compiled by nvcc
for sm_90a with the build's flags. Each kernel is reported with its registers, spills, shared
memory, programs per SM, its hot loops' SASS and MUFU instructions per element, and the
estimated fraction of H100 bandwidth (:mod:`benchmarks.sass`): an estimate, never a
measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The logits cases: the vocabularies of Qwen2 and Llama 3 in bf16, a 32k fp32 one, and GPT-2's,
# whose rows are not a multiple of 16 elements.
LOGITS_SHAPES = (("bf16", 151936), ("bf16", 128256), ("fp32", 32000), ("bf16", 50257))
# The fused linear path at the shape of a long-context DPO step (TRL #7244).
LINEAR_SHAPE = dict(tokens=8192, hidden=4096, vocab=151936)
FAST_TARGET, SWEEP_TARGET, MIN_PROGRAMS = 0.8, 0.5, 2


@dataclass
class Row:
    """One compiled kernel specialisation and what its code allows."""

    backend: str
    kernel: str
    case: str
    dtype: str
    vocab: int
    threads: int
    resources: sass.Resources
    loops: List[sass.Loop]
    bytes_per_element: int  # of one element (pair) of the row(s) the kernel streams
    target: float
    config: str = ""
    programs: int = field(init=False)
    fraction: float = field(init=False)

    def __post_init__(self):
        self.programs = sass.programs_per_sm(self.resources.registers, self.threads, self.resources.shared_bytes)
        self.fraction = sass.bandwidth_fraction(self.loops)

    def per_element(self, count: Callable[[sass.Loop], int]) -> List[float]:
        """``count`` of each hot loop per element of the row it streams."""
        return [count(loop) * self.bytes_per_element / loop.bytes for loop in self.loops]

    @property
    def meets(self) -> bool:
        return (self.fraction >= self.target and self.programs >= MIN_PROGRAMS
                and self.resources.local_bytes == 0)

    def as_dict(self) -> dict:
        return dict(backend=self.backend, kernel=self.kernel, case=self.case, dtype=self.dtype, vocab=self.vocab,
                    config=self.config, threads=self.threads, registers=self.resources.registers,
                    local_bytes=self.resources.local_bytes, shared_bytes=self.resources.shared_bytes,
                    programs_per_sm=self.programs, bytes_per_element=self.bytes_per_element,
                    instructions_per_element=self.per_element(lambda l: l.instructions),
                    mufu_per_element=self.per_element(lambda l: l.mufu),
                    loop_bytes=[l.bytes for l in self.loops], estimated_fraction=round(self.fraction, 3),
                    target=self.target, meets=self.meets)


# --------------------------------------------------------------------------- Triton


@dataclass
class Launch:
    kernel: object  # the JITFunction
    arguments: dict  # keyword arguments of the launch, num_warps included


@contextlib.contextmanager
def recorded_launches():
    """Replace the package's Triton kernels by recorders for the duration; yields the list the
    launches are appended to (``kernel[grid](**arguments)`` runs nothing)."""
    from prefopt_kernels.backends.triton import kernels

    launches: List[Launch] = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda **arguments: launches.append(Launch(self.kernel, arguments))

    originals = {name: getattr(kernels, name) for name in kernels.__all__}
    for name, kernel in originals.items():
        setattr(kernels, name, Recorder(kernel))
    try:
        yield launches
    finally:
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)


def compile_sm90(launch: Launch, workdir: str) -> Tuple[str, str, int]:
    """``(cubin path, name, threads)`` of one recorded launch compiled for sm_90, specialised as
    Triton specialises it at launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, arguments = launch.kernel, dict(launch.arguments)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = bind(**arguments)
    options, signature, constexprs, attrs = kernel._pack_args(backend, arguments, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    path = os.path.join(workdir, f"{compiled.metadata.hash}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    return path, compiled.metadata.name, 32 * compiled.metadata.num_warps


def _logits_calls(dtype_name: str, vocab: int):
    """``(case, kernel role, target, run)`` for each public logits op: ``run()`` makes the
    launches of its forward and backward through the Triton backend."""
    import torch

    from prefopt_kernels import divergences
    from prefopt_kernels.backends import triton as backend
    from prefopt_kernels.checks import op_spec
    from prefopt_kernels.sampling import candidate_count

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    # Three tokens of two sequences: no stride or count specialises to 1.
    logits, ref = torch.zeros(2, 3, vocab, dtype=dtype), torch.zeros(2, 3, vocab, dtype=dtype)
    labels, upstream = torch.zeros(6, dtype=torch.int64), torch.zeros(6)

    def op(spec, with_labels, with_ref, grads):
        def run():
            lab, r = (labels if with_labels else None), (ref if with_ref else None)
            stats = backend.forward(logits, lab, r, None, spec)
            backend.backward(logits, lab, r, None, spec, stats, *(upstream if g else None for g in grads),
                             torch.empty_like(logits))
        return run

    yield "logprobs", FAST_TARGET, op(op_spec(temperature=1.0, want_logp=True), True, False, (1, 0, 0))
    yield "logprobs+entropy", FAST_TARGET, op(op_spec(temperature=1.0, want_logp=True, return_entropy=True),
                                              True, False, (1, 1, 0))
    # The sampler-matched forward gathers its first candidates in the same read (its backward is
    # logprobs'): top_k = 50 (51 candidates) and top_p or min_p alone (the default 1024).
    for name, sampler in (("k50", dict(top_k=50)), ("p", dict(top_p=0.9))):
        spec = op_spec(temperature=1.0, want_logp=True, **sampler)

        def gather(spec=spec):
            backend.forward_with_candidates(logits, labels, None, None, spec, candidate_count(spec, vocab))
        yield f"logprobs+sampler:{name}", FAST_TARGET, gather
    for member in divergences.Divergence:
        target = SWEEP_TARGET if member.second_sweep else FAST_TARGET
        yield f"divergence:{member.key}", target, op(
            op_spec(temperature=1.0, divergence=member.key), False, True, (0, 0, 1))
        yield f"terms:{member.key}", target, op(
            op_spec(temperature=1.0, divergence=member.key, want_logp=True, want_ref_logp=True),
            True, True, (1, 0, 1))


def _linear_calls():
    """The slice kernels of the fused linear path at :data:`LINEAR_SHAPE` with a bf16 head on a
    GPU (the GEMM writes fp32 tiles): ``(case, target, run)`` over the tile widths the planner
    picks (the full tile and the last, narrower one)."""
    import torch

    from prefopt_kernels import divergences
    from prefopt_kernels.backends import RowStats, present_stats, row_state
    from prefopt_kernels.backends import triton as backend
    from prefopt_kernels.checks import op_spec
    from prefopt_kernels.linear.tiles import plan_tiles, tile_costs
    from prefopt_kernels.spec import DEFAULT_MEMORY_BUDGET, HeadSpec

    tokens, hidden, vocab = LINEAR_SHAPE["tokens"], LINEAR_SHAPE["hidden"], LINEAR_SHAPE["vocab"]
    widths = {}
    for heads in (1, 2):
        for backward in (False, True):
            # A GPU head: bf16 GEMM inputs, fp32 result written by the GEMM (not widened).
            head = _GpuHead(torch.empty(vocab, hidden, dtype=torch.bfloat16, device="meta"),
                            HeadSpec(compute_dtype=torch.bfloat16))
            entry, column = tile_costs([head] * heads, (), backward)
            _, width = plan_tiles(tokens, vocab, entry, column, DEFAULT_MEMORY_BUDGET)
            widths[(heads, backward)] = sorted({width, vocab % width or width})
    rows = 3
    labels, upstream = torch.zeros(rows, dtype=torch.int64), torch.zeros(rows)

    def fold_and_backward(spec, with_ref, grads):
        def stats(with_ref):
            # The finished statistics a forward pass leaves (their values do not matter here).
            return RowStats.empty(rows, present_stats(spec, True, with_ref), "cpu")

        def run():
            heads = 1 + with_ref
            for width in widths[(heads, False)]:
                tile = torch.zeros(1, rows, width)
                state = row_state.empty(rows, spec, with_ref, tile.device)
                backend.fold(state, tile, labels, tile if with_ref else None, None, spec, 0)
                if spec.member is not None and spec.member.second_sweep:
                    backend.sweep(stats(with_ref), tile, tile, labels, None, spec, 0, torch.empty(rows),
                                  torch.empty(rows), first_slice=True)
            for width in widths[(heads, True)]:
                tile = torch.zeros(1, rows, width)
                backend.slice_backward(tile, labels, tile if with_ref else None, None, spec, stats(with_ref),
                                       *(upstream if g else None for g in grads), tile, 0)
        return run

    yield "linear:logprobs", FAST_TARGET, fold_and_backward(op_spec(temperature=1.0, want_logp=True), False,
                                                            (1, 0, 0))
    for member in divergences.Divergence:
        target = SWEEP_TARGET if member.second_sweep else FAST_TARGET
        spec = op_spec(temperature=1.0, divergence=member.key, want_logp=True, want_ref_logp=True)
        yield f"linear:terms:{member.key}", target, fold_and_backward(spec, True, (1, 0, 1))


@dataclass
class _GpuHead:
    """The parts of a ``linear.heads.Head`` the tile planner reads, as a CUDA head has them."""

    weight: object
    spec: object
    bias: object = None
    widened: bool = False

    @property
    def gemm_dtype(self):
        return self.spec.compute_dtype


def triton_rows(shapes: Sequence[Tuple[str, int]] = LOGITS_SHAPES, linear: bool = True,
                only: Optional[Sequence[str]] = None) -> List[Row]:
    """Every Triton specialisation the cases launch, compiled once each: the logits ops at
    ``shapes`` (``(dtype, V)``), the fused linear path's slice kernels when ``linear``;
    ``only`` keeps the named cases (e.g. ``"terms:js"``)."""
    groups = [((dtype, vocab), _logits_calls(dtype, vocab)) for dtype, vocab in shapes]
    if linear:
        groups.append((("fp32", LINEAR_SHAPE["vocab"]), _linear_calls()))
    rows, compiled = [], {}
    with tempfile.TemporaryDirectory() as workdir, recorded_launches() as launches:
        for (dtype, vocab), calls in groups:
            for case, target, run in calls:
                if only is not None and case not in only:
                    continue
                del launches[:]
                run()
                for launch in list(launches):
                    key = _specialisation_key(launch)
                    if key not in compiled:
                        path, name, threads = compile_sm90(launch, workdir)
                        compiled[key] = (name, threads, sass.analyse_cubin(path)[name])
                    name, threads, (resources, loops) = compiled[key]
                    if case.startswith("logprobs+sampler"):
                        # The candidates' stores are predicated on the chunks (all of a thread's
                        # values on unaligned rows) that beat the running threshold: a random-order row at
                        # V = 151936 stages about a twentieth (top_k = 50) to a fifth (1024
                        # candidates) of the bytes it reads. The streamed bytes of the row are its
                        # loads.
                        loops = [dataclasses.replace(loop, bytes_stored=0) for loop in loops]
                    streamed = 1 + launch.arguments.get("HAS_REF", launch.arguments.get("DIVERGENCE", 0) != 0)
                    written = "grad_ptr" in launch.arguments
                    size = {"bf16": 2, "fp32": 4}[dtype]
                    rows.append(Row("triton", name, case, dtype, vocab, threads, resources, loops,
                                    size * (streamed + written),
                                    FAST_TARGET if "state" in name else target,
                                    config=f"BLOCK_V={launch.arguments['BLOCK_V']} "
                                           f"warps={launch.arguments['num_warps']}"))
    return rows


def _specialisation_key(launch: Launch) -> tuple:
    """What Triton compiles a launch by: constexprs, the launch options, tensor dtypes and the
    divisibility by 16 of the integers."""
    key = []
    for name, value in sorted(launch.arguments.items()):
        if hasattr(value, "dtype"):
            key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or name.isupper() or name == "num_warps":
            key.append((name, value))
        elif isinstance(value, int):
            key.append((name, value == 1, value % 16 == 0))
    return (launch.kernel.__name__, tuple(key))


# --------------------------------------------------------------------------- CUDA C++

# The build's flags (CMakeLists.txt), and line info to tell the sweeps of a kernel apart.
CUDA_FLAGS = ("-O3", "--fmad=false", "--expt-relaxed-constexpr", "-std=c++17", "-DPREFOPT_WITH_CUDA", "-lineinfo")
DTYPE_CODES = {0: ("fp32", 4), 1: ("bf16", 2), 2: ("fp16", 2)}  # csrc/include/prefopt/common.h DType
# Threads per block where a kernel declares no __launch_bounds__: the launch for V >= 16384.
CUDA_DEFAULT_THREADS = 512


def cuda_rows() -> List[Row]:
    """Every kernel instantiation of ``csrc/cuda/*.cu``, compiled by nvcc for sm_90a."""
    import shutil

    from prefopt_kernels import divergences

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found: the CUDA C++ kernels need a CUDA toolkit to compile")
    sources = sorted(os.path.join(ROOT, "csrc", "cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
                     if f.endswith(".cu"))
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for source in sources:
            cubin = os.path.join(workdir, os.path.basename(source) + ".cubin")
            done = subprocess.run([nvcc, "-cubin", "-arch=sm_90a", *CUDA_FLAGS, "-I", os.path.join(ROOT, "csrc"),
                                   "-I", os.path.join(ROOT, "csrc", "include"), source, "-o", cubin],
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"nvcc failed on {source}:\n{done.stderr[-2000:]}")
            threads = _declared_threads(cubin)
            for mangled, (resources, loops) in sass.analyse_cubin(cubin).items():
                name, arguments = _demangled(mangled)
                if len(arguments) < 2 or not loops:
                    continue
                if name == "candidates_forward_kernel":
                    rows += _cuda_candidate_rows(name, arguments, threads.get(mangled, CUDA_DEFAULT_THREADS),
                                                 resources, loops)
                    continue
                dtype, size = DTYPE_CODES[arguments[0]]
                code = arguments[1]
                member = divergences.Divergence(code) if code else None
                streamed = 2 if (code or "sweep" in name) else 1
                written = "backward" in name
                sweeps = member is not None and member.second_sweep and "fold" not in name
                rows.append(Row("cuda", name, f"<{', '.join(map(str, arguments))}>"
                                + (f" {member.key}" if member else ""), dtype, 0,
                                threads.get(mangled, CUDA_DEFAULT_THREADS), resources, loops,
                                size * (streamed + written), SWEEP_TARGET if sweeps else FAST_TARGET))
    return rows


# The sampled forward's candidates per row: top_k = 50 (51 candidates) and top_p or min_p alone
# (prefopt_kernels.sampling's default 1024).
CUDA_CANDIDATE_COUNTS = (("k50", 51), ("p", 1024))


def _cuda_candidate_rows(name: str, arguments: List[int], threads: int, resources: sass.Resources,
                         loops: List[sass.Loop]) -> List[Row]:
    """Rows of one instantiation of the CUDA sampled forward: the logits cases of its dtype at each
    count of :data:`CUDA_CANDIDATE_COUNTS` for the logprobs forward (no divergence), else one row at
    the top_p default. Its code and shared memory do not depend on the count. Its hot loop is the
    first pass over tiles where no value beats the threshold (csrc/cuda/candidates_device.cuh,
    tile_loop); appends and compactions run outside it, on the few tiles where values enter."""
    from prefopt_kernels import divergences

    dtype, size = DTYPE_CODES[arguments[0]]
    code = arguments[1]
    member = divergences.Divergence(code) if code else None
    vocabs = [v for d, v in LOGITS_SHAPES[:3] if d == dtype] if member is None else []
    counts = CUDA_CANDIDATE_COUNTS if vocabs else CUDA_CANDIDATE_COUNTS[1:]
    case = f"<{', '.join(map(str, arguments))}>" + (f" {member.key}" if member else "")
    target = SWEEP_TARGET if member is not None and member.second_sweep else FAST_TARGET
    rows = []
    for vocab in vocabs or [0]:
        for sampler, count in counts:
            rows.append(Row("cuda", name, f"{case} logprobs+sampler:{sampler}", dtype, vocab, threads,
                            resources, loops, size * (2 if code else 1), target, config=f"C={count}"))
    return rows


def _declared_threads(cubin: str) -> Dict[str, int]:
    """The ``__launch_bounds__`` of each function that declares one."""
    import re

    text = subprocess.run([os.path.join(sass.cuda_tools(), "cuobjdump"), "-elf", cubin], capture_output=True,
                          text=True).stdout
    found, current, attribute = {}, None, None
    for line in text.splitlines():
        section = re.search(r"\.nv\.info\.(\S+)", line)
        if section:
            current, attribute = section.group(1), None
        elif "Attribute:" in line:
            attribute = line.split()[-1]
        elif current and attribute == "EIATTR_MAX_THREADS" and "Value:" in line:
            values = re.findall(r"0x([0-9a-f]+)", line)  # x, y, z on the line after the attribute
            if values:
                found[current] = int(values[0], 16)
            attribute = None
    return found


def _demangled(mangled: str) -> Tuple[str, List[int]]:
    """``(kernel name, template arguments)`` of a mangled kernel name, booleans as 0 and 1."""
    import re

    text = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    found = re.search(r"(\w+)<([^<>]*)>\(", text)
    if not found:
        return text, []
    words = {"false": 0, "true": 1}
    values = [words.get(v.strip(), v.strip()) for v in found.group(2).split(",")]
    return found.group(1), [int(v) for v in values if isinstance(v, int) or v.lstrip("-").isdigit()]


# --------------------------------------------------------------------------- report


def markdown(rows: Sequence[Row], notes: Sequence[str]) -> str:
    """The report as a markdown table, one line per specialisation."""
    lines = ["# Static sm_90 cost of the GPU kernels (an estimate, not a measurement)", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "| backend | kernel | case | dtype | V | config | regs | spill B | smem B | programs/SM "
              "| instr/elem | MUFU/elem | est. fraction | target | meets |", "|" + "---|" * 15]
    for r in rows:
        instr = " + ".join(f"{x:.0f}" for x in r.per_element(lambda l: l.instructions))
        mufu = " + ".join(f"{x:.1f}" for x in r.per_element(lambda l: l.mufu))
        lines.append(f"| {r.backend} | {r.kernel} | {r.case} | {r.dtype} | {r.vocab or ''} | {r.config} "
                     f"| {r.resources.registers} | {r.resources.local_bytes} | {r.resources.shared_bytes} "
                     f"| {r.programs} | {instr} | {mufu} | {r.fraction:.2f} | {r.target:.1f} "
                     f"| {'yes' if r.meets else '**no**'} |")
    met = sum(r.meets for r in rows)
    lines += ["", f"{met} of {len(rows)} specialisations meet their budget."]
    return "\n".join(lines) + "\n"


NOTES = (
    f"Card model: {sass.H100.name}: {sass.H100.instructions_per_s / 1e12:.1f} T thread-instructions/s, "
    f"{sass.H100.mufu_per_s / 1e12:.1f} T MUFU/s, {sass.H100.bytes_per_s / 1e12:.1f} TB/s: "
    f"{sass.H100.instructions_per_byte:.1f} instructions and {sass.H100.mufu_per_byte:.2f} MUFU per byte.",
    "instr/elem and MUFU/elem: per element (pair, with a reference row) of each hot loop, from the SASS of one "
    "iteration of one thread; a second sweep is a second term.",
    "est. fraction: the fraction of bandwidth that instruction issue allows (benchmarks/sass.py); "
    "every loop is taken to read DRAM.",
    f"target: {FAST_TARGET} for logp, entropy, forward/reverse KL and the slice states, {SWEEP_TARGET} for the "
    f"second-sweep divergences; meets: the target, >= {MIN_PROGRAMS} programs per SM and no spills.",
    "Triton: every launch of the package's ops (logits forward+backward; the fused linear path's slice "
    f"kernels on its planned tiles at N={LINEAR_SHAPE['tokens']}, H={LINEAR_SHAPE['hidden']}, "
    f"V={LINEAR_SHAPE['vocab']}, bf16 head), as the package configures it.",
    f"CUDA C++: every instantiation in csrc/cuda; programs/SM at the kernel's __launch_bounds__, else "
    f"{CUDA_DEFAULT_THREADS} threads (the launch for V >= 16384).",
)


def main(out_dir: Optional[str] = None, quick: bool = False, cuda: bool = True) -> int:
    """Compile, analyse, write ``results.{json,md}`` under ``out_dir`` (default
    ``benchmarks/results/static-sm90``) and print the table. Exit status 0 when it ran."""
    import json
    import platform

    os.environ.pop("TRITON_INTERPRET", None)
    if "prefopt_kernels.backends.triton.kernels" in sys.modules and _interpreted_kernels():
        sys.exit("--static-gpu: the Triton kernels were imported under TRITON_INTERPRET=1; run it "
                 "in a process without it")
    notes = list(NOTES)
    rows = triton_rows(LOGITS_SHAPES[:1], linear=False) if quick else triton_rows()
    if cuda:
        try:
            rows += cuda_rows()
        except RuntimeError as exc:
            notes.append(f"CUDA C++ not analysed: {exc}")
    import triton

    notes.append(f"Compiled with Triton {triton.__version__} on {platform.machine()}.")
    text = markdown(rows, notes)
    out_dir = out_dir or os.path.join(ROOT, "benchmarks", "results", "static-sm90")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"notes": notes, "rows": [r.as_dict() for r in rows]}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out_dir}/results.{{json,md}}")
    return 0


def _interpreted_kernels() -> bool:
    from prefopt_kernels.backends.triton import kernels

    return not hasattr(kernels.token_forward_kernel, "signature")
