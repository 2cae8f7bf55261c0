"""Which backend runs a call: the calling thread's choice, ``PREFOPT_BACKEND`` and the device."""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Optional

import torch

BACKEND_NAMES = ("triton", "native", "reference")
_selection = threading.local()


def backend_module(name: str):
    """The module of the backend ``name`` (one of :data:`BACKEND_NAMES`); may raise ImportError."""
    return importlib.import_module(f"prefopt_kernels.backends.{name}")


def available_backends() -> list:
    """Names of the backends usable in this process, in dispatch preference order.

    ``triton`` needs Triton and a CUDA device (or ``TRITON_INTERPRET=1``, which runs its
    kernels on CPU tensors); ``native`` needs the compiled extension; ``reference`` is
    always there.
    """
    names = []
    for name in BACKEND_NAMES:
        try:
            if backend_module(name).is_available():
                names.append(name)
        except ImportError:
            continue
    return names


class use_backend(contextlib.AbstractContextManager):
    """Select the backend of the calling thread: ``"auto" | "triton" | "native" | "reference"``.

    Call it to set this thread's choice, or use it as a context manager to set it for a
    block (the previous choice is restored on exit, so blocks nest). The choice is
    thread-local: other threads keep theirs, and a new thread starts at ``"auto"``.
    ``"auto"`` sends CUDA tensors to Triton and CPU tensors to the native extension when
    built, else to the reference; the environment variable ``PREFOPT_BACKEND`` overrides
    ``"auto"``. The backward pass always runs on the backend its forward ran on.
    """

    def __init__(self, name: str):
        check_backend_name(name, "name")
        self._previous = selected_backend()
        _selection.name = name

    def __exit__(self, *exc_info):
        _selection.name = self._previous
        return False


def selected_backend() -> str:
    """The calling thread's choice as :class:`use_backend` set it (``"auto"`` by default)."""
    return getattr(_selection, "name", "auto")


def check_backend_name(name, argument: str) -> None:
    """Raise a ValueError naming ``argument`` unless ``name`` is ``"auto"`` or a backend's name."""
    if name not in ("auto",) + BACKEND_NAMES:
        raise ValueError(f"{argument} must be one of auto, {', '.join(BACKEND_NAMES)}; got {name!r}")


def backend_selection() -> str:
    """The calling thread's choice, ``PREFOPT_BACKEND`` standing in for ``"auto"``; checked.

    A registered op carries this string and resolves it with :func:`pick_backend`, so its
    backward runs where its forward ran.
    """
    name = selected_backend()
    if name == "auto":
        name = os.environ.get("PREFOPT_BACKEND", "auto") or "auto"
        check_backend_name(name, "PREFOPT_BACKEND")
    return name


def pick_backend(device: torch.device, name: Optional[str] = None):
    """The backend module that runs on ``device`` for the selection ``name`` (default: the caller's)."""
    name = backend_selection() if name is None else name
    if name != "auto":
        module = backend_module(name)
        if not (module.is_available() and module.supports(device)):
            raise ValueError(
                f"backend {name!r} cannot run on {device.type} tensors here "
                f"(available: {', '.join(available_backends())})"
            )
        return module
    preference = ("triton", "native") if device.type == "cuda" else ("native",)
    for candidate in preference:
        try:
            module = backend_module(candidate)
        except ImportError:
            continue
        if module.is_available() and module.supports(device):
            return module
    return backend_module("reference")
