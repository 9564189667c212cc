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
    hurt when the machine is loaded). A non-negative integer; an integer-valued float such as
    ``1e6`` is accepted too. Anything else (``-5``, ``2.5``, ``abc``) raises ``ValueError``
    naming the variable and the value when ``uniopt`` is imported.
``UNIOPT_NUMBA_CACHE``
    ``0`` turns the on-disk kernel cache off.

Parallel kernels and ``fork``: Numba's parallel kernels run on its threading layer (GNU OpenMP
here: ``tbb`` is not installed, and ``workqueue`` is not safe for concurrent calls from several
threads, which ``nogil`` kernels allow). GNU OpenMP does not survive ``fork()``: a child that
runs a parallel region after its parent did is killed. So a process forked after the threading
layer started (a DataLoader worker, ``multiprocessing``'s ``fork`` context) runs the serial
kernels: :data:`PARALLEL_MIN_SIZE` becomes "never" in the child (``os.register_at_fork``), and
every caller reads it at call time. Results are the same; only the threads differ.
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
    "FORKED_SERIAL",
    "PARALLEL_MIN_SIZE",
    "cpu_kernel",
    "elementwise",
    "source_fingerprint",
]

CPU_OPTIONS = dict(error_model="numpy", fastmath=False, nogil=True)
ELEMENTWISE_OPTIONS = dict(error_model="numpy", fastmath=False, inline="always")

_never = 2**62


def _parse_min_size(name: str, text: str | None) -> int:
    """The value of a size variable: a non-negative integer (``1e6`` allowed), or ``ValueError``."""
    if text is None or not text.strip():
        return _never
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        if not number.is_integer():  # nan, inf, 2.5
            raise ValueError(f"Invalid {name}: {text!r} (expected a non-negative integer such as "
                             f"100000 or 1e5)") from None
        value = int(number)
    if value < 0:
        raise ValueError(f"Invalid {name}: {text!r} (expected a non-negative integer such as "
                         f"100000 or 1e5)")
    return value


PARALLEL_MIN_SIZE = _parse_min_size("UNIOPT_PARALLEL_MIN_SIZE",
                                    os.environ.get("UNIOPT_PARALLEL_MIN_SIZE"))
CACHE_ENABLED = os.environ.get("UNIOPT_NUMBA_CACHE", "1") != "0"


def _threading_layer_started() -> bool:
    try:
        from numba.np.ufunc import parallel
    except ImportError:  # pragma: no cover - numba's layout changed: assume the worst
        return True
    return bool(getattr(parallel, "_is_initialized", True))


def _serial_after_fork() -> None:
    """In a forked child of a process whose parallel threads started: serial kernels only."""
    global PARALLEL_MIN_SIZE, FORKED_SERIAL
    if PARALLEL_MIN_SIZE < _never and _threading_layer_started():
        PARALLEL_MIN_SIZE, FORKED_SERIAL = _never, True


FORKED_SERIAL = False  # True in a forked child that fell back to the serial kernels
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_serial_after_fork)

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
