"""``uniopt.adapters.torch.dual_optim``: humancompatible-train's import path for :class:`iALM`.

``from uniopt.adapters.torch.dual_optim import iALM`` works where code was written for
``from humancompatible.train.dual_optim import iALM``; the class lives in
:mod:`uniopt.adapters.torch.ialm`.
"""

from .ialm import iALM

__all__ = ["iALM"]
