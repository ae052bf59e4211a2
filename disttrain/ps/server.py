"""A parameter server: its state machine (keys, sync / async / ssp clocks, gradient
accumulation, optimizer updates) that never touches a socket, and `serve()`, its loop."""
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from disttrain.observe.server import ServerObserver
from disttrain.optim import rules
from disttrain.tensor import RowSparseGrad
from disttrain.ps import (auth, elastic, group as groups, protocol, rebuild, recovery, replica,
                           snapshot, transport)
from disttrain.ps.layout import Chunk, chunk_layout
from disttrain.ps.protocol import MODES, Message, Payload, RequestError

# Dense keys are updated slice by slice: every rule is elementwise, so the result is the
# same, and a 1 MB slice keeps parameter, gradient and the rule's scratch in cache (figure
# in docs/performance.md). Each slice keeps its own state dict.
UPDATE_SLICE_BYTES = protocol.FRAME_BYTES


@dataclass(eq=False)
class KeyChunk:
    """One server's chunk of one key: its weights, optimizer state and clocks."""
    name: str
    shape: tuple
    dtype: np.dtype
    chunk: Chunk
    sparse: bool
    param: np.ndarray                       # (rows in chunk, row_size), owned by the server
    state: dict = field(default_factory=dict)
    version: int = 0                        # sync: clocks applied; else pushes applied
    pushes: list = field(default_factory=list)   # pushes received per worker rank
    pending: dict = field(default_factory=dict)  # sync: clock -> Accumulator
    spare: list = field(default_factory=list)    # gradient buffers to reuse (warm pages)
    group: "groups.Group" = None            # while set, `param` is a view into group.param
    # and the optimizer state and pending gradients live in the group
    average: bool = False                   # pushes are values to average, not gradients
    applied: int = 0                        # pushes summed into applied updates (ps/recovery.py)
    previous: np.ndarray = None             # weights of version - 1 (sync with recovery on)

    @property
    def members(self):
        return (self,)


# What one optimizer call updates: a KeyChunk, or a Group of them stored back to back. Both
# have the `param`, `state`, `sparse`, `spare`, `pending`, `version` and `members` that
# ServerState._push, the gradient kinds and Accumulator use.
UpdateTarget = KeyChunk | groups.Group


