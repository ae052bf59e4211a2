"""Parameter servers: how keys are cut into chunks, and a server's state machine (sync /
async / ssp, optimizer updates) that never touches a socket; `serve()` wires it up."""
import os
import signal
import sys
import traceback
import zlib
from dataclasses import dataclass, field

import numpy as np

from disttrain.optim import rules
from disttrain.tensor import RowSparseGrad
from disttrain.ps import protocol, snapshot, transport
from disttrain.ps.protocol import Message, Payload

MODES = ("sync", "async", "ssp")

# Keys smaller than this live whole on one server: splitting a bias costs a message per
# server and buys no bandwidth.
MIN_SPLIT_BYTES = 64 * 1024

# Big keys are cut into chunks of at most this size, dealt round-robin to the servers; the
# client sends each chunk as its own message, so a server updates and answers one chunk
# while the next is still on the wire (measured: this pipelining is worth ~2x on 256 MB).
MAX_CHUNK_BYTES = 4 << 20

# Dense keys are updated slice by slice: every rule is elementwise, so the result is the
# same, and a 1 MB slice keeps parameter, gradient and the rule's scratch in cache
# (measured 3x faster than one pass over a 256 MB key). Each slice keeps its own state dict.
UPDATE_SLICE_BYTES = protocol.FRAME_BYTES


class RequestError(ValueError):
    """A well-formed message that asks for something invalid; the text goes back to the sender."""


@dataclass(frozen=True)
class Chunk:
    index: int         # position in the key's layout; (key name, index) names it on the wire
    server: int
    row_start: int
    row_stop: int
    row_size: int      # elements per row (product of shape[1:])

    @property
    def start(self):   # flat element offsets of the chunk within the key
        return self.row_start * self.row_size

    @property
    def stop(self):
        return self.row_stop * self.row_size


