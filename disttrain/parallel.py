"""DataParallel: the one object a worker program wraps its model and optimizer with. Alone it
trains locally; with DISTTRAIN_ROLE=worker it trains through the parameter server."""
import atexit
import os
import sys

import numpy as np

from disttrain import backend
from disttrain.ps import client, scheduler, server

_failed = False  # set when the program dies of an uncaught exception
BUCKET_BYTES = 1 << 20  # about where a message's fixed cost falls below its transfer time


def _note_failure(hook):
    def excepthook(*args):
        global _failed
        _failed = True
        hook(*args)
    return excepthook


class _Bucket:
    """Dense parameters that travel as one key. Several are packed into flat buffers: their
    gradients are copied into one array and pushed as one payload, and the weights are pulled
    into one array whose slices are the parameters' arrays (on a GPU they are copied over).
    A lone parameter is its own key and travels without copies. Every update rule is
    elementwise, so a server updating the flat key computes exactly what it would for each
    parameter apart."""

    def __init__(self, key, names, params):
        self.key, self.names, self.params = key, names, params
        self.flat = len(params) > 1
        self.shapes = [p.data.shape for p in params]
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in self.shapes]
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self.dtype = np.dtype(params[0].data.dtype)
        if self.flat:
            self.grads = np.empty(self.bounds[-1], self.dtype)
            self.weights = np.empty(self.bounds[-1], self.dtype)
            self.views = [self.weights[a:b].reshape(shape)
                          for a, b, shape in zip(self.bounds, self.bounds[1:], self.shapes)]
            for p, view in zip(params, self.views):
                view[...] = backend.to_numpy(p.data)
                if isinstance(p.data, np.ndarray):
                    p.data = view   # pulled weights then land in the parameters directly
        self.ready = set()      # ids of the parameters whose gradient is final this step
        self.pushed = False

    @property
    def shape(self):
        return (self.bounds[-1],) if self.flat else self.shapes[0]

    def host_weights(self):
        """The current weights as one host array (what rank 0 initialises the servers with)."""
        if not self.flat:
            return backend.to_numpy(self.params[0].data)
        for p, view in zip(self.params, self.views):
            if p.data is not view:
                view[...] = backend.to_numpy(p.data)
        return self.weights

    def pull_target(self):
        """The host array a pull writes into."""
        if self.flat:
            return self.weights
        data = self.params[0].data
        return data if isinstance(data, np.ndarray) else backend.to_numpy(data)

    def store_pulled(self, target):
        """Copy the pulled weights into the parameters that are not views of the target
        (on a GPU, or rebound by the program since)."""
        for p, view in zip(self.params, self.views if self.flat else [target]):
            if p.data is not view:
                p.data[...] = backend.array_module(p.data).asarray(view)

    def gradient(self):
        """The gradient to push: None when no parameter has one this step."""
        grads = [p.grad for p in self.params]
        if all(grad is None for grad in grads):
            return None
        if not self.flat:
            return _host_gradient(grads[0])
        for name, grad, a, b in zip(self.names, grads, self.bounds, self.bounds[1:]):
            if grad is None:
                raise RuntimeError(
                    f"DataParallel: parameter {name!r} got no gradient this step while others "
                    f"pushed with it as one key did ({', '.join(self.names)}); pass "
                    f"DataParallel(..., bucket_bytes=0) to push each parameter as its own key")
            if hasattr(grad, "indices"):
                grad = grad.to_dense()
            self.grads[a:b] = backend.to_numpy(grad).reshape(-1)
        return self.grads


