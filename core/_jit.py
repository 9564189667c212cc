"""The one place where Numba options live.

Every compiled kernel of uniopt is made by a helper of this module, so the flags that matter
(see ``docs/performance.md``) are set once:

* ``error_model="numpy"``: the default Python error model adds a zero-division check to every
  division and stops SIMD vectorisation (4-7x slower).
* ``fastmath=False``: memory-bound loops gain nothing from it, and it makes results depend on
  how a loop is split between vector body and scalar tail.
* ``cache=True`` for CPU kernels, with a cache key that includes a fingerprint of the sources
  kernels compile from (``rules/``, ``kernels/`` and this module; :func:`fingerprinted_files`).
  Numba's key covers only the kernel's own bytecode, so an edit to a rule that a kernel inlines
  from another module would otherwise load a stale kernel; an edit to a face or to the command
  line recompiles nothing.

Nothing is compiled at import: Numba compiles a dispatcher on its first call.

Environment variables (read once, at import):

``UNIOPT_PARALLEL_MIN_SIZE``
    Parameter count of one group from which the CPU kernels run their parallel (``prange``)
    variant. Default: never (serial kernels; parallel threads help little on small machines and
    hurt when the machine is loaded).
``UNIOPT_NUMBA_CACHE``
    ``0`` turns the on-disk kernel cache off.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
from numba.core.caching import FunctionCache

__all__ = [
    "CPU_OPTIONS",
    "ELEMENTWISE_OPTIONS",
    "PARALLEL_MIN_SIZE",
    "cpu_kernel",
    "elementwise",
    "source_fingerprint",
]

CPU_OPTIONS = dict(error_model="numpy", fastmath=False, nogil=True)
ELEMENTWISE_OPTIONS = dict(error_model="numpy", fastmath=False, inline="always")

_never = 2**62
PARALLEL_MIN_SIZE = int(os.environ.get("UNIOPT_PARALLEL_MIN_SIZE", _never))
CACHE_ENABLED = os.environ.get("UNIOPT_NUMBA_CACHE", "1") != "0"

_PACKAGE_DIR = Path(__file__).resolve().parent
_fingerprint: str | None = None


def fingerprinted_files(package_dir: Path | None = None) -> list[Path]:
    """The sources a kernel can compile from: ``rules/*.py``, ``kernels/*.py`` and this module.

    Faces (``qh.py``, ``polyak.py``, ...), the command line and the adapters are left out:
    editing them must not invalidate every cached kernel.

    Args:
        package_dir: The core package's folder (default: the installed one).

    Returns:
        The files, sorted by their path relative to ``package_dir``.
    """
    base = _PACKAGE_DIR if package_dir is None else Path(package_dir)
    files = [*base.joinpath("rules").glob("*.py"), *base.joinpath("kernels").glob("*.py"),
             base / Path(__file__).name]
    return sorted(files, key=lambda path: path.relative_to(base).as_posix())


def fingerprint_of(package_dir: Path) -> str:
    """The SHA-256 over the relative path and bytes of every file of ``fingerprinted_files``."""
    package_dir = Path(package_dir)
    digest = hashlib.sha256()
    for path in fingerprinted_files(package_dir):
        digest.update(path.relative_to(package_dir).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def source_fingerprint() -> str:
    """The fingerprint of the installed package's kernel sources (computed once per process)."""
    global _fingerprint
    if _fingerprint is None:
        _fingerprint = fingerprint_of(_PACKAGE_DIR)
    return _fingerprint


class _FingerprintedCache(FunctionCache):
    """Numba's function cache, keyed also on the fingerprint of uniopt's sources."""

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + (source_fingerprint(),)


def cpu_kernel(fn=None, *, parallel: bool = False):
    """Decorate a top-level function as a cached Numba CPU kernel.

    Each cached kernel must be its own top-level definition: closures made by one factory share
    a cache entry in Numba, and their flags are not part of the key.
    """

    def wrap(f):
        dispatcher = numba.njit(parallel=parallel, **CPU_OPTIONS)(f)
        if CACHE_ENABLED and not getattr(numba.config, "DISABLE_JIT", False):
            dispatcher._cache = _FingerprintedCache(f)
        return dispatcher

    return wrap if fn is None else wrap(fn)


def elementwise(fn):
    """Compile a rule written on scalars as an always-inlined Numba helper."""
    if getattr(numba.config, "DISABLE_JIT", False):
        return fn
    return numba.njit(**ELEMENTWISE_OPTIONS)(fn)