def chunk_layout(name, shape, dtype, num_servers):
    """Contiguous row ranges of a key: a big key in chunks of at most MAX_CHUNK_BYTES (and at
    least one per server) dealt round-robin to all servers; a small one whole. The first
    chunk goes to the server the name hashes to, so many small keys spread out."""
    shape = tuple(int(n) for n in shape)
    rows = shape[0] if shape else 1
    row_size = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    nbytes = rows * row_size * np.dtype(dtype).itemsize
    first = zlib.crc32(name.encode()) % num_servers
    if nbytes < MIN_SPLIT_BYTES or rows < 2:
        return [Chunk(0, first, 0, rows, row_size)]
    pieces = max(num_servers, -(-nbytes // MAX_CHUNK_BYTES))
    pieces = min(pieces, rows)
    bounds = [rows * i // pieces for i in range(pieces + 1)]
    return [Chunk(i, (first + i) % num_servers, bounds[i], bounds[i + 1], row_size)
            for i in range(pieces)]


class _Updated:
    """A target of updates, a KeyChunk or a Group: ServerState._push, _apply and Accumulator
    use its `param`, `state`, `sparse`, `spare`, `pending`, `version`, `members` and this."""

    def take_buffer(self):
        return self.spare.pop() if self.spare else np.empty_like(self.param)


@dataclass(eq=False)
class KeyChunk(_Updated):
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
    group: "Group" = None                   # while set, `param` is a view into group.param
    # and the optimizer state and pending gradients live in the group

    @property
    def members(self):
        return (self,)


@dataclass(eq=False)
class Group(_Updated):
    """Small dense chunks that workers push packed in one frame, in that order (a
    DataParallel bucket), stored back to back: one optimizer call updates them all and one
    frame answers their pull. To the rest of the server it looks like one flat key; each
    member keeps its name, clocks and a view of its weights, so it can still be pulled alone.

    Measured on LeNet-5's ten parameters (2 workers, SGD with momentum): a server's decode,
    handling and reply encoding of one step take 170 us instead of 320 us key by key, and a
    pinned 2-worker step 11.05 instead of 11.68 ms (4 alternating runs each).

    A group forms on the first packed push of chunks never pushed before, and is dissolved
    back into plain keys, state and pending gradients split exactly, the moment any member is
    pushed otherwise (alone, without gradient, or packed with other keys); those keys then
    stay plain."""
    members: tuple                          # the KeyChunks, in packed order
    offsets: list                           # each member's first element in `param`
    param: np.ndarray                       # 1-D, all members' weights back to back
    state: dict = field(default_factory=dict)
    version: int = 0
    pending: dict = field(default_factory=dict)
    spare: list = field(default_factory=list)
    sparse = False


class Accumulator:
    """Sum of the gradients pushed for one clock of one chunk. A lone dense push stays as
    its received pieces (no copy); a second one is summed into a reusable buffer. Sparse
    rows are kept until the clock is complete."""

    def __init__(self, key):
        self.key = key
        self.count = 0
        self.pieces = None          # the first dense push: [(offset, piece)]
        self.dense = None           # the sum of two or more, shaped like the chunk
        self.rows, self.values = [], []

    def add(self, gradient):
        self.count += 1
        if gradient is None:        # a worker with no gradient for this key this step
            return
        if isinstance(gradient, tuple):
            self.rows.append(gradient[0])
            self.values.append(gradient[1])
        elif self.pieces is None and self.dense is None:
            self.pieces = gradient
        else:
            self.materialize()
            flat = self.dense.reshape(-1)
            for offset, piece in gradient:
                flat[offset:offset + piece.size] += piece

    def materialize(self):
        if self.dense is None:
            self.dense = self.key.take_buffer()
            flat = self.dense.reshape(-1)
            if self.pieces is None:
                flat[:] = 0
            for offset, piece in self.pieces or ():
                flat[offset:offset + piece.size] = piece
            self.pieces = None
        return self.dense

    def total(self):
        """None, [(offset, piece)] of one push, a dense chunk-shaped array, or
        (unique rows, summed values)."""
        if self.pieces is not None and not self.rows:
            return self.pieces
        if self.rows:
            values = np.concatenate(self.values)
            summed = RowSparseGrad.from_rows(np.concatenate(self.rows), values,
                                             (self.key.param.shape[0],) + values.shape[1:])
            if self.dense is None and self.pieces is None:
                return summed.indices, summed.values
            self.materialize()[summed.indices] += summed.values
        return self.dense


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

    # --- dispatch -------------------------------------------------------------
    def handle(self, route, message):
        try:
            if message.op == "init":
                replies = [(route, self._init(message))]
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
            else:
                raise RequestError(f"a server does not serve op {message.op!r}")
        except RequestError as error:
            return [(route, protocol.error_reply(message.id, self.sender, str(error)))]
        replies += self._answer_ready_pulls()
        self._pass_on_checkpoint_request(message, replies)
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
        self.keys.update(new)
        return Message("reply", message.id, self.sender)

    def _new_key(self, name, spec, index):
        try:
            shape = tuple(int(n) for n in spec["shape"])
            dtype = np.dtype(spec["dtype"])
            sparse = bool(spec.get("sparse", False))
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
        return KeyChunk(name, shape, dtype, chunk, sparse, param,
                        pushes=[0] * self.num_workers)

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
        """None (an empty push), a list of dense (offset, piece) covering the chunk, or
        (local rows, values)."""
        if not payloads:
            return None
        if payloads[0].kind == "dense":
            return self._dense_pieces(key, payloads, "push")
        rows, values = self._row_pairs(key, payloads, "push", with_values=True)
        rows = np.concatenate(rows)
        if len(np.unique(rows)) != len(rows):
            raise RequestError(f"push: key {key.name!r} repeats a row")
        return rows, np.concatenate(values)

    def _push_units(self, message, keys):
        """What a push updates, as (target, gradient) pairs: a target is a KeyChunk, or the
        Group of the chunks a packed payload carries (see Group)."""
        payloads = _by_key(message)
        if len(set(map(id, keys))) != len(keys):
            raise RequestError(f"push: a key chunk is named twice in {message.keys}")
        units, packed = [], set()
        for payload in message.payloads:
            if payload.kind == "packed":
                units += self._packed_units(payload, keys, payloads, packed)
        for index, key in enumerate(keys):
            if index not in packed:
                if key.group is not None:   # pushed on its own now: back to a plain key
                    self._dissolve(key.group)
                units.append((key, self._gradient(key, payloads[index])))
        return units

    def _packed_units(self, payload, keys, payloads, packed):
        members = []
        for index, start, size in payload.spans:
            key = keys[index]
            # The payload itself is listed under its first span's key; nothing else may be.
            if index in packed or len(payloads[index]) > (index == payload.key):
                raise RequestError(f"push: key {key.name!r} is in more than one payload")
            self._check_dtype(key, payload.array, "push")
            if key.sparse or start != key.chunk.start or size != key.param.size:
                raise RequestError(f"push: a packed payload carries whole dense chunks, but "
                                   f"key {key.name!r} got {size} elements at {start} (server "
                                   f"{self.rank} holds {key.chunk.start}..{key.chunk.stop})")
            packed.add(index)
            members.append(key)
        members = tuple(members)
        group = self._group_of(members)
        if group is not None:
            return [(group, [(0, payload.array)])]
        starts = np.cumsum([0] + [key.param.size for key in members]).tolist()
        return [(key, [(0, payload.array[start:stop])])
                for key, start, stop in zip(members, starts, starts[1:])]

    def _group_of(self, members):
        """The Group of exactly these chunks in this order: the existing one, a new one if
        none of them was ever pushed, or None (they are then updated one by one)."""
        group = members[0].group
        if group is not None and group.members == members:
            return group
        for key in members:
            if key.group is not None:
                self._dissolve(key.group)
        itemsize = members[0].param.itemsize
        if len(members) < 2 or any(any(key.pushes) for key in members) or \
                sum(key.param.size for key in members) * itemsize > UPDATE_SLICE_BYTES:
            return None   # (a key never pushed has no state and no pending sum yet)
        state = snapshot.join_states(members)   # restored keys bring optimizer state
        if state is None:
            return None
        offsets = np.cumsum([0] + [key.param.size for key in members]).tolist()
        group = Group(members, offsets[:-1], np.concatenate([key.param.reshape(-1)
                                                              for key in members]), state)
        for key, start, stop in zip(members, offsets, offsets[1:]):
            key.param = group.param[start:stop].reshape(key.param.shape)
            key.group = group
        return group

    @staticmethod
    def _dissolve(group):
        """Give every member its share of the group's optimizer state and pending sums."""
        for key, start in zip(group.members, group.offsets):
            stop = start + key.param.size
            key.group = None
            key.state = {index: {name: value[start:stop].copy()
                                 if isinstance(value, np.ndarray) else value
                                 for name, value in state.items()}
                         for index, state in group.state.items()}
            for clock, accumulator in group.pending.items():
                share = key.pending[clock] = Accumulator(key)
                share.count = accumulator.count
                if accumulator.dense is not None:
                    share.dense = accumulator.dense[start:stop].reshape(key.param.shape).copy()
                elif accumulator.pieces is not None:
                    share.pieces = [(0, accumulator.pieces[0][1][start:stop])]

    def _push(self, message, keys=None):
        self._require_config(message)
        rank = self._worker_rank(message)
        clock, lr = message.meta.get("clock"), message.meta.get("lr")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool):
            raise RequestError(f"push: lr {lr!r} must be a number")
        keys = keys or self._keys(message)
        # Check the whole request before changing anything, so a bad push leaves no trace
        # (forming or dissolving a group moves data but changes no value).
        units = self._push_units(message, keys)
        for key in keys:
            if clock != key.pushes[rank]:
                raise RequestError(f"push: worker {rank} sent clock {clock!r} for key "
                                   f"{key.name!r}, expected clock {key.pushes[rank]}")
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
                self._count_update(target)
            # Clocks are applied in order, each once all N workers pushed it.
            while sync and target.pending.get(target.version) and \
                    target.pending[target.version].count == self.num_workers:
                self._apply(target, target.pending.pop(target.version), lr, self.num_workers)
                self._count_update(target)

    @staticmethod
    def _count_update(target):
        target.version += 1
        for key in target.members:
            key.version = target.version

    def _apply(self, key, accumulator, lr, divisor):
        """Run the optimizer rule on the chunk with the mean gradient."""
        gradient = accumulator.total()
        if gradient is None:
            return
        optimizer = self.config["optimizer"]
        rule = rules.RULES[optimizer["name"]]
        hyper = dict(optimizer["hyper"], lr=float(lr))
        if isinstance(gradient, tuple):
            rows, values = gradient
            rules.apply_rows(rule, key.param, rows, values / divisor if divisor != 1 else values,
                             key.state, **hyper)
            return
        param = key.param.reshape(-1)
        step = max(1, UPDATE_SLICE_BYTES // param.itemsize)
        if isinstance(gradient, list) and divisor == 1 and not key.sparse \
                and _on_slice_grid(gradient, step, param.size):
            # One push whose frames are the update slices: run the rule on the received
            # buffers directly (rules never write to their gradient).
            for offset, piece in gradient:
                rule(param[offset:offset + piece.size], piece,
                     key.state.setdefault(offset // step, {}), **hyper)
            return
        gradient = accumulator.materialize()
        if divisor != 1:
            gradient /= divisor
        if key.sparse:   # lazily updated rows keep per-row state: stay lazy for dense pushes
            rules.apply_rows(rule, key.param, np.arange(key.param.shape[0]), gradient,
                             key.state, **hyper)
        else:
            flat = gradient.reshape(-1)
            for start in range(0, param.size, step):
                rule(param[start:start + step], flat[start:start + step],
                     key.state.setdefault(start // step, {}), **hyper)
        key.spare.append(gradient)

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
        return keys

    def _ready(self, message, keys):
        # A pushpull's pull half reads the weights of the clock after the one it pushed.
        clock = message.meta["clock"] + (message.op == "pushpull")
        mode = self.config["mode"]
        if mode == "sync":
            return all(key.version >= clock for key in keys)
        if mode == "ssp":
            # The puller is at `clock`; it may run at most `staleness` clocks ahead of the
            # slowest worker.
            return all(min(key.pushes) >= clock - self.config["staleness"] for key in keys)
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
        snapshot = self.config["mode"] != "sync"
        requested = _by_key(message) if message.op == "pull" else None
        payloads = []
        index = 0
        while index < len(keys):
            key = keys[index]
            rows = [p.array for p in requested[index] if p.kind == "rows"] if requested else []
            group = key.group
            if group is not None and not rows and \
                    tuple(keys[index:index + len(group.members)]) == group.members:
                # The whole group asked for in packed order (a bucket): answer in one frame.
                spans = [(index + i, member.chunk.start, member.param.size)
                         for i, member in enumerate(group.members)]
                payloads.append(Payload(index, "packed", 0,
                                        group.param.copy() if snapshot else group.param, spans))
                index += len(spans)
            else:
                payloads += _key_reply(index, key, rows, snapshot)
                index += 1
        return Message("reply", message.id, self.sender, message.keys, payloads,
                       meta={"versions": [key.version for key in keys]})


def _key_reply(index, key, rows, snapshot):
    """The payloads answering a pull of one chunk: the asked-for rows, or all of it."""
    if rows:
        local = np.concatenate(rows) - key.chunk.row_start
        values = key.param[local]
        global_rows = local + key.chunk.row_start
        rows_per_frame = max(1, protocol.FRAME_BYTES // max(1, values[:1].nbytes))
        payloads = []
        for s in range(0, len(local), rows_per_frame):
            payloads.append(Payload(index, "rows", s, global_rows[s:s + rows_per_frame]))
            payloads.append(Payload(index, "values", s, values[s:s + rows_per_frame]))
        return payloads
    flat = key.param.reshape(-1)
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


_rejected = 0


def _log_rejected(text):
    # A flood of bad messages must not flood the log: the first few, then every 100th.
    global _rejected
    _rejected += 1
    if _rejected <= 10 or _rejected % 100 == 0:
        print(f"disttrain: server rejected message #{_rejected}: {text}", file=sys.stderr,
              flush=True)


def serve(membership, max_message_bytes=protocol.DEFAULT_MAX_MESSAGE_BYTES, host=None):
    """A server process's loop: register, then answer requests until the scheduler says
    shutdown (return 0) or reports a dead peer (return 1)."""
    host = host or transport.advertised_host(membership.scheduler_address[len("tcp://"):])
    listener = transport.Listener(host, max_message_bytes)
    try:
        book = membership.register(tcp=listener.tcp_address, ipc=listener.ipc_address,
                                   rank=_env_rank())
        state = ServerState(membership.rank, len(book["worker"]), len(book["server"]))
        while not membership.shutdown.is_set():
            if membership.dead:
                return 1
            try:
                received = listener.receive(100)
            except protocol.ProtocolError as error:
                _log_rejected(str(error))
                listener.send(error.identity, protocol.error_reply(
                    error.request_id, state.sender, str(error)))
                continue
            if received is None:
                continue
            identity, message = received
            try:
                replies = state.handle(identity, message)
            except Exception as error:  # a bug must not take the job down silently
                traceback.print_exc()
                replies = [(identity, protocol.error_reply(
                    message.id, state.sender, f"internal error: {type(error).__name__}: {error}"))]
            for route, reply in replies:
                if reply.op == "error":
                    _log_rejected(reply.meta["error"])
                listener.send(route, reply)
        return 0
    finally:
        listener.close()
        membership.close()


def _env_rank():
    value = os.environ.get("DISTTRAIN_RANK")
    return int(value) if value not in (None, "") else None


def use_realtime_priority(rank=None):
    """Run this process at real-time priority (SCHED_FIFO 1) where the OS permits (root or
    CAP_SYS_NICE); True if it does. Call it before any thread or zmq context exists: zmq's
    I/O threads inherit it.

    Why: with every worker pinned to its own core (launch --bind), a server thread woken by
    a push can be queued behind a computing worker until the next scheduler tick (measured:
    ~4 ms stalls in over 10% of LeNet steps on 2 cores, while the other core sat idle). A
    real-time server preempts the worker at once and runs for the fraction of a millisecond
    its answer takes; it blocks on its socket the rest of the time."""
    who = "server" if rank is None else f"server {rank}"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return True
    except (AttributeError, OSError) as error:   # no such call here, or not permitted
        print(f"disttrain: {who} keeps normal priority (SCHED_FIFO refused: {error}); "
              f"pinned workers may then wait for it up to a scheduler tick", file=sys.stderr,
              flush=True)
        return False


def install_sigterm_exit():
    """The launcher stops servers and the scheduler with SIGTERM once workers are done."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
