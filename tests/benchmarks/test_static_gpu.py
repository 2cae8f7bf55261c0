"""The static sm_90 cost model (benchmarks/sass.py) on hand-written SASS with hand-derived
counts, and a compile guard: the heaviest Triton specialisations compiled for sm_90 keep no
spills and at least two programs per SM."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from benchmarks import sass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# nvdisasm -c -gi output. kernel_a: a prologue; a loop 0x40..0xc0 (9 instructions, one a NOP)
# at loop.py:10 inlined in kernel.py:3; a second loop with no global memory (a reduction); an
# outer loop around the first (not innermost); a trap loop on itself. kernel_b: two versions
# of one source loop (a vectorised body, a scalar remainder), a second sweep as wide, and a
# scalar tail loop of its own source line.
SASS = """
//--------------------- .text.kernel_a --------------------------
.text.kernel_a:
	//## File "kernel.py", line 1
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0020*/                   MOV R2, RZ ;
        /*0030*/                   NOP ;
.L_x_0:
	//## File "loop.py", line 10 inlined at "kernel.py", line 3
	//## File "kernel.py", line 3
        /*0040*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0050*/                   LDG.E.U16 R8, desc[UR4][R2.64+0x10] ;
        /*0060*/                   FFMA R9, R4, R5, R6 ;
        /*0070*/                   MUFU.EX2 R10, R9 ;
        /*0080*/                   NOP ;
        /*0090*/                   MUFU.LG2 R11, R10 ;
        /*00a0*/                   STG.E.64 desc[UR4][R2.64], R10 ;
        /*00b0*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*00c0*/               @!P0 BRA `(.L_x_0) ;
	//## File "kernel.py", line 4
        /*00d0*/                   IADD3 R0, R0, 0x1, RZ ;
        /*00e0*/                   ISETP.GE.AND P1, PT, R0, 0x20, PT ;
        /*00f0*/               @!P1 BRA `(.L_x_1) ;
.L_x_2:
        /*0100*/                   SHFL.BFLY PT, R12, R11, 0x1, 0x1f ;
        /*0110*/                   FADD R11, R11, R12 ;
        /*0120*/               @!P0 BRA `(.L_x_2) ;
        /*0130*/                   EXIT ;
.L_x_3:
        /*0140*/                   BRA `(.L_x_3);
//--------------------- .text.kernel_b --------------------------
.text.kernel_b:
.L_x_4:
	//## File "kernel.py", line 20
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   FADD R9, R4, R5 ;
        /*0020*/               @!P0 BRA `(.L_x_4) ;
.L_x_5:
        /*0030*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0040*/                   FADD R9, R4, R9 ;
        /*0050*/                   FADD R9, R4, R9 ;
        /*0060*/               @!P0 BRA `(.L_x_5) ;
.L_x_6:
	//## File "kernel.py", line 30
        /*0070*/                   LDG.E.64 R4, desc[UR4][R2.64] ;
        /*0080*/                   LDG.E.64 R6, desc[UR4][R2.64+0x8] ;
        /*0090*/               @!P0 BRA `(.L_x_6) ;
.L_x_7:
	//## File "kernel.py", line 40
        /*00a0*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*00b0*/               @!P0 BRA `(.L_x_7) ;
        /*00c0*/                   EXIT ;