# --- gradients: what a push brings, and how one clock's pushes add up --------------------
class DenseGradient:
    """A dense push for one update target, as received: (offset, 1-D piece) pairs that tile
    it. Its pieces are the received frames; nothing writes to them."""
    __slots__ = ("pieces",)

    def __init__(self, pieces):
        self.pieces = pieces

    def add_to(self, accumulator):
        accumulator.add_dense(self)

    def apply(self, target, rule, hyper, divisor):
        param = target.param.reshape(-1)
        step = _slice_elements(param)
        if divisor == 1 and not target.sparse and _on_slice_grid(self.pieces, step, param.size):
            # One push whose frames are the update slices: run the rule on the received
            # buffers directly (rules never write to their gradient).
            for offset, piece in self.pieces:
                rule(param[offset:offset + piece.size], piece,
                     target.state.setdefault(offset // step, {}), **hyper)
            return
        DenseSum(_gather(target, self.pieces)).apply(target, rule, hyper, divisor)


class DenseSum:
    """Dense gradients summed into a buffer shaped like the target; after the update the
    buffer goes to `target.spare` for the next sum."""
    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array

    def apply(self, target, rule, hyper, divisor):
        gradient = self.array
        if divisor != 1:
            gradient /= divisor
        if target.sparse:   # lazily updated rows keep per-row state: stay lazy for dense pushes
            rules.apply_rows(rule, target.param, np.arange(target.param.shape[0]), gradient,
                             target.state, **hyper)
        else:
            param, flat = target.param.reshape(-1), gradient.reshape(-1)
            step = _slice_elements(param)
            for start in range(0, param.size, step):
                rule(param[start:start + step], flat[start:start + step],
                     target.state.setdefault(start // step, {}), **hyper)
        target.spare.append(gradient)


class RowGradient:
    """Some rows of a sparse key: local row indices (unique) and their values, one row each."""
    __slots__ = ("rows", "values")

    def __init__(self, rows, values):
        self.rows, self.values = rows, values

    def add_to(self, accumulator):
        accumulator.add_rows(self)

    def apply(self, target, rule, hyper, divisor):
        values = self.values / divisor if divisor != 1 else self.values
        rules.apply_rows(rule, target.param, self.rows, values, target.state, **hyper)


class Accumulator:
    """Sum of the gradients pushed for one clock of one update target. A lone dense push
    stays as received (no copy); a second one is summed into a reusable buffer. Sparse rows
    are kept until the clock is complete."""

    def __init__(self, target):
        self.target = target
        self.count = 0
        self.first = None           # the first dense push: a DenseGradient
        self.dense = None           # the sum of two or more, shaped like the target
        self.rows = []              # RowGradients

    def add(self, gradient):
        """gradient: a DenseGradient, a RowGradient, or None (a worker with no gradient for
        this target this step, which still counts)."""
        self.count += 1
        if gradient is not None:
            gradient.add_to(self)

    def add_dense(self, gradient):
        if self.first is None and self.dense is None:
            self.first = gradient
            return
        flat = self.materialize().reshape(-1)
        for offset, piece in gradient.pieces:
            flat[offset:offset + piece.size] += piece

    def add_rows(self, gradient):
        self.rows.append(gradient)

    def materialize(self):
        if self.dense is None:
            self.dense = _gather(self.target, self.first.pieces if self.first else ())
            self.first = None
        return self.dense

    def share(self, key, start, stop):
        """The part of this (dense) sum that falls on elements start..stop, as the
        Accumulator of `key` (a group member dissolving)."""
        share = Accumulator(key)
        share.count = self.count
        if self.dense is not None:
            share.dense = self.dense[start:stop].reshape(key.param.shape).copy()
        elif self.first is not None:
            share.first = DenseGradient([(0, self.first.pieces[0][1][start:stop])])
        return share

    def total(self):
        """What the clock's pushes add up to: None (no worker had a gradient), the lone
        dense push as received, the rows summed (a RowGradient), or a DenseSum."""
        if self.rows:
            values = np.concatenate([g.values for g in self.rows])
            summed = RowSparseGrad.from_rows(np.concatenate([g.rows for g in self.rows]), values,
                                             (self.target.param.shape[0],) + values.shape[1:])
            if self.dense is None and self.first is None:
                return RowGradient(summed.indices, summed.values)
            self.materialize()[summed.indices] += summed.values
            return DenseSum(self.dense)
        if self.first is not None:
            return self.first
        return None if self.dense is None else DenseSum(self.dense)


def _gather(target, pieces):
    """A buffer shaped like the target (a spare one if any: its pages are warm) holding the
    pieces; zeros where none."""
    buffer = target.spare.pop() if target.spare else np.empty_like(target.param)
    flat = buffer.reshape(-1)
    if not pieces:
        flat[:] = 0
    for offset, piece in pieces:
        flat[offset:offset + piece.size] = piece
    return buffer


def _slice_elements(param):
    return max(1, UPDATE_SLICE_BYTES // param.itemsize)


def _on_slice_grid(pieces, step, size):
    """True when every piece is exactly one update slice (what KVStore sends: frames and
    slices are both cut every FRAME_BYTES from the chunk start)."""
    return all(offset % step == 0 and (piece.size == step or offset + piece.size == size)
               for offset, piece in pieces)


class ServerState:
    """Everything one server knows, driven by `handle(route, message)`, which returns the
    replies to send as (route, Message) pairs; `route` is opaque (the transport's peer id)."""

    def __init__(self, rank, num_workers, num_servers):
        self.rank, self.num_workers, self.num_servers = rank, num_workers, num_servers
        self.keys = {}
        self.config = None          # {"optimizer": {...}, "mode": ..., "staleness": ...}
        self.waiting_pulls = []     # (route, message, keys) held back by the consistency mode
        self.sender = f"server-{rank}"
        self.checkpoint_clock = None  # first clock a worker pushed asking for a checkpoint
        self.restored = None          # {"dir", "step"} of the checkpoint restored, if any
        self.keep_previous = False    # sync with recovery on: a replacement pulls version - 1
        # For chain replication (ps/replica.py): the KeyChunks changed since it last looked
        # (id -> chunk), and whether a sync push is answered only once its clock is applied.
        self.updated = {}
        self.hold_pushes = False
        self.roster = None            # elastic jobs: which workers count at which clock

    # --- dispatch -------------------------------------------------------------
    def handle(self, route, message):
        try:
            if message.op == "init":
                replies = [(route, self._init(message))]
            elif message.op == "push" and self.hold_pushes and self.config and \
                    self.config["mode"] == "sync":
                self.waiting_pulls.append((route, message, self._push(message)))
                replies = []
            elif message.op == "push":
                self._push(message)
                replies = [(route, Message("reply", message.id, self.sender))]
            elif message.op in ("pull", "pushpull"):
                keys = self._check_pull(message)
                if message.op == "pushpull":
                    self._push(message, keys)
                self.waiting_pulls.append((route, message, keys))
                replies = []
            elif message.op in ("checkpoint", "restore", "restored"):
                replies = [(route, self._snapshot(message))]
            elif message.op == "recover":   # a replacement worker: where its predecessor was
                replies = [(route, recovery.recover_reply(self, message, self._worker_rank(message)))]
            elif message.op == "stats":
                replies = [(route, recovery.stats_reply(self, message))]
            elif message.op == "joined":   # a new worker (elastic): where it starts
                replies = [(route, elastic.joined_reply(self, message, self._worker_rank(message)))]
            else:
                raise RequestError(f"a server does not serve op {message.op!r}")
        except RequestError as error:
            return [(route, protocol.error_reply(message.id, self.sender, str(error)))]
        replies += self._answer_ready_pulls()
        self._pass_on_checkpoint_request(message, replies)
        elastic.tell_members(self, replies)
        return replies

    def _pass_on_checkpoint_request(self, message, replies):
        """A push carrying "checkpoint": clock (a preempted worker) makes every later reply
        say so: in sync mode every worker then learns it in the replies of that very clock
        (they wait for all pushes of it), and all write the checkpoint after it."""
        clock = message.meta.get("checkpoint")
        if message.op in ("push", "pushpull") and type(clock) is int and \
                (self.checkpoint_clock is None or clock < self.checkpoint_clock):
            self.checkpoint_clock = clock
        if self.checkpoint_clock is not None:
            for _, reply in replies:
                if reply.op == "reply":
                    reply.meta["checkpoint"] = self.checkpoint_clock

    def _snapshot(self, message):
        """checkpoint: write this server's shard into meta "dir"; restore: load it from a
        checkpoint there (any number of servers wrote it); restored: which one was loaded."""
        directory, step = message.meta.get("dir"), message.meta.get("step")
        if message.op == "restored":
            return Message("reply", message.id, self.sender, meta={"restored": self.restored})
        self._require_config(message)
        if type(directory) is not str or type(step) is not int:
            raise RequestError(f"{message.op}: meta needs 'dir' (str) and 'step' (int), got "
                               f"{directory!r} and {step!r}")
        try:
            if message.op == "checkpoint":
                return Message("reply", message.id, self.sender,
                               meta=snapshot.write_shard(self, directory, step))
            snapshot.restore_shard(self, directory, snapshot.read_manifest(directory))
            self.updated.update((id(key), key) for key in self.keys.values())
        except snapshot.SnapshotError as error:
            raise RequestError(str(error)) from None
        self.restored = {"dir": directory, "step": step}
        return Message("reply", message.id, self.sender, meta={"restored": self.restored})

    # --- init -----------------------------------------------------------------
    def _init(self, message):
        meta = message.meta
        config = {"optimizer": meta.get("optimizer"), "mode": meta.get("mode"),
                  "staleness": meta.get("staleness", 0)}
        optimizer = config["optimizer"]
        if not (isinstance(optimizer, dict) and optimizer.get("name") in rules.RULES
                and isinstance(optimizer.get("hyper"), dict)):
            raise RequestError(f"init: optimizer must be {{'name': one of {sorted(rules.RULES)}, "
                               f"'hyper': {{...}}}}, got {optimizer!r}")
        if config["mode"] not in MODES:
            raise RequestError(f"init: mode {config['mode']!r} is not one of {MODES}")
        if not (isinstance(config["staleness"], int) and config["staleness"] >= 0):
            raise RequestError(f"init: staleness {config['staleness']!r} must be an int >= 0")
        if self.config is not None and self.config != config:
            raise RequestError(f"init: config {config} differs from the first init's {self.config}")
        specs = meta.get("specs")
        if not (isinstance(specs, list) and len(specs) == len(message.keys)):
            raise RequestError("init: meta 'specs' must list {shape, dtype, sparse} per key")
        chunks = self._chunk_indices(message)
        payloads = _by_key(message)
        new = {}
        for index, (name, spec, chunk) in enumerate(zip(message.keys, specs, chunks)):
            if (name, chunk) in self.keys or (name, chunk) in new:
                raise RequestError(f"init: key {name!r} chunk {chunk} is already initialized")
            new[name, chunk] = self._new_key(name, spec, chunk)
            self._copy_dense(new[name, chunk], payloads[index], "init")
        self.config = config
        self.keep_previous = meta.get("recovery") is True and config["mode"] == "sync"
        self.keys.update(new)
        self.updated.update((id(key), key) for key in new.values())
        return Message("reply", message.id, self.sender)

    def _new_key(self, name, spec, index):
        try:
            shape = tuple(int(n) for n in spec["shape"])
            dtype = np.dtype(spec["dtype"])
            sparse = bool(spec.get("sparse", False))
            average = bool(spec.get("average", False))
        except (KeyError, TypeError, ValueError) as error:
            raise RequestError(f"init: bad spec {spec!r} for key {name!r}: {error}") from None
        if dtype.name not in protocol.DTYPES or any(n < 0 for n in shape):
            raise RequestError(f"init: key {name!r} has unsupported dtype {dtype} or shape {shape}")
        layout = chunk_layout(name, shape, dtype, self.num_servers)
        if index >= len(layout) or layout[index].server != self.rank:
            raise RequestError(f"init: chunk {index} of key {name!r} {shape} does not belong "
                               f"on server {self.rank}")
        chunk = layout[index]
        param = np.empty((chunk.row_stop - chunk.row_start, chunk.row_size), dtype=dtype)
        if average and sparse:
            raise RequestError(f"init: key {name!r} cannot be both sparse and average")
        return KeyChunk(name, shape, dtype, chunk, sparse, param,
                        pushes=[0] * self.num_workers, average=average)

    # --- payload checks -------------------------------------------------------
    @staticmethod
    def _chunk_indices(message):
        chunks = message.meta.get("chunks")
        if type(chunks) is not list or len(chunks) != len(message.keys) or \
                not all(type(c) is int for c in chunks):
            raise RequestError(f"{message.op}: meta 'chunks' must list one chunk index per "
                               f"key ({len(message.keys)}), got {chunks!r}")
        return chunks

    def _keys(self, message):
        """The KeyChunks a request names, as (key name, chunk index) pairs."""
        keys = []
        for name, chunk in zip(message.keys, self._chunk_indices(message)):
            key = self.keys.get((name, chunk))
            if key is None:
                raise RequestError(f"unknown key {name!r} chunk {chunk} on server {self.rank} "
                                   f"(not initialized here)")
            keys.append(key)
        return keys

    def _copy_dense(self, key, payloads, what):
        """Copy a key's dense payloads into its fresh chunk-shaped array (init) — they must
        cover the chunk exactly, in order."""
        flat = key.param.reshape(-1)
        for offset, piece in self._dense_pieces(key, payloads, what):
            flat[offset:offset + piece.size] = piece

    def _dense_pieces(self, key, payloads, what):
        """(offset within the chunk, 1-D array) for each of a key's dense payloads, checked
        to tile the chunk exactly."""
        expected = key.chunk.start
        pieces = []
        for p in payloads:
            if p.kind != "dense":
                raise RequestError(f"{what}: key {key.name!r} payload kind {p.kind!r}, expected dense")
            self._check_dtype(key, p.array, what)
            if p.start != expected or p.array.ndim != 1:
                raise RequestError(f"{what}: key {key.name!r} slice at {p.start} of shape "
                                   f"{p.array.shape}, expected a 1-D slice at {expected}")
            pieces.append((p.start - key.chunk.start, p.array))
            expected += p.array.size
        if expected != key.chunk.stop:
            raise RequestError(f"{what}: key {key.name!r} payloads cover elements "
                               f"{key.chunk.start}..{expected}, server {self.rank} holds "
                               f"{key.chunk.start}..{key.chunk.stop}")
        return pieces

    @staticmethod
    def _check_dtype(key, array, what):
        if array.dtype != key.dtype:
            raise RequestError(f"{what}: key {key.name!r} is {key.dtype}, payload is {array.dtype}")

    def _row_pairs(self, key, payloads, what, with_values):
        """Local row indices (and their values) from a key's rows/values payloads."""
        rows, values = [], []
        step = 2 if with_values else 1
        if len(payloads) % step:
            raise RequestError(f"{what}: key {key.name!r} rows payload without its values")
        for i in range(0, len(payloads), step):
            row_payload = payloads[i]
            if row_payload.kind != "rows" or row_payload.array.dtype != np.int64 \
                    or row_payload.array.ndim != 1:
                raise RequestError(f"{what}: key {key.name!r} expected a 1-D int64 rows payload, "
                                   f"got {row_payload.kind} {row_payload.array.dtype}"
                                   f"{row_payload.array.shape}")
            local = row_payload.array - key.chunk.row_start
            if local.size and (local.min() < 0 or local.max() >= key.param.shape[0]):
                raise RequestError(f"{what}: key {key.name!r} rows outside "
                                   f"{key.chunk.row_start}..{key.chunk.row_stop - 1} on server "
                                   f"{self.rank}")
            rows.append(local)
            if with_values:
                value_payload = payloads[i + 1]
                self._check_dtype(key, value_payload.array, what)
                if value_payload.kind != "values" or \
                        value_payload.array.size != local.size * key.chunk.row_size:
                    raise RequestError(f"{what}: key {key.name!r} has {local.size} rows but "
                                       f"values of shape {value_payload.array.shape}")
                values.append(value_payload.array.reshape(local.size, key.chunk.row_size))
        return rows, values

    # --- push -----------------------------------------------------------------
    def _worker_rank(self, message):
        rank = message.meta.get("rank")
        if not (isinstance(rank, int) and 0 <= rank < self.num_workers):
            raise RequestError(f"{message.op}: worker rank {rank!r} not in 0..{self.num_workers - 1}")
        return rank

    def _require_config(self, message):
        if self.config is None:
            raise RequestError(f"{message.op} before init on server {self.rank}")

    def _gradient(self, key, payloads):
        """None (an empty push), a DenseGradient covering the chunk, or a RowGradient."""
        if not payloads:
            return None
        if payloads[0].kind == "dense":
            return DenseGradient(self._dense_pieces(key, payloads, "push"))
        rows, values = self._row_pairs(key, payloads, "push", with_values=True)
        rows = np.concatenate(rows)
        if len(np.unique(rows)) != len(rows):
            raise RequestError(f"push: key {key.name!r} repeats a row")
        return RowGradient(rows, np.concatenate(values))

    def _push_units(self, message, keys):
        """What a push updates, as (target, gradient) pairs: a target is a KeyChunk, or the
        Group of the chunks a packed payload carries (see ps/group.py)."""
        payloads = _by_key(message)
        if len(set(map(id, keys))) != len(keys):
            raise RequestError(f"push: a key chunk is named twice in {message.keys}")
        units, packed = [], set()
        for payload in message.payloads:
            if payload.kind == "packed":
                members = groups.packed_members(payload, keys, payloads, packed, self.rank)
                group = groups.group_of(members, UPDATE_SLICE_BYTES)
                if group is not None:
                    units.append((group, DenseGradient([(0, payload.array)])))
                    continue
                starts = np.cumsum([0] + [key.param.size for key in members]).tolist()
                units += [(key, DenseGradient([(0, payload.array[start:stop])]))
                          for key, start, stop in zip(members, starts, starts[1:])]
        for index, key in enumerate(keys):
            if index not in packed:
                if key.group is not None:   # pushed on its own now: back to a plain key
                    groups.dissolve(key.group)
                units.append((key, self._gradient(key, payloads[index])))
        return units

    def _push(self, message, keys=None):
        self._require_config(message)
        rank = self._worker_rank(message)
        clock, lr = message.meta.get("clock"), message.meta.get("lr")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool):
            raise RequestError(f"push: lr {lr!r} must be a number")
        keys = keys or self._keys(message)
        if keys and all(type(clock) is int and clock < key.pushes[rank] for key in keys):
            return keys   # applied already: a request re-sent to a restarted server
        # Check the whole request before changing anything, so a bad push leaves no trace
        # (forming or dissolving a group moves data but changes no value).
        units = self._push_units(message, keys)
        # A chunk that already has this (worker, clock) push skips it (ps/recovery.py).
        units = recovery.fresh_units(units, recovery.replayed(keys, rank, clock))
        if self.roster is not None:   # "leave" / "join" marks (ps/elastic.py)
            elastic.take_marks(self, rank, message.meta)
        sync = self.config["mode"] == "sync"
        for target, gradient in units:
            for key in target.members:
                key.pushes[rank] += 1
            # Sync sums N pushes of a clock; async and ssp apply every push as it arrives.
            accumulator = target.pending.setdefault(clock, Accumulator(target)) if sync \
                else Accumulator(target)
            accumulator.add(gradient)
            if not sync:
                self._apply(target, accumulator, lr, 1)
                self._count_update(target, 1)
            # Clocks are applied in order, each once all N workers pushed it (elastic: the
            # N that count at that clock).
            while sync and target.pending.get(target.version) and \
                    target.pending[target.version].count == elastic.expected(self, target.version):
                if self.keep_previous:
                    recovery.keep_previous(target)
                workers = elastic.expected(self, target.version)
                self._apply(target, target.pending.pop(target.version), lr, workers)
                self._count_update(target, workers)
        return keys

    def _count_update(self, target, contributions):
        target.version += 1
        for key in target.members:
            key.version = target.version
            key.applied += contributions   # pushes summed into updates (ps/recovery.py)
            self.updated[id(key)] = key   # for the replica (ps/replica.py)

    def _apply(self, target, accumulator, lr, divisor):
        """Run the optimizer rule on the target with the mean gradient of a clock (or of one
        push: async and ssp)."""
        gradient = accumulator.total()
        if gradient is None:
            return
        if target.average:
            self._average(target, accumulator)
            return
        optimizer = self.config["optimizer"]
        gradient.apply(target, rules.RULES[optimizer["name"]],
                       dict(optimizer["hyper"], lr=float(lr)), divisor)

    def _average(self, key, accumulator):
        """An average key (buffers such as BatchNorm statistics): sync stores the mean of the
        N pushed values; async / ssp move the stored value 1/N of the way to each push."""
        total = accumulator.materialize()
        if self.config["mode"] == "sync":
            np.divide(total, accumulator.count, out=key.param)
        else:
            key.param += (total - key.param) / self.num_workers
        key.spare.append(total)

    # --- pull -----------------------------------------------------------------
    def _check_pull(self, message):
        self._require_config(message)
        self._worker_rank(message)
        if type(message.meta.get("clock")) is not int:
            raise RequestError(f"{message.op}: clock {message.meta.get('clock')!r} must be an int")
        keys = self._keys(message)
        if message.op == "pull":
            for key, payloads in zip(keys, _by_key(message)):
                self._row_pairs(key, payloads, "pull", with_values=False)
            if message.meta.get("exact") is True:
                recovery.check_exact(self, keys, message.meta["clock"])
        return keys

    def _ready(self, message, keys):
        # A pushpull's pull half reads the weights of the clock after the one it pushed.
        clock = message.meta["clock"] + (message.op != "pull")
        mode = self.config["mode"]
        if mode == "sync":
            return all(key.version >= clock for key in keys)
        if mode == "ssp":
            # The puller is at `clock`; it may run at most `staleness` clocks ahead of the
            # slowest worker.
            return all(elastic.slowest(self, key) >= clock - self.config["staleness"]
                       for key in keys)
        return True

    def _answer_ready_pulls(self):
        replies, still_waiting = [], []
        for route, message, keys in self.waiting_pulls:
            if self._ready(message, keys):
                replies.append((route, self._pull_reply(message, keys)))
            else:
                still_waiting.append((route, message, keys))
        self.waiting_pulls = still_waiting
        return replies

    def _pull_reply(self, message, keys):
        # Sync replies may share the server's arrays (no copy): the next update of a chunk
        # needs every worker's next push, which each sends only after its pull arrived.
        # Async/ssp updates can come at any time, so they send a snapshot.
        if message.op == "push":   # a held push (hold_pushes): its clock is applied now
            return Message("reply", message.id, self.sender)
        snapshot = self.config["mode"] != "sync"
        requested = _by_key(message) if message.op == "pull" else None
        # An exact pull (a replacement worker) reads version == clock, maybe the kept one.
        exact = message.op == "pull" and message.meta.get("exact") is True
        payloads = []
        index = 0
        while index < len(keys):
            key = keys[index]
            rows = [p.array for p in requested[index] if p.kind == "rows"] if requested else []
            # The whole group asked for in packed order (a bucket): answer in one frame.
            packed, answered = (None, 0) if rows or exact else \
                groups.packed_reply(index, keys, snapshot)
            if packed is not None:
                payloads.append(packed)
                index += answered
            else:
                weights = recovery.exact_weights(key, message.meta["clock"]) if exact else None
                payloads += _key_reply(index, key, rows, snapshot, weights)
                index += 1
        return Message("reply", message.id, self.sender, message.keys, payloads,
                       meta={"versions": [key.version for key in keys]})


def _key_reply(index, key, rows, snapshot, weights=None):
    """The payloads answering a pull of one chunk: the asked-for rows, or all of it (of
    `weights`, default the chunk's current ones)."""
    weights = key.param if weights is None else weights
    if rows:
        local = np.concatenate(rows) - key.chunk.row_start
        values = weights[local]
        global_rows = local + key.chunk.row_start
        rows_per_frame = max(1, protocol.FRAME_BYTES // max(1, values[:1].nbytes))
        payloads = []
        for s in range(0, len(local), rows_per_frame):
            payloads.append(Payload(index, "rows", s, global_rows[s:s + rows_per_frame]))
            payloads.append(Payload(index, "values", s, values[s:s + rows_per_frame]))
        return payloads
    flat = weights.reshape(-1)
    if snapshot:
        flat = flat.copy()
    return [Payload(index, "dense", key.chunk.start + offset, piece)
            for offset, piece in protocol.split_frames(flat)]


def _by_key(message):
    """The message's payloads as one list per key (a packed one under its first key)."""
    lists = [[] for _ in message.keys]
    for payload in message.payloads:
        lists[payload.key].append(payload)
    return lists


def serve(membership, max_message_bytes=protocol.DEFAULT_MAX_MESSAGE_BYTES, host=None,
          rank=None, observe=frozenset(), metrics_dir=None, replicas=0, incarnation=0):
    """A server process's loop: register (asking for `rank`, the launcher's, if given, and
    advertising `host`, else the address on the route to the scheduler), then answer requests
    until the scheduler says shutdown (return 0) or reports a dead peer (return 1).
    `observe` and `metrics_dir` go to the ServerObserver (config.Config's fields).
    replicas=1: chain replication (ps/replica.py); incarnation > 0 (a restarted server): the
    shard is rebuilt first, from the replica or from the workers (ps/rebuild.py)."""
    restarted = incarnation > 0
    host = host or transport.advertised_host(membership.scheduler_address[len("tcp://"):])
    keys = membership.credentials
    # With replicas the other servers' keys get in too, for the replica ops only (below).
    listener = transport.Listener(host, max_message_bytes, security=keys and auth.ServerCurve(
        keys, ("worker", "server") if replicas else ("worker",), f"server {keys.rank}"))
    rejections = protocol.RejectionLog("server")
    observer = state = replication = None
    try:
        book = membership.register(tcp=listener.tcp_address, ipc=listener.ipc_address,
                                   rank=rank)
        if listener.security is not None:   # who is who among this host's ipc peers
            listener.security.learn_local_peers(book, transport.host_identity())
        state = ServerState(membership.rank, len(book["worker"]), len(book["server"]))
        if replicas and state.num_servers < 2:
            print("disttrain: --server-replicas 1 needs 2 or more servers; a lone server keeps "
                  "no replica", file=sys.stderr, flush=True)
            replicas = 0
        replication = _start_replication(state, listener, membership, book, max_message_bytes,
                                         replicas, incarnation)
        receive = replication.receive if replication is not None else listener.receive
        # Without a replica, a restarted server waits for worker 0's weights (ps/rebuild.py).
        awaiting = rebuild.AwaitWeights(state) if restarted and not replicas else None
        if membership.elastic:   # the workers of the book are those that count at clock 0
            state.roster = elastic.Roster(r for r, entry in enumerate(book["worker"]) if entry)
        observer = ServerObserver(membership.rank, state, membership.clock, observe,
                                  metrics_dir)
        book_version = membership.book_version
        # A replacement's (recovery) or a joiner's (elastic) first requests can overtake
        # the book notice that names it.
        newcomers = recovery.Newcomers((membership.restart_timeout or membership.elastic)
                                       and membership.heartbeat_timeout)
        while not membership.shutdown.is_set():
            if membership.dead:
                return 1
            if membership.book_version != book_version:   # a replaced worker has a new pid
                book_version = membership.book_version
                if listener.security is not None:
                    listener.security.learn_local_peers(membership.book, transport.host_identity())
            try:
                received = newcomers.next(listener.security) or receive(100)
            except protocol.ProtocolError as error:
                rejections.say(str(error))
                listener.send(error.identity, protocol.error_reply(
                    error.request_id, state.sender, str(error)))
                continue
            if received is None:
                observer.idle()
                continue
            identity, message = received
            started = time.perf_counter()
            if replication is not None and message.op in replica.OPS:
                # Never held: a chain's acknowledgements must not wait on the chain.
                replies = [(identity, replication.holder.handle(message))]
                observer.handled(message, replies, started)
            else:
                refusal = auth.worker_refusal(message)
                if refusal and newcomers.hold(identity, message):
                    continue
                try:
                    if refusal:
                        replies = [(identity, protocol.error_reply(message.id, state.sender,
                                                                   refusal))]
                    elif awaiting is not None and not awaiting.done:
                        replies = awaiting.handle(identity, message)
                    else:
                        replies = state.handle(identity, message)
                except Exception as error:  # a bug must not take the job down silently
                    traceback.print_exc()
                    replies = [(identity, protocol.error_reply(
                        message.id, state.sender,
                        f"internal error: {type(error).__name__}: {error}"))]
                observer.handled(message, replies, started)
                if replication is not None:
                    replies = replication.after(replies)
            for route, reply in replies:
                if reply.op == "error":
                    rejections.say(reply.meta["error"])
                listener.send(route, reply)
        return 0
    finally:
        if state is not None:
            recovery.say_counts(state)
        if observer is not None:
            observer.close()
        if replication is not None:
            replication.close()
        listener.close()
        membership.close()


def _start_replication(state, listener, membership, book, max_message_bytes, replicas,
                       incarnation):
    """A restarted server's shard back from its replica, and this server's part in the
    chain (None without replicas)."""
    if incarnation and replicas:
        replica.fetch_shard(state, book, membership, max_message_bytes)
    if not replicas:
        return None
    return replica.Replication(state, listener, membership, book, max_message_bytes,
                               incarnation)
