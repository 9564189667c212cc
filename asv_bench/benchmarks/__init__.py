"""uniopt's asv benchmarks (one module per area; shared settings in ``common``)."""
