"""Runs a worker script on several local ranks for the multi-process tests (gloo, CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_workers(script: str, out_dir, nproc: int = 2, timeout: int = 600) -> dict:
    """``script`` (a path relative to ``tests/``, e.g. ``"distributed/linear_fsdp_worker.py"``) under
    ``torch.distributed.run`` on ``nproc`` ranks, given ``out_dir``; returns the ``results.json`` it
    writes there. A failing rank fails the caller's test with the output's tail.

    A worker runs in its own folder and imports the modules beside it and the shared helpers of
    ``tests/`` (``launch``, ``dpo_rounding``, ...) by their plain names: ``tests/`` is put on its
    ``PYTHONPATH``."""
    worker = TESTS / script
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(worker), str(out_dir)]
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=worker.parent, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((Path(out_dir) / "results.json").read_text())


def finish_worker(out_dir, results: dict) -> None:
    """A worker's last step: rank 0 writes ``results`` to ``out_dir/results.json``, every rank
    waits for the others, and the process ends there.

    After the barrier no rank communicates again, so each leaves with ``os._exit(0)`` instead of
    tearing the group down: gloo's teardown, or the interpreter's shutdown with gloo's threads
    alive, now and then left one rank waiting forever after the other had gone (and, before the
    barrier, aborted a rank that exited while another still flushed the last collective).
    """
    import torch.distributed as dist

    if dist.get_rank() == 0:
        (Path(out_dir) / "results.json").write_text(json.dumps(results))
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
