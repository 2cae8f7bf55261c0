"""Runs a worker script on several local ranks for the multi-process tests (gloo, CPU)."""

import json
import subprocess
import sys
from pathlib import Path


def run_workers(script: str, out_dir, nproc: int = 2, timeout: int = 600) -> dict:
    """``script`` (a file in this directory) under ``torch.distributed.run`` on ``nproc`` ranks, given
    ``out_dir``; returns the ``results.json`` it writes there. A failing rank fails the caller's test
    with the output's tail."""
    worker = Path(__file__).with_name(script)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(worker), str(out_dir)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=worker.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((Path(out_dir) / "results.json").read_text())
