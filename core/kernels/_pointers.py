"""Turning raw addresses into typed Numba arrays inside kernels.

A pointer table (int64 addresses plus sizes) lets one kernel call walk over any number of
tensors owned by NumPy or torch without building a Python list of arrays per call.
"""

from __future__ import annotations

import ctypes

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

__all__ = ["address_as_pointer", "view", "addresses"]


@intrinsic
def address_as_pointer(typingctx, address, like):
    """``address`` (int64) as a pointer to elements of ``like``'s dtype."""
    pointer_type = types.CPointer(like.dtype)
    signature = pointer_type(address, like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return signature, codegen


def view(address, size, like):
    """A 1-D array of ``size`` elements of ``like``'s dtype starting at ``address``."""
    return numba.carray(address_as_pointer(address, like), (size,))


if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: the same kernels run as plain Python
    def view(address, size, like):  # noqa: F811
        c_type = np.ctypeslib.as_ctypes_type(like.dtype)
        pointer = ctypes.cast(ctypes.c_void_p(int(address)), ctypes.POINTER(c_type))
        return np.ctypeslib.as_array(pointer, (int(size),))
else:
    view = numba.njit(inline="always")(view)


def addresses(arrays) -> np.ndarray:
    """Data addresses of NumPy arrays (0 for ``None``) as an int64 array."""
    return np.array([0 if a is None else a.ctypes.data for a in arrays], dtype=np.int64)
