"""How one step of a uniopt torch optimizer runs, so the optimizer classes need not care.

Each parameter of a param group goes one of three ways:

* **table** -- CPU, float32/float64, contiguous parameter, gradient and state: the group's
  tensors of one dtype are updated by *one* call of a Numba table kernel
  (:mod:`uniopt.kernels.qh_cpu`), which reads and writes the tensors' memory in place through
  their data addresses (no copies);
* **cuda** -- CUDA, float32/float64, contiguous: one numba.cuda kernel launch per tensor on the
  current torch stream (when numba-cuda is installed and not in simulator mode);
* **torch** -- anything else (non-contiguous tensors, float16/bfloat16, other devices, a forced
  ``backend="torch"``): the same rule executed with torch ops (``uniopt.rules.bind(...,
  sqrt=torch.sqrt)``) under ``torch.no_grad()``, results ``copy_``-ed into place.

The address tables of parameters and state are cached per group and rebuilt when the group's
parameters or their data pointers change, when ``opt.state`` is replaced (``load_state_dict``)
or when a parameter gets its state. Scalar state (QHAdam's ``beta1_weight``...) lives in the
table between steps and is written back to the state dicts after every kernel call. Gradients
are checked and their addresses read at every step (``zero_grad()`` usually replaces them): a
gradient the kernel cannot read as it is (non-contiguous, another size or dtype) takes the
torch path for that step. The cache keeps references to the state tensors it points to, so a
kernel never writes to freed memory; replacing state tensors or scalars by hand (instead of via
``load_state_dict``) requires :meth:`Dispatcher.invalidate` (``opt._dispatcher.invalidate()``).

A step is all-or-nothing: every group is checked (sparse or mismatched gradients, state that
does not fit its parameter) before the first tensor is touched.

Three hooks make the dispatcher serve rules whose "gradient" or state is not torch's:

* **given gradients** -- ``collect(..., grads=...)`` takes each parameter's gradient from the
  caller instead of ``p.grad`` (iALM's constraint values; a dual optimizer's violation vector;
  a bilevel solver's hypergradient). They are checked as ``p.grad`` would be, plus device and
  dtype (torch guarantees those only for ``p.grad``); a tensor the kernel cannot read takes
  the torch path. A table's rows' given gradients are in ``table.grads`` for its kernel call;
* **state where the face keeps it** -- :meth:`Rule.state_of` says where a parameter's state
  dict is (default ``optimizer.state[p]``; iALM: its one-tensor group, humancompatible-train's
  layout) and :meth:`Rule.new_state` where a new one goes. For state outside
  ``optimizer.state`` the cached tables are re-checked at every step against the buffer
  tensors the dict holds then (replacing one by hand needs no :meth:`Dispatcher.invalidate`);
* **results** -- a rule with ``returns = True`` has :meth:`Dispatcher.run` return what its
  ``run_table``/``run_cuda``/``run_torch`` calls returned (a step size, a norm), one list per
  group; an exception raised there stops the step at that group (a rule that must change
  nothing on a failed step raises before it writes, as iALM's kernel does).

Only the memory of *plain* tensors ever reaches a kernel (:func:`local_view`): a parameter,
gradient or state buffer of exact type ``torch.Tensor`` or ``torch.nn.Parameter``. A DTensor
(FSDP2's ``fully_shard``, tensor parallelism) with ``Shard``/``Replicate`` placements runs on
its local tensor (``to_local()``, with its gradient's and state's local tensors, when the
gradient has the parameter's placements); any other tensor subclass (wrappers with
``__torch_dispatch__``/``__torch_function__``, DTensors with ``Partial`` placements) takes the
torch path on the tensors themselves, so the subclass sees ordinary torch ops. Complex tensors
follow ``torch.optim``: they are updated as real pairs (``torch.view_as_real``), on every path.
"""

from __future__ import annotations

import operator
import sys
from typing import Any, NamedTuple

import numpy as np
import torch

from uniopt import _jit

__all__ = ["BACKENDS", "Rule", "Table", "Work", "Dispatcher", "local_view", "grad_view", "dist_key",
           "cuda_kernels_usable", "is_plain", "all_finite", "nonfinite_gate", "resolve_process_group",
           "group_average"]

BACKENDS = ("auto", "torch")
_NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_PLAIN = (_Tensor, _Parameter)


def is_plain(*tensors) -> bool:
    """Whether every tensor is of exact type ``torch.Tensor`` or ``torch.nn.Parameter`` (owns
    its memory: only such a tensor's address may reach a kernel)."""
    return all(type(t) is _Tensor or type(t) is _Parameter for t in tensors)


