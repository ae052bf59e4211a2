"""Tensor: an array plus the record of how it was computed, and backward() over that record."""
import numpy as np

from disttrain import backend

_grad_enabled = True


class no_grad:
    """Context manager (and decorator) under which operations record no graph."""

    def __enter__(self):
        global _grad_enabled
        self._previous, _grad_enabled = _grad_enabled, False

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self._previous

    def __call__(self, function):
        def wrapper(*args, **kwargs):
            with no_grad():
                return function(*args, **kwargs)
        wrapper.__name__, wrapper.__doc__ = function.__name__, function.__doc__
        return wrapper


def is_grad_enabled():
    return _grad_enabled


def _sum_repeated_rows(rows, row_grads):
    """(sorted unique rows, their summed gradients) on numpy: each row's first gradient is
    copied and its repeats added with one flat add.at, in order (so the sums equal a
    sequential add.at's bit for bit): np.add.at over whole rows is far slower, and was most
    of word2vec's step (docs/performance.md)."""
    order = np.argsort(rows, kind="stable")
    sorted_rows, ordered = rows[order], row_grads[order]
    first = np.ones(len(rows), bool)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    values = ordered[first]
    repeats = np.flatnonzero(~first)
    if len(repeats):
        row_size = values[0].size
        segment = np.cumsum(first)[repeats] - 1           # the unique row each repeat adds to
        flat = (segment[:, None] * row_size + np.arange(row_size)).reshape(-1)
        np.add.at(values.reshape(len(values), -1).reshape(-1), flat, ordered[repeats].reshape(-1))
    return sorted_rows[first].astype(np.int64), values


class RowSparseGrad:
    """Gradient of a row-indexed array: only ``values`` at rows ``indices`` are non-zero.

    Embedding lookups produce it so that a 100k-row table costs only the rows a batch used.
    ``indices`` are unique and sorted; ``values`` has shape ``(len(indices),) + shape[1:]``.
    """

    __array_ufunc__ = None  # make ndarray + RowSparseGrad defer to our __radd__

    def __init__(self, indices, values, shape):
        self.indices, self.values, self.shape = indices, values, tuple(shape)

    @classmethod
    def from_rows(cls, rows, row_grads, shape):
        """Sum the gradients of repeated rows: (rows with repeats, their grads) -> unique rows."""
        xp = backend.array_module(row_grads)
        rows = rows.reshape(-1)
        row_grads = row_grads.reshape((rows.shape[0],) + tuple(shape[1:]))
        if xp is np:
            return cls(*_sum_repeated_rows(rows, row_grads), shape)
        unique, inverse = xp.unique(rows, return_inverse=True)
        values = xp.zeros((unique.shape[0],) + tuple(shape[1:]), dtype=row_grads.dtype)
        xp.add.at(values, inverse.reshape(-1), row_grads)
        return cls(unique.astype(np.int64), values, shape)

    @property
    def dtype(self):
        return self.values.dtype

    def to_dense(self):
        xp = backend.array_module(self.values)
        dense = xp.zeros(self.shape, dtype=self.values.dtype)
        dense[self.indices] = self.values
        return dense

    def __add__(self, other):
        if isinstance(other, RowSparseGrad):
            xp = backend.array_module(self.values)
            return RowSparseGrad.from_rows(xp.concatenate([self.indices, other.indices]),
                                           xp.concatenate([self.values, other.values]), self.shape)
        dense = other.copy()
        dense[self.indices] += self.values
        return dense

    __radd__ = __add__

    def __repr__(self):
        return f"RowSparseGrad(rows={len(self.indices)}, shape={self.shape}, dtype={self.dtype})"


class _HookHandle:
    def __init__(self, hooks, hook):
        self._hooks, self._hook = hooks, hook

    def remove(self):
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


def _as_array(data, dtype=None):
    if isinstance(data, Tensor):
        data = data.data
    xp = backend.array_module(data)
    if dtype is not None:
        return xp.asarray(data, dtype=dtype)
    if isinstance(data, (np.ndarray, np.generic)) or xp is not np:
        return xp.asarray(data)
    array = np.asarray(data)
    # Python floats default to float32 (the training precision); Python ints to int64.
    if array.dtype == np.float64:
        return array.astype(np.float32)
    return array


