"""Run as a script by ``test_triton_compile.py``, with the interpreter off: compiles every Triton
kernel specialisation for sm_90 to a cubin, and checks that a divergence code the registry does
not know compiles in none. Prints ``compiled N``, N the forward, backward, slice-state and sweep
specialisations of the (dtype, divergence or none, labels, weight) grid (the sampled forwards and
folds and the row states' finish compile too, uncounted).

The specialisations are independent, so a pool of one process per CPU compiles them, each once.

The script runs on every Triton from the floor in pyproject.toml up (Triton 3.2's ``ASTSource``
takes ``constants`` and a signature without the constexprs, later ones ``constexprs``).
"""

import inspect
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, NamedTuple, Optional

FLOATS = {"inv_temperature", "beta", "one_minus_beta", "log_beta", "log_one_minus_beta", "alpha",
          "alpha_minus_one"}


class Specialisation(NamedTuple):
    """One kernel (by its name in ``kernels``) with its pointer types and constexprs; ``counted``
    says whether it belongs to the grid that ``compiled N`` counts."""

    kernel: str
    pointers: Dict[str, str]
    constants: Dict[str, object]
    counted: bool = True


def signature(fn, pointers, constants):
    """Triton's signature for ``fn``: the constexprs, the given pointer types, other pointers
    fp32, the scalar floats fp32, strides i64 and every other integer i32."""
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


