"""``python -m uniopt info``: what this installation of uniopt runs on.

The demo (``examples/demo.py``, ``make demo``) and the side-by-side benchmark
(``asv_bench/table.py``, ``make bench``) live outside the package: they import torch and JAX,
which the package never does.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import sys

__all__ = ["main", "info"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _backend_status(module: str) -> str:
    try:
        importlib.import_module(module)
        return "available"
    except Exception as exc:  # an adapter whose framework is missing or broken
        return f"unavailable ({type(exc).__name__}: {exc})"


def _cuda_status() -> str:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "numba-cuda simulator (NUMBA_ENABLE_CUDASIM=1)"
    try:
        from numba import cuda
    except Exception as exc:
        return f"numba.cuda unavailable ({exc})"
    try:
        if cuda.is_available():
            return f"CUDA device: {cuda.get_current_device().name.decode()}"
    except Exception as exc:
        return f"no CUDA device ({type(exc).__name__})"
    return "no CUDA device"


def info() -> int:
    """Print versions, available backends, Numba's threading layer and the CUDA situation."""
    import numba

    import uniopt

    from . import _jit

    print(f"uniopt {uniopt.__version__} ({os.path.dirname(uniopt.__file__)})")
    print(f"python {sys.version.split()[0]} on {platform.platform()}, {os.cpu_count()} CPUs")
    for dist in ("numpy", "scipy", "numba", "numba-cuda", "torch", "jax", "jaxlib", "optax"):
        print(f"  {dist:<11} {_version(dist)}")
    print("backends:")
    print("  numpy (core)            available")
    print(f"  uniopt.adapters.torch   {_backend_status('uniopt.adapters.torch')}")
    print(f"  uniopt.adapters.jax     {_backend_status('uniopt.adapters.jax')}")
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "not initialised yet (no parallel kernel has run)"
    print(f"numba threading layer: {layer}; threads: {numba.config.NUMBA_NUM_THREADS}")
    print(f"numba kernel cache: {'on' if _jit.CACHE_ENABLED else 'off'}; parallel kernels from "
          f"{'never' if _jit.PARALLEL_MIN_SIZE >= 2**62 else _jit.PARALLEL_MIN_SIZE} params")
    print(f"cuda: {_cuda_status()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: ``info`` is its one command (argparse exits 2 on anything else)."""
    parser = argparse.ArgumentParser(prog="python -m uniopt", description="uniopt command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends, threading layer, CUDA")
    parser.parse_args(argv)
    return info()


if __name__ == "__main__":
    sys.exit(main())
