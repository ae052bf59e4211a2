"""DataParallel: the one object a worker program wraps its model and optimizer with. Alone it
trains locally; with DISTTRAIN_ROLE=worker it trains through the parameter server."""
import sys
import time

import numpy as np

from disttrain import backend, config, elastic
from disttrain.buffer_average import BufferAverage
from disttrain.observe.steps import StepTimer
from disttrain.observe.trace import Tracer
from disttrain.ps import client, membership, protocol

BUCKET_BYTES = 1 << 20  # about where a message's fixed cost falls below its transfer time


class _Bucket:
    """Parameters whose gradients travel together: one pushpull message (one per server that
    holds some of them), sent from the gradient hook of the last of them; the reply carries
    their weights of the next clock. Each parameter stays its own key, named as in
    ``named_parameters()``, so a parameter without gradient this step is simply left alone."""

    def __init__(self, names, params):
        self.names, self.params = names, params
        self.ready = set()      # ids of the parameters whose gradient is final this step
        self.pushed = False

    def gradients(self):
        """{name: host gradient, or None for "no gradient this step"}."""
        return {name: None if p.grad is None else _host_gradient(p.grad)
                for name, p in zip(self.names, self.params)}

    def pull_targets(self):
        return {name: _pull_target(p.data) for name, p in zip(self.names, self.params)}


