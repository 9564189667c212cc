r"""Converters from other momentum methods to QHM / QHAdam hyper-parameters.

The same dictionaries as ``qhoptim.pyt`` (``{"lr", "momentum", "nu"}`` and
``{"lr", "betas", "nus"}``), available as classmethods on every backend's QHM and QHAdam, so a
user can write ``QHM(params, **QHM.from_pid(k_p, k_i, k_d))``.

All conversions rely on QHM's two-term recurrence (eliminate the momentum buffer):

.. math::
   \theta_{t+1} = \theta_t + \beta(\theta_t - \theta_{t-1}) - \alpha(1 - \nu\beta) g_t
                  + \alpha\beta(1 - \nu) g_{t-1}

Deviation from qhoptim: :meth:`QHMConversions.from_two_state_optimizer` returns the exact
``nu``. qhoptim's formula is right only when ``q == 1`` (see ``docs/deviations.md``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .._validation import check_conversion, pair, real

__all__ = [
    "QHMParams",
    "QHAdamParams",
    "from_pid",
    "from_synthesized_nesterov",
    "from_robust_momentum",
    "from_accsgd",
    "from_two_state_optimizer",
    "from_nadam",
    "QHMConversions",
    "QHAdamConversions",
]


class QHMParams(NamedTuple):
    alpha: float
    nu: float
    beta: float


class QHAdamParams(NamedTuple):
    alpha: float
    nu1: float
    nu2: float
    beta1: float
    beta2: float


def from_pid(k_p, k_i, k_d) -> QHMParams:
    """Recht (2018)'s PID controller with its derivative filter tied to ``k_d / (k_d - k_p)``."""
    return QHMParams(alpha=k_i, nu=k_p * k_p / (k_i * k_d), beta=k_d / (k_d - k_p))


def from_synthesized_nesterov(alpha, beta1, beta2) -> QHMParams:
    """Lessard, Recht & Packard (2016), Section 6: QHM's iterates are SNV's gradient points."""
    return QHMParams(alpha=alpha / (1.0 - beta1), nu=1.0 - ((1.0 - beta1) / beta1) * beta2, beta=beta1)


def from_robust_momentum(l, kappa, rho=None) -> QHMParams:
    """Robust Momentum (Cyrus et al., 2018); ``rho=None`` gives the Triple Momentum Method."""
    if rho is None:
        rho = 1.0 - 1.0 / math.sqrt(kappa)
    alpha = kappa * (1.0 - rho) ** 2 * (1.0 + rho) / l
    beta1 = kappa * rho**3 / (kappa - 1.0)
    beta2 = rho**3 / ((kappa - 1.0) * (1.0 - rho) ** 2 * (1.0 + rho))
    return from_synthesized_nesterov(alpha, beta1, beta2)


def from_accsgd(delta, kappa, xi, eps=0.7) -> QHMParams:
    """AccSGD (Kidambi, Netrapalli, Jain & Kakade, 2018)."""
    return QHMParams(
        alpha=delta * eps * (1.0 + xi) / (1.0 + eps),
        nu=(eps * xi - 1.0) / (eps * (1.0 + xi)),
        beta=(kappa - eps * eps * xi) / (kappa + eps * xi),
    )


def from_two_state_optimizer(h, k, l, m, q, z) -> QHMParams:
    r"""The two-state optimizer (TSO) of Ma & Yarats (2019).

    .. math::
       a_{t+1} = h a_t + k \theta_t + l g_t, \qquad \theta_{t+1} = m a_t + q \theta_t + z g_t

    Eliminating :math:`a` gives :math:`\theta_{t+2} = (h+q)\theta_{t+1} - (hq - km)\theta_t +
    z g_{t+1} + (lm - hz) g_t`. Matching QHM's recurrence requires the TSO's characteristic
    polynomial to have roots 1 and :math:`\beta` (``(1-h)(1-q) = km``), and then

    .. math::
       \beta = h + q - 1, \quad \alpha = \frac{hz - z - lm}{1 - \beta}, \quad
       \nu = \frac{\alpha + z}{\alpha\beta}

    (``beta`` is computed as the smaller root, as qhoptim does). The trajectories coincide from
    the start when :math:`a_0 = (1 - q)\theta_0 / m`. qhoptim returns a different ``nu`` that is
    right only for ``q == 1``; this function returns the exact one. With ``beta == 0`` every
    ``nu`` gives the same method and ``nu = 1`` is returned.
    """
    phi = math.sqrt((h - q) ** 2 + 4.0 * k * m)
    beta = (h + q - phi) / 2.0
    alpha = (h * z - z - l * m) / (1.0 - beta)
    nu = 1.0 if beta == 0.0 else (alpha + z) / (alpha * beta)
    return QHMParams(alpha=alpha, nu=nu, beta=beta)


