"""iALM dual steps (issue 4): uniopt against humancompatible-train 0.4.x.

* ``UnioptTorchIALM`` / ``UnioptNumpyIALM`` / ``HumancompatibleIALM``: ``time_update`` of one
  ``update(c)`` (one constraint group of ``m`` float32 constraints, momentum 0.5, fixed ``c``)
  of ``uniopt.adapters.torch.dual_optim.iALM``, ``uniopt.iALM`` and
  ``humancompatible.train.dual_optim.iALM`` with the same settings (``contenders.IALM``).
* ``...ForwardUpdate``: the same with ``forward_update(loss, c)`` (the training loop's call; ``c``
  a leaf that requires grad).
* ``IALMSpeedup.track_ratio`` / ``IALMForwardUpdateSpeedup.track_ratio``: humancompatible-train
  time / uniopt torch time, measured interleaved in one process (goals: >= 5 for ``update`` at
  1e5 and more constraints; > 1 for ``forward_update`` at every size).
"""

from . import common  # noqa: F401, I001  (first: pins the process before any thread pool)

from . import contenders  # noqa: E402

SIZES = list(contenders.IALM_SIZES)
_REPEAT, _MIN_TIME = 7, 0.05


def _build(name, m):
    try:
        return contenders.build_ialm(name, m)
    except contenders.Unavailable as exc:
        raise NotImplementedError(str(exc)) from exc


class _IALMStep:
    case = ""
    params = [SIZES]
    param_names = ["m"]
    timeout = 300

    def setup(self, m):
        self.update = _build(self.case, m)

    def teardown(self, m):
        self.update = None

    def time_update(self, m):
        self.update()


class UnioptTorchIALM(_IALMStep):
    """uniopt.adapters.torch.dual_optim.iALM(...).update(c)."""

    case = "uniopt_torch_ialm"


class UnioptNumpyIALM(_IALMStep):
    """uniopt.iALM(...).update(c) on ndarrays."""

    case = "uniopt_numpy_ialm"


class HumancompatibleIALM(_IALMStep):
    """humancompatible.train.dual_optim.iALM(...).update(c)."""

    case = "hct_ialm"


class UnioptTorchIALMForwardUpdate(_IALMStep):
    """uniopt.adapters.torch.dual_optim.iALM(...).forward_update(loss, c), c requires grad."""

    case = "uniopt_torch_ialm_fu"


class HumancompatibleIALMForwardUpdate(_IALMStep):
    """humancompatible.train.dual_optim.iALM(...).forward_update(loss, c), c requires grad."""

    case = "hct_ialm_fu"


class IALMSpeedup:
    """humancompatible-train update time / uniopt torch update time (goal >= 5 at m >= 1e5),
    one process, interleaved repeats (higher is better)."""

    params = [SIZES]
    param_names = ["m"]
    timeout = 600

    reference, ours = "hct_ialm", "uniopt_torch_ialm"

    def setup_cache(self):
        out = {}
        for m in SIZES:
            try:
                steps = {name: _build(name, m) for name in (self.reference, self.ours)}
            except NotImplementedError as exc:
                out[m] = str(exc)
                continue
            out[m] = contenders.paired_ratio(steps, self.reference, self.ours, _REPEAT, _MIN_TIME)
        return out

    def setup(self, ratios, m):
        if isinstance(ratios[m], str):
            raise NotImplementedError(ratios[m])

    def track_ratio(self, ratios, m):
        return ratios[m]

    track_ratio.unit = "ratio"


class IALMForwardUpdateSpeedup(IALMSpeedup):
    """humancompatible-train forward_update time / uniopt torch forward_update time (goal > 1
    at every size), one process, interleaved repeats (higher is better)."""

    reference, ours = "hct_ialm_fu", "uniopt_torch_ialm_fu"
