"""QHM and QHAdam on a least-squares problem with the NumPy core, and through SciPy.

Run: python examples/numpy_qhm_least_squares.py
"""

import numpy as np
import scipy.optimize

import uniopt

rng = np.random.default_rng(0)
a = rng.standard_normal((200, 20))
b = a @ rng.standard_normal(20) + 0.01 * rng.standard_normal(200)
exact = np.linalg.lstsq(a, b, rcond=None)[0]


def fun(x):
    r = a @ x - b
    return 0.5 * float(r @ r) / len(b), a.T @ r / len(b)


# The stateful optimizer: arrays are updated in place.
qhm_x = x = np.zeros(20)
opt = uniopt.QHM([x], **uniopt.QHM.from_synthesized_nesterov(alpha=0.2, beta1=0.9, beta2=0.5))
for _ in range(500):
    opt.step([fun(x)[1]])
print(f"QHM (synthesized Nesterov) : |x - x*| = {np.linalg.norm(x - exact):.2e}")

# SciPy-style driver, and the same function handed to scipy.optimize.minimize.
res_uniopt = res = uniopt.minimize(fun, np.zeros(20), method="qhm", jac=True,
                      options=dict(lr=0.5, momentum=0.9, nu=0.7, gtol=1e-10, maxiter=5000))
print(f"uniopt.minimize(qhm)       : {res.message} nit={res.nit}, |x - x*| = {np.linalg.norm(res.x - exact):.2e}")
res = scipy.optimize.minimize(fun, np.zeros(20), method=uniopt.minimize_qhm, jac=True,
                              options=dict(lr=0.5, momentum=0.9, nu=0.7, gtol=1e-10, maxiter=5000))
print(f"scipy.optimize.minimize    : {res.message} nit={res.nit}, |x - x*| = {np.linalg.norm(res.x - exact):.2e}")

# The claim, checked by the tests: every run ends at the closed-form least-squares solution.
# minimize stops once every gradient component is <= gtol, so |grad| <= sqrt(d) gtol, which
# puts x within sqrt(d) gtol / lambda_min(A^T A / n) of it.
bound = np.sqrt(20) * 1e-10 / np.linalg.eigvalsh(a.T @ a / len(b))[0]
print(f"result qhm_distance={np.linalg.norm(qhm_x - exact):.3e} "
      f"minimize_distance={np.linalg.norm(res_uniopt.x - exact):.3e} "
      f"scipy_distance={np.linalg.norm(res.x - exact):.3e} gtol_bound={bound:.3e}")
