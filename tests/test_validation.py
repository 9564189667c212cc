"""One validation policy (uniopt._validation), table-driven over every face of the QH family
and the minimize options.

Every public optimizer of the NumPy, torch and JAX faces (QHM, QHAdam, QHAdamW; qhm, qhadam,
qhadamw, scale_by_qhm, scale_by_qhadam) and ``uniopt.minimize``'s methods are built with each
bad value; the exception type is checked, and the message must name the argument and show the
value (``Invalid learning rate: -1.0``). A second table checks that what qhoptim 1.1.0 accepts
we accept too, and a third that what we reject on purpose qhoptim does accept (so the list in
docs/deviations.md is true).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import qhoptim.pyt as qhoptim
import torch

import uniopt
from uniopt.adapters import torch as uniopt_torch

import jax
import optax
from uniopt.adapters import jax as uniopt_jax  # noqa: E402

NAN, INF = math.nan, math.inf
QHM_DEFAULTS = dict(lr=0.1, momentum=0.9, nu=0.7)


def _quadratic(x):
    return float(x @ x), 2 * x


# ----------------------------------------------------------------------------------------------
# The faces: build(**kwargs) with qhoptim's argument names (lr, ...)
# ----------------------------------------------------------------------------------------------
def _numpy(cls, defaults=None):
    return lambda **kw: cls([np.zeros(2)], **{**(defaults or {}), **kw})


def _torch(cls, defaults=None):
    return lambda **kw: cls([torch.zeros(2, requires_grad=True)], **{**(defaults or {}), **kw})


def _jax(factory, defaults=None, lr="learning_rate"):
    def build(**kw):
        kw = {**(defaults or {}), **kw}
        if "lr" in kw:
            value = kw.pop("lr")
            if lr is not None:
                kw[lr] = value
        return factory(**kw)

    return build


def _minimize(method, defaults=None):
    def build(**kw):
        options = {**(defaults or {}), **kw}
        return uniopt.minimize(_quadratic, np.ones(2), method=method, jac=True,
                               options=dict(options, maxiter=1))

    return build


def _scipy(method, defaults=None):
    def build(**kw):
        from scipy.optimize import minimize

        options = {**(defaults or {}), **kw}
        return minimize(_quadratic, np.ones(2), method=method, jac=True,
                        options=dict(options, maxiter=1))

    return build


QHM_FACES = {
    "numpy.QHM": _numpy(uniopt.QHM, QHM_DEFAULTS),
    "torch.QHM": _torch(uniopt_torch.QHM, QHM_DEFAULTS),
    "jax.qhm": _jax(uniopt_jax.qhm, QHM_DEFAULTS),
    "jax.scale_by_qhm": _jax(lambda momentum, nu, **kw: uniopt_jax.scale_by_qhm(momentum, nu),
                             QHM_DEFAULTS, lr=None),
    "minimize.qhm": _minimize("qhm"),
    "scipy.minimize_qhm": _scipy(uniopt.minimize_qhm),
}
QHADAM_FACES = {
    "numpy.QHAdam": _numpy(uniopt.QHAdam),
    "numpy.QHAdamW": _numpy(uniopt.QHAdamW),
    "torch.QHAdam": _torch(uniopt_torch.QHAdam),
    "torch.QHAdamW": _torch(uniopt_torch.QHAdamW),
    "jax.qhadam": _jax(uniopt_jax.qhadam),
    "jax.qhadamw": _jax(uniopt_jax.qhadamw),
    "jax.scale_by_qhadam": _jax(uniopt_jax.scale_by_qhadam, lr=None),
    "minimize.qhadam": _minimize("qhadam"),
    "scipy.minimize_qhadam": _scipy(uniopt.minimize_qhadam),
}
# Which faces take which argument (the rest have no such argument).
NO_MAXIMIZE = {"jax.", "minimize.", "scipy."}
ONLY = {
    "maximize": lambda face: not face.startswith(tuple(NO_MAXIMIZE)),
    "decouple_weight_decay": lambda face: not face.endswith(("W", "w", "scale_by_qhadam")),
    "lr": lambda face: "scale_by" not in face,
    "weight_decay": lambda face: "scale_by" not in face,
    "weight_decay_type": lambda face: "scale_by" not in face,
    "b1": lambda face: face.startswith("jax."),
    "b2": lambda face: face.startswith("jax."),
    "nu1": lambda face: face.startswith("jax."),
    "nu2": lambda face: face.startswith("jax."),
}

# (argument, bad value, exception, the message's start: "Invalid <argument>: <value>")
QHM_BAD = [
    ("lr", -1.0, ValueError, "Invalid learning rate: -1.0"),
    ("lr", INF, ValueError, "Invalid learning rate: inf"),
    ("lr", NAN, ValueError, "Invalid learning rate: nan"),
    ("lr", "0.1", TypeError, "Invalid learning rate: '0.1'"),
    ("lr", None, TypeError, "Invalid learning rate: None"),
    ("momentum", 1.5, ValueError, "Invalid momentum value: 1.5"),
    ("momentum", 1.0, ValueError, "Invalid momentum value: 1.0"),
    ("momentum", -0.1, ValueError, "Invalid momentum value: -0.1"),
    ("momentum", NAN, ValueError, "Invalid momentum value: nan"),
    ("momentum", "0.9", TypeError, "Invalid momentum value: '0.9'"),
    ("nu", INF, ValueError, "Invalid nu value: inf"),
    ("nu", NAN, ValueError, "Invalid nu value: nan"),
    ("nu", [0.7], TypeError, "Invalid nu value: [0.7]"),
    ("weight_decay", -1e-4, ValueError, "Invalid weight_decay value: -0.0001"),
    ("weight_decay", INF, ValueError, "Invalid weight_decay value: inf"),
    ("weight_decay", "0", TypeError, "Invalid weight_decay value: '0'"),
    ("weight_decay_type", "l2", ValueError, "Invalid weight_decay_type value: 'l2'"),
    ("weight_decay_type", None, ValueError, "Invalid weight_decay_type value: None"),
    ("maximize", 1, TypeError, "Invalid maximize value: 1"),
    ("maximize", "yes", TypeError, "Invalid maximize value: 'yes'"),
    ("maximize", None, TypeError, "Invalid maximize value: None"),
]
QHADAM_BAD = [
    ("lr", -1e-3, ValueError, "Invalid learning rate: -0.001"),
    ("lr", INF, ValueError, "Invalid learning rate: inf"),
    ("lr", "fast", TypeError, "Invalid learning rate: 'fast'"),
    ("eps", -1e-8, ValueError, "Invalid epsilon value: -1e-08"),
    ("eps", INF, ValueError, "Invalid epsilon value: inf"),
    ("eps", NAN, ValueError, "Invalid epsilon value: nan"),
    ("eps", None, TypeError, "Invalid epsilon value: None"),
    ("betas", (1.0, 0.999), ValueError, "Invalid beta parameter at index 0: 1.0"),
    ("betas", (1.5, 0.999), ValueError, "Invalid beta parameter at index 0: 1.5"),
    ("betas", (-0.1, 0.999), ValueError, "Invalid beta parameter at index 0: -0.1"),
    ("betas", (0.9, NAN), ValueError, "Invalid beta parameter at index 1: nan"),
    ("betas", (0.9, "x"), TypeError, "Invalid beta parameter at index 1: 'x'"),
    ("betas", (0.9,), ValueError, "Invalid betas: (0.9,)"),
    ("betas", (0.9, 0.99, 0.999), ValueError, "Invalid betas: (0.9, 0.99, 0.999)"),
    ("betas", 0.9, TypeError, "Invalid betas: 0.9"),
    ("betas", "ab", TypeError, "Invalid betas: 'ab'"),
    ("nus", (NAN, 1.0), ValueError, "Invalid nu parameter at index 0: nan"),
    ("nus", (1.0, INF), ValueError, "Invalid nu parameter at index 1: inf"),
    ("nus", (0.7,), ValueError, "Invalid nus: (0.7,)"),
    ("nus", 0.7, TypeError, "Invalid nus: 0.7"),
    ("weight_decay", -0.1, ValueError, "Invalid weight_decay value: -0.1"),
    ("weight_decay", INF, ValueError, "Invalid weight_decay value: inf"),
    ("decouple_weight_decay", 1, TypeError, "Invalid decouple_weight_decay value: 1"),
    ("decouple_weight_decay", "yes", TypeError, "Invalid decouple_weight_decay value: 'yes'"),
    ("maximize", 0, TypeError, "Invalid maximize value: 0"),
    ("b1", 1.0, ValueError, "Invalid b1 value: 1.0"),
    ("b2", -0.1, ValueError, "Invalid b2 value: -0.1"),
    ("b1", "0.9", TypeError, "Invalid b1 value: '0.9'"),
    ("nu1", NAN, ValueError, "Invalid nu1 value: nan"),
    ("nu2", INF, ValueError, "Invalid nu2 value: inf"),
    ("nu2", None, TypeError, "Invalid nu2 value: None"),
]


def _cases(faces, table):
    out = []
    for face, build in faces.items():
        for arg, value, exc, message in table:
            if arg in ONLY and not ONLY[arg](face):
                continue
            out.append(pytest.param(build, arg, value, exc, message, id=f"{face}-{arg}={value!r}"))
    return out


def _check_message(message: str, arg: str, value, text: str) -> None:
    assert message.startswith(text), (message, text)
    # It names the argument (qhoptim's words for lr/eps/betas/nus) and shows the value.
    names = {"lr": "learning rate", "eps": "epsilon", "betas": "beta", "nus": "nu"}
    assert names.get(arg, arg) in message
    shown = repr(value) if isinstance(value, (str, list, type(None))) else str(value)
    if not isinstance(value, tuple) or "index" not in text:
        assert shown in message
    else:
        assert any(str(v) in message or repr(v) in message for v in value)


@pytest.mark.parametrize("build,arg,value,exc,message", _cases(QHM_FACES, QHM_BAD)
                         + _cases(QHADAM_FACES, QHADAM_BAD))
def test_bad_value_raises_naming_argument_and_value(build, arg, value, exc, message):
    with pytest.raises(exc) as info:
        build(**{arg: value})
    _check_message(str(info.value), arg, value, message)


# ----------------------------------------------------------------------------------------------
# Param groups (NumPy, torch) go through the same checks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,params", [
    (uniopt.QHM, lambda: [np.zeros(2)]),
    (uniopt_torch.QHM, lambda: [torch.zeros(2, requires_grad=True)]),
])
def test_param_groups_use_the_same_policy(cls, params):
    opt = cls(params(), **QHM_DEFAULTS)
    for arg, value, exc, message in [("momentum", 1.5, ValueError, "Invalid momentum value: 1.5"),
                                     ("lr", INF, ValueError, "Invalid learning rate: inf"),
                                     ("maximize", 1, TypeError, "Invalid maximize value: 1")]:
        with pytest.raises(exc, match="^" + re.escape(message)):
            opt.add_param_group({"params": params(), arg: value})
    assert len(opt.param_groups) == 1


# ----------------------------------------------------------------------------------------------
# minimize options and the Polyak method
# ----------------------------------------------------------------------------------------------
MINIMIZE_BAD = [
    ("maxiter", 2.5, TypeError, "Invalid maxiter value: 2.5"),
    ("maxiter", True, TypeError, "Invalid maxiter value: True"),
    ("maxiter", -1, ValueError, "Invalid maxiter value: -1"),
    ("gtol", -1e-5, ValueError, "Invalid gtol value: -1e-05"),
    ("gtol", NAN, ValueError, "Invalid gtol value: nan"),
    ("gtol", "x", TypeError, "Invalid gtol value: 'x'"),
    ("tol", -1.0, ValueError, "Invalid tol value: -1.0"),
    ("max_stepsize", -1.0, ValueError, "Invalid max_stepsize value: -1.0"),
    ("max_stepsize", INF, ValueError, "Invalid max_stepsize value: inf"),
    ("delta", -0.5, ValueError, "Invalid delta value: -0.5"),
    ("momentum", -0.5, ValueError, "Invalid momentum value: -0.5"),
    ("fun_min", NAN, ValueError, "Invalid fun_min value: nan"),
    ("variant", "sps", ValueError, "Invalid variant value: 'sps'"),
]
POLYAK_ONLY = {"max_stepsize", "delta", "momentum", "fun_min", "variant"}


MINIMIZE_CASES = [pytest.param(method, *row, id=f"{method}-{row[0]}={row[1]!r}")
                  for method in ("qhm", "qhadam", "polyak") for row in MINIMIZE_BAD
                  if method == "polyak" or row[0] not in POLYAK_ONLY]


@pytest.mark.parametrize("method,arg,value,exc,message", MINIMIZE_CASES)
def test_minimize_options(method, arg, value, exc, message):
    defaults = QHM_DEFAULTS if method == "qhm" else {}
    for build in (_minimize(method, defaults),
                  _scipy(getattr(uniopt, f"minimize_{method}"), defaults)):
        if arg == "maxiter":
            call = lambda: uniopt.minimize(_quadratic, np.ones(2), method=method, jac=True,  # noqa: E731
                                           options=dict(defaults, maxiter=value))
        else:
            call = lambda: build(**{arg: value})  # noqa: E731
        with pytest.raises(exc) as info:
            call()
        _check_message(str(info.value), arg, value, message)


# ----------------------------------------------------------------------------------------------
# Against qhoptim's own checks
# ----------------------------------------------------------------------------------------------
def _qhoptim(cls, defaults=None):
    return lambda **kw: cls([torch.zeros(2, requires_grad=True)], **{**(defaults or {}), **kw})


QHOPTIM_ACCEPTS = [  # (QHM or QHAdam, kwargs): valid for qhoptim, so valid for every face
    ("QHM", dict(lr=0.0)),
    ("QHM", dict(lr=1)),
    ("QHM", dict(lr=np.float32(0.5))),
    ("QHM", dict(momentum=0.0)),
    ("QHM", dict(momentum=0.999999)),
    ("QHM", dict(nu=-2.5)),
    ("QHM", dict(nu=3.0)),
    ("QHM", dict(weight_decay=0.5, weight_decay_type="direct")),
    ("QHAdam", dict(lr=0.0, eps=0.0)),
    ("QHAdam", dict(betas=(0.0, 0.0))),
    ("QHAdam", dict(betas=[0.5, 0.999999])),
    ("QHAdam", dict(nus=(-1.0, 2.0))),
    ("QHAdam", dict(weight_decay=1e-2, decouple_weight_decay=True)),
    ("QHAdam", dict(decouple_weight_decay=np.bool_(False))),
]


@pytest.mark.parametrize("which,kwargs", QHOPTIM_ACCEPTS, ids=[f"{w}-{k}" for w, k in QHOPTIM_ACCEPTS])
def test_what_qhoptim_accepts_we_accept(which, kwargs):
    if which == "QHM":
        _qhoptim(qhoptim.QHM, QHM_DEFAULTS)(**kwargs)
        faces = QHM_FACES
    else:
        _qhoptim(qhoptim.QHAdam)(**kwargs)
        faces = QHADAM_FACES
    for face, build in faces.items():
        if any(arg in ONLY and not ONLY[arg](face) for arg in kwargs):
            continue
        build(**kwargs)


DELIBERATE = [  # qhoptim accepts these; every face rejects them (docs/deviations.md)
    ("QHM", "momentum", 1.0, ValueError),
    ("QHM", "momentum", 1.5, ValueError),
    ("QHM", "lr", INF, ValueError),
    ("QHM", "lr", NAN, ValueError),
    ("QHM", "nu", NAN, ValueError),
    ("QHM", "weight_decay", INF, ValueError),
    ("QHAdam", "lr", INF, ValueError),
    ("QHAdam", "eps", INF, ValueError),
    ("QHAdam", "nus", (NAN, 1.0), ValueError),
    ("QHAdam", "decouple_weight_decay", 1, TypeError),
]


@pytest.mark.parametrize("which,arg,value,exc", DELIBERATE,
                         ids=[f"{w}-{a}={v!r}" for w, a, v, _ in DELIBERATE])
def test_deliberate_rejections_are_accepted_by_qhoptim(which, arg, value, exc):
    reference = _qhoptim(qhoptim.QHM, QHM_DEFAULTS) if which == "QHM" else _qhoptim(qhoptim.QHAdam)
    reference(**{arg: value})
    faces = QHM_FACES if which == "QHM" else QHADAM_FACES
    tried = 0
    for face, build in faces.items():
        if arg in ONLY and not ONLY[arg](face):
            continue
        with pytest.raises(exc):
            build(**{arg: value})
        tried += 1
    assert tried >= 4


# ----------------------------------------------------------------------------------------------
# check_polyak: the same policy for the solver's fields (bools, integers)
# ----------------------------------------------------------------------------------------------
POLYAK_FIELDS_BAD = [
    ("has_aux", 1, TypeError, "Invalid has_aux value: 1"),
    ("has_aux", "no", TypeError, "Invalid has_aux value: 'no'"),
    ("maxiter", 2.5, TypeError, "Invalid maxiter value: 2.5"),
    ("maxiter", -3, ValueError, "Invalid maxiter value: -3"),
    ("tol", -1e-3, ValueError, "Invalid tol value: -0.001"),
    ("verbose", "yes", TypeError, "Invalid verbose value: 'yes'"),
]


@pytest.mark.parametrize("arg,value,exc,message", POLYAK_FIELDS_BAD,
                         ids=[f"{a}={v!r}" for a, v, _, _ in POLYAK_FIELDS_BAD])
def test_check_polyak_fields(arg, value, exc, message):
    from uniopt._validation import check_polyak

    valid = dict(fun_min=0.0, variant="SPS_max", max_stepsize=1.0, delta=0.0, momentum=False)
    check_polyak(**valid, has_aux=np.bool_(True), maxiter=np.int32(5), tol=0.0, verbose=2)
    with pytest.raises(exc) as info:
        check_polyak(**valid, **{arg: value})
    _check_message(str(info.value), arg, value, message)