def _dtensor_class():
    """``DTensor`` if ``torch.distributed.tensor`` was imported (only then can one exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (without importing ``torch.distributed``)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_view(t: torch.Tensor) -> torch.Tensor | None:
    """The plain real tensor a step of ``t`` may read and write in place, or ``None``.

    ``t`` itself for a plain tensor (exact type ``torch.Tensor`` or ``torch.nn.Parameter``); the
    local tensor of a DTensor whose placements are all ``Shard``/``Replicate`` (when that local
    tensor is plain); complex tensors as their ``torch.view_as_real`` (same memory, float
    pairs). ``None`` for every other tensor: other subclasses, ``Partial`` placements,
    conjugate views. The result shares ``t``'s memory; its contiguity is not checked here.
    """
    cls = type(t)
    if cls is not _Tensor and cls is not _Parameter:
        if not is_dtensor(t) or not all(pl.is_shard() or pl.is_replicate() for pl in t.placements):
            return None
        with torch.no_grad():
            t = t.to_local()
        cls = type(t)
        if cls is not _Tensor and cls is not _Parameter:
            return None
    if t.is_complex():
        if t.is_conj() or t.layout != torch.strided:
            return None
        t = torch.view_as_real(t.detach())  # detach() shares the version counter
    return t


def grad_view(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor | None:
    """:func:`local_view` of gradient ``g`` of ``p``, if it pairs with ``local_view(p)``.

    A plain parameter needs a plain gradient; a DTensor parameter a DTensor gradient with the
    same placements on the same mesh (then the local tensors hold the same elements).
    """
    if type(p) is _Tensor or type(p) is _Parameter:
        if type(g) is not _Tensor and type(g) is not _Parameter:
            return None
    elif not (is_dtensor(p) and is_dtensor(g) and g.placements == p.placements
              and g.device_mesh == p.device_mesh):
        return None
    return local_view(g)


def dist_key(p: torch.Tensor):
    """For a sharded DTensor ``p``: ``(mesh, replicas)``, else ``None``.

    A sum over ``p``'s elements is the sum over the mesh of its local sums divided by
    ``replicas``, the number of ranks that hold the same shard (the product of the sizes of the
    mesh dimensions ``p`` is replicated on). ``None``: the local tensor holds every element.
    """
    if not is_dtensor(p):
        return None
    mesh = p.device_mesh
    if not any(pl.is_shard() for pl in p.placements):
        return None
    replicas = 1
    for dim, pl in enumerate(p.placements):
        if not pl.is_shard():
            replicas *= mesh.size(dim)
    return mesh, replicas


def all_finite(tensors, process_group=None) -> bool:
    """Whether every element of every tensor is finite (no NaN, no inf), in one reduction.

    The check of every ``nonfinite`` policy of the torch face (docs/faults.md). ``None`` and
    empty tensors are skipped; a DTensor is checked on its local tensor and a sparse tensor on
    its values. The tensors of one device and dtype go through one fused
    ``torch._foreach_norm(..., inf)`` (a max-abs norm: it never overflows, and NaN and inf come
    out non-finite), then one host sync for all of them. With a ``process_group``, the local
    flag is all-reduced with ``MIN`` over it, so every rank gets the same answer (call it on
    every rank); without one, DTensors' flags are all-reduced over their meshes (each
    dimension's group), so FSDP2 shards decide alike.
    """
    groups: dict = {}
    meshes: list = []
    for t in tensors:
        if t is None:
            continue
        if is_dtensor(t):
            if process_group is None and not any(t.device_mesh == m for m in meshes):
                meshes.append(t.device_mesh)
            t = t.to_local()
        if t.is_sparse:
            t = t.coalesce().values()
        if t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    flags = [torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all().cpu()
             for ts in groups.values()]
    ok = bool(torch.stack(flags).all()) if flags else True
    reduce_over = [process_group] if process_group is not None else [
        mesh.get_group(dim) for mesh in meshes for dim in range(mesh.ndim)]
    if reduce_over:
        import torch.distributed as dist

        for group in reduce_over:
            device = "cpu"
            if dist.get_backend(group) == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            ok = bool(flag.item())
    return ok


def nonfinite_gate(optimizer, labelled, groups, process_group=None) -> bool:
    """Apply ``optimizer.nonfinite`` to a step's inputs, before anything changes.

    Args:
      optimizer: the optimizer (its ``nonfinite`` policy and its class name in the message).
      labelled: a list of ``(tensor, label)``: the step's gradients (or constraint values), the
        label naming each in the error (``"the gradient of parameter 0 of param group 1"``).
      groups: the param groups whose ``nonfinite_skips`` a skipped step increments.
      process_group: reduce the flag over it (:func:`all_finite`).

    Returns:
      ``True`` when the step goes ahead, ``False`` when it is skipped (counters incremented).

    Raises:
      FloatingPointError: non-finite values under ``nonfinite="raise"``, naming the first.
    """
    policy = getattr(optimizer, "nonfinite", "propagate")
    if policy == "propagate" or all_finite([t for t, _ in labelled], process_group):
        return True
    if policy == "raise":
        from uniopt._validation import nonfinite_error

        # the first non-finite value among this rank's own (local shards: no collective here,
        # where ranks could stop at different tensors)
        where = next((label for t, label in labelled if t is not None and not all_finite(
            [t.to_local() if is_dtensor(t) else t])), "another rank's values")
        raise nonfinite_error(type(optimizer).__name__, where)
    for group in groups:
        group["nonfinite_skips"] = int(group.get("nonfinite_skips", 0)) + 1
    return False


def grad_labels(param_groups: list) -> list:
    """``(p.grad, label)`` for every parameter with a gradient, for :func:`nonfinite_gate`."""
    return [(p.grad, f"the gradient of parameter {i} of param group {k}")
            for k, group in enumerate(param_groups) for i, p in enumerate(group["params"])
            if p.grad is not None]


def resolve_process_group(pg=None):
    """The process group a uniopt optimizer reduces its values over, or ``None``.

    ``pg`` given: returned as it is (a ``torch.distributed.ProcessGroup``; anything else is a
    ``TypeError``). ``None``: the world group when ``torch.distributed`` is available and
    initialised, else ``None`` (a single process: nothing is reduced). ``torch.distributed`` is
    never imported here: if nothing imported it, no process group can exist.

    Raises:
      TypeError: ``pg`` is neither ``None`` nor a process group.
    """
    dist = sys.modules.get("torch.distributed")
    if pg is None:
        if dist is None or not dist.is_available() or not dist.is_initialized():
            return None
        return dist.group.WORLD
    group_class = getattr(dist, "ProcessGroup", None) if dist is not None else None
    if group_class is None or not isinstance(pg, group_class):
        raise TypeError(f"Invalid process_group: {pg!r} (expected a torch.distributed.ProcessGroup "
                        f"or None)")
    return pg


def group_average(values: torch.Tensor, pg) -> torch.Tensor:
    """``values`` (a 1-D tensor) averaged over the ranks of ``pg``, in ONE ``all_reduce``.

    A sum followed by a division by the group size (gloo has no ``AVG``), so every rank gets
    the same bits. ``pg`` ``None`` or of size 1: ``values`` itself. ``values`` is replaced, not
    changed in place.
    """
    if pg is None:
        return values
    import torch.distributed as dist

    size = dist.get_world_size(pg)
    if size == 1:
        return values
    buffer = values.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=pg)
    return buffer.div_(size)


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def owned_copy(state_dict: dict) -> dict:
    """A state dict whose state tensors are fresh contiguous copies (loading never aliases)."""

    def own(value):
        if isinstance(value, torch.Tensor):
            return value.detach().clone(memory_format=torch.contiguous_format)
        return value

    state_dict = dict(state_dict)
    state_dict["state"] = {k: {key: own(v) for key, v in s.items()} for k, s in state_dict["state"].items()}
    return state_dict


class Rule:
    """What the dispatcher needs to know about one update rule; one subclass per rule.

    Attributes:
      name: the optimizer's name, used in error messages.
      buffers: keys of the tensor state (each shaped like its parameter).
      scalars: keys of per-parameter Python-float state that the table kernel advances in place
        (passed to it as float64 arrays, one entry per tensor).
    """

    name = "?"
    buffers: tuple = ()
    scalars: tuple = ()
    #: whether the run methods return values that :meth:`Dispatcher.run` hands back
    returns = False
    #: whether a tensor subclass (a DTensor) may run on its local tensor; ``False`` for a rule
    #: whose step reduces over the whole tensor (a norm) and has no cross-shard reduction
    local_views = True
    #: whether a table-kernel step bumps its parameters' autograd version counters, as an
    #: in-place torch op would (``False``: a face whose parameters never enter a graph, or
    #: that keeps a reference's behaviour, as iALM does)
    bump_versions = True

    def state_of(self, group: dict, index: int, p: torch.Tensor, state) -> dict | None:
        """The state dict of parameter ``index`` of ``group``, or ``None`` when it has none yet.

        The default is torch's ``state[p]`` (``state`` is the optimizer's). A face that keeps
        the buffers elsewhere returns that dict (iALM: the group itself).
        """
        return state.get(p) or None

    def new_state(self, group: dict, index: int, p: torch.Tensor, state) -> dict:
        """Create (and store where :meth:`state_of` finds it) the state of a parameter at its
        first gradient; the default stores :meth:`init_state` in ``state[p]``."""
        s = state[p] = self.init_state(p)
        return s

    def init_state(self, p: torch.Tensor) -> dict:
        """The state of a parameter at its first gradient."""
        raise NotImplementedError

    def constants(self, group: dict):
        """The host-side constants of one step of ``group`` (re-read at every step)."""
        raise NotImplementedError

    def run_table(self, constants, table: "Table"):
        """Run the CPU table kernel over ``table`` (returns a value if ``returns``)."""
        raise NotImplementedError

    def run_cuda(self, constants, p, g, buffers, state, stream):
        """One numba.cuda step of one tensor; ``p, g, buffers`` are 1-D device arrays."""
        raise NotImplementedError

    def run_torch(self, constants, p, g, buffers, state):
        """One step of one tensor with torch ops (any device, dtype and layout)."""
        raise NotImplementedError


class Table:
    """The tensors of one param group that share a dtype and run in one CPU kernel call.

    ``p_addrs``, ``g_addrs``, ``buffer_addrs[k]`` (int64) and ``sizes`` are the kernel's pointer
    table; ``scalars[k]`` (float64) hold the rule's scalar state per tensor; ``scratch`` is a
    small work array of the tensors' dtype; ``grads`` this step's given gradient tensors of the
    rows (``collect(grads=...)``; ``None`` for ``p.grad``); ``cache`` is the rule's to keep
    per-table values in (emptied when a row's state changes).
    """

    def __init__(self, dtype: torch.dtype, rule: Rule, rows: list, params: list, states: list,
                 views: list | None = None, dist=None):
        self.dtype, self.np_dtype, self.rows, self.dist = dtype, _NUMPY_DTYPES[dtype], rows, dist
        self.owners = [params[i] for i in rows]  # the optimizer's parameters
        self.params = self.owners if views is None else [views[i] for i in rows]  # plain, real
        # direct: every row's parameter is a plain real tensor (the fast gradient scan)
        self.direct = all(map(operator.is_, self.owners, self.params))
        self.p_ptrs = [p.data_ptr() for p in self.params]
        self.nbytes = [p.nbytes for p in self.params]
        self.sizes = np.array([p.numel() for p in self.params], dtype=np.int64)
        self.total = int(self.sizes.sum())
        self.p_addrs = np.array(self.p_ptrs, dtype=np.int64)
        self.g_addrs = np.zeros(len(rows), dtype=np.int64)
        self.buffer_addrs = [np.zeros(len(rows), dtype=np.int64) for _ in rule.buffers]
        self.scalars = [np.zeros(len(rows), dtype=np.float64) for _ in rule.scalars]
        self.scratch = np.zeros(16, dtype=self.np_dtype)
        self.grads: list | None = None
        self.cache: dict = {}
        self.sources: list = [()] * len(rows)  # (state dict, key, tensor, address) per buffer
        self.states: list = [None] * len(rows)  # state dicts (a private dummy until created)
        self._held: list = [None] * len(rows)   # keeps the state tensors we point to alive
        self._rule = rule
        for row, i in enumerate(rows):
            self.set_state(row, states[i])

    @property
    def parallel(self) -> bool:
        """Whether the parallel kernel runs (re-read each step: a forked child runs serially)."""
        return self.total >= _jit.PARALLEL_MIN_SIZE

    def set_state(self, row: int, state: dict | None) -> None:
        rule = self._rule
        if state is None:
            state = dict.fromkeys(rule.scalars, 0.0)  # no state yet: the kernel skips the row
            for addrs in self.buffer_addrs:
                addrs[row] = 0
        else:
            p = self.params[row]
            held = [local_view(state[key]) for key in rule.buffers]
            for b, key in zip(held, rule.buffers):
                # new state comes from Rule.init_state (zeros like the parameter); loaded state
                # was routed by _kind. Never hand a kernel anything else.
                if (b is None or b.dtype != p.dtype or b.shape != p.shape or not b.is_contiguous()
                        or b.device != p.device):
                    raise RuntimeError(f"{rule.name}: state {key!r} cannot be stepped in place "
                                       f"with its parameter ({type(state[key]).__name__})")
            for addrs, b in zip(self.buffer_addrs, held):
                addrs[row] = b.data_ptr()
            self._held[row] = held
            self.sources[row] = [(state, key, state[key], b.data_ptr())
                                 for key, b in zip(rule.buffers, held)]
        self.cache.clear()
        self.states[row] = state
        self.load_scalars(row)

    def scan(self) -> list | None:
        """This step's gradient addresses, or ``None`` if a parameter's data pointer changed.

        An address is 0 for no gradient and -1 for a gradient the kernel cannot read as it is
        (non-contiguous, of another size in bytes, sparse): it takes the torch path this step,
        where it is checked (shape, device, layout) or computed with type promotion. The size
        in bytes stands in for the dtype (one attribute read less per tensor): torch enforces a
        gradient's dtype unless ``p.grad_dtype`` is changed, and the dtypes a float32/float64
        gradient could then have with the same item size are integer or complex ones.
        """
        if not self.direct:
            return self._scan_views()
        try:
            addrs = [(0 if (g := p.grad) is None else
                      g.data_ptr() if g.is_contiguous() and g.nbytes == nb and type(g) in _PLAIN
                      else -1)
                     if p.data_ptr() == pp else -2
                     for p, pp, nb in zip(self.params, self.p_ptrs, self.nbytes)]
        except RuntimeError:  # a gradient without storage (sparse)
            addrs = [(0 if (g := p.grad) is None else -1 if g.layout != torch.strided else
                      g.data_ptr() if g.is_contiguous() and g.nbytes == nb and type(g) in _PLAIN
                      else -1)
                     if p.data_ptr() == pp else -2
                     for p, pp, nb in zip(self.params, self.p_ptrs, self.nbytes)]
        return None if -2 in addrs else addrs

    def scan_given(self, grads: list) -> list | None:
        """:meth:`scan` of given gradients (``grads[i]`` for parameter ``i`` of the group):
        also -1 for a gradient on another device or of another dtype (which ``p.grad`` cannot
        be). Stores the rows' gradients in ``grads``."""
        addrs = []
        given = self.grads = [grads[i] for i in self.rows]
        direct = self.direct
        for owner, view, pp, nb, g in zip(self.owners, self.params, self.p_ptrs, self.nbytes, given):
            if not direct:
                view = local_view(owner)
                if view is None:
                    return None
            if view.data_ptr() != pp:
                return None
            if g is None:
                addrs.append(0)
                continue
            gv = (g if type(g) in _PLAIN else None) if direct else grad_view(owner, g)
            # a table's tensors are on the CPU; the dtype and size checked, no sparse layout
            addrs.append(gv.data_ptr() if (gv is not None and gv.layout is torch.strided
                                           and gv.dtype is view.dtype and gv.is_cpu
                                           and gv.is_contiguous() and gv.nbytes == nb) else -1)
        return addrs

    def _scan_views(self) -> list | None:
        """:meth:`scan` for tables holding local or real views of their parameters."""
        addrs = []
        for owner, pp, nb in zip(self.owners, self.p_ptrs, self.nbytes):
            view = local_view(owner)
            if view is None or view.data_ptr() != pp:
                return None
            g = owner.grad
            if g is None:
                addrs.append(0)
                continue
            gv = grad_view(owner, g)
            addrs.append(gv.data_ptr() if (gv is not None and gv.layout == torch.strided
                                           and gv.is_contiguous() and gv.nbytes == nb) else -1)
        return addrs

    def buffers(self, row: int) -> list:
        """The (plain, local) state buffers of row ``row`` that the kernel's addresses point to."""
        return self._held[row]

    def load_scalars(self, row: int) -> None:
        """Re-read one row's scalar state from its state dict."""
        for values, key in zip(self.scalars, self._rule.scalars):
            values[row] = self.states[row][key]

    def store_scalars(self) -> None:
        """Write the scalar state the kernel advanced back into the state dicts (as floats)."""
        for values, key in zip(self.scalars, self._rule.scalars):
            for s, v in zip(self.states, values.tolist()):
                s[key] = v


_cuda_usable: bool | None = None


def cuda_kernels_usable() -> bool:
    """Whether numba.cuda can run kernels on torch's CUDA tensors (not its simulator)."""
    global _cuda_usable
    if _cuda_usable is None:
        try:
            import numba
            from numba import cuda

            _cuda_usable = not numba.config.ENABLE_CUDASIM and cuda.is_available()
        except Exception:  # numba-cuda missing or no driver: torch ops instead
            _cuda_usable = False
    return _cuda_usable


def _views(p: torch.Tensor, state: dict | None, rule: Rule):
    """``(local_view(p), [local_view(buffer)...])``, or ``None`` when a step of ``p`` must run
    on the tensors themselves (a subclass other than DTensor, state that does not pair; any
    subclass for a rule without ``local_views``)."""
    if not rule.local_views and not (type(p) is _Tensor or type(p) is _Parameter):
        return None
    view = local_view(p)
    if view is None:
        return None
    buffers = None
    if state is not None:
        buffers = [local_view(state[key]) for key in rule.buffers]
        if any(b is None or b.shape != view.shape for b in buffers):
            return None
        if not rule.local_views and not is_plain(*(state[key] for key in rule.buffers)):
            return None
    return view, buffers


def _kind(views, rule: Rule, backend: str) -> str:
    """``"table"``, ``"cuda"`` or ``"torch"`` for a parameter (gradients are checked per step)."""
    if backend == "torch" or views is None:
        return "torch"
    p, buffers = views
    if p.dtype not in _NUMPY_DTYPES or p.numel() == 0 or not p.is_contiguous():
        return "torch"
    for b in buffers or ():
        if b.dtype != p.dtype or not b.is_contiguous() or b.device != p.device:
            return "torch"
    if p.device.type == "cpu":
        return "table"
    if p.device.type == "cuda" and cuda_kernels_usable():
        return "cuda"
    return "torch"


def _check_state(rule: Rule, index: int, p: torch.Tensor, state: dict) -> None:
    for key in rule.buffers + rule.scalars:
        if key not in state:
            raise RuntimeError(f"{rule.name}: the state of parameter {index} has no {key!r}")
    for key in rule.buffers:
        b = state[key]
        if not isinstance(b, torch.Tensor) or b.shape != p.shape or b.device != p.device:
            what = (f"shape {tuple(b.shape)} on {b.device}" if isinstance(b, torch.Tensor)
                    else type(b).__name__)
            raise RuntimeError(f"{rule.name}: state {key!r} of parameter {index} ({what}) does "
                               f"not match the parameter (shape {tuple(p.shape)} on {p.device})")


def _check_grad(rule: Rule, index: int, p: torch.Tensor, g: torch.Tensor) -> None:
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"{rule.name} does not support sparse gradients")
    if g.shape != p.shape or g.device != p.device or not (g.is_floating_point() or g.is_complex()):
        raise RuntimeError(
            f"{rule.name}: gradient of parameter {index} (shape {tuple(g.shape)}, {g.dtype}, "
            f"{g.device}) does not match the parameter (shape {tuple(p.shape)}, {p.dtype}, {p.device})")


