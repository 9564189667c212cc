"""uniopt.minimize and the SciPy custom methods against SciPy's own behaviour (scipy 1.17).

Every situation is run through both entry points -- ``uniopt.minimize(method="qhm")`` and
``scipy.optimize.minimize(method=uniopt.minimize_qhm)`` (which hands ``bounds``,
``constraints``, ``hess``, ``tol``... to the custom method) -- and compared with what SciPy's
unconstrained ``"BFGS"`` does in the same situation (warning class and text, status, message).
"""

from __future__ import annotations

import ast
import inspect
import warnings

import numpy as np
import pytest
import scipy.optimize

import uniopt

METHODS = {
    "qhm": (uniopt.minimize_qhm, dict(lr=0.05, momentum=0.9, nu=0.7)),
    "qhadam": (uniopt.minimize_qhadam, dict(lr=0.05, nus=(0.7, 1.0), eps=1e-3)),
    "polyak": (uniopt.minimize_polyak, dict(max_stepsize=10.0)),
}


def quadratic(x):
    """f = ||x - c||^2 / 2 with its minimum (0) at c = (2, -3, 4), outside [0, 1]^3."""
    c = np.array([2.0, -3.0, 4.0])
    return 0.5 * float((x - c) @ (x - c)), x - c


X0 = np.zeros(3)
BOUNDS = [(0.0, 1.0)] * 3
CONSTRAINTS = [{"type": "ineq", "fun": lambda x: 1.0 - x[0]}]


def via_uniopt(name, **kwargs):
    options = dict(METHODS[name][1], **kwargs.pop("options", {}))
    return uniopt.minimize(quadratic, X0, method=name, jac=True, options=options, **kwargs)


def via_scipy(name, **kwargs):
    method, hyper = METHODS[name]
    options = dict(hyper, **kwargs.pop("options", {}))
    return scipy.optimize.minimize(quadratic, X0, method=method, jac=True, options=options, **kwargs)


ENTRY_POINTS = {"uniopt": via_uniopt, "scipy": via_scipy}


def bfgs(**kwargs):
    return scipy.optimize.minimize(quadratic, X0, method="BFGS", jac=True, **kwargs)


