"""Compiled kernels: Numba CPU kernels (``*_cpu``) and numba.cuda kernels (``*_cuda``).

Kernels update flat arrays in place, validate nothing and never allocate per element. CPU
kernels take a *table* of tensors (raw data addresses and sizes), so one call updates a whole
parameter group, whatever its number of tensors. The CUDA module is imported lazily (importing
``numba.cuda`` costs time and needs no GPU until a kernel runs).
"""
