"""Every Triton kernel specialisation compiles for a GPU target, with no GPU present, and a
divergence code the registry does not know compiles in none.

The interpreter runs kernels as Python, so it cannot catch what only the compiler rejects
(non-constexpr globals, type mismatches across branches). Compiling each specialisation
for sm_90 to a cubin can; it runs in a subprocess because the interpreter is switched on
for this whole test session.

The sweep runs on every Triton from the floor in pyproject.toml up: to check the floor,
run this test with that release first on ``PYTHONPATH`` (Triton 3.2's ``ASTSource`` takes
``constants`` and a signature without the constexprs, later ones ``constexprs``).
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import inspect
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from prefopt_kernels.backends.triton import kernels
    from prefopt_kernels.divergences import Divergence

    FLOATS = {"inv_temperature", "beta", "one_minus_beta", "log_beta", "log_one_minus_beta", "alpha",
              "alpha_minus_one"}

    def signature(fn, pointers, constants):
        sig = {}
        for name in fn.arg_names:
            if name in constants:
                sig[name] = "constexpr"
            elif name in pointers:
                sig[name] = pointers[name]
            elif name.endswith("_ptr"):
                sig[name] = "*fp32"
            elif name in FLOATS:
                sig[name] = "fp32"
            else:
                sig[name] = "i64" if name.startswith("stride") else "i32"
        return sig

    def compile_one(fn, pointers, constants):
        sig = signature(fn, pointers, constants)
        if "constexprs" in inspect.signature(ASTSource).parameters:
            source = ASTSource(fn, sig, constexprs=constants)
        else:  # Triton 3.2: the signature holds only the arguments that are not constexprs
            source = ASTSource(fn, {k: v for k, v in sig.items() if v != "constexpr"}, constants=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert compiled.asm.get("cubin"), "no cubin produced"

    count = 0
    codes = [0] + [int(d) for d in Divergence]
    for dtype, divergence, labels, weight in itertools.product(("bf16", "fp32"), codes, (True, False), (True, False)):
        if not labels and divergence == 0:
            continue
        rows = {"a_ptr": "*" + dtype, "b_ptr": "*" + dtype, "labels_ptr": "*i64"}
        # Rows aligned by the kernels (as at an odd vocabulary): 16 bytes of elements.
        align = 8 if dtype == "bf16" else 4
        compile_one(kernels.token_forward_kernel, rows, dict(
            HAS_LABELS=labels, HAS_REF=divergence > 0, HAS_WEIGHT=weight, WANT_LOGP=labels, WANT_ENTROPY=labels,
            WANT_REF_LOGP=labels and divergence > 0, DIVERGENCE=divergence, BLOCK_V=4096, ALIGN=align,
            CANDIDATES=0, CAP=1))
        if labels and divergence == 0:  # the sampled forward, gathering its first candidates
            for candidates in (51, 1024):  # the candidate buffer is in the logits' dtype
                compile_one(kernels.token_forward_kernel, dict(rows, top_ptr="*" + dtype), dict(
                    HAS_LABELS=True, HAS_REF=False, HAS_WEIGHT=weight, WANT_LOGP=True, WANT_ENTROPY=False,
                    WANT_REF_LOGP=False, DIVERGENCE=0, BLOCK_V=4096, ALIGN=align, CANDIDATES=candidates,
                    CAP=triton.next_power_of_2(candidates + 4096)))
        compile_one(kernels.token_backward_kernel, dict(rows, grad_ptr="*" + dtype), dict(
            HAS_LABELS=labels, HAS_WEIGHT=weight, GRAD_LOGP=labels, GRAD_ENTROPY=labels,
            DIVERGENCE=divergence, BLOCK_V=4096, ALIGN=align))
        compile_one(kernels.slice_state_kernel, dict(rows, argmax_ptr="*i64"), dict(
            HAS_LABELS=labels, HAS_REF=divergence > 0, HAS_WEIGHT=weight, WANT_ENTROPY=labels,
            DIVERGENCE=divergence, BLOCK_V=4096, ALIGN=align, CANDIDATES=0, CAP=1))
        if labels and divergence == 0:  # a sharded sampled forward's fold, gathering its first candidates
            for fold_align in (align,) if weight else (align, 1):  # aligned rows; rows read from their starts
                compile_one(kernels.slice_state_kernel, dict(rows, argmax_ptr="*i64", top_ptr="*" + dtype), dict(
                    HAS_LABELS=True, HAS_REF=False, HAS_WEIGHT=weight, WANT_ENTROPY=False, DIVERGENCE=0,
                    BLOCK_V=4096, ALIGN=fold_align, CANDIDATES=51, CAP=triton.next_power_of_2(51 + 4096)))
        count += 3
        if divergence and Divergence(divergence).second_sweep:
            compile_one(kernels.slice_sweep_kernel, rows, dict(
                HAS_LABELS=labels, HAS_WEIGHT=weight, DIVERGENCE=divergence, BLOCK_V=4096, ALIGN=align))
            count += 1
    # A code the registry does not know fails to compile in every kernel.
    unknown = max(int(d) for d in Divergence) + 1
    rows = {"a_ptr": "*fp32", "b_ptr": "*fp32", "labels_ptr": "*i64"}
    for fn, pointers, flags in (
            (kernels.token_forward_kernel, rows, dict(HAS_REF=True, WANT_LOGP=False, WANT_ENTROPY=False,
                                                       WANT_REF_LOGP=False)),
            (kernels.token_backward_kernel, dict(rows, grad_ptr="*fp32"), dict(GRAD_LOGP=False, GRAD_ENTROPY=False)),
            (kernels.slice_state_kernel, dict(rows, argmax_ptr="*i64"), dict(HAS_REF=True, WANT_ENTROPY=False,
                                                                             CANDIDATES=0, CAP=1)),
            (kernels.slice_sweep_kernel, rows, {})):
        try:
            compile_one(fn, pointers, dict(HAS_LABELS=False, HAS_WEIGHT=False, DIVERGENCE=unknown, BLOCK_V=4096,
                                           ALIGN=4, **flags))
        except Exception as error:
            assert "DIVERGENCE code" in repr(error) + repr(error.__cause__), repr(error)
        else:
            raise AssertionError(f"{fn.__name__} compiled the unknown code {unknown}")
    print("compiled", count)
    """
)


def test_every_specialisation_compiles_for_sm90():
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    from prefopt_kernels.divergences import Divergence

    # Forward, backward and slice state for every (dtype, divergence or none, labels,
    # weight) but the label-less, divergence-less four; the sweep for second-sweep divergences.
    specialisations = 2 * (len(Divergence) + 1) * 4 - 2 * 2
    sweeps = 2 * sum(d.second_sweep for d in Divergence) * 4
    assert f"compiled {3 * specialisations + sweeps}" in result.stdout, result.stdout