def runtime_warnings(fn) -> tuple:
    """``(messages of the RuntimeWarnings fn raised, fn's result)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)], result


# ----------------------------------------------------------------------------------------------
# bounds, constraints, hess: warned about as SciPy's BFGS does, and not applied
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", METHODS)
def test_bounds_warn_like_scipy_unconstrained_methods(entry, name):
    scipy_messages, _ = runtime_warnings(lambda: bfgs(bounds=BOUNDS))
    assert scipy_messages == ["Method BFGS cannot handle bounds."]
    with pytest.warns(RuntimeWarning, match=f"^Method {name} cannot handle bounds\\.$"):
        result = ENTRY_POINTS[entry](name, bounds=BOUNDS, options=dict(maxiter=5000))
    messages, _ = runtime_warnings(lambda: ENTRY_POINTS[entry](name, bounds=BOUNDS))
    assert messages == [m.replace("BFGS", name) for m in scipy_messages]
    # The run is unconstrained: x leaves the box, as BFGS's does, and equals the bound-free run.
    assert result.success and np.abs(result.x).max() > 1.0
    free = ENTRY_POINTS[entry](name, options=dict(maxiter=5000))
    np.testing.assert_array_equal(result.x, free.x)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", METHODS)
def test_constraints_and_hessians_warn_like_scipy(entry, name):
    hess = lambda x: np.eye(3)  # noqa: E731
    hessp = lambda x, p: p  # noqa: E731
    expected, _ = runtime_warnings(lambda: bfgs(constraints=CONSTRAINTS, hess=hess, hessp=hessp))
    assert len(expected) == 3
    messages, result = runtime_warnings(
        lambda: ENTRY_POINTS[entry](name, constraints=CONSTRAINTS, hess=hess, hessp=hessp,
                                    options=dict(maxiter=3)))
    assert sorted(messages) == sorted(m.replace("BFGS", name) for m in expected)
    assert result.nit == 3
    # A single dict constraint counts too; an empty tuple (SciPy's default) does not.
    with pytest.warns(RuntimeWarning, match="cannot handle constraints"):
        ENTRY_POINTS[entry](name, constraints=CONSTRAINTS[0], options=dict(maxiter=1))
    assert runtime_warnings(lambda: ENTRY_POINTS[entry](name, constraints=(),
                                                        options=dict(maxiter=1)))[0] == []


# ----------------------------------------------------------------------------------------------
# callbacks
# ----------------------------------------------------------------------------------------------
def stop_after(k, how="raise"):
    seen = []

    def callback(xk):
        seen.append(np.copy(xk))
        if len(seen) >= k:
            if how == "raise":
                raise StopIteration
            return True
        return None

    return callback, seen


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", METHODS)
def test_callback_stop_iteration_is_status_99_as_scipy(entry, name):
    callback, seen = stop_after(3)
    want = bfgs(callback=callback)
    assert len(seen) == 3
    assert (want.status, want.success, want.nit) == (99, False, 3)
    callback, seen = stop_after(3)
    got = ENTRY_POINTS[entry](name, callback=callback)
    assert (got.status, got.success, got.message, got.nit) == (want.status, want.success,
                                                               want.message, want.nit)
    assert got.message == "`callback` raised `StopIteration`."
    # x is the point the callback saw last, and fun/jac are evaluated there.
    assert len(seen) == 3
    np.testing.assert_array_equal(got.x, seen[-1])
    f, g = quadratic(got.x)
    assert got.fun == f
    np.testing.assert_array_equal(got.jac, g)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", METHODS)
def test_callback_returning_true_stops_and_says_so(entry, name):
    callback, seen = stop_after(4, how="return")
    scipy_result = bfgs(callback=callback)  # SciPy's minimize methods ignore the return value
    assert scipy_result.status == 0
    callback, seen = stop_after(4, how="return")
    got = ENTRY_POINTS[entry](name, callback=callback)
    assert (got.status, got.success, got.nit, len(seen)) == (99, False, 4, 4)
    assert got.message == "`callback` returned `True`."
    assert "StopIteration" not in got.message
    # Any other return value (None, 1, "stop") goes on.
    for value in (None, 1, "stop", False):
        result = ENTRY_POINTS[entry](name, callback=lambda xk, v=value: v, options=dict(maxiter=7))
        assert (result.status, result.nit) == (1, 7)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_callback_signatures_as_scipy(entry):
    """``callback(intermediate_result)`` gets an OptimizeResult (x, fun), anything else x."""
    for which, call in (("bfgs", lambda cb: bfgs(callback=cb, options=dict(maxiter=2))),
                        ("ours", lambda cb: ENTRY_POINTS[entry]("qhm", callback=cb,
                                                                options=dict(maxiter=2)))):
        results, arrays = [], []
        call(lambda intermediate_result: results.append(intermediate_result))
        call(lambda xk, intermediate_result=None: arrays.append((xk, intermediate_result)))
        assert len(results) == len(arrays) == 2, which
        assert isinstance(results[0], scipy.optimize.OptimizeResult), which
        assert results[0].fun == quadratic(results[0].x)[0], which
        assert isinstance(arrays[0][0], np.ndarray) and arrays[0][1] is None, which


# ----------------------------------------------------------------------------------------------
# tol, maxiter
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_tol_sets_gtol_unless_given(name):
    want = via_uniopt(name, options=dict(gtol=1e-3, maxiter=5000))
    assert want.success and np.abs(want.jac).max() <= 1e-3
    for result in (via_uniopt(name, tol=1e-3, options=dict(maxiter=5000)),
                   via_scipy(name, tol=1e-3, options=dict(maxiter=5000))):
        assert result.success
        np.testing.assert_array_equal(result.x, want.x)
        assert result.nit == want.nit
    tighter = via_uniopt(name, options=dict(gtol=1e-9, maxiter=20000))
    assert tighter.nit > want.nit
    # An explicit gtol wins over tol, as in SciPy (BFGS: options.setdefault("gtol", tol)).
    for result in (via_uniopt(name, tol=1e-3, options=dict(gtol=1e-9, maxiter=20000)),
                   via_scipy(name, tol=1e-3, options=dict(gtol=1e-9, maxiter=20000))):
        np.testing.assert_array_equal(result.x, tighter.x)
    assert bfgs(tol=1e-3, options=dict(gtol=1e-9)).nit >= bfgs(tol=1e-3).nit
    with pytest.raises(ValueError, match="Invalid tol value: -1"):
        via_uniopt(name, tol=-1.0)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("maxiter,error,message", [
    (2.5, TypeError, "Invalid maxiter value: 2.5"),
    (float("inf"), TypeError, "Invalid maxiter value: inf"),
    (True, TypeError, "Invalid maxiter value: True"),
    ("10", TypeError, "Invalid maxiter value: '10'"),
    (-1, ValueError, "Invalid maxiter value: -1"),
])
def test_maxiter_must_be_a_nonnegative_integer(entry, name, maxiter, error, message):
    with pytest.raises(error, match="^" + message.replace(".", r"\.")):
        ENTRY_POINTS[entry](name, options=dict(maxiter=maxiter))


@pytest.mark.parametrize("name", METHODS)
def test_maxiter_counts_steps(name):
    for maxiter in (0, 1, np.int64(6), 4.0):  # an integer-valued float counts, as in SciPy
        result = via_uniopt(name, options=dict(maxiter=maxiter))
        assert (result.status, result.nit) == (1, int(maxiter))
        assert result.message == bfgs(options=dict(maxiter=1)).message  # SciPy's words
    assert via_uniopt(name, options=dict(maxiter=0)).x.tolist() == X0.tolist()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unknown_options_warn_with_scipys_class(entry):
    with pytest.warns(scipy.optimize.OptimizeWarning, match="Unknown solver options: learning_rate"):
        ENTRY_POINTS[entry]("qhm", options=dict(learning_rate=0.1, maxiter=1))
    with pytest.warns(scipy.optimize.OptimizeWarning, match="Unknown solver options: learning_rate"):
        bfgs(options=dict(learning_rate=0.1, maxiter=1))


def test_method_names_and_callables():
    a = uniopt.minimize(quadratic, X0, method="QHM", jac=True, options=dict(maxiter=3))
    b = uniopt.minimize(quadratic, X0, method=uniopt.minimize_qhm, jac=True, options=dict(maxiter=3))
    np.testing.assert_array_equal(a.x, b.x)
    with pytest.raises(ValueError, match="Invalid method: 'bfgs'"):
        uniopt.minimize(quadratic, X0, method="bfgs", jac=True)
    with pytest.raises(ValueError, match="Invalid method: 3"):
        uniopt.minimize(quadratic, X0, method=3, jac=True)


def test_signature_is_scipys():
    ours = list(inspect.signature(uniopt.minimize).parameters)
    theirs = list(inspect.signature(scipy.optimize.minimize).parameters)
    assert ours == theirs


# ----------------------------------------------------------------------------------------------
# One module for every method
# ----------------------------------------------------------------------------------------------
def _imports(path) -> list:
    """``(module, level, inside_function)`` for every import in the file at ``path``."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                out.append((child.module or "", child.level, in_function))
            elif isinstance(child, ast.Import):
                out.extend((alias.name, 0, in_function) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return out


def test_one_minimize_module_without_an_import_cycle():
    import uniopt._minimize as minimize_module
    import uniopt.polyak as polyak_module

    for method in (uniopt.minimize_qhm, uniopt.minimize_qhadam, uniopt.minimize_polyak):
        assert method.__module__ == "uniopt._minimize"
    assert set(minimize_module.METHODS.values()) == {uniopt.minimize_qhm, uniopt.minimize_qhadam,
                                                     uniopt.minimize_polyak}
    polyak_imports = _imports(polyak_module.__file__)
    minimize_imports = _imports(minimize_module.__file__)
    assert not any("_minimize" in module for module, _, _ in polyak_imports)
    assert ("polyak", 1, False) in minimize_imports
    # No import of a uniopt module inside a function, in either file.
    for module, level, in_function in polyak_imports + minimize_imports:
        assert not (in_function and (level > 0 or module.startswith("uniopt"))), module
