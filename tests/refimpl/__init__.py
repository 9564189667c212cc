"""Independent oracles for the tests (never shipped)."""
