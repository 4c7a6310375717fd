"""Choose the kernel backend (config key ``kernels.backend``): torch or fused CuPy.

``auto`` on CUDA tensors, where whichever CuPy is installed (``cupy-cuda12x`` or
``cupy-cuda13x``) can compile and run a kernel, leaves the choice to each move: pack and
unpack take the path measured faster for their direction and size (``path_choice.py``),
the reductions take CuPy. Where CuPy cannot run, ``auto`` is the torch path, saying why
once per process; naming ``cupy`` where it cannot run is an error that says why.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

__all__ = ["BACKENDS", "select_backend", "cupy_unavailable_reason"]

BACKENDS: tuple[str, ...] = ("auto", "torch", "cupy")
_INSTALL_HINT = 'pip install "pipegrid[cuda12]" (or "pipegrid[cuda13]": the extra matching your CUDA)'


@functools.cache
def cupy_unavailable_reason() -> str | None:
    """Why the CuPy path cannot run in this process, or None when it can.

    Probed once per process: importing CuPy and querying the driver is slow, and
    neither the installation nor the visible devices change while training.
    """
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("cupy") is None:
        return f"CuPy is not installed; install it with {_INSTALL_HINT}"
    try:
        import cupy
    except Exception as error:  # a broken install raises more than ImportError
        return f"CuPy failed to import ({error}); reinstall it with {_INSTALL_HINT}"
    try:
        if not cupy.cuda.is_available():
            return "cupy.cuda.is_available() is False (driver or CUDA runtime mismatch)"
    except Exception as error:
        return f"CuPy cannot reach the CUDA driver ({error})"
    try:  # compile and run one kernel: a CuPy for another CUDA major, or without NVRTC, fails here
        if int(cupy.arange(4, dtype=cupy.int64).sum()) != 6:
            return "CuPy's test kernel returned a wrong sum"
    except Exception as error:
        return (f"CuPy cannot compile or run a kernel ({type(error).__name__}: {error}); install the "
                f"CuPy for this machine's CUDA: {_INSTALL_HINT}")
    return None


@functools.cache
def _say_fallback(reason: str) -> None:
    logging.getLogger("pipegrid.kernels").warning(
        "kernels.backend=auto uses the torch path for CUDA tensors: %s", reason)


def select_backend(name: str = "auto", device: torch.device | str | None = None) -> str:
    """Resolve ``kernels.backend`` for tensors on ``device``: "torch", "cupy", or "auto" (both can run).

    "auto" stays "auto" only for CUDA tensors where CuPy can run; passed on to ``pack``,
    ``unpack`` and ``FlatBuffer`` it picks the faster path per move (see ``path_choice.py``).
    Raises ValueError for an unknown name and RuntimeError when "cupy" is asked for
    where it cannot run (CPU tensors, no CUDA, CuPy missing).
    """
    if name not in BACKENDS:
        raise ValueError(f"kernels.backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return "torch"
    device = torch.device("cpu" if device is None else device)
    if device.type != "cuda":
        if name == "cupy":
            raise RuntimeError(
                f"kernels.backend=cupy needs CUDA tensors, got tensors on {device}; "
                "set kernels.backend=auto or torch")
        return "torch"
    reason = cupy_unavailable_reason()
    if reason is None:
        return name
    if name == "cupy":
        raise RuntimeError(f"kernels.backend=cupy cannot run: {reason}; or set kernels.backend=auto")
    _say_fallback(reason)
    return "torch"