class Tensor:
    """An n-dimensional array that can record the operations made on it.

    ``data`` is the array, ``grad`` the gradient that ``backward()`` accumulated into it
    (leaves only), ``requires_grad`` whether operations on it are recorded.
    """

    __array_priority__ = 1000  # ndarray <op> Tensor calls the Tensor's reflected operator

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _as_array(data, dtype)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._parents = ()
        self._backward = None
        self._hooks = []
        if self.requires_grad and self.data.dtype.kind not in "fc":
            raise TypeError(f"only floating tensors can require gradients, got dtype {self.data.dtype}")

    @classmethod
    def from_op(cls, data, parents, backward):
        """The result of an op: records ``parents`` and the op's gradient rule if needed.

        ``backward(grad_out)`` must return one gradient (or None) per parent.
        """
        out = cls.__new__(cls)
        out.data, out.grad, out._hooks = data, None, []
        out.requires_grad = _grad_enabled and any(p.requires_grad for p in parents)
        if out.requires_grad:
            out._parents, out._backward = parents, backward
        else:
            out._parents, out._backward = (), None
        return out

    # --- properties -----------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: backend.device_of(self.data))
    is_leaf = property(lambda self: self._backward is None)
    T = property(lambda self: self.transpose())

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"tensor({self.numpy()!r}{grad})".replace("\n", "\n       ")

    def __array__(self, dtype=None, copy=None):
        array = backend.to_numpy(self.data)
        return array if dtype is None else array.astype(dtype, copy=False)

    def numpy(self):
        return backend.to_numpy(self.data)

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor of one element, this one has shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self):
        return Tensor(self.data)

    def astype(self, dtype):
        from disttrain.ops import elementwise
        return elementwise.astype(self, dtype)

    def to(self, device):
        """A copy of this tensor on 'cpu' or 'cuda:N' (a leaf; keeps requires_grad)."""
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)

    def zero_(self):
        self.data[...] = 0
        return self

    # --- gradients ------------------------------------------------------------------------
    def register_post_accumulate_grad_hook(self, hook):
        """Call ``hook(self)`` during backward() as soon as ``self.grad`` is final for that pass."""
        if not self.is_leaf:
            raise RuntimeError("gradient-ready hooks can only be registered on leaf tensors")
        self._hooks.append(hook)
        return _HookHandle(self._hooks, hook)

    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad`` that requires it.

        Nodes are visited in topological order by counting, for every node, how many of its
        consumers have not yet sent their gradient (Kahn's algorithm): a node runs once all its
        consumers have, so each leaf's gradient is final - and its hooks fire - as early as
        possible. Both passes use explicit stacks, so graph depth is not limited by recursion.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(no input had requires_grad=True, or it was computed under no_grad)")
        xp = backend.array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient argument needs a scalar, "
                                   f"got shape {self.shape}; pass grad= of that shape")
            grad = xp.ones_like(self.data)
        else:
            grad = _as_array(grad, self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(): grad of shape {grad.shape} for a tensor of shape {self.shape}")

        consumers_left = {id(self): 0}
        stack = [self]
        while stack:
            node = stack.pop()
            for parent in node._parents:
                if parent.requires_grad:
                    if id(parent) not in consumers_left:
                        consumers_left[id(parent)] = 0
                        stack.append(parent)
                    consumers_left[id(parent)] += 1

        grads = {id(self): grad}
        ready = [self]
        while ready:
            node = ready.pop()
            node_grad = grads.pop(id(node), None)
            if node._backward is None:
                node._accumulate(node_grad)
                continue
            parent_grads = node._backward(node_grad) if node_grad is not None else (None,) * len(node._parents)
            for parent, parent_grad in zip(node._parents, parent_grads):
                if not parent.requires_grad:
                    continue
                if parent_grad is not None:
                    key = id(parent)
                    grads[key] = parent_grad if key not in grads else grads[key] + parent_grad
                consumers_left[id(parent)] -= 1
                if consumers_left[id(parent)] == 0:
                    ready.append(parent)
            if not retain_graph:
                node._parents, node._backward = (), None

    def _accumulate(self, grad):
        if grad is not None:
            if isinstance(grad, RowSparseGrad):
                self.grad = grad if self.grad is None else self.grad + grad
            else:
                if grad.shape != self.shape:  # a gradient rule broke its contract
                    raise RuntimeError(f"gradient of shape {grad.shape} for a leaf of shape {self.shape}")
                # Copy on first write: gradient rules may hand back arrays that alias each other.
                self.grad = grad.astype(self.dtype, copy=True) if self.grad is None else self.grad + grad
        for hook in self._hooks:
            hook(self)

    # --- operators: thin aliases of the ops ---------------------------------------------
    def __add__(self, other): return ops.add(self, other)
    def __radd__(self, other): return ops.add(other, self)
    def __sub__(self, other): return ops.sub(self, other)
    def __rsub__(self, other): return ops.sub(other, self)
    def __mul__(self, other): return ops.mul(self, other)
    def __rmul__(self, other): return ops.mul(other, self)
    def __truediv__(self, other): return ops.div(self, other)
    def __rtruediv__(self, other): return ops.div(other, self)
    def __pow__(self, other): return ops.pow(self, other)
    def __rpow__(self, other): return ops.pow(other, self)
    def __matmul__(self, other): return ops.matmul(self, other)
    def __rmatmul__(self, other): return ops.matmul(other, self)
    def __neg__(self): return ops.neg(self)
    def __abs__(self): return ops.abs(self)
    def __getitem__(self, index): return ops.getitem(self, index)
    def __lt__(self, other): return ops.compare(self, other, "less")
    def __le__(self, other): return ops.compare(self, other, "less_equal")
    def __gt__(self, other): return ops.compare(self, other, "greater")
    def __ge__(self, other): return ops.compare(self, other, "greater_equal")
    def __eq__(self, other): return ops.compare(self, other, "equal")
    def __ne__(self, other): return ops.compare(self, other, "not_equal")
    __hash__ = object.__hash__

    # --- methods with numpy names ---------------------------------------------------------
    def sum(self, axis=None, keepdims=False): return ops.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return ops.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return ops.max(self, axis, keepdims)
    def min(self, axis=None, keepdims=False): return ops.min(self, axis, keepdims)
    def var(self, axis=None, keepdims=False, ddof=0): return ops.var(self, axis, keepdims, ddof)
    def argmax(self, axis=None): return Tensor(self.data.argmax(axis))
    def argmin(self, axis=None): return Tensor(self.data.argmin(axis))
    def exp(self): return ops.exp(self)
    def log(self): return ops.log(self)
    def sqrt(self): return ops.sqrt(self)
    def tanh(self): return ops.tanh(self)
    def sigmoid(self): return ops.sigmoid(self)
    def relu(self): return ops.relu(self)
    def clip(self, a_min=None, a_max=None): return ops.clip(self, a_min, a_max)
    def matmul(self, other): return ops.matmul(self, other)
    def transpose(self, *axes): return ops.transpose(self, axes[0] if len(axes) == 1 and not isinstance(axes[0], int) else (axes or None))
    def reshape(self, *shape): return ops.reshape(self, shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
    def flatten(self): return ops.reshape(self, (-1,))
    def squeeze(self, axis=None): return ops.squeeze(self, axis)
    def expand_dims(self, axis): return ops.expand_dims(self, axis)
    def broadcast_to(self, shape): return ops.broadcast_to(self, shape)


def tensor(data, requires_grad=False, dtype=None):
    """A new leaf tensor holding ``data`` (an array, nested list or scalar)."""
    if isinstance(data, Tensor):
        data = data.data.copy()
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


def zeros(*shape, dtype=np.float32, requires_grad=False):
    return Tensor(np.zeros(_shape(shape), dtype), requires_grad)


def ones(*shape, dtype=np.float32, requires_grad=False):
    return Tensor(np.ones(_shape(shape), dtype), requires_grad)


def randn(*shape, dtype=np.float32, requires_grad=False, rng=None):
    rng = np.random.default_rng() if rng is None else rng
    return Tensor(rng.standard_normal(_shape(shape)).astype(dtype), requires_grad)


def arange(*args, dtype=None):
    return Tensor(np.arange(*args, dtype=dtype))


def zeros_like(t, requires_grad=False):
    return Tensor(backend.array_module(t.data).zeros_like(t.data), requires_grad)


def ones_like(t, requires_grad=False):
    return Tensor(backend.array_module(t.data).ones_like(t.data), requires_grad)


def _shape(shape):
    return tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else tuple(shape)


from disttrain import ops  # noqa: E402  (ops import Tensor from this module)