def from_nadam(lr=1e-3, beta1=0.9, beta2=0.999) -> QHAdamParams:
    """NAdam (Dozat, 2016), up to the bias correction of the first moment."""
    return QHAdamParams(alpha=lr, nu1=beta1, nu2=1.0, beta1=beta1, beta2=beta2)


class QHMConversions:
    """Mixin giving a QHM class qhoptim's ``from_*`` classmethods.

    ``_conversion_keys`` names the constructor arguments for (learning rate, momentum, nu).
    """

    _conversion_keys = ("lr", "momentum", "nu")

    @classmethod
    def _params_to_dict(cls, params: QHMParams) -> dict:
        lr_key, momentum_key, nu_key = cls._conversion_keys
        return {lr_key: params.alpha, nu_key: params.nu, momentum_key: params.beta}

    @classmethod
    def from_pid(cls, k_p, k_i, k_d):
        """QHM hyper-parameters recovering Recht (2018)'s PID optimizer."""
        return cls._params_to_dict(check_conversion("from_pid", from_pid, k_p=k_p, k_i=k_i,
                                                    k_d=k_d))

    @classmethod
    def from_synthesized_nesterov(cls, alpha, beta1, beta2):
        """QHM hyper-parameters recovering the synthesized Nesterov variants (Lessard et al.)."""
        return cls._params_to_dict(check_conversion(
            "from_synthesized_nesterov", from_synthesized_nesterov, alpha=alpha, beta1=beta1,
            beta2=beta2))

    @classmethod
    def from_robust_momentum(cls, l, kappa, rho=None):
        """QHM hyper-parameters recovering Robust Momentum / the Triple Momentum Method."""
        return cls._params_to_dict(check_conversion(
            "from_robust_momentum", from_robust_momentum, ("rho",), l=l, kappa=kappa, rho=rho))

    @classmethod
    def from_accsgd(cls, delta, kappa, xi, eps=0.7):
        """QHM hyper-parameters recovering AccSGD (Kidambi et al., 2018)."""
        return cls._params_to_dict(check_conversion("from_accsgd", from_accsgd, delta=delta,
                                                    kappa=kappa, xi=xi, eps=eps))

    @classmethod
    def from_two_state_optimizer(cls, h, k, l, m, q, z):
        """QHM hyper-parameters recovering the two-state optimizer (exact ``nu``; see module doc)."""
        return cls._params_to_dict(check_conversion(
            "from_two_state_optimizer", from_two_state_optimizer, h=h, k=k, l=l, m=m, q=q, z=z))


class QHAdamConversions:
    """Mixin giving a QHAdam class qhoptim's ``from_nadam`` classmethod."""

    _conversion_keys = ("lr", "betas", "nus")

    @classmethod
    def from_nadam(cls, lr=1e-3, betas=(0.9, 0.999)):
        """QHAdam hyper-parameters approximating NAdam (Dozat, 2016)."""
        lr_key, betas_key, nus_key = cls._conversion_keys
        lr = real(lr_key, lr)  # named as the face names it (``learning_rate`` on JAX)
        beta1, beta2 = pair("betas", betas)
        params = check_conversion("from_nadam", from_nadam, lr=lr, beta1=beta1, beta2=beta2)
        return {lr_key: params.alpha, nus_key: (params.nu1, params.nu2),
                betas_key: (params.beta1, params.beta2)}