class DataParallel:
    """``DataParallel(model, optimizer, mode="sync" | "async" | "ssp", staleness=0)``.

    Distributed, one step is: backward() sends each bucket of gradients from the
    gradient-ready hook of its last parameter (so communication overlaps the rest of
    backward); step() waits for the replies, which carry the fresh weights. Rank 0
    initialises the servers with its weights and optimizer config; every worker then pulls
    them, so all start equal. The servers' keys are the ``named_parameters()`` names.

    Sparse embeddings (a module with ``sparse=True`` and a ``weight``): pushes carry only the
    rows of the RowSparseGrad; pulls fetch only the rows a batch uses, at the start of that
    module's forward (its indices are known there, and in sync mode those rows are exactly
    what every worker's previous step produced). ``state_dict()`` (DataParallel's: use it
    for checkpoints) and ``close()`` pull such tables whole, so checkpoints and evaluation
    never see stale rows.

    A worker leaves the job with ``close()``, which the end of a ``with DataParallel(...)``
    block calls. A worker that ends any other way (an exception in the block, a crash, a
    kill, or no close()) says no goodbye: its heartbeats stop, and the scheduler names it
    dead to every other process, which then exit non-zero.

    overlap=False pushes every gradient in step() instead of from backward's hooks: needed
    when gradients change between backward() and step() (clipping, accumulation over several
    backward calls).

    Dense parameters travel in buckets of about ``bucket_bytes``, as in PyTorch DDP: the
    parameters of a bucket (consecutive in reverse registration order, the order backward
    finishes them; one parameter group) go out as one pushpull message per server, the
    moment the last of their gradients is ready, and its reply brings their weights of the
    next clock: one message per bucket and step instead of a push and a pull per parameter.
    Its small gradients travel packed in one frame, and the server updates them with one
    optimizer call (see ``ps/group.py``); each is still the key of its own name.
    A parameter with no gradient in a step is pushed as "none" and left as it is.
    ``bucket_bytes=0`` sends every parameter in a message of its own.

    Floating-point buffers (BatchNorm's running statistics) are averaged over the workers
    at every clock through one extra key (see ``buffer_average.BufferAverage``), so each
    worker's, and the saved model's, statistics describe all the data.

    ``self.timer`` (disttrain.observe.steps.StepTimer) splits each step into compute, push,
    pull and apply. ``metrics_dir``: rank 0 tells the servers to write their metrics lines
    there (default: DISTTRAIN_METRICS_DIR, which the servers also read themselves).

    ``checkpoints``: a ``checkpoint_dist.Checkpoints``; rank 0 then loads the newest usable
    checkpoint into the servers right after init, before anyone pulls.

    In an elastic job (launch -n MIN:MAX) ``self.elastic`` follows who is in the job: SIGTERM
    makes this worker leave after its step, a new worker waits to be let in, and
    ``on_membership_change(old_count, new_count)`` is called on every worker at the clock the
    count changes (rescale the learning rate there: docs/elastic.md). ``num_workers`` is the
    number in the job now.
    """

    def __init__(self, model, optimizer, mode="sync", staleness=0, overlap=True,
                 bucket_bytes=BUCKET_BYTES, metrics_dir=None, checkpoints=None,
                 on_membership_change=None):
        if mode not in protocol.MODES:
            raise ValueError(f"DataParallel: mode {mode!r} is not one of {protocol.MODES}")
        if not (isinstance(staleness, int) and staleness >= 0):
            raise ValueError(f"DataParallel: staleness {staleness!r} must be an int >= 0")
        if not (isinstance(bucket_bytes, int) and bucket_bytes >= 0):
            raise ValueError(f"DataParallel: bucket_bytes {bucket_bytes!r} must be an int >= 0")
        self.model, self.optimizer = model, optimizer
        self.mode, self.staleness, self.overlap = mode, staleness, overlap
        self.bucket_bytes = bucket_bytes
        self.checkpoints = checkpoints   # a checkpoint_dist.Checkpoints to resume from / write
        self.rank, self.num_workers, self.num_servers, self.clock = 0, 1, 0, 0
        settings = config.from_env()
        self.metrics_dir = metrics_dir or settings.metrics_dir
        if settings.role not in (None, "worker"):
            raise RuntimeError(f"DataParallel runs in worker programs, but "
                               f"DISTTRAIN_ROLE={settings.role!r}")
        self.is_distributed = settings.role == "worker"
        # A replacement of a dead worker (ps-lite's is_recovery): the clock it resumed at.
        self.recovered_clock = None
        # Elastic jobs (launch -n MIN:MAX): a disttrain.elastic.WorkerElastic; the callback
        # gets (old, new) worker counts when workers join or leave (see disttrain/elastic.py).
        self.elastic = None
        self._on_membership_change = on_membership_change
        self._closed = False
        self.timer = StepTimer()   # the time split of each step (disttrain.observe.steps)
        if self.is_distributed:
            self._connect(settings)

    # --- set-up -----------------------------------------------------------------
    def _connect(self, settings):
        self._membership = membership.Membership.from_config("worker", settings)
        try:
            book = self._membership.register(rank=settings.rank)
            self.rank, self.num_workers = self._membership.rank, len(book["worker"])
            if self._membership.elastic:
                self.elastic = elastic.WorkerElastic(
                    self, self._on_membership_change, settings.min_workers or 1,
                    settings.restart_timeout or settings.timeout)
                self.num_workers = len(self.elastic.active)
            self.num_servers = len(book["server"])
            self._store = client.KVStore(book, self.rank, self._membership,
                                         self._membership.timeout)
            self.timer = StepTimer(self.rank, Tracer(self._membership.clock)
                                   if "trace" in settings.observe else None, self._store,
                                   report="report" in settings.observe)
            self._params = dict(self.model.named_parameters())
            self._lr_group = {id(p): i for i, g in enumerate(self.optimizer.param_groups)
                              for p in g["params"]}
            self._sparse = self._sparse_modules()
            self._buckets = self._make_buckets()
            self._bucket_of = {id(p): b for b in self._buckets for p in b.params}
            for name, p in self._params.items():
                self._store.declare(name, p.data.shape, p.data.dtype, sparse=name in self._sparse)
            self._averaged = BufferAverage(self.model, self._store)   # BatchNorm statistics
            # A replacement joins a running job: the servers hold everything, and the other
            # workers are past the start barrier, waiting in the clock it must redo.
            replacing = self._membership.recovery
            replica = settings.server_replicas and self.num_servers > 1
            if self.rank == 0 and settings.recovery and not replica:
                self._store.on_server_restarted = self._reinit_server   # no replica to fetch
            joining = self._membership.join   # elastic: a new worker of a running job
            if self.rank == 0 and not replacing and not joining:
                self._store.init({**{n: backend.to_numpy(p.data) for n, p in self._params.items()},
                                  **self._averaged.initial()},
                                 self.optimizer.config(), self.mode, self.staleness,
                                 {"metrics_dir": self.metrics_dir} if self.metrics_dir else None,
                                 recovery=settings.recovery and self.mode == "sync")
                if self.checkpoints is not None:   # servers load a checkpoint, if there is one
                    self.checkpoints.restore_servers(self)
            if not replacing and not joining:
                self._membership.barrier("worker")
            if self.checkpoints is not None:
                self.checkpoints.learn_restored(self)
            if joining:
                # A SIGTERM while it waits: a worker may be marking its join right now, so
                # it still comes in, and leaves after its first step (the usual leave).
                self.elastic.leave_on_sigterm()
                self.clock = self.elastic.admit()
                self._pull(list(self._params))
                self._averaged.recover(self.clock, exact=False)
            elif replacing:
                self._recover()
            else:
                self._pull(list(self._params))   # every worker starts from rank 0's
        except BaseException:
            self._membership.close()
            raise
        self._pending, self._pulled = [], []   # handles; {name: pull target} per pushpull
        if self.elastic is not None:
            self.elastic.leave_on_sigterm()
        if self.overlap:
            for p in self._params.values():
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._row_pulls = [module.register_forward_pre_hook(self._rows_puller(name))
                           for name, module in self._sparse.items()]

    def _recover(self):
        """A replacement worker: continue at clock c, the first its predecessor did not push
        to every key (servers' `recover`), from the weights of version c (an exact pull, sync;
        async / ssp: the current ones). Its pushes of c that reached a server are skipped there."""
        handle = self._store.request("recover", {"rank": self.rank})
        handle.wait()
        clocks = [reply["clock"] for reply in handle.replies.values() if reply["clock"] is not None]
        self.clock = self.recovered_clock = min(clocks, default=0)
        self._pull(list(self._params))
        self._averaged.recover(self.clock, exact=self.mode == "sync")
        print(f"disttrain: worker {self.rank} recovered: a replacement, resuming at clock "
              f"{self.clock}", file=sys.stderr, flush=True)

    def _reinit_server(self, server, clocks):
        """A server restarted without a replica gets this worker's weights (in sync mode
        every worker holds the weights of its last clock): a key with an unanswered request
        of clock c at version c, any other at this worker's clock (its reply arrived)."""
        newest = None
        if self.checkpoints is not None:   # (its module is loaded then: harness made it)
            from disttrain.checkpoint_dist import complete_checkpoints
            found = complete_checkpoints(self.checkpoints.directory)
            newest = str(found[0]) if found else None
        arrays = {**{n: backend.to_numpy(p.data) for n, p in self._params.items()},
                  **self._averaged.initial()}
        versions = {(name, chunk.index): clocks.get((name, chunk.index), self.clock)
                    for name in arrays for chunk in self._store.specs[name][3]}
        self._store.reinit_server(server, arrays, versions, self.optimizer.config(), self.mode,
                                  self.staleness, newest)

    def _sparse_modules(self):
        """{weight key: module} of the layers that produce row-sparse gradients."""
        found = {}
        for prefix, module in self.model.named_modules():
            if getattr(module, "sparse", False) is True and "weight" in module._parameters:
                found[f"{prefix}.weight" if prefix else "weight"] = module
        return found

    def _make_buckets(self):
        """Sparse and frozen parameters go alone; the rest are grouped in reverse
        registration order (the order backward finishes them) up to ``bucket_bytes``, one
        parameter group (one learning rate) per bucket."""
        buckets, group, size = [], [], 0
        for name, p in reversed(self._params.items()):
            alone = name in self._sparse or not p.requires_grad
            if group and (alone or size + p.data.nbytes > self.bucket_bytes or
                          self._lr_group.get(id(p), 0) != self._lr_group.get(id(group[0][1]), 0)):
                buckets.append(group)
                group, size = [], 0
            group.append((name, p))
            size += p.data.nbytes
            if alone:
                buckets.append(group)
                group, size = [], 0
        if group:
            buckets.append(group)
        return [_Bucket([n for n, _ in g], [p for _, p in g]) for g in buckets]

    def _rows_puller(self, name):
        """A forward pre-hook for the sparse layer of key `name`: pull the rows its indices
        (the first argument) name, so the forward sees them current."""
        def pull_rows(module, args):
            array = args[0].data if hasattr(args[0], "data") else args[0]
            rows = np.unique(backend.to_numpy(array)).astype(np.int64)
            self._pull([name], rows={name: rows})
        return pull_rows

    # --- moving weights and gradients -------------------------------------------
    def _pull(self, names, rows=None):
        """Pull into the parameters' arrays in place (through a host copy on a GPU)."""
        outs = {name: _pull_target(self._params[name].data) for name in names}
        # A replacement redoing its first clock reads that clock's weights, not the next.
        exact = self.clock == self.recovered_clock and self.mode == "sync"
        waited = self.timer.wait_for([self._store.pull_async(outs, self.clock, rows, exact)])
        self._store_pulled(outs)
        self.timer.add("apply", waited, time.perf_counter())

    def _store_pulled(self, outs):
        for name, out in outs.items():
            data = self._params[name].data
            if out is not data:
                data[...] = backend.array_module(data).asarray(out)

    def _push(self, bucket, timed=True):
        """Send a bucket's gradients. A dense bucket's message asks for the weights of the
        next clock too (pushpull: one message per bucket and step, not two); the reply is
        written into the pull targets when step() waits for it. timed=False: the caller
        counts the time as push (step() times its whole sending part at once)."""
        started = time.perf_counter()
        bucket.pushed = True
        if self.elastic is not None:   # this clock's "leave" / "join" marks
            self._store.marks = self.elastic.marks(self.clock)
        lr = self.optimizer.param_groups[self._lr_group.get(id(bucket.params[0]), 0)]["lr"]
        if bucket.names[0] in self._sparse:   # its rows are pulled by the next forward
            self._pending.append(self._store.push_async(bucket.gradients(), self.clock, lr))
        else:
            targets = bucket.pull_targets()
            self._pending.append(self._store.pushpull_async(bucket.gradients(), targets,
                                                            self.clock, lr))
            self._pulled.append(targets)
        if timed:
            self.timer.add("push", started, time.perf_counter())

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
    def state_dict(self):
        """The model's state_dict(), sparse tables pulled whole first (between steps a worker
        holds only the rows its own batches used)."""
        if self.is_distributed and self._sparse and not self._closed:
            self._pull(list(self._sparse))
        return self.model.state_dict()

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        self.timer.step_entered()
        if not self.is_distributed:
            started = time.perf_counter()
            self.optimizer.step()
            self.timer.add("apply", started, time.perf_counter())
            return self.timer.step_done()
        # Buckets with no gradient this step still send an empty push: sync servers count N.
        # Everything up to the wait is sending, timed as one span: no untimed gap inside the
        # step for the scheduler to land a context switch in.
        sending = time.perf_counter()
        for bucket in self._buckets:
            if not bucket.pushed:
                self._push(bucket, timed=False)
            bucket.pushed = False
            bucket.ready.clear()
        pending, self._pending = self._pending, []
        pulled, self._pulled = self._pulled, []
        self._averaged.send(pending)
        self.clock += 1
        self.timer.add("push", sending, time.perf_counter())
        waited = self.timer.wait_for(pending)
        for targets in pulled:
            self._store_pulled(targets)
        self._averaged.receive()
        if self.elastic is not None:
            self.elastic.after_step(self.clock - 1)
        self.timer.add("apply", waited, time.perf_counter())
        self.timer.step_done()

    def close(self, failed=False):
        """Leave the job. Normally: wait for what is in flight, pull sparse tables whole
        (the model is complete for evaluation or saving), and say goodbye to the scheduler
        (the job ends once every worker has). failed=True leaves without goodbye, so the
        scheduler names this worker dead to everyone."""
        if self._closed or not self.is_distributed:
            self._closed = True
            return
        for handle in self._row_pulls:
            handle.remove()
        try:
            if not failed and not self._membership.dead:
                for handle in self._pending:
                    handle.wait()
                # Leave the model complete for evaluation or saving after close().
                if self._sparse:
                    self._pull(list(self._sparse))
                self._membership.goodbye(leave=self.elastic is not None and self.elastic.left)
        finally:
            self._closed = True
            self.timer.close()
            self._store.close()
            self._membership.close()

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        # After an exception, no goodbye: the scheduler notices the silence and tells every
        # other process which worker failed.
        self.close(failed=error_type is not None)
        return False


def _pull_target(data):
    """The host array a pull writes into: the parameter's own array, or a host copy."""
    return data if isinstance(data, np.ndarray) else backend.to_numpy(data)


def _host_gradient(grad):
    """A gradient as numpy (RowSparseGrad stays row-sparse) for the wire."""
    if hasattr(grad, "indices"):
        return type(grad)(backend.to_numpy(grad.indices), backend.to_numpy(grad.values), grad.shape)
    return backend.to_numpy(grad)
