r"""Bilevel optimization: the lower-level ``Dynamic`` (RAD, T-RAD, BDA, IAPTT-GM) for PyTorch.

The lower-level (LL) problem :math:`\min_w f(w, x)` is solved by :math:`T` steps of an inner
optimizer on a functional copy of the LL model, and the upper-level (UL) hypergradient
:math:`\nabla_x F(w_\tau(x), x)` is back-propagated through the unrolled trajectory:

.. math::
   w_{t+1} = \Phi_t(w_t, s_t, d_t), \qquad
   d_t = \nabla_w\left[(1 - \alpha_t) f + \alpha_t F\right](w_t, x), \qquad
   \alpha_t = \alpha\,\gamma^t

with :math:`\Phi_t` the inner optimizer's update (state :math:`s_t`), :math:`\alpha` =
``alpha``, :math:`\gamma` = ``alpha_decay``, :math:`T` = ``lower_loop``. Methods (the seed
toolbox's names):

* RAD (Franceschi et al. 2018): ``alpha=0``, everything differentiated, :math:`\tau = T`;
* BDA (Liu et al. 2020): ``alpha > 0``, the LL direction aggregates the UL gradient;
* T-RAD (Shaban et al. 2019): the first ``truncate_iters`` steps are not differentiated
  (Shaban's :math:`K = T -` ``truncate_iters`` last steps are);
* PTT (IAPTT-GM's pessimistic trajectory truncation, Liu et al. 2021): ``acquire_max_loss``,
  :math:`\tau = t^* = 1 + \arg\max_{t=0..T-1} F(w_{t+1})`;
* initialization auxiliary (IAPTT-GM): ``init_aux``, the LL initial point :math:`w_0` (the LL
  model's weights) is a UL variable and gets :math:`\partial F(w_\tau)/\partial w_0` too.

RAD/BDA are the LL direction, T-RAD/PTT exclusive truncations; all else combines.

References:
  Franceschi, Frasconi, Salzo, Grazzi & Pontil, "Bilevel programming for hyperparameter
  optimization and meta-learning", ICML 2018, https://arxiv.org/abs/1806.04910;
  Shaban, Cheng, Hatch & Boots, "Truncated back-propagation for bilevel optimization",
  AISTATS 2019, https://arxiv.org/abs/1810.10667;
  Liu, Mu, Yuan, Zeng & Zhang, "A generic first-order algorithmic framework for bi-level
  programming beyond lower-level singleton", ICML 2020, https://arxiv.org/abs/2006.04045;
  Liu, Liu, Zeng & Zhang, "Towards gradient-based bilevel optimization with non-convex
  followers and beyond", NeurIPS 2021, https://arxiv.org/abs/2110.00455
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

from uniopt._validation import boolean, check_bilevel_dynamic

from . import _unroll

__all__ = ["Dynamic", "DynamicResult"]


def _unflatten(flats: list, layout: list) -> list:
    """The LL parameters' tensors (in ``layout`` order) as views of the groups' flat vectors.

    A group of one tensor is one ``view``; a larger group is one ``split``. Either is a single
    node of the graph whose backward is a reshape or one concatenation, where a slice per
    tensor would zero-fill and copy the whole flat vector for every tensor, in every step's
    gradient and again in the hypergradient.
    """
    chunks = {}
    for k, flat in enumerate(flats):
        members = sorted((o, math.prod(shape)) for _, g, o, shape in layout if g == k)
        if len(members) == 1:
            chunks[(k, members[0][0])] = flat
        else:
            for (o, _), piece in zip(members, torch.split(flat, [n for _, n in members])):
                chunks[(k, o)] = piece
    return [chunks[(k, o)].view(shape) for _, k, o, shape in layout]


class _Objective(nn.Module):
    """Calls an objective with ``lower`` (the LL model) reparametrized by ``functional_call``."""

    def __init__(self, lower: nn.Module):
        super().__init__()
        self.lower = lower

    def forward(self, fn, data, target, upper):
        return fn({"data": data, "target": target, "upper_model": upper, "lower_model": self.lower})


@dataclasses.dataclass
class DynamicResult:
    """What :meth:`Dynamic.optimize` returns (pass it to :meth:`Dynamic.hypergrad`).

    Attributes:
      tstar: the PTT index :math:`t^*` in ``1..lower_loop`` (a 1-based step count) with
        ``acquire_max_loss``, else ``lower_loop``: the iterate the UL loss is evaluated at.
      ul_losses: ``F(w_1) .. F(w_T)`` (a float64 CPU tensor of shape ``(lower_loop,)``,
        computed under ``no_grad`` after each step) when validation data was given, else
        ``None``.
      flats: ``flats[t][k]``: the flat weight vector of LL param group ``k`` at ``w_t``,
        ``t = 0..lower_loop``. Iterates on the tape (between ``truncate_iters`` and ``tstar``)
        carry the graph back to the UL parameters; the truncated ones and, with PTT, those
        after ``tstar`` are detached (their graph is dropped at the end of the solve).
    """

    tstar: int
    ul_losses: torch.Tensor | None
    flats: list
    _layout: list = dataclasses.field(repr=False)  # (name, group, offset, shape) per LL param
    _init_leaves: list = dataclasses.field(repr=False, default_factory=list)
    _used: bool = dataclasses.field(repr=False, default=False)

    def weights(self, t: int) -> list:
        """The LL parameters' tensors at ``w_t`` (views of the flat vectors, in the order of
        ``ll_model.named_parameters()``), ``t = 0..lower_loop``."""
        return _unflatten(self.flats[t], self._layout)

    @property
    def params(self) -> list:
        """The LL parameters' tensors at the chosen iterate :math:`w_{t^*}` (``tstar``)."""
        return self.weights(self.tstar)

    @property
    def trajectory(self) -> list:
        """``[weights(0), ..., weights(lower_loop)]``: the whole LL trajectory."""
        return [self.weights(t) for t in range(len(self.flats))]