"""


def test_parse_and_hot_loops_count_one_iteration_by_hand():
    functions = sass.parse_sass(SASS)
    assert sorted(functions) == ["kernel_a", "kernel_b"]
    code = functions["kernel_a"]
    assert [i.address for i in code][:3] == [0x0, 0x10, 0x20]
    assert code[4].source == '"loop.py", line 10 inlined at "kernel.py", line 3'
    assert code[12].operands == "0x40" and code[12].source == code[4].source
    # Only 0x40..0xc0 moves memory and is innermost: 8 instructions besides the NOP.
    assert sass.hot_loops(code) == [sass.Loop(instructions=8, mufu=2, bytes_loaded=16 + 2, bytes_stored=8)]


def test_versions_of_one_source_loop_count_once():
    loops = sass.hot_loops(sass.parse_sass(SASS)["kernel_b"])
    # Line 20: the 16-byte body stands for its 2-byte remainder; line 30 is a sweep of its own;
    # line 40 moves 4 bytes an iteration where the sweeps move 16: a tail, left out.
    assert loops == [sass.Loop(instructions=3, mufu=0, bytes_loaded=16, bytes_stored=0),
                     sass.Loop(instructions=3, mufu=0, bytes_loaded=16, bytes_stored=0)]


@pytest.mark.parametrize("opcode, moved", [
    ("LDG.E.128.CONSTANT", (16, 0)), ("LDG.E.64", (8, 0)), ("LDG.E", (4, 0)), ("LDG.E.U16", (2, 0)),
    ("LDG.E.S8", (1, 0)), ("STG.E.128", (0, 16)), ("STG.E.U16", (0, 2)), ("STG.E", (0, 4)),
    ("LDS.128", (0, 0)), ("FFMA", (0, 0)),
])
def test_global_bytes_by_access_width(opcode, moved):
    assert sass.global_bytes(opcode) == moved


def test_bandwidth_fraction_by_hand():
    card = sass.Card("toy", instructions_per_s=10.0, mufu_per_s=1.0, bytes_per_s=1.0)
    # 8 bytes need 8 s; 40 instructions 4 s; 2 MUFU 2 s: memory-bound, the whole bandwidth.
    assert sass.bandwidth_fraction([sass.Loop(40, 2, 8, 0)], card) == 1.0
    # 160 instructions take 16 s where the 8 bytes need 8 s: half the bandwidth.
    assert sass.bandwidth_fraction([sass.Loop(160, 0, 8, 0)], card) == 0.5
    # 12 MUFU take 12 s for 6 + 2 bytes.
    assert sass.bandwidth_fraction([sass.Loop(0, 12, 6, 2)], card) == pytest.approx(8 / 12)
    # Two memory-bound sweeps over the same 8 bytes: each is necessary only once.
    assert sass.bandwidth_fraction([sass.Loop(8, 0, 8, 0), sass.Loop(8, 0, 8, 0)], card) == 0.5
    assert sass.bandwidth_fraction([], card) == 0.0


@pytest.mark.parametrize("registers, threads, shared, programs", [
    # 32 regs x 32 lanes = 1024 per warp: 64 warps by registers; 16 warps a program: the warp limit, 4.
    (32, 512, 0, 4),
    # 56 regs -> 1792 per warp: 36 warps fit, 2 programs of 16 warps.
    (56, 512, 1024, 2),
    # 155 regs -> 4960, rounded to 5120 per warp: 12 warps fit, one program of 8 warps.
    (155, 256, 1024, 1),
    # 128 threads of 16 regs: 32 programs by warps and registers, 32 the block limit.
    (16, 64, 0, 32),
    # Shared memory: 100 KiB + 1 KiB reserved per program leaves room for two.
    (32, 128, 100 * 1024, 2),
])
def test_programs_per_sm_by_hand(registers, threads, shared, programs):
    assert sass.programs_per_sm(registers, threads, shared) == programs


def test_h100_budget_per_byte():
    # 132 SMs x 4 x 32 lanes x 1.755 GHz over 3.0 TB/s; 132 x 16 x 1.755 GHz MUFU over the same.
    assert sass.H100.instructions_per_byte == pytest.approx(9.88, abs=0.01)
    assert sass.H100.mufu_per_byte == pytest.approx(1.235, abs=0.01)


# The heaviest specialisations: the second-sweep divergences with both rows, and the entropy.
GUARDED = ("logprobs+entropy", "terms:js", "terms:chi2", "terms:alpha")


def _cuobjdump_available() -> bool:
    try:
        sass.cuda_tools()
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(shutil.which("ptxas") is None and not _cuobjdump_available(),
                    reason="no CUDA binary tools (Triton's wheel bundles them)")
def test_heaviest_triton_specialisations_keep_registers_and_spills_in_bounds(tmp_path):
    pytest.importorskip("triton")
    script = (
        "import json, sys\n"
        "from benchmarks import static_gpu\n"
        f"rows = static_gpu.triton_rows(static_gpu.LOGITS_SHAPES[:1], linear=False, only={GUARDED!r})\n"
        "json.dump([r.as_dict() for r in rows], open(sys.argv[1], 'w'))\n"
    )
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["case"] for r in rows} == set(GUARDED)
    assert {r["kernel"] for r in rows} == {"token_forward_kernel", "token_backward_kernel"}
    for r in rows:
        where = f"{r['kernel']} {r['case']} ({r['config']})"
        assert r["local_bytes"] == 0, f"{where} spills {r['local_bytes']} bytes"
        assert r["programs_per_sm"] >= 2, f"{where}: {r['registers']} registers, {r['programs_per_sm']} program(s)/SM"
