"""Framework faces of uniopt: ``uniopt.adapters.torch`` and ``uniopt.adapters.jax``.

This package imports no framework; import the adapter you need explicitly.
"""
