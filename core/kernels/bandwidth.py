"""A bandwidth yardstick: the memory traffic of a QHAdam step with trivial arithmetic.

The side-by-side benchmark (``asv_bench/``) times :func:`stream_table_` next to
``qh_cpu.qhadam_table_`` on the same pointer tables: the ratio of the two times is the fraction
of the reachable memory bandwidth the real kernel attains (``docs/performance.md``). It lives
here because every compiled kernel of uniopt is defined in this package, with the options of
:mod:`uniopt._jit`.
"""

from __future__ import annotations

from .. import _jit
from ._pointers import view

__all__ = ["BYTES_PER_PARAM", "stream_table_"]

#: Bytes moved per float32 element by a QHAdam step: read p, g, m, v; write p, m, v (7 x 4).
BYTES_PER_PARAM = 28


@_jit.cpu_kernel
def stream_table_(p_addrs, g_addrs, m_addrs, v_addrs, sizes, like):
    """Read p, g, m, v and write p, m, v over a pointer table, with trivial arithmetic.

    Each write is ``g - x``, so values stay bounded however often it runs.

    Args:
        p_addrs, g_addrs, m_addrs, v_addrs: int64 data addresses, one per tensor.
        sizes: int64 element counts, one per tensor.
        like: a one-element array of the tensors' dtype.
    """
    for t in range(sizes.size):
        n = sizes[t]
        p = view(p_addrs[t], n, like)
        g = view(g_addrs[t], n, like)
        m = view(m_addrs[t], n, like)
        v = view(v_addrs[t], n, like)
        for i in range(n):
            gi = g[i]
            p[i] = gi - p[i]
            m[i] = gi - m[i]
            v[i] = gi - v[i]
