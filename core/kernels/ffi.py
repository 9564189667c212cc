"""Reading XLA's FFI call frame from Numba: the pieces every ``numba.cfunc`` handler shares.

XLA's typed FFI (``api_version=1``) calls a handler ``XLA_FFI_Error* handler(XLA_FFI_CallFrame*)``.
The struct layouts below are those of ``xla/ffi/api/c_api.h`` (FFI API 0.3, shipped with jaxlib
under ``jax.ffi.include_dir()``), for a 64-bit platform: every ``struct_size``, pointer and
``int64_t`` is 8 bytes, enums are 4 bytes padded to 8 when a pointer follows.

``XLA_FFI_CallFrame``::

    0   size_t struct_size          40  XLA_FFI_Args  {struct_size, extension_start,
    8   Extension_Base* extension_start         int64 size @56, types* @64, void** args @72}
    16  const XLA_FFI_Api* api       80  XLA_FFI_Rets  {..., int64 size @96, types* @104,
    24  ExecutionContext* ctx                   void** rets @112}
    32  ExecutionStage stage        120 XLA_FFI_Attrs {..., int64 size @136, ...}
                                    168 XLA_FFI_Future* future

``XLA_FFI_Buffer``: ``struct_size`` @0, ``extension_start`` @8, ``dtype`` (enum) @16, ``data`` @24,
``rank`` @32, ``dims`` (int64*) @40.

Metadata query: before using a handler XLA may call it with ``extension_start`` pointing to an
``XLA_FFI_Metadata_Extension`` (``Extension_Base {struct_size, type @8, next}`` then
``XLA_FFI_Metadata* metadata`` @24). The handler fills ``metadata->api_version``
(``XLA_FFI_Api_Version {struct_size @8, extension_start @16, major @24, minor @28}``) and
``traits`` (@32, uint32) and returns NULL without touching any buffer.

Nothing here imports jax: the handlers are pure Numba over raw addresses, and the JAX adapter
registers them (``uniopt.adapters.jax._ffi``). Errors are not reported through the frame
(creating an ``XLA_FFI_Error`` needs the API's function table): the adapter checks every
dtype, shape and count before it emits a call, and a handler that still sees a layout it does
not know leaves its buffers untouched.
"""

from __future__ import annotations

import numba
from numba import types
from numba.extending import intrinsic

from ._pointers import view

__all__ = ["API_MAJOR", "API_MINOR", "F32", "F64", "frame_address", "answer_metadata",
           "arg_buffer", "ret_buffer", "n_args", "n_rets", "buffer_dtype", "buffer_data",
           "buffer_size", "load_i64", "arg_array", "ret_array"]

API_MAJOR = 0  # XLA_FFI_API_MAJOR of the header the layouts come from
API_MINOR = 3  # XLA_FFI_API_MINOR
F32 = 11  # XLA_FFI_DataType_F32
F64 = 12  # XLA_FFI_DataType_F64
_METADATA_EXTENSION = 1  # XLA_FFI_Extension_Metadata

_FRAME_EXTENSION = 8
_FRAME_ARGS_SIZE, _FRAME_ARGS = 56, 72
_FRAME_RETS_SIZE, _FRAME_RETS = 96, 112
_EXTENSION_TYPE, _EXTENSION_METADATA = 8, 24
_METADATA_VERSION, _METADATA_MAJOR, _METADATA_MINOR, _METADATA_TRAITS = 8, 24, 28, 32
_METADATA_TYPE_ID = 40
_VERSION_STRUCT_SIZE = 24  # XLA_FFI_Api_Version: up to and including minor_version
_BUFFER_DTYPE, _BUFFER_DATA, _BUFFER_RANK, _BUFFER_DIMS = 16, 24, 32, 40


@intrinsic
def frame_address(typingctx, pointer):
    """The ``void*`` handed to a cfunc as an int64 address."""

    def codegen(context, builder, sig, args):
        return builder.ptrtoint(args[0], context.get_value_type(types.int64))

    return types.int64(pointer), codegen


@intrinsic
def _i64_pointer(typingctx, address):
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int64)))

    return types.CPointer(types.int64)(address), codegen


@intrinsic
def _i32_pointer(typingctx, address):
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int32)))

    return types.CPointer(types.int32)(address), codegen


_inline = numba.njit(inline="always")


@_inline
def load_i64(address):
    """The int64 (or pointer) stored at ``address``."""
    return numba.carray(_i64_pointer(address), (1,))[0]


@_inline
def _load_i32(address):
    return numba.carray(_i32_pointer(address), (1,))[0]


@_inline
def _store_i64(address, value):
    numba.carray(_i64_pointer(address), (1,))[0] = value


@_inline
def _store_i32(address, value):
    numba.carray(_i32_pointer(address), (1,))[0] = value


@_inline
def answer_metadata(frame):
    """If ``frame`` is XLA's metadata query, answer it (API version, no traits): True.

    Returns False for a normal call, which the handler then executes.
    """
    extension = load_i64(frame + _FRAME_EXTENSION)
    if extension == 0 or _load_i32(extension + _EXTENSION_TYPE) != _METADATA_EXTENSION:
        return False
    metadata = load_i64(extension + _EXTENSION_METADATA)
    if metadata == 0:
        return True
    version = metadata + _METADATA_VERSION
    _store_i64(version, _VERSION_STRUCT_SIZE)
    _store_i64(version + 8, 0)  # extension_start
    _store_i32(metadata + _METADATA_MAJOR, API_MAJOR)
    _store_i32(metadata + _METADATA_MINOR, API_MINOR)
    _store_i32(metadata + _METADATA_TRAITS, 0)
    if load_i64(metadata) >= _METADATA_TYPE_ID + 8:  # the caller's struct has state_type_id
        _store_i64(metadata + _METADATA_TYPE_ID, 0)  # XLA_FFI_UNKNOWN_TYPE_ID: stateless
    return True


@_inline
def n_args(frame):
    return load_i64(frame + _FRAME_ARGS_SIZE)


@_inline
def n_rets(frame):
    return load_i64(frame + _FRAME_RETS_SIZE)


@_inline
def arg_buffer(frame, i):
    """Address of the ``XLA_FFI_Buffer`` of argument ``i`` (every argument is a buffer)."""
    return load_i64(load_i64(frame + _FRAME_ARGS) + 8 * i)


@_inline
def ret_buffer(frame, i):
    """Address of the ``XLA_FFI_Buffer`` of result ``i``."""
    return load_i64(load_i64(frame + _FRAME_RETS) + 8 * i)


@_inline
def buffer_dtype(buffer):
    return _load_i32(buffer + _BUFFER_DTYPE)


@_inline
def buffer_data(buffer):
    return load_i64(buffer + _BUFFER_DATA)


@_inline
def buffer_size(buffer):
    """Number of elements (the product of the dims; 1 for a scalar)."""
    rank = load_i64(buffer + _BUFFER_RANK)
    dims = load_i64(buffer + _BUFFER_DIMS)
    n = 1
    for r in range(rank):
        n *= load_i64(dims + 8 * r)
    return n


@_inline
def arg_array(frame, like, k):
    """Argument ``k`` as a flat array of ``like``'s dtype (its element count)."""
    buffer = arg_buffer(frame, k)
    return view(buffer_data(buffer), buffer_size(buffer), like)


@_inline
def ret_array(frame, like, k):
    """Result ``k`` as a flat array of ``like``'s dtype (its element count)."""
    buffer = ret_buffer(frame, k)
    return view(buffer_data(buffer), buffer_size(buffer), like)
