"""``python -m benchmarks``: the benchmark suite on the default device, printed as a table.

Examples::

    python -m benchmarks                          # default suite (CUDA if present, else CPU)
    python -m benchmarks --quick                  # about a minute
    python -m benchmarks --ops logprobs,divergence --vocab 32000,128256 --dtype bf16
    python -m benchmarks --ops linear --tokens 1024 --hidden 1024  # from hidden states
    python -m benchmarks --ops sampler --tokens 1024 --hidden 256  # sampler-matched vs plain
    python -m benchmarks --full --out /tmp/bench  # GPU: every op, mode, N, V and dtype
    python -m benchmarks --distributed            # tensor parallel: 2 gloo ranks on the CPU
    python -m benchmarks --dpo-step               # one DPO step: stock TRL vs PrefOptDPOTrainer
    python -m benchmarks --distill-step           # one distillation step: stock TRL vs ours, dense and sparse
    python -m benchmarks --grpo-step              # one GRPO step: stock TRL vs PrefOptGRPOTrainer
    python -m benchmarks --kto-step               # one KTO step: stock TRL vs PrefOptKTOTrainer
    python -m benchmarks --static-gpu             # no GPU needed: sm_90 code of every GPU kernel
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``) as parsed options."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    p.add_argument("--full", action="store_true",
                   help="GPU: the whole grid of ops, modes, N, V and dtypes (long)")
    p.add_argument("--ops", type=_csv(str),
                   help="comma list: logprobs, logprobs+entropy, divergence (all seven) or "
                        "divergence:NAME, terms:forward_kl, sparse_po; from hidden states and "
                        "the LM head: linear (both) or linear:logprobs, linear:terms; "
                        "sampler-matched (top_k=50, top_p=0.9, min_p=0.05): logprobs+sampler, "
                        "linear:logprobs+sampler, or sampler (both beside their plain ops)")
    p.add_argument("--modes", type=_csv(str), help="comma list of fwd, bwd, fwd+bwd")
    p.add_argument("--vocab", type=_csv(int), help="comma list of vocabulary sizes V")
    p.add_argument("--tokens", type=_csv(int), help="comma list of token counts N")
    p.add_argument("--hidden", type=_csv(int),
                   help="comma list of hidden sizes H of the linear ops (alone: the linear ops)")
    p.add_argument("--dtype", type=_csv(str), help="comma list of fp32, bf16, fp16")
    p.add_argument("--backends", type=_csv(str),
                   help="package backends to run (default: the fast ones for the device); "
                        "triton on a CPU runs interpreted at tiny shapes only")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--compile", dest="compile_eager", action="store_true", default=None,
                   help="torch.compile of the eager code on every case (default: on the headline "
                        "cases, off with --quick)")
    p.add_argument("--no-compile", dest="compile_eager", action="store_false")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-peers", action="store_true", help="skip Liger-Kernel and CCE")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes only (end-to-end check of the suite, e.g. under the "
                        "Triton interpreter); times are meaningless")
    p.add_argument("--budget", type=float, default=None,
                   help="CPU: seconds of timed repeats per case and implementation")
    p.add_argument("--out", help="directory for results.{json,md,png} "
                                 "(default benchmarks/results/<device>/)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--distributed", action="store_true",
                   help="instead of the suite: the vocabulary-sharded ops (process_group=) on "
                        "2 gloo ranks of this CPU against gathering the logits (default "
                        "terms:forward_kl and linear:terms at N=4096, V=32000, H=1024 fp32, "
                        "about 3 minutes on 2 cores); --ops, --tokens, --vocab, --hidden, "
                        "--dtype, --tiny, --budget, --backends, --no-memory apply. Written as "
                        "a section of the same results files, which keep the suite's results")
    p.add_argument("--dpo-step", action="store_true",
                   help="instead of the suite: one DPO training step (forward + backward) of a "
                        "tiny Llama, stock trl.DPOTrainer (sigmoid) against PrefOptDPOTrainer "
                        "(sigmoid on its fused head, sparse_po) and SparsePO on full logits; "
                        "time and peak memory (default V=32000, N=4096 tokens, H=256, bf16 mixed "
                        "precision as TRL defaults to; about 90 s on 2 cores). One value "
                        "each of --vocab, --tokens, --hidden, --dtype (fp32, bf16) applies, and "
                        "--device, --tiny, --budget, --no-memory. Needs trl. Written as a "
                        "section of the same results files")
    p.add_argument("--distill-step", action="store_true",
                   help="instead of the suite: one distillation step (forward + backward), stock "
                        "DistillationTrainer and ServerDistillationTrainer against ours, and the dense "
                        "divergence op against TRL's ChunkedDivergenceFunction; time and peak memory "
                        "(default V=32000, N=2048 tokens, H=256, bf16). One value each of --vocab, "
                        "--tokens, --hidden, --dtype applies, and --device, --tiny, --budget, --no-memory, "
                        "--out. Needs trl. Writes distill_step.{json,md}")
    p.add_argument("--grpo-step", action="store_true",
                   help="instead of the suite: one GRPO training step (reference scoring, "
                        "forward + backward) of a tiny Llama, stock trl.GRPOTrainer (k3 KL) "
                        "against PrefOptGRPOTrainer (k3 on its fused head, the exact full KL) and "
                        "the full KL on full logits; time and peak memory. Sizes and options as "
                        "--dpo-step. Needs trl. Written as a section of the same results files")
    p.add_argument("--kto-step", action="store_true",
                   help="instead of the suite: one KTO training step (KL pairs, reference passes, "
                        "forward + backward) of a tiny Llama, stock trl.KTOTrainer against "
                        "PrefOptKTOTrainer and against full logits; time and peak memory. Sizes and "
                        "options as --dpo-step. Needs trl. Written as a section of the same results files")
    p.add_argument("--static-gpu", action="store_true",
                   help="instead of the suite, and without a GPU: compile every Triton "
                        "specialisation the package launches and the CUDA C++ kernels for sm_90, "
                        "and report registers, spills, programs per SM, hot-loop SASS and MUFU "
                        "instructions per element and the fraction of H100 bandwidth they allow "
                        "(an estimate; about 10 minutes on 2 cores, --quick: one shape of the "
                        "Triton kernels). Written to --out (default "
                        "benchmarks/results/static-sm90/)")
    return p.parse_args(argv)


def _expand_ops(ops):
    from .cases import DIVERGENCES, OPS, PLAIN_LINEAR_OPS, SAMPLER_OPS
    if ops is None:
        return None
    out = []
    for op in ops:
        if op == "divergence":
            out += [f"divergence:{d}" for d in DIVERGENCES]
        elif op == "terms":
            out.append("terms:forward_kl")
        elif op == "linear":
            out += list(PLAIN_LINEAR_OPS)
        elif op == "sampler":
            out += list(SAMPLER_OPS)
        elif op in OPS:
            out.append(op)
        else:
            sys.exit(f"--ops: unknown op {op!r}; known: {', '.join(OPS)}")
    return out


def explicit_axes(args) -> bool:
    """Whether the command line names any axis of the case grid (ops, modes, N, V, dtype, H)."""
    return any(getattr(args, k) is not None
               for k in ("ops", "modes", "tokens", "vocab", "dtype", "hidden"))


def _default_backends(device) -> tuple:
    """Backends of the package that run on ``device``, found by running a tiny op on each."""
    import torch
    try:
        import prefopt_kernels as pk
    except Exception as exc:
        return [], [f"prefopt_kernels not importable ({type(exc).__name__}: {exc}): "
                    "baselines only."]
    usable = []
    x = torch.zeros(2, 8, device=device, requires_grad=True)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    for name in pk.available_backends():
        try:
            with pk.use_backend(name):
                pk.token_logprobs(x, labels).sum().backward()
            usable.append(name)
        except Exception:
            continue
    notes = []
    if device.type == "cuda":
        chosen = [b for b in usable if b != "reference"]
    else:
        chosen = [b for b in usable if b == "native"]
        if not chosen:
            notes.append("native extension not built: the package's CPU fast path is missing. "
                         "The reference backend (the float64-capable test oracle) is not a "
                         "fast path and is left out; --backends reference runs it.")
        notes.append("triton on CPU is left out (the Triton interpreter says nothing about "
                     "speed); --backends triton runs it interpreted at tiny shapes.")
    if not chosen:
        notes.append("no package backend runs on this device: baselines only.")
    return chosen, notes


def _out_dir(args, device_name: str) -> str:
    from . import report
    return args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    report.slug(device_name))


def main_distributed(args, argv: Optional[List[str]] = None) -> int:
    """``--distributed``: the tensor-parallel benchmark (see ``tensor_parallel``)."""
    unsupported = [flag for flag, given in (
        ("--quick", args.quick), ("--full", args.full), ("--modes", args.modes is not None),
        ("--device cuda", args.device == "cuda"), ("--compile", bool(args.compile_eager)))
        if given]
    if unsupported:
        sys.exit(f"--distributed: {', '.join(unsupported)} not supported (gloo ranks on the "
                 "CPU, forward + backward)")
    import torch

    from . import report
    from .cases import default_cases, tiny_cases
    from .tensor_parallel import DEFAULT_OPS, WORLD, check_cases, run

    cpu = torch.device("cpu")
    if args.backends and "triton" in args.backends:
        # Inherited by the ranks, before they import the package's Triton kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.backends is not None:
        backends, notes = args.backends, []
    else:
        backends, notes = _default_backends(cpu)
    ops = _expand_ops(args.ops) or list(DEFAULT_OPS)
    if args.tiny:
        cases = tiny_cases(ops)
    else:
        cases = default_cases("cpu", ops=ops, tokens=args.tokens, vocabs=args.vocab,
                              dtypes=args.dtype, hiddens=args.hidden)
    try:
        check_cases(cases, WORLD)
    except ValueError as exc:
        sys.exit(f"--distributed: {exc}")
    budget = args.budget if args.budget is not None else 1.0
    section = run(cases, backends, budget_s=budget, measure_memory=not args.no_memory,
                  progress=not args.no_progress)
    section["notes"] = notes + section["notes"]
    section["meta"]["argv"] = sys.argv[1:] if argv is None else list(argv)
    paths = report.write_section(_out_dir(args, section["meta"]["device_name"]),
                                 "tensor_parallel", section)
    print(report.tensor_parallel_markdown(section))
    print(f"wrote {', '.join(sorted(paths.values()))} in {section['meta']['wall_s']:.0f} s")
    return 0 if all(r["status"] == "ok" for r in section["results"]) else 1


def main_trainer_step(args, argv: Optional[List[str]] = None, section_key: str = "dpo_step") -> int:
    """``--dpo-step`` / ``--grpo-step`` / ``--kto-step``: one training step per trainer variant (see
    ``dpo_step``, ``grpo_step``, ``kto_step``); ``section_key`` names the module and the results' section."""
    import importlib
    import importlib.util

    import torch

    from . import report

    flag = "--" + section_key.replace("_", "-")
    unsupported = [name for name, given in (
        ("--quick", args.quick), ("--full", args.full), ("--ops", args.ops is not None),
        ("--modes", args.modes is not None), ("--backends", args.backends is not None),
        ("--compile", bool(args.compile_eager))) if given]
    if unsupported:
        sys.exit(f"{flag}: {', '.join(unsupported)} not supported (one training step of "
                 "each trainer)")
    if importlib.util.find_spec("trl") is None:
        sys.exit(f"{flag}: needs trl (pip install -e '.[trl]')")
    step = importlib.import_module(f"{__package__}.{section_key}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    sizes = dict(step.TINY) if args.tiny else {}
    for key, given in (("vocab", args.vocab), ("tokens", args.tokens), ("hidden", args.hidden),
                       ("dtype", args.dtype)):
        if given is not None:
            if len(given) != 1:
                sys.exit(f"{flag}: one value of --{key}")
            sizes[key] = given[0]
    try:
        section = step.run(**sizes, device=device,
                           budget_s=args.budget if args.budget is not None else 1.0,
                           measure_memory=not args.no_memory, progress=not args.no_progress)
    except ValueError as exc:
        sys.exit(f"{flag}: {exc}")
    section["meta"]["argv"] = sys.argv[1:] if argv is None else list(argv)
    paths = report.write_section(_out_dir(args, section["meta"]["device_name"]), section_key,
                                 section)
    print(report.SECTIONS[section_key](section))
    print(f"wrote {', '.join(sorted(paths.values()))} in {section['meta']['wall_s']:.0f} s")
    return 0 if all(r["status"] == "ok" for r in section["results"]) else 1


def main_distill_step(args, argv: Optional[List[str]] = None) -> int:
    """``--distill-step``: one distillation step per trainer, and the dense op (see ``distill_step``)."""
    import importlib.util

    import torch

    from . import distill_step, report

    if importlib.util.find_spec("trl") is None:
        sys.exit("--distill-step: needs trl (pip install -e '.[trl]')")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    sizes = dict(distill_step.TINY) if args.tiny else {}
    for key in ("vocab", "tokens", "hidden", "dtype"):
        given = getattr(args, key)
        if given is not None:
            if len(given) != 1:
                sys.exit(f"--distill-step: one value of --{key}")
            sizes[key] = given[0]
    try:
        section = distill_step.run(**sizes, device=device, budget_s=args.budget if args.budget is not None else 1.0,
                                   measure_memory=not args.no_memory, progress=not args.no_progress)
    except ValueError as exc:
        sys.exit(f"--distill-step: {exc}")
    section["meta"]["argv"] = sys.argv[1:] if argv is None else list(argv)
    paths = distill_step.write(_out_dir(args, report.device_name(torch.device(device))), section)
    print(distill_step.markdown(section))
    print(f"wrote {', '.join(sorted(paths.values()))} in {section['meta']['wall_s']:.0f} s")
    return 0 if all(r["status"] == "ok" for r in section["results"]) else 1


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m benchmarks``: the suite (or ``--distributed``, ``--dpo-step``, ``--grpo-step``); writes the
    results files and prints the markdown. Exit status 0 when any case ran (a section: when
    every row ran), else 1."""
    args = parse_args(argv)
    if sum((args.distributed, args.dpo_step, args.grpo_step, args.kto_step, args.distill_step, args.static_gpu)) > 1:
        sys.exit("--distributed, --dpo-step, --grpo-step, --kto-step, --distill-step and --static-gpu: "
                 "one section per run")
    if args.static_gpu:
        from . import static_gpu
        return static_gpu.main(args.out, quick=args.quick)
    if args.distributed:
        return main_distributed(args, argv)
    if args.dpo_step:
        return main_trainer_step(args, argv, "dpo_step")
    if args.grpo_step:
        return main_trainer_step(args, argv, "grpo_step")
    if args.kto_step:
        return main_trainer_step(args, argv, "kto_step")
    if args.distill_step:
        return main_distill_step(args, argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    if device.type == "cpu" and args.backends and "triton" in args.backends:
        # Must be set before prefopt_kernels imports its Triton kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from . import report
    from .cases import default_cases, tiny_cases
    from .measure import copy_bandwidth
    from .implementations import implementations
    from .runner import GEMM_BOUND_MIN_REPS, RunConfig, run_cases

    notes: List[str] = []
    if args.backends is not None:
        backends = args.backends
    else:
        backends, more = _default_backends(device)
        notes += more
    # torch.compile of the eager code is what a user would pick instead of the package: the
    # default runs compare to it on the headline ops (each shape compiles for tens of seconds).
    compile_eager = args.compile_eager if args.compile_eager is not None else not args.quick
    compile_only = None
    if args.compile_eager is None and not args.full:
        if device.type == "cuda":
            compile_only = lambda c: (c.op in ("logprobs", "terms:forward_kl")
                                      and c.mode == "fwd+bwd" and c.v == 128256
                                      and c.dtype == "bf16")
            shapes = "fwd+bwd, V=128256 bf16 only"
        else:
            compile_only = lambda c: (c.op in ("logprobs", "terms:forward_kl", "linear:logprobs")
                                      and c.mode == "fwd+bwd" and c.dtype == "fp32")
            shapes = "logprobs, terms:forward_kl and linear:logprobs, fwd+bwd fp32 only"
        if compile_eager:
            notes.append(f"torch.compile baseline: headline ops, {shapes} (each shape compiles "
                         "for tens of seconds); --compile runs it everywhere.")
    impls, more = implementations(device, backends, compile_eager=compile_eager,
                                  compile_only=compile_only, peers=not args.no_peers)
    notes += more

    ops = _expand_ops(args.ops)
    if args.tiny:
        cases = tiny_cases(ops)
    else:
        cases = default_cases(device.type, quick=args.quick, full=args.full, ops=ops,
                              modes=args.modes, tokens=args.tokens, vocabs=args.vocab,
                              dtypes=args.dtype, hiddens=args.hidden)
        if device.type == "cpu" and not (args.quick or explicit_axes(args)):
            notes.append("CPU default: divergences forward_kl and js only; --ops divergence "
                         "runs all seven.")
        if device.type == "cpu" and "triton" in backends:
            cases += [c for c in tiny_cases(ops) if c not in cases]
        if device.type == "cpu" and any(c.linear for c in cases):
            notes.append("linear ops on a CPU: seconds of GEMMs per call, so each implementation "
                         "warms up on a small copy of the case, the call whose memory the child "
                         "process measures is its first timing sample and counts toward --budget "
                         f"(s per case and implementation), with at least {GEMM_BOUND_MIN_REPS} "
                         "sample(s): a larger --budget takes more.")

    budget = args.budget if args.budget is not None else (0.5 if args.quick else 1.0)
    cfg = RunConfig(device=device, backends=backends, compile_eager=compile_eager,
                    measure_memory=not args.no_memory, cpu_budget_s=budget,
                    progress=not args.no_progress)
    t0 = time.time()
    copy_gbps = copy_bandwidth(device) / 1e9
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = report.device_name(device)
    meta = {"device": str(device), "device_name": name, "torch": torch.__version__,
            "triton": triton_version, "copy_gbps": copy_gbps,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
            "backends": backends, "compile": compile_eager,
            "argv": sys.argv[1:] if argv is None else list(argv)}
    out_dir = _out_dir(args, name)

    def checkpoint(partial):
        report.write(out_dir, {**meta, "wall_s": time.time() - t0, "complete": False}, notes,
                     partial, with_plot=False)
    results = run_cases(cases, impls, cfg, on_case=checkpoint)
    meta.update(wall_s=time.time() - t0, complete=True)
    paths = report.write(out_dir, meta, notes, results)
    with open(paths["md"]) as f:
        print(f.read())
    print(f"wrote {', '.join(sorted(paths.values()))} in {meta['wall_s']:.0f} s")
    return 0 if any(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
