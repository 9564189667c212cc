"""Fixed cost per step: 100 tensors of 4 elements each, where the arithmetic is negligible and
what is left is Python, dispatch and per-tensor overhead."""

from .common import build

OPTIMIZERS = [
    "uniopt_torch_qhadam",
    "uniopt_torch_qhm",
    "torch_adam_fused",
    "torch_adam_foreach",
    "torch_sgd_momentum",
    "uniopt_torch_polyak",
    "torch_sgd",
    "qhoptim_qhadam",
    "qhoptim_qhm",
    "uniopt_jax_qhadam",
    "optax_adam",
    "uniopt_numpy_qhadam",
    "kernel_qhadam",
]


class FixedCost:
    """One step on 100 tensors x 4 elements (float32); params are contenders.CASES keys."""

    params = [OPTIMIZERS]
    param_names = ["optimizer"]
    timeout = 300

    def setup(self, optimizer):
        self.step = build(optimizer, 0, "tiny")

    def time_step(self, optimizer):
        self.step()
