"""What a kernel's sm_90 machine code allows, without a GPU: its resources, its hot loops and
the fraction of an H100's bandwidth that their instruction issue leaves room for.

The cost model (DESIGN.md, "Cost without a GPU"): an H100 SXM issues 29.6 T thread-
instructions/s (132 SMs x 4 schedulers x 32 lanes x 1.755 GHz) and 3.7 T MUFU operations/s
(16 per SM and clock), and moves 3.0 TB/s, so a streaming loop keeps up with memory while it
runs at most about 9.9 instructions and 1.2 MUFU per byte it loads or stores. A hot loop is
an innermost loop of the SASS (a backward branch) that loads or stores global memory; its
instructions, MUFU operations and global bytes are counted over one iteration of one thread,
and the versions the compiler makes of one source loop count once (:func:`hot_loops`).
The estimate is an upper bound from instruction issue: latency, occupancy and the memory
system can only lower it. It is never a measurement.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple


@dataclass(frozen=True)
class Card:
    """The throughputs and per-SM limits the estimate uses."""

    name: str
    instructions_per_s: float
    mufu_per_s: float
    bytes_per_s: float
    registers_per_sm: int = 65536
    warps_per_sm: int = 64
    programs_per_sm: int = 32
    shared_bytes_per_sm: int = 228 * 1024
    shared_reserved_per_program: int = 1024

    @property
    def instructions_per_byte(self) -> float:
        return self.instructions_per_s / self.bytes_per_s

    @property
    def mufu_per_byte(self) -> float:
        return self.mufu_per_s / self.bytes_per_s


H100 = Card("H100 SXM (sm_90)", instructions_per_s=132 * 4 * 32 * 1.755e9, mufu_per_s=132 * 16 * 1.755e9,
            bytes_per_s=3.0e12)


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers, e.g. "LDG.E.128.CONSTANT"
    operands: str
    source: str  # the innermost source position (with its inlining chain), "" without line info


@dataclass(frozen=True)
class Loop:
    """One iteration of one thread in a hot loop."""

    instructions: int  # NOPs excluded
    mufu: int
    bytes_loaded: int  # global memory
    bytes_stored: int

    @property
    def bytes(self) -> int:
        return self.bytes_loaded + self.bytes_stored

    def issue_seconds(self, card: Card) -> float:
        """The time one iteration takes on ``card`` if only issue and memory limited it."""
        return max(self.bytes / card.bytes_per_s, self.instructions / card.instructions_per_s,
                   self.mufu / card.mufu_per_s)


_FUNCTION = re.compile(r"^\.text\.(\S+):")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_SOURCE = re.compile(r"^\s*//## File (.*)")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> Dict[str, List[Instruction]]:
    """``nvdisasm -c -gi`` output as each function's instructions in address order, each with
    its source position; branch targets are resolved from labels to addresses."""
    functions: Dict[str, List[Instruction]] = {}
    labels: Dict[str, Dict[str, int]] = {}
    current, source, pending, in_comments = None, "", [], False
    for line in text.splitlines():
        header = _FUNCTION.match(line)
        if header:
            current = header.group(1)
            functions[current], labels[current] = [], {}
            continue
        if current is None:
            continue
        position = _SOURCE.match(line)
        if position:
            # The first line of a block is the innermost position; the next ones are callers.
            if not in_comments:
                source = position.group(1)
            in_comments = True
            continue
        in_comments = False
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        found = _INSTRUCTION.search(line)
        if found:
            address = int(found.group(1), 16)
            for name in pending:
                labels[current][name] = address
            pending = []
            functions[current].append(Instruction(address, found.group(3), found.group(4), source))
    for name, code in functions.items():
        functions[name] = [_resolved(i, labels[name]) for i in code]
    return functions


def _resolved(instruction: Instruction, labels: Dict[str, int]) -> Instruction:
    target = re.search(r"\((\.L_x_\d+)\)", instruction.operands)
    if target and target.group(1) in labels:
        return Instruction(instruction.address, instruction.opcode, hex(labels[target.group(1)]),
                           instruction.source)
    return instruction


def global_bytes(opcode: str) -> Tuple[int, int]:
    """``(loaded, stored)`` global bytes of one instruction for one thread (0, 0 if neither)."""
    parts = opcode.split(".")
    if parts[0] not in ("LDG", "STG"):
        return 0, 0
    width = 4
    for part in parts[1:]:
        if part in ("128", "64", "32"):
            width = int(part) // 8
        elif part in ("U16", "S16", "16"):
            width = 2
        elif part in ("U8", "S8", "8"):
            width = 1
    return (width, 0) if parts[0] == "LDG" else (0, width)


def hot_loops(instructions: Sequence[Instruction]) -> List[Loop]:
    """The kernel's sweeps over memory, in address order: one :class:`Loop` per source loop.

    A loop is a branch back to an earlier address; the innermost ones (containing no other)
    that move global memory are hot. The compiler may emit several versions of one source
    loop (an unrolled body and its remainder, a copy per runtime branch); they share the
    back branch's source position, and the one moving the most bytes per iteration (the
    widest body) stands for them, the one with more instructions on a tie. Loops that move
    fewer bytes per iteration than the kernel's widest are the scalar head and tail around
    a vectorised body (a few elements of each row) and are left out: every sweep of a kernel
    streams the same rows at the same width.
    """
    ranges = []
    for ins in instructions:
        if ins.opcode.split(".")[0] == "BRA" and ins.operands.startswith("0x"):
            target = int(ins.operands, 16)
            if target < ins.address:
                ranges.append((target, ins.address, ins.source))
    innermost = [r for r in ranges
                 if not any(o is not r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    sweeps: Dict[str, Loop] = {}
    for start, end, source in sorted(innermost):
        body = [i for i in instructions if start <= i.address <= end and i.opcode.split(".")[0] != "NOP"]
        moved = [global_bytes(i.opcode) for i in body]
        loop = Loop(instructions=len(body), mufu=sum(i.opcode.startswith("MUFU") for i in body),
                    bytes_loaded=sum(m[0] for m in moved), bytes_stored=sum(m[1] for m in moved))
        if loop.bytes and (source not in sweeps
                           or (loop.bytes, loop.instructions) > (sweeps[source].bytes, sweeps[source].instructions)):
            sweeps[source] = loop
    widest = max((loop.bytes for loop in sweeps.values()), default=0)
    return [loop for loop in sweeps.values() if loop.bytes == widest]


def bandwidth_fraction(loops: Sequence[Loop], card: Card = H100) -> float:
    """The estimated fraction of ``card``'s bandwidth a kernel reaches with these hot loops.

    Each loop is taken to run as many iterations as the others (every loop of a kernel walks
    the same row in the same tile width) and to reach DRAM (a second sweep over a 151936-wide
    row of 132 programs does not stay in a 50 MB L2). The bytes the kernel must move are
    those of its largest loop; the time is the sum of each loop's issue-limited time.
    """
    if not loops:
        return 0.0
    needed = max(loop.bytes for loop in loops) / card.bytes_per_s
    return needed / sum(loop.issue_seconds(card) for loop in loops)


def programs_per_sm(registers: int, threads: int, shared_bytes: int, card: Card = H100) -> int:
    """Resident programs (thread blocks) per SM: the least of the warp, register, shared
    memory and block limits (registers are allocated per warp in units of 256)."""
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = (card.registers_per_sm // per_warp) // warps
    by_warps = card.warps_per_sm // warps
    by_shared = (card.shared_bytes_per_sm // (shared_bytes + card.shared_reserved_per_program)
                 if shared_bytes else card.programs_per_sm)
    return min(by_registers, by_warps, by_shared, card.programs_per_sm)


def cuda_tools() -> str:
    """The folder of ``cuobjdump`` and ``nvdisasm`` (Triton's wheel bundles them; else the CUDA
    toolkit's)."""
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        if os.path.exists(os.path.join(bundled, "cuobjdump")):
            return bundled
    except ImportError:
        pass
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local"):
        if root and os.path.exists(os.path.join(root, "bin", "cuobjdump")):
            return os.path.join(root, "bin")
    raise RuntimeError("cuobjdump not found: install triton (it bundles one) or a CUDA toolkit")


def _tool(name: str, *arguments: str) -> str:
    done = subprocess.run([os.path.join(cuda_tools(), name), *arguments], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} {' '.join(arguments)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Resources:
    registers: int
    local_bytes: int  # per thread: register spills (and any stack)
    shared_bytes: int  # static shared memory


def analyse_cubin(cubin_path: str) -> Dict[str, Tuple[Resources, List[Loop]]]:
    """Every function of a cubin: its resources and its hot loops."""
    usage: Dict[str, Resources] = {}
    current = None
    for line in _tool("cuobjdump", "--dump-resource-usage", cubin_path).splitlines():
        name = re.search(r"Function (\S+):", line)
        if name:
            current = name.group(1)
            continue
        if current and "REG:" in line:
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            usage[current] = Resources(registers=int(fields["REG"]),
                                       local_bytes=int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)),
                                       shared_bytes=int(fields.get("SHARED", 0)))
            current = None
    code = parse_sass(_tool("nvdisasm", "-c", "-gi", cubin_path))
    return {name: (usage[name], hot_loops(code.get(name, []))) for name in usage}