class _GroupPlan:
    """Cached routing of one param group: its tables and the tensors on the other paths."""

    def __init__(self, rule: Rule, group: dict, state, backend: str):
        params = group["params"]
        self.group, self.params_list, self.state_obj = group, params, state
        self.params = list(params)
        states = [rule.state_of(group, i, p, state) for i, p in enumerate(params)]
        for i, (p, s) in enumerate(zip(params, states)):
            if s is not None:
                _check_state(rule, i, p, s)
        self.states = states
        self.missing = {i for i, s in enumerate(states) if s is None}
        self.views = [_views(p, s, rule) for p, s in zip(params, states)]
        self.kinds = [_kind(v, rule, backend) for v in self.views]
        local = [None if v is None else v[0] for v in self.views]
        by_key: dict = {}
        for i, (p, kind) in enumerate(zip(params, self.kinds)):
            if kind == "table":
                by_key.setdefault((local[i].dtype, dist_key(p)), []).append(i)
        self.tables = [Table(dtype, rule, rows, params, states, local, dist)
                       for (dtype, dist), rows in by_key.items()]
        self.place = {i: (table, row) for table in self.tables for row, i in enumerate(table.rows)}
        self.others = [i for i, kind in enumerate(self.kinds) if kind != "table"]
        self.other_ptrs = [_address(params[i]) for i in self.others]
        # state outside optimizer.state: the tables are re-checked against it at every step
        self.external = type(rule).state_of is not Rule.state_of
        self.meshes: list = []  # the device meshes of the group's DTensor parameters, in order
        for p in params:
            if is_dtensor(p) and not any(p.device_mesh == m for m in self.meshes):
                self.meshes.append(p.device_mesh)

    def current(self) -> bool:
        """Whether every table row's state dict still holds the buffer tensors (at the addresses)
        the table points to (state kept outside ``optimizer.state``, :meth:`Rule.state_of`)."""
        for table in self.tables:
            for sources in table.sources:
                for state, key, tensor, address in sources:
                    b = state.get(key)
                    if b is not tensor or b.data_ptr() != address:
                        return False
        return True

    def matches(self, group: dict, state) -> bool:
        """Whether the plan still describes ``group`` (table pointers are checked by ``scan``)."""
        params = group["params"]
        return (group is self.group and state is self.state_obj and params is self.params_list
                and len(params) == len(self.params) and all(map(operator.is_, params, self.params))
                and (not self.others or [_address(params[i]) for i in self.others] == self.other_ptrs))