def compile_one(case: Specialisation) -> None:
    """Compiles ``case`` for sm_90 with 8 warps; raises if it fails or yields no cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from prefopt_kernels.backends.triton import kernels

    fn = getattr(kernels, case.kernel)
    sig = signature(fn, case.pointers, case.constants)
    if "constexprs" in inspect.signature(ASTSource).parameters:
        source = ASTSource(fn, sig, constexprs=case.constants)
    else:  # Triton 3.2: the signature holds only the arguments that are not constexprs
        source = ASTSource(fn, {k: v for k, v in sig.items() if v != "constexpr"}, constants=case.constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert compiled.asm.get("cubin"), f"{case.kernel} {case.constants}: no cubin produced"


def refusal(case: Specialisation) -> Optional[str]:
    """``None`` when compiling ``case`` fails on its unknown divergence code; else what went wrong."""
    try:
        compile_one(case)
    except Exception as error:
        text = repr(error) + repr(error.__cause__)
        return None if "DIVERGENCE code" in text else f"{case.kernel}: {text}"
    return f"{case.kernel} compiled the unknown code {case.constants['DIVERGENCE']}"


def specialisations() -> List[Specialisation]:
    """Every specialisation the backend launches, at BLOCK_V=4096: per dtype, divergence code (0:
    none), labels and weight, the forward, backward and slice state (not the label-less,
    divergence-less ones), the sweep for second-sweep divergences; the sampled forwards and the
    sharded sampled fold where there are labels and no divergence."""
    import triton

    from prefopt_kernels.divergences import Divergence

    cases = []
    codes = [0] + [int(d) for d in Divergence]
    for dtype, divergence, labels, weight in itertools.product(("bf16", "fp32"), codes, (True, False), (True, False)):
        if not labels and divergence == 0:
            continue
        rows = {"a_ptr": "*" + dtype, "b_ptr": "*" + dtype, "labels_ptr": "*i64"}
        # Rows aligned by the kernels (as at an odd vocabulary): 16 bytes of elements.
        align = 8 if dtype == "bf16" else 4
        cases.append(Specialisation("token_forward_kernel", rows, dict(
            HAS_LABELS=labels, HAS_REF=divergence > 0, HAS_WEIGHT=weight, WANT_LOGP=labels, WANT_ENTROPY=labels,
            WANT_REF_LOGP=labels and divergence > 0, DIVERGENCE=divergence, BLOCK_V=4096, ALIGN=align,
            CANDIDATES=0, CAP=1)))
        if labels and divergence == 0:  # the sampled forward, gathering its first candidates
            for candidates in (51, 1024):  # the candidate buffer is in the logits' dtype
                cases.append(Specialisation("token_forward_kernel", dict(rows, top_ptr="*" + dtype), dict(
                    HAS_LABELS=True, HAS_REF=False, HAS_WEIGHT=weight, WANT_LOGP=True, WANT_ENTROPY=False,
                    WANT_REF_LOGP=False, DIVERGENCE=0, BLOCK_V=4096, ALIGN=align, CANDIDATES=candidates,
                    CAP=triton.next_power_of_2(candidates + 4096)), counted=False))
        cases.append(Specialisation("token_backward_kernel", dict(rows, grad_ptr="*" + dtype), dict(
            HAS_LABELS=labels, HAS_WEIGHT=weight, GRAD_LOGP=labels, GRAD_ENTROPY=labels,
            DIVERGENCE=divergence, BLOCK_V=4096, ALIGN=align, ZERO_SUM=dtype == "fp32")))
        cases.append(Specialisation("slice_state_kernel", dict(rows, argmax_ptr="*i64"), dict(
            HAS_LABELS=labels, HAS_REF=divergence > 0, HAS_WEIGHT=weight, WANT_ENTROPY=labels,
            DIVERGENCE=divergence, BLOCK_V=4096, ALIGN=align, CANDIDATES=0, CAP=1)))
        if labels and divergence == 0:  # a sharded sampled forward's fold, gathering its first candidates
            for fold_align in (align,) if weight else (align, 1):  # aligned rows; rows read from their starts
                cases.append(Specialisation("slice_state_kernel", dict(rows, argmax_ptr="*i64", top_ptr="*" + dtype),
                                            dict(HAS_LABELS=True, HAS_REF=False, HAS_WEIGHT=weight,
                                                 WANT_ENTROPY=False, DIVERGENCE=0, BLOCK_V=4096, ALIGN=fold_align,
                                                 CANDIDATES=51, CAP=triton.next_power_of_2(51 + 4096)),
                                            counted=False))
        if divergence and Divergence(divergence).second_sweep:
            cases.append(Specialisation("slice_sweep_kernel", rows, dict(
                HAS_LABELS=labels, HAS_WEIGHT=weight, DIVERGENCE=divergence, BLOCK_V=4096, ALIGN=align)))
    return cases + finish_specialisations()


def finish_specialisations() -> List[Specialisation]:
    """The row states' finish (uncounted): finalize for every divergence code (0 with and without
    a reference), with labels (rows skipped by them) and without (every row read); finish_sweep
    with and without labels."""
    from prefopt_kernels.divergences import Divergence

    cases = []
    labels_ptr = {"labels_ptr": "*i64"}
    for divergence, labels in itertools.product([0] + [int(d) for d in Divergence], (True, False)):
        for has_ref in (True, False) if divergence == 0 else (True,):
            cases.append(Specialisation("finalize_kernel", labels_ptr, dict(
                HAS_LABELS=labels, HAS_WEIGHT=True, EVERY_ROW_READ=not labels, WANT_LOGP=labels, WANT_ENTROPY=True,
                HAS_REF=has_ref, WANT_REF_LOGP=labels and has_ref, DIVERGENCE=divergence, BLOCK=1024),
                counted=False))
    for labels in (True, False):
        cases.append(Specialisation("finish_sweep_kernel", labels_ptr, dict(
            HAS_LABELS=labels, HAS_WEIGHT=True, EVERY_ROW_READ=not labels, BLOCK=1024), counted=False))
    return cases


def unknown_code_cases() -> List[Specialisation]:
    """Each kernel at the first divergence code past the registry's."""
    from prefopt_kernels.divergences import Divergence

    unknown = max(int(d) for d in Divergence) + 1
    rows = {"a_ptr": "*fp32", "b_ptr": "*fp32", "labels_ptr": "*i64"}
    common = dict(HAS_LABELS=False, HAS_WEIGHT=False, DIVERGENCE=unknown, BLOCK_V=4096, ALIGN=4)
    return [
        Specialisation("token_forward_kernel", rows, dict(common, HAS_REF=True, WANT_LOGP=False, WANT_ENTROPY=False,
                                                          WANT_REF_LOGP=False)),
        Specialisation("token_backward_kernel", dict(rows, grad_ptr="*fp32"), dict(common, GRAD_LOGP=False,
                                                                                   GRAD_ENTROPY=False,
                                                                                   ZERO_SUM=True)),
        Specialisation("slice_state_kernel", dict(rows, argmax_ptr="*i64"), dict(common, HAS_REF=True,
                                                                                 WANT_ENTROPY=False, CANDIDATES=0,
                                                                                 CAP=1)),
        Specialisation("slice_sweep_kernel", rows, common),
        Specialisation("finalize_kernel", {"labels_ptr": "*i64"}, dict(
            HAS_LABELS=False, HAS_WEIGHT=False, EVERY_ROW_READ=False, WANT_LOGP=False, WANT_ENTROPY=False,
            HAS_REF=True, WANT_REF_LOGP=False, DIVERGENCE=unknown, BLOCK=1024)),
    ]


def main() -> None:
    cases = specialisations()
    keys = [(c.kernel, sorted(c.pointers.items()), sorted(c.constants.items())) for c in cases]
    assert len(set(map(repr, keys))) == len(keys), "a specialisation is listed twice"
    # Spawned workers start clean: the parent's Triton state is not copied into them.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        compiled = pool.map(compile_one, cases)  # both submitted at once: no worker waits on the other map
        refused = pool.map(refusal, unknown_code_cases())
        list(compiled)
        failures = [f for f in refused if f is not None]
    assert not failures, failures
    print("compiled", sum(c.counted for c in cases))


if __name__ == "__main__":
    main()
