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


class DataParallel:
    """``DataParallel(model, optimizer, mode="sync" | "async" | "ssp", staleness=0)``.

    Distributed, one step is: backward() pushes each gradient from its gradient-ready hook
    (so communication overlaps the rest of backward); step() waits for the pushes and pulls
    the fresh weights into the parameters' arrays in place. Rank 0 initialises the servers
    with its weights and optimizer config; every worker then pulls them, so all start equal.

    Sparse embeddings (a module with ``sparse=True`` and a ``weight``): pushes carry only the
    rows of the RowSparseGrad; pulls fetch only the rows a batch uses, at the start of that
    module's forward (its indices are known there, and in sync mode those rows are exactly
    what every worker's previous step produced). ``model.state_dict()`` and ``close()`` pull
    such tables whole, so checkpoints and evaluation never see stale rows.

    overlap=False pushes every gradient in step() instead of from backward's hooks: needed
    when gradients change between backward() and step() (clipping, accumulation over several
    backward calls). With overlap, ready gradients are pushed in buckets of about
    ``bucket_bytes``, as PyTorch DDP does: every message costs the server and the worker
    fixed Python work (~0.1 ms), so ten small pushes per step cost more than one.
    """

    def __init__(self, model, optimizer, mode="sync", staleness=0, overlap=True,
                 bucket_bytes=BUCKET_BYTES):
        if mode not in server.MODES:
            raise ValueError(f"DataParallel: mode {mode!r} is not one of {server.MODES}")
        if not (isinstance(staleness, int) and staleness >= 0):
            raise ValueError(f"DataParallel: staleness {staleness!r} must be an int >= 0")
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
            self._names = {id(p): name for name, p in self._params.items()}
            self._lr_group = {id(p): i for i, g in enumerate(self.optimizer.param_groups)
                              for p in g["params"]}
            self._sparse = self._sparse_modules()
            for name, p in self._params.items():
                self._store.declare(name, p.data.shape, p.data.dtype, sparse=name in self._sparse)
            if self.rank == 0:
                self._store.init({n: backend.to_numpy(p.data) for n, p in self._params.items()},
                                 self.optimizer.config(), self.mode, self.staleness)
            self._membership.barrier("worker")
            self._pull(list(self._params))   # every worker starts from rank 0's
        except BaseException:
            self._membership.close()
            raise
        self._pushed, self._pending = set(), []
        self._bucket, self._bucket_size = [], 0   # ready gradients not yet pushed
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
    def _pull(self, names, rows=None, before=()):
        """Pull into the parameters' arrays in place (through a host copy on a GPU).

        ``before``: handles (pushes) to wait for too. The pull is sent without waiting for
        them: each server connection delivers in order, so a server sees the pushes first,
        and one round trip per step is saved.
        """
        outs = {}
        for name in names:
            data = self._params[name].data
            outs[name] = data if isinstance(data, np.ndarray) else backend.to_numpy(data)
        handle = self._store.pull_async(outs, self.clock, rows)
        for pushed in before:
            pushed.wait()
        handle.wait()
        for name in names:
            data = self._params[name].data
            if outs[name] is not data:
                data[...] = backend.array_module(data).asarray(outs[name])

    def _lr(self, p):
        return self.optimizer.param_groups[self._lr_group.get(id(p), 0)]["lr"]

    def _push(self, names):
        by_lr = {}
        for name in names:
            p = self._params[name]
            grad = p.grad
            if grad is not None:
                grad = _host_gradient(grad)
            by_lr.setdefault(self._lr(p), {})[name] = grad
        for lr, grads in by_lr.items():
            self._pending.append(self._store.push_async(grads, self.clock, lr))

    def _on_grad_ready(self, tensor):
        name = self._names[id(tensor)]
        if name in self._pushed:
            raise RuntimeError(f"DataParallel: the gradient of {name!r} became ready twice in "
                               f"one step (backward() twice before step()?); use "
                               f"DataParallel(..., overlap=False) to accumulate gradients")
        self._pushed.add(name)
        self._bucket.append(name)
        grad = tensor.grad
        self._bucket_size += grad.values.nbytes if hasattr(grad, "indices") else getattr(grad, "nbytes", 0)
        if self._bucket_size >= self.bucket_bytes:
            self._flush_bucket()

    def _flush_bucket(self):
        if self._bucket:
            self._push(self._bucket)
        self._bucket, self._bucket_size = [], 0

    # --- the training-loop API ----------------------------------------------------
    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        if not self.is_distributed:
            return self.optimizer.step()
        # Keys with no gradient this step still send an empty push: sync servers count N.
        self._bucket += [n for n in self._params if n not in self._pushed]
        self._flush_bucket()
        pending, self._pending = self._pending, []
        self._pushed.clear()
        self.clock += 1
        self._pull([n for n in self._params if n not in self._sparse], before=pending)

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