def _address(p: torch.Tensor) -> int:
    """The data address of ``p``'s local view (0 for tensors the kernels never address)."""
    view = local_view(p)
    return 0 if view is None else view.data_ptr()


class Work(NamedTuple):
    """One param group's step as :meth:`Dispatcher.collect` found it (nothing changed yet).

    ``tables``: ``(table, addrs)`` for each table with a gradient, ``addrs`` this step's gradient
    addresses (0: no gradient, or a gradient on the torch path), already in ``table.g_addrs``;
    ``slow``: indices (in ``group["params"]``) of the checked gradients that take the cuda or
    torch path; ``new``: indices of the parameters whose state is created by this step;
    ``grads``: the given gradients (``collect(grads=...)``), ``None`` for ``p.grad``.
    """

    group: dict
    plan: "_GroupPlan"
    tables: list
    slow: list
    new: Any
    grads: Any = None


class Dispatcher:
    """Runs a :class:`Rule` over an optimizer's param groups (see the module docstring)."""

    def __init__(self, rule: Rule, backend: str = "auto"):
        if backend not in BACKENDS:
            expected = ", ".join(map(repr, BACKENDS))
            raise ValueError(f"Invalid backend: {backend!r} (expected one of {expected})")
        self.rule, self.backend = rule, backend
        self._plans: dict = {}  # id(group) -> _GroupPlan (which checks it is still that group)

    def meshes(self, group: dict) -> list:
        """The device meshes of ``group``'s DTensor parameters, in parameter order (every
        rank's order), from the plan :meth:`collect` made or checked for it this step."""
        plan = self._plans.get(id(group))
        return [] if plan is None else plan.meshes

    def invalidate(self) -> None:
        """Forget every cached table (after parameters, state or scalars were changed by hand)."""
        self._plans = {}

    def _plan(self, group: dict, state, grads=None):
        """The group's plan and this step's gradient addresses of each of its tables
        (``grads``: the group's given gradients, or ``None`` for ``p.grad``)."""
        plan = self._plans.get(id(group))
        if plan is not None and plan.matches(group, state) and (not plan.external or plan.current()):
            scans = ([table.scan() for table in plan.tables] if grads is None
                     else [table.scan_given(grads) for table in plan.tables])
            if None not in scans:
                return plan, scans
        plan = self._plans[id(group)] = _GroupPlan(self.rule, group, state, self.backend)
        return plan, ([table.scan() for table in plan.tables] if grads is None
                      else [table.scan_given(grads) for table in plan.tables])

    def step(self, param_groups: list, state, grads: list | None = None):
        """One step of every param group; raises before changing anything if a check fails.
        Returns what :meth:`run` returns."""
        return self.run(self.collect(param_groups, state, grads))

    def collect(self, param_groups: list, state, grads: list | None = None) -> list:
        """Check every group and gather its step's work, changing nothing (phase 1 of ``step``).

        Returns one :class:`Work` per group that has a gradient, for :meth:`run`. In between,
        an optimizer may read each group's gradients from it (the CPU ones already checked and
        in their tables' ``g_addrs``: a reduction over the same scan, such as PolyakSGD's norm),
        and set what :meth:`Rule.constants` returns; an exception there still changes nothing.

        ``grads``: ``None`` (each parameter's ``.grad``), or one sequence per group of the
        gradient tensors of its parameters (``None`` entries: no gradient), given by the face.
        """
        rule = self.rule
        work = []
        for k, group in enumerate(param_groups):
            given = None if grads is None else grads[k]
            plan, scans = self._plan(group, state, given)
            params = plan.params
            tables, slow = [], []
            for table, addrs in zip(plan.tables, scans):
                if -1 in addrs:  # gradients the kernel cannot read go the torch way this step
                    for row, a in enumerate(addrs):
                        if a == -1:
                            addrs[row] = 0
                            slow.append(table.rows[row])
                if any(addrs):
                    if len(addrs) == 1:
                        table.g_addrs[0] = addrs[0]
                    else:
                        table.g_addrs[:] = addrs
                    tables.append((table, addrs))
            if given is None:
                slow.extend(i for i in plan.others if params[i].grad is not None)
                for i in slow:
                    _check_grad(rule, i, params[i], params[i].grad)
            else:
                if plan.others:
                    slow.extend(i for i in plan.others if given[i] is not None)
                for i in slow:
                    _check_grad(rule, i, params[i], given[i])
            if tables or slow:
                if not plan.missing:
                    new = ()
                elif given is None:
                    new = [i for i in plan.missing if params[i].grad is not None]
                else:
                    new = [i for i in plan.missing if given[i] is not None]
                work.append(Work(group, plan, tables, slow, new, given))
        return work

    def run(self, work: list) -> list | None:
        """Run the work :meth:`collect` returned (phase 2 of ``step``), right after it.

        Returns ``None``, or for a rule with ``returns``, one list per :class:`Work` of what its
        run calls returned (its tables' first, then the other tensors' in order).
        """
        rule = self.rule
        results = [] if rule.returns else None
        for group, plan, tables, slow, new, grads in work:
            for i in new:
                self._create_state(plan, plan.state_obj, i)
            constants = rule.constants(group)
            values = [] if results is not None else None
            for table, addrs in tables:  # collect put addrs in table.g_addrs
                if table.parallel:
                    threads = torch.get_num_threads()  # numba's OpenMP pool may change it
                    try:
                        value = rule.run_table(constants, table)
                    finally:
                        torch.set_num_threads(threads)
                else:
                    value = rule.run_table(constants, table)
                if values is not None:
                    values.append(value)
                if rule.scalars:
                    table.store_scalars()
                if rule.bump_versions:
                    torch.autograd.graph.increment_version(
                        table.owners if all(addrs) else [p for p, a in zip(table.owners, addrs) if a])
            for i in slow:
                value = self._run_one(constants, plan, i, grads)
                if values is not None:
                    values.append(value)
            if results is not None:
                results.append(values)
        return results

    def _create_state(self, plan: _GroupPlan, state, i: int) -> None:
        p = plan.params[i]
        s = self.rule.new_state(plan.group, i, p, state)
        plan.states[i] = s
        plan.missing.discard(i)
        if i in plan.place:
            table, row = plan.place[i]
            table.set_state(row, s)

    def _run_one(self, constants, plan: _GroupPlan, i: int, grads=None):
        rule, p, s = self.rule, plan.params[i], plan.states[i]
        g = p.grad if grads is None else grads[i]
        views = plan.views[i]
        if views is not None:  # plain (real) local tensors, if the gradient and state pair up
            pv, gv = views[0], grad_view(p, g)
            buffers = [local_view(s[key]) for key in rule.buffers]
            if gv is None or gv.shape != pv.shape or any(b is None or b.shape != pv.shape
                                                         for b in buffers):
                views = None
        if views is None:  # a tensor subclass: its own ops (real pairs for complex tensors)
            with torch.no_grad():
                value = rule.run_torch(constants, _real(p), _real(g),
                                       [_real(s[key]) for key in rule.buffers], s)
        elif (plan.kinds[i] == "cuda" and gv.dtype == pv.dtype and gv.device == pv.device
              and gv.is_contiguous()):
            from numba import cuda

            with cuda.gpus[pv.device.index or 0]:
                stream = cuda.external_stream(torch.cuda.current_stream(pv.device).cuda_stream)
                arrays = [cuda.as_cuda_array(t.view(-1), sync=False) for t in (pv, gv, *buffers)]
                value = rule.run_cuda(constants, arrays[0], arrays[1], arrays[2:], s, stream)
        else:
            with torch.no_grad():
                value = rule.run_torch(constants, pv, gv, buffers, s)
        if views is not None and is_dtensor(p):
            torch.autograd.graph.increment_version(p)  # the local tensor has its own counter
        if i in plan.place:  # a table row stepped on the torch path: refresh its scalars
            table, row = plan.place[i]
            table.load_scalars(row)
        return value