class Dynamic:
    r"""The lower-level dynamics of unrolled bilevel optimization (RAD, T-RAD, BDA, IAPTT-GM).

    ``optimize`` runs ``lower_loop`` steps of ``ll_opt``'s update rule from ``ll_model``'s
    current weights on a functional copy (``ll_model`` itself is not changed) and keeps the
    trajectory's graph; ``hypergrad`` evaluates the UL objective at the chosen iterate,
    *adds* :math:`\partial F / \partial x` into the UL parameters' ``.grad`` (and
    :math:`\partial F / \partial w_0` into ``ll_model``'s with ``init_aux``) and returns the UL
    loss. A normal ``ul_opt.step()`` follows::

        dyn = Dynamic(ll_objective, 20, ul_model, ul_objective, ll_model,
                      ll_opt=torch.optim.SGD(ll_model.parameters(), lr=0.1))
        for data, target, val_data, val_target in batches:
            ul_opt.zero_grad()
            result = dyn.optimize(data, target)
            dyn.hypergrad(result, val_data, val_target)
            ul_opt.step()

    Objectives are called as ``objective(state)`` with the mapping ``{"data", "target",
    "upper_model", "lower_model"}``; the LL objective gets the training batch, the UL objective
    the validation batch. ``"lower_model"`` is ``ll_model`` reparametrized by
    ``torch.func.functional_call`` with the current iterate's weights: calling it, and reading
    its parameters (``state["lower_model"].weight``, ``.parameters()``), both give the
    iterate. It returns a scalar tensor.

    Inner steps. The update rule and hyper-parameters of each param group of ``ll_opt`` are read
    at every ``optimize`` (schedulers work); its state starts fresh (zero) at every solve and
    ``ll_opt`` itself is never stepped. Supported: ``torch.optim.SGD`` (momentum, nesterov,
    weight_decay, maximize; ``dampening`` must be 0), ``torch.optim.Adam`` / ``AdamW`` (not
    ``amsgrad``), uniopt's ``QHM``, ``QHAdam``, ``QHAdamW``; each is executed as the QH rule of
    :mod:`uniopt.rules.qh` (see :mod:`uniopt.adapters.torch._unroll`). The weights of each
    param group are held as one flat vector (one dtype and device per group); gradients are
    taken with ``torch.autograd.grad(..., create_graph=True)`` with respect to those vectors
    only, so no ``.grad`` is touched while solving. A differentiable step runs the Numba
    forward + VJP kernels when available and the tensors allow it (``kernels``), else torch ops.
    Truncated steps (``truncate_iters``) run under ``no_grad``, in place, through a uniopt QHM /
    QHAdam (the shared dispatcher's kernels), at the true iterates; their state is carried on.

    Args:
      ll_objective: ``f(state) -> scalar tensor``, the LL loss.
      lower_loop: :math:`T >= 1`, the number of LL steps per solve.
      ul_model: the module holding the UL variables :math:`x` (its parameters get the
        hypergradient).
      ul_objective: ``F(state) -> scalar tensor``, the UL loss.
      ll_model: the LL model (its parameters are :math:`w_0`).
      acquire_max_loss: PTT: back-propagate from :math:`t^* = 1 + \arg\max_t F(w_{t+1})`
        (first on ties; the argmax is a constant) instead of :math:`T`. Needs validation data
        in ``optimize``. The graph of the steps after :math:`t^*` is built during the solve
        (``t^*`` is known only at the end) and dropped when it ends.
      alpha: BDA's :math:`\alpha \in [0, 1]` (0: RAD, the LL gradient alone). ``alpha > 0`` needs
        validation data in ``optimize``.
      truncate_iters: T-RAD: the number of *leading* steps not differentiated, in
        ``[0, lower_loop)`` (the toolbox's convention; Shaban et al.'s :math:`K` =
        ``lower_loop - truncate_iters``). Exclusive with ``acquire_max_loss``.
      ll_opt: the LL optimizer (over exactly ``ll_model``'s parameters): it supplies the update
        rule and its hyper-parameters. Required (``None`` is an error).
      alpha_decay: :math:`\gamma \in (0, 1]`, :math:`\alpha_t = \alpha\gamma^t` (decays through
        truncated steps too).
      init_aux: the initialization auxiliary: ``hypergrad`` also accumulates
        :math:`\partial F/\partial w_0` into ``ll_model``'s ``.grad`` (zeros under T-RAD:
        :math:`w_0` is not on the tape).
      warm_start: after ``hypergrad``, copy the last LL iterate :math:`w_T` (detached; not
        :math:`w_{t^*}`) into ``ll_model``, so the next solve starts there. Otherwise every
        solve starts from ``ll_model``'s weights as they are (policy "reset").
      checkpoint: wrap every differentiable step in
        ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the graph keeps only
        each step's inputs and the step is recomputed during ``hypergrad`` (less memory, about
        one more LL gradient per step of time); the results are the same.
      kernels: ``None`` (auto): the Numba unroll kernels when present and applicable, except
        for plain SGD (momentum 0), whose step is one torch ``add`` (an axpy: torch's op is
        already one pass, and cheaper than a kernel call); ``True``: require them (``RuntimeError`` at ``optimize`` when they cannot run); ``False``: torch
        ops only.

    Raises:
      TypeError: a non-callable objective, a model that is not an ``nn.Module``, an ``ll_opt``
        that is not a supported optimizer, a flag that is not a bool, a non-integer count.
      ValueError: ``lower_loop < 1``, ``truncate_iters`` outside ``[0, lower_loop)``, T-RAD
        with PTT, ``alpha`` outside [0, 1], ``alpha_decay`` outside (0, 1], ``ll_opt`` ``None``
        or over other parameters than ``ll_model``'s, unsupported optimizer options
        (``dampening``, ``amsgrad``).

    Deviations from the seed toolbox (BOHML/BOAT; ``docs/deviations.md``): T-RAD's truncated
    steps are taken at the true iterates and add nothing to the UL ``.grad``; the
    initialization auxiliary really moves :math:`w_0`; no ``higher``.
    """

    def __init__(self, ll_objective: Callable, lower_loop: int, ul_model: nn.Module,
                 ul_objective: Callable, ll_model: nn.Module, acquire_max_loss: bool = False,
                 alpha: float = 0.0, truncate_iters: int = 0, ll_opt=None, *,
                 alpha_decay: float = 1.0, init_aux: bool = False, warm_start: bool = False,
                 checkpoint: bool = False, kernels: bool | None = None):
        checked = check_bilevel_dynamic(ll_objective, ul_objective, lower_loop, acquire_max_loss,
                                        alpha, truncate_iters, alpha_decay, init_aux, warm_start,
                                        checkpoint)
        (self.lower_loop, self.acquire_max_loss, self.alpha, self.truncate_iters,
         self.alpha_decay, self.init_aux, self.warm_start, self.checkpoint) = checked
        if kernels is not None:
            kernels = boolean("kernels value", kernels)
        self.kernels = kernels
        for what, model in (("ul_model", ul_model), ("ll_model", ll_model)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"Invalid {what}: {type(model).__name__} (expected a torch.nn.Module)")
        if ll_opt is None:
            raise ValueError("Invalid ll_opt: None (expected a torch optimizer over ll_model's "
                             "parameters)")
        if not isinstance(ll_opt, torch.optim.Optimizer):
            raise TypeError(f"Invalid ll_opt: {type(ll_opt).__name__} (expected one of "
                            f"{', '.join(_unroll.SUPPORTED)})")
        self.ll_objective, self.ul_objective = ll_objective, ul_objective
        self.ul_model, self.ll_model, self.ll_opt = ul_model, ll_model, ll_opt
        self._wrapper = _Objective(ll_model)
        self._layout = self._check_layout()
        _unroll.group_rules(ll_opt)  # raises for unsupported optimizers and options

    # ------------------------------------------------------------------------------------------
    def _check_layout(self) -> list:
        """``(name, group, offset, shape)`` per LL parameter; checks ``ll_opt``'s groups."""
        named = list(self.ll_model.named_parameters())
        where = {}
        for k, group in enumerate(self.ll_opt.param_groups):
            for p in group["params"]:
                where[id(p)] = k
        ids = {id(p) for _, p in named}
        if set(where) != ids:
            raise ValueError(f"Invalid ll_opt: {type(self.ll_opt).__name__} over "
                             f"{len(where)} tensors that are not exactly ll_model's "
                             f"{len(ids)} parameters")
        self._groups = [list(group["params"]) for group in self.ll_opt.param_groups]
        offsets = {}
        for k, params in enumerate(self._groups):
            if not params:
                raise ValueError(f"Invalid ll_opt: param group {k} is empty")
            if len({(p.dtype, p.device) for p in params}) > 1:
                raise ValueError(f"Invalid ll_opt: param group {k} mixes dtypes or devices "
                                 "(Dynamic keeps each group as one flat vector)")
            o = 0
            for p in params:
                offsets[id(p)] = o
                o += p.numel()
        return [(name, where[id(p)], offsets[id(p)], tuple(p.shape)) for name, p in named]

    def _initial(self) -> list:
        """``w_0`` per group: with ``init_aux`` a differentiable concatenation of ``ll_model``'s
        parameters, else a detached copy (a leaf that requires grad)."""
        flats = []
        for params in self._groups:
            if self.init_aux:
                flats.append(torch.cat([p.reshape(-1) for p in params]))
            else:
                with torch.no_grad():
                    flat = torch.cat([p.reshape(-1) for p in params])
                flats.append(flat.requires_grad_(True))
        return flats

    def _views(self, flats: list) -> dict:
        tensors = _unflatten(flats, self._layout)
        return {"lower." + name: w for (name, *_), w in zip(self._layout, tensors)}

    def _call(self, fn, flats, data, target):
        return functional_call(self._wrapper, self._views(flats), (fn, data, target, self.ul_model))

    def _ll_loss(self, flats, alpha_t, batch):
        data, target, val_data, val_target = batch
        loss = self._call(self.ll_objective, flats, data, target)
        if self.alpha > 0.0:
            ul = self._call(self.ul_objective, flats, val_data, val_target)
            loss = (1.0 - alpha_t) * loss + alpha_t * ul
        return loss

    def _grads(self, loss, flats, create_graph):
        return torch.autograd.grad(loss, flats, create_graph=create_graph, allow_unused=True,
                                   materialize_grads=True)

    # ------------------------------------------------------------------------------------------
    def _diff_step(self, kinds, coefficients, alpha_t, batch, use_kernel, sizes, *tensors):
        """One differentiable step: ``tensors`` = the groups' flats, then their state tensors."""
        n = len(kinds)
        flats, rest = list(tensors[:n]), tensors[n:]
        loss = self._ll_loss(flats, alpha_t, batch)
        grads = self._grads(loss, flats, True)
        new_flats, new_states, i = [], [], 0
        for kind, c, w, g, size, kernel in zip(kinds, coefficients, flats, grads, sizes, use_kernel):
            buffers = tuple(rest[i:i + size])
            i += size
            w_new, buffers = _unroll.diff_step(kind, c, w, g, buffers, kernel)
            new_flats.append(w_new)
            new_states.extend(buffers)
        return (*new_flats, *new_states)

    def _use_kernels(self, rules, flats, states) -> list:
        if self.kernels is False:
            return [False] * len(rules)
        use = []
        for rule, w, (buffers, _) in zip(rules, flats, states):
            if self.kernels is None and rule.kind == "sgd":
                # plain SGD is one axpy: torch's own op is already one pass (measured: the
                # kernel Function's call costs more than it saves); QHM/QHAdam take the kernels
                use.append(False)
                continue
            w = w.detach()
            ok = _unroll.kernel_supported(w, w, *buffers)
            if self.kernels and not ok:
                raise RuntimeError(
                    "Dynamic(kernels=True): the Numba unroll kernels "
                    + ("cannot take these tensors (need plain 1-D contiguous float32/float64 "
                       "CPU or CUDA tensors)" if _unroll.kernel_available() else "are not available"))
            use.append(ok)
        return use

    def _record(self, flats, val_data, val_target) -> float:
        with torch.no_grad():
            return float(self._call(self.ul_objective, flats, val_data, val_target))

    def optimize(self, data, target, val_data=None, val_target=None) -> DynamicResult:
        r"""Run one LL solve of ``lower_loop`` steps from ``ll_model``'s current weights.

        Args:
          data, target: the LL (training) batch, passed to ``ll_objective``.
          val_data, val_target: the UL (validation) batch, passed to ``ul_objective``; needed
            for BDA (``alpha > 0``) and PTT; when given, ``F(w_t)`` is recorded after each step.

        Returns:
          A :class:`DynamicResult`: the trajectory, ``tstar`` and the UL losses. Its graph is
          consumed by one :meth:`hypergrad` call.

        Raises:
          ValueError: BDA or PTT without validation data; ``ll_opt``'s groups changed.
        """
        if (self.alpha > 0.0 or self.acquire_max_loss) and val_data is None:
            method = "PTT (acquire_max_loss=True)" if self.acquire_max_loss else f"BDA (alpha={self.alpha})"
            raise ValueError(f"Invalid val_data: None ({method} needs validation data)")
        current = [list(g["params"]) for g in self.ll_opt.param_groups]
        if len(current) != len(self._groups) or any(
                len(a) != len(b) or any(x is not y for x, y in zip(a, b))
                for a, b in zip(current, self._groups)):
            self._layout = self._check_layout()
        rules = _unroll.group_rules(self.ll_opt)
        kinds = [r.kind for r in rules]
        batch = (data, target, val_data, val_target)
        record = val_data is not None
        T, k_drop = self.lower_loop, self.truncate_iters
        losses: list = []
        with torch.enable_grad():
            flats = self._initial()
            init_leaves = [p for params in self._groups for p in params] if self.init_aux else []
            trajectory = [flats]
            states = [_unroll.initial_state(r, w) for r, w in zip(rules, flats)]
            t = 0
            if k_drop > 0:  # T-RAD: graph-free steps in place on the dispatcher's kernels
                runner = _unroll.TruncatedRunner(rules, [w.detach().clone() for w in flats])
                for t in range(k_drop):
                    views = [f.detach().requires_grad_(True) for f in runner.flats]
                    loss = self._ll_loss(views, self.alpha * self.alpha_decay ** t, batch)
                    grads = self._grads(loss, views, False)
                    del loss, views
                    runner.step([g.detach() for g in grads])
                    if record:
                        losses.append(self._record(runner.flats, val_data, val_target))
                    if t + 1 < k_drop:
                        trajectory.append([f.detach().clone() for f in runner.flats])
                states = runner.carry()
                flats = [f.detach().requires_grad_(True) for f in runner.flats]
                trajectory.append(flats)
                t = k_drop
            use_kernel = self._use_kernels(rules, flats, states)
            scalars = [s[1] for s in states]
            tensors = [b for s in states for b in s[0]]
            sizes = [len(s[0]) for s in states]
            for t in range(t, T):
                coefficients = []
                for k, r in enumerate(rules):
                    c, scalars[k] = _unroll.advance(r, scalars[k])
                    coefficients.append(c)
                step = functools.partial(self._diff_step, kinds, coefficients,
                                         self.alpha * self.alpha_decay ** t, batch, use_kernel,
                                         sizes)
                if self.checkpoint:
                    out = torch.utils.checkpoint.checkpoint(step, *flats, *tensors,
                                                            use_reentrant=False)
                else:
                    out = step(*flats, *tensors)
                flats, tensors = list(out[:len(rules)]), list(out[len(rules):])
                trajectory.append(flats)
                if record:
                    losses.append(self._record(flats, val_data, val_target))
            del tensors, out
        ul_losses = torch.tensor(losses, dtype=torch.float64) if record else None
        tstar = T
        if self.acquire_max_loss:
            tstar = 1 + max(range(T), key=lambda i: (losses[i], -i))  # first index on ties
            for s in range(tstar + 1, T + 1):  # drop the graph after t*
                trajectory[s] = [w.detach() for w in trajectory[s]]
        return DynamicResult(tstar, ul_losses, trajectory, self._layout, init_leaves)

    def hypergrad(self, result: DynamicResult, val_data, val_target) -> torch.Tensor:
        r"""Accumulate the hypergradient of the UL loss at the chosen iterate; return the loss.

        Evaluates :math:`L = F(w_\tau)` (:math:`\tau` = ``result.tstar``) through the unrolled
        graph and *adds* :math:`\partial L/\partial x` into the ``.grad`` of ``ul_model``'s
        parameters (``None`` becomes the gradient; a parameter the loss does not reach is left
        as it is) with ``torch.autograd.grad`` (no ``.backward()``). With ``init_aux`` also
        :math:`\partial L/\partial w_0` into ``ll_model``'s parameters (zeros where :math:`w_0`
        does not reach :math:`L`, as under T-RAD). Then, with ``warm_start``, copies
        :math:`w_T` (detached) into ``ll_model``.

        Args:
          result: what :meth:`optimize` returned (usable once: its graph is freed here).
          val_data, val_target: the UL batch passed to ``ul_objective``.

        Returns:
          The UL loss :math:`L` (detached).
        """
        if result._used:
            raise RuntimeError("Dynamic.hypergrad: this result's graph was already used "
                               "(call optimize again)")
        ul_params = [p for p in self.ul_model.parameters() if p.requires_grad]
        leaves = list(result._init_leaves)
        with torch.enable_grad():
            loss = self._call(self.ul_objective, result.flats[result.tstar], val_data, val_target)
            inputs = ul_params + leaves
            grads = torch.autograd.grad(loss, inputs, allow_unused=True) if inputs else ()
        result._used = True
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(inputs, grads)):
                if g is None:
                    if i < len(ul_params):
                        continue
                    g = torch.zeros_like(p)
                if p.grad is None:
                    p.grad = g.detach()
                else:
                    p.grad.add_(g)
            if self.warm_start:
                for p, w in zip(self.ll_model.parameters(), result.weights(len(result.flats) - 1)):
                    p.copy_(w)
        return loss.detach()
