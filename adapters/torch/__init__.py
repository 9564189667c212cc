"""PyTorch face of uniopt: ``torch.optim`` optimizers that run uniopt's kernels.

Importing this module imports torch (``import uniopt`` alone never does).
"""

from .polyak import PolyakSGD
from .ialm import iALM
from .qh import QHM, QHAdam, QHAdamW

__all__ = ["QHM", "QHAdam", "QHAdamW", "PolyakSGD", "iALM"]
