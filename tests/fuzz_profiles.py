"""Hypothesis profiles of the property-based tests (a test helper, not a test module).

* ``"ci"`` (the default): few examples, no deadline (Numba compiles a kernel on its first call),
  derandomized so that a CI run is reproducible (the same examples every run);
* ``"fuzz"``: thousands of examples, random (``make fuzz`` selects it with
  ``HYPOTHESIS_PROFILE=fuzz``).

:func:`profile` is the settings object named by ``HYPOTHESIS_PROFILE`` (``"ci"`` when unset);
the fuzz tests decorate themselves with it, so they follow the variable whether or not
``conftest.py`` loaded a profile. Tests with their own ``@settings`` keep them.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["CI", "FUZZ", "profile", "register"]

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]

CI = "ci"
FUZZ = "fuzz"


def register() -> None:
    """Register the ``"ci"`` and ``"fuzz"`` profiles (idempotent)."""
    settings.register_profile(CI, max_examples=12, deadline=None, derandomize=True,
                              print_blob=True, suppress_health_check=_SLOW)
    settings.register_profile(FUZZ, max_examples=2000, deadline=None, print_blob=True,
                              suppress_health_check=_SLOW)


def name() -> str:
    """The profile named by ``HYPOTHESIS_PROFILE`` (``"ci"`` when unset)."""
    return os.environ.get("HYPOTHESIS_PROFILE", "").strip() or CI


def profile(max_examples: int | None = None, fuzz_max_examples: int | None = None) -> settings:
    """The settings of the selected profile (``"ci"`` when ``HYPOTHESIS_PROFILE`` names none).

    ``max_examples`` caps the example count of the ``"ci"`` profile and ``fuzz_max_examples``
    that of the ``"fuzz"`` one, for tests much slower per example than the rest (the CUDA
    simulator runs each thread as a Python thread).
    """
    register()
    chosen = settings.get_profile(name())
    cap = {CI: max_examples, FUZZ: fuzz_max_examples}.get(name())
    if cap is not None:
        return settings(chosen, max_examples=min(cap, chosen.max_examples))
    return chosen


register()