class DataParallel:
    """``DataParallel(model, optimizer, mode="sync" | "async" | "ssp", staleness=0)``.

    Distributed, one step is: backward() sends each bucket of gradients from the
    gradient-ready hook of its last parameter (so communication overlaps the rest of
    backward); step() waits for the replies, which carry the fresh weights. Rank 0 initialises the servers
    with its weights and optimizer config; every worker then pulls them, so all start equal.

    Sparse embeddings (a module with ``sparse=True`` and a ``weight``): pushes carry only the
    rows of the RowSparseGrad; pulls fetch only the rows a batch uses, at the start of that
    module's forward (its indices are known there, and in sync mode those rows are exactly
    what every worker's previous step produced). ``model.state_dict()`` and ``close()`` pull
    such tables whole, so checkpoints and evaluation never see stale rows.

    overlap=False pushes every gradient in step() instead of from backward's hooks: needed
    when gradients change between backward() and step() (clipping, accumulation over several
    backward calls).

    Dense parameters travel in buckets of about ``bucket_bytes``, as in PyTorch DDP: the
    parameters of a bucket (consecutive in reverse registration order, the order backward
    finishes them; same dtype and parameter group) are one key on the servers, pushed the
    moment the last of their gradients is ready. Every key costs the worker and the server
    fixed Python work per message (measured: LeNet's ten parameters as one key took a
    2-worker run from 0.72 to 0.79 of two processes that do not communicate at all). A
    parameter of ``bucket_bytes`` or more, or with ``bucket_bytes=0`` every parameter, is
    its own key and travels without copies; that is also what a model needs whose
    parameters are not all used every step (a bucket must get all of its gradients or none,
    and says which one is missing).
    """

    def __init__(self, model, optimizer, mode="sync", staleness=0, overlap=True,
                 bucket_bytes=BUCKET_BYTES):
        if mode not in server.MODES:
            raise ValueError(f"DataParallel: mode {mode!r} is not one of {server.MODES}")
        if not (isinstance(staleness, int) and staleness >= 0):
            raise ValueError(f"DataParallel: staleness {staleness!r} must be an int >= 0")
        if not (isinstance(bucket_bytes, int) and bucket_bytes >= 0):
            raise ValueError(f"DataParallel: bucket_bytes {bucket_bytes!r} must be an int >= 0")
        self.model, self.optimizer = model, optimizer
        self.mode, self.staleness, self.overlap = mode, staleness, overlap
        self.bucket_bytes = bucket_bytes
        self.rank, self.num_workers, self.clock = 0, 1, 0
        role = os.environ.get("DISTTRAIN_ROLE", "")
        if role not in ("", "worker"):
            raise RuntimeError(f"DataParallel runs in worker programs, but DISTTRAIN_ROLE={role!r}")
        self.is_distributed = role == "worker"
        self._closed = False
        if self.is_distributed:
            self._connect()

    # --- set-up -----------------------------------------------------------------
    def _connect(self):
        self._membership = scheduler.Membership.from_env("worker")
        try:
            rank = os.environ.get("DISTTRAIN_RANK", "")
            book = self._membership.register(rank=int(rank) if rank else None)
            self.rank, self.num_workers = self._membership.rank, len(book["worker"])
            self._store = client.KVStore(book, self.rank, self._membership,
                                         self._membership.timeout)
            self._params = dict(self.model.named_parameters())
            self._lr_group = {id(p): i for i, g in enumerate(self.optimizer.param_groups)
                              for p in g["params"]}
            self._sparse = self._sparse_modules()
            self._buckets = self._make_buckets()
            self._bucket_of = {id(p): b for b in self._buckets.values() for p in b.params}
            for key, bucket in self._buckets.items():
                self._store.declare(key, bucket.shape, bucket.dtype, sparse=key in self._sparse)
            if self.rank == 0:
                self._store.init({key: b.host_weights() for key, b in self._buckets.items()},
                                 self.optimizer.config(), self.mode, self.staleness)
            self._membership.barrier("worker")
            self._pull(list(self._buckets))   # every worker starts from rank 0's
        except BaseException:
            self._membership.close()
            raise
        self._pending, self._pulled = [], []   # handles; (bucket, pull target) pairs
        if self.overlap:
            for p in self._params.values():
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        for name, module in self._sparse.items():
            self._pull_rows_before_forward(name, module)
        self._pull_whole_before_state_dict()
        sys.excepthook = _note_failure(sys.excepthook)
        atexit.register(self.close)

    def _sparse_modules(self):
        """{weight key: module} of the layers that produce row-sparse gradients."""
        found = {}
        for prefix, module in self.model.named_modules():
            if getattr(module, "sparse", False) is True and "weight" in module._parameters:
                found[f"{prefix}.weight" if prefix else "weight"] = module
        return found

    def _make_buckets(self):
        """{key: _Bucket}. Sparse, frozen and big parameters are keys of their own; the rest
        are packed in reverse registration order while dtype and parameter group agree."""
        buckets, group, size, group_kind = {}, [], 0, None

        def close_group():
            if len(group) == 1:
                buckets[group[0][0]] = _Bucket(group[0][0], [group[0][0]], [group[0][1]])
            elif group:
                key = f"bucket{len(buckets)}[{group[0][0]}..{group[-1][0]}]"
                if key in self._params:
                    raise ValueError(f"DataParallel: a parameter is named {key!r}, a bucket's name")
                buckets[key] = _Bucket(key, [n for n, _ in group], [p for _, p in group])
            group.clear()

        for name, p in reversed(self._params.items()):
            alone = name in self._sparse or not p.requires_grad or \
                p.data.nbytes >= self.bucket_bytes
            kind = (np.dtype(p.data.dtype), self._lr_group.get(id(p), 0))
            if group and (alone or size + p.data.nbytes > self.bucket_bytes or kind != group_kind):
                close_group()
                size = 0
            group.append((name, p))
            size += p.data.nbytes
            group_kind = kind
            if alone:
                close_group()
                size = 0
        close_group()
        return buckets

    def _pull_rows_before_forward(self, name, module):
        original = module.forward

        def forward(indices, *args, **kwargs):
            if not self._closed:   # after close() the whole table was pulled already
                array = indices.data if hasattr(indices, "data") else indices
                rows = np.unique(backend.to_numpy(array)).astype(np.int64)
                self._pull([name], rows={name: rows})
            return original(indices, *args, **kwargs)

        module.forward = forward

    def _pull_whole_before_state_dict(self):
        original = self.model.state_dict

        def state_dict(*args, **kwargs):
            if self._sparse and not self._closed:
                self._pull(list(self._sparse))
            return original(*args, **kwargs)

        self.model.state_dict = state_dict

    # --- moving weights and gradients -------------------------------------------
    def _pull(self, keys, rows=None):
        """Pull buckets into their parameters (in place where a bucket is one host array)."""
        outs = {key: self._buckets[key].pull_target() for key in keys}
        self._store.pull_async(outs, self.clock, rows).wait()
        for key in keys:
            self._buckets[key].store_pulled(outs[key])

    def _push(self, bucket):
        """Send a bucket's gradient. A dense bucket's message asks for the weights of the
        next clock too (pushpull: one message per bucket and step, not two); the reply is
        written into the bucket's pull target when step() waits for it."""
        bucket.pushed = True
        lr = self.optimizer.param_groups[self._lr_group.get(id(bucket.params[0]), 0)]["lr"]
        grads = {bucket.key: bucket.gradient()}
        if bucket.key in self._sparse:   # its rows are pulled by the next forward
            self._pending.append(self._store.push_async(grads, self.clock, lr))
            return
        target = bucket.pull_target()
        self._pending.append(self._store.pushpull_async(grads, {bucket.key: target},
                                                        self.clock, lr))
        self._pulled.append((bucket, target))

    def _on_grad_ready(self, tensor):
        bucket = self._bucket_of[id(tensor)]
        if bucket.pushed or id(tensor) in bucket.ready:
            name = next(n for n, p in zip(bucket.names, bucket.params) if p is tensor)
            raise RuntimeError(f"DataParallel: the gradient of {name!r} became ready twice in "
                               f"one step (backward() twice before step()?); use "
                               f"DataParallel(..., overlap=False) to accumulate gradients")
        bucket.ready.add(id(tensor))
        if len(bucket.ready) == len(bucket.params):
            self._push(bucket)

    # --- the training-loop API ----------------------------------------------------
    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        if not self.is_distributed:
            return self.optimizer.step()
        # Buckets with no gradient this step still send an empty push: sync servers count N.
        for bucket in self._buckets.values():
            if not bucket.pushed:
                self._push(bucket)
            bucket.pushed = False
            bucket.ready.clear()
        pending, self._pending = self._pending, []
        pulled, self._pulled = self._pulled, []
        self.clock += 1
        for handle in pending:
            handle.wait()
        for bucket, target in pulled:
            bucket.store_pulled(target)

    def close(self):
        """Say goodbye to the scheduler (the job ends once every worker has). Called at
        exit if the program does not; a program dying of an exception says no goodbye, so
        the scheduler reports it dead to everyone."""
        if self._closed or not self.is_distributed:
            self._closed = True
            return
        try:
            if not _failed and not self._membership.dead:
                for handle in self._pending:
                    handle.wait()
                # Leave the model complete for evaluation or saving after close().
                if self._sparse:
                    self._pull(list(self._sparse))
                self._membership.goodbye()
        finally:
            self._closed = True
            self._store.close()
            self._membership.close()

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        if error_type is None:
            self.close()
        else:
            # No goodbye: the scheduler notices the silence and tells every other process.
            global _failed
            _failed = True
            self.close()
        return False


def _host_gradient(grad):
    """A gradient as numpy (RowSparseGrad stays row-sparse) for the wire."""
    if hasattr(grad, "indices"):
        return type(grad)(backend.to_numpy(grad.indices), backend.to_numpy(grad.values), grad.shape)
    return backend.to_numpy(grad)
