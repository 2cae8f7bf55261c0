"""Child processes: the one launcher for every part of the suite that runs in a fresh interpreter.

A process's resident set only grows, so CPU memory is measured in a child per case
(``runner.measure_cpu_memory``); the tensor-parallel ranks are a child each
(``tensor_parallel.run``); the DPO step runs in one child (``dpo_step.run``). The parent calls
:func:`run_children` with an *entry*, ``"module:function"``, and one JSON request per child;
each child runs ``python -m benchmarks.child_process ENTRY REQUEST``, which calls
``function(request)``. The entry prints its results with :func:`emit`, one JSON object per
line as they come (so a child cut short leaves what it finished), or returns them, emitted
when it returns. A child exits when the parent is gone (its stdin closes), so none is left
waiting in a collective after the parent was killed.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Collection, List, Optional, Sequence

MODULE = "benchmarks.child_process"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env() -> dict:
    """A child's environment: glibc returns every large freed block to the OS at once, so a
    block freed by an earlier call is not silently reused (which would under-report a peak)."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 16))
    return env


@dataclass
class ChildRun:
    """How one child ended: the JSON objects it printed, in order, its exit code, whether it
    was stopped at the deadline, and its last line of stderr (empty when shown on ours)."""

    lines: List[dict]
    returncode: int
    timed_out: bool
    stderr_tail: str
    deadline_s: float

    def failure(self, who: str) -> Optional[str]:
        """What went wrong, as a note that names the child ``who``; None when it exited with 0."""
        if self.timed_out:
            return f"{who} did not finish within {self.deadline_s:.0f} s"
        if self.returncode == 0:
            return None
        note = f"{who} exited with code {self.returncode}"
        if self.returncode < 0:
            note += f" (killed by signal {-self.returncode}, out of memory?)"
        return note + (f": {self.stderr_tail}" if self.stderr_tail else "")


def run_children(entry: str, requests: Sequence[dict], *, deadline_s: float,
                 show_stderr: Collection[int] = ()) -> List[ChildRun]:
    """Run ``entry`` in one child per request, all at once, until every child has exited or
    ``deadline_s`` has passed (the children still running are then killed); one
    :class:`ChildRun` per request, in order. The children in ``show_stderr`` (by index) write
    their stderr (progress, tracebacks) to this process's; the others' is kept for the note."""
    with tempfile.TemporaryDirectory() as tmp:
        started = []
        for i, request in enumerate(requests):
            out = open(os.path.join(tmp, f"{i}.out"), "w+")
            err = None if i in show_stderr else open(os.path.join(tmp, f"{i}.err"), "w+")
            proc = subprocess.Popen([sys.executable, "-m", MODULE, entry, json.dumps(request)],
                                    stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    env=child_env(), cwd=REPO_ROOT)
            started.append((proc, out, err))
        deadline = time.monotonic() + deadline_s
        killed = set()
        try:
            for proc, _, _ in started:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for i, (proc, _, _) in enumerate(started):
                if proc.poll() is None:
                    proc.kill()
                    killed.add(i)
                proc.wait()
                proc.stdin.close()
        runs = []
        for i, (proc, out, err) in enumerate(started):
            out.seek(0)
            lines = [obj for obj in map(_json_object, out) if obj is not None]
            out.close()
            tail = ""
            if err is not None:
                err.seek(0)
                tail = (err.read().strip().splitlines() or [""])[-1][:200]
                err.close()
            runs.append(ChildRun(lines, proc.returncode, i in killed, tail, deadline_s))
    return runs


def _json_object(line: str) -> Optional[dict]:
    """A line the child printed with :func:`emit`, else None (other output, or a line cut
    short when the child was killed)."""
    if not line.startswith("{"):
        return None
    try:
        return json.loads(line)
    except ValueError:
        return None


def emit(obj: dict) -> None:
    """Child side: hand ``obj`` to the parent (one JSON line on stdout)."""
    print(json.dumps(obj), flush=True)


def _exit_with_parent() -> None:
    """Stop this child once the parent is gone: the parent's end of our stdin closes."""
    sys.stdin.read()
    os._exit(3)


def main(argv: Sequence[str]) -> int:
    """Child side: ``ENTRY REQUEST_JSON`` -> ``function(request)`` of ``module:function``."""
    if len(argv) != 2 or ":" not in argv[0]:
        sys.exit(f"usage: python -m {MODULE} MODULE:FUNCTION REQUEST_JSON (internal: started "
                 "by python -m benchmarks)")
    module, function = argv[0].split(":", 1)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    result = getattr(importlib.import_module(module), function)(json.loads(argv[1]))
    if result is not None:
        emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
