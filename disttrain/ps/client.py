"""The worker side of the parameter server (ps-lite's KVWorker): `KVStore` sends init /
push / pull / pushpull for each key's chunks to all servers at once, blocking or via a `Handle`."""
import itertools
import sys
import time
from dataclasses import dataclass

import numpy as np
import zmq

from disttrain import config
from disttrain.ps import auth, protocol, transport
from disttrain.ps.group import pack_payloads
from disttrain.ps.layout import MAX_CHUNK_BYTES, Chunk, chunk_layout
from disttrain.ps.protocol import Message
from disttrain.tensor import RowSparseGrad


@dataclass(slots=True)
class Entry:
    """What a request carries for one chunk of one key. (A slots class rather than a
    NamedTuple: one is made for every chunk of every push, and it costs fewer instructions.)"""
    name: str
    chunk: Chunk
    pieces: list       # (kind, start, array) each: "dense" slices, or "rows" / "values" pairs
    nbytes: int        # the chunk's size on the wire, to pack messages of ~MAX_CHUNK_BYTES


def _say(text):
    print(f"disttrain: {text}", file=sys.stderr, flush=True)


class PSError(RuntimeError):
    """A server refused a request; the text is the server's explanation."""


class Handle:
    """An outstanding request to one or more servers. `wait()` blocks (with the store's
    deadline) until every server answered, and raises if one of them refused."""

    def __init__(self, store, what, requests, on_reply=None):
        self.store, self.what = store, what
        self.outstanding = set(requests)     # request ids still unanswered
        self.on_reply = on_reply             # called with each reply Message
        self.errors = []
        self.applied = []                    # (start, end) of each on_reply call (observe)

    def done(self):
        if self.outstanding:
            self.store._pump(0)
        return not self.outstanding

    def _answer(self, reply):
        self.outstanding.discard(reply.id)
        asked = reply.meta.get("checkpoint")   # a preempted worker asked for a checkpoint
        if type(asked) is int and (self.store.checkpoint_clock is None or
                                   asked < self.store.checkpoint_clock):
            self.store.checkpoint_clock = asked
        if reply.meta.get("members") is not None:   # elastic: who counts at which clock
            self.store.members = reply.meta["members"]
        if reply.op == "error":
            self.errors.append(f"{reply.sender}: {reply.meta.get('error')}")
        elif self.on_reply is not None:
            started = time.perf_counter()
            self.on_reply(reply)
            self.applied.append((started, time.perf_counter()))

    def wait(self):
        deadline = transport.Deadline(self.store.timeout, self.what)
        while self.outstanding:
            if self.store.membership is not None:
                self.store.membership.check()
            deadline.check()
            self.store._pump(deadline.poll_ms())
        if self.errors:
            raise PSError(f"{self.what} failed: " + "; ".join(self.errors))


class KVStore:
    """Keys are declared (shape, dtype, sparse) on every worker; rank 0 calls `init`.

    Gradients are sent zero-copy: an array handed to `push` must not change until its
    handle is done (the acknowledgement means the server has it). `timeout` (s) bounds
    every wait; default DISTTRAIN_TIMEOUT's.

    A process that moves big arrays through it should call `backend.keep_freed_memory()`
    first, as the worker programs (workers/harness.py) and servers do.
    """

    def __init__(self, book, rank, membership=None, timeout=None,
                 max_message_bytes=protocol.DEFAULT_MAX_MESSAGE_BYTES, credentials=auth.FROM_ENV):
        self.rank, self.membership = rank, membership
        self.timeout = timeout if timeout is not None else config.from_env().timeout
        self._identity = transport.new_identity(f"worker{rank}")
        self._keys = membership.credentials if membership is not None else \
            auth.resolve(credentials, "worker", rank)
        self.max_message_bytes = max_message_bytes
        self.servers = list(book["server"])   # the book entries connected to
        self.connections = [self._connect(server_rank, server)
                            for server_rank, server in enumerate(book["server"])]
        # Every request until it is answered, (server, Message), to re-send it to a
        # restarted server; and the membership's book version they were sent under.
        self.unanswered = {}
        self._book_version = getattr(membership, "book_version", 0)
        # Called as (server, {(name, chunk): clock of its oldest unanswered request}) when a
        # server was restarted, before anything is re-sent to it (DataParallel's rank 0
        # re-inits a server that has no replica there).
        self.on_server_restarted = None
        self.num_workers = len(book["worker"])
        self.specs = {}        # name -> (shape, dtype, sparse, chunks)
        self.frames = {}       # name -> [(chunk, [(start, stop) of each frame], bytes)]
        self.averaged = set()  # names declared average=True (see declare)
        self.handles = {}      # request id -> Handle
        self._ids = itertools.count(1)
        self._poller = None
        self.sender = f"worker-{rank}"
        self.ask_checkpoint = False     # pushes say "checkpoint after this clock" (preempted)
        self.checkpoint_clock = None    # the first such clock any worker asked for
        self.marks = {}                 # elastic: "leave" / "join" marks of this clock's pushes
        self.members = None             # elastic: the servers' latest spans (ps/elastic.py)
        self.bytes_sent = self.bytes_received = 0   # payload bytes, for the metrics files

    def _connect(self, server_rank, server):
        return transport.Connection(
            transport.pick_address(server), self._identity, self.max_message_bytes,
            self._keys and auth.ClientCurve(self._keys, auth.key_name("server", server_rank)))

    def _send_to(self, server, message):
        self.unanswered[message.id] = (server, message)
        self.connections[server].send(message)

    def _follow_book(self):
        """A server was restarted (a book notice): connect to its new address and re-send
        every request it has not answered. Servers skip a push they already applied."""
        self._book_version = self.membership.book_version
        book = self.membership.book
        for rank, entry in enumerate(book["server"]):
            old = self.servers[rank]
            if (entry.get("tcp"), entry.get("pid")) == (old.get("tcp"), old.get("pid")):
                continue
            if self._poller is not None:
                self._poller.unregister(self.connections[rank].socket)
            self.connections[rank].close()
            if not old.get("ipc"):   # this store was told to use tcp (in-process tests)
                entry = dict(entry, ipc="")
            self.servers[rank] = entry
            self.connections[rank] = self._connect(rank, entry)
            if self._poller is not None:
                self._poller.register(self.connections[rank].socket, zmq.POLLIN)
            resent = [message for server, message in self.unanswered.values() if server == rank]
            if self.on_server_restarted is not None:
                clocks = {}
                for message in resent:
                    clock = message.meta.get("clock")   # an init or a request has none
                    for pair in zip(message.keys, message.meta.get("chunks", ())):
                        if type(clock) is int:
                            clocks[pair] = min(clocks.get(pair, clock), clock)
                self.on_server_restarted(rank, clocks)
            for message in resent:
                self.connections[rank].send(message)
            _say(f"worker {self.rank}: server {rank} was restarted; re-sent its "
                 f"{len(resent)} unanswered requests")

    # --- keys -------------------------------------------------------------------
    def declare(self, name, shape, dtype, sparse=False, average=False):
        """average=True: the servers keep the mean of the workers' pushed values instead of
        applying the optimizer to them as gradients (buffers such as BatchNorm statistics)."""
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        if average:
            self.averaged.add(name)
        if dtype.name not in protocol.DTYPES:
            raise ValueError(f"key {name!r}: dtype {dtype} is not one of {protocol.DTYPES}")
        chunks = chunk_layout(name, shape, dtype, len(self.connections))
        self.specs[name] = (shape, dtype, sparse, chunks)
        # Where each chunk's dense frames start and stop, worked out once: every push of
        # the key cuts its array the same way (a per-push split cost time on every key).
        self.frames[name] = [
            (chunk, [(chunk.start + start, chunk.start + stop) for start, stop in
                     protocol.frame_bounds(chunk.stop - chunk.start, dtype.itemsize)],
             (chunk.stop - chunk.start) * dtype.itemsize)
            for chunk in chunks]

    def _spec(self, name):
        if name not in self.specs:
            raise KeyError(f"key {name!r} was never declared (declared: {sorted(self.specs)[:5]}...)")
        return self.specs[name]

    # --- sending ----------------------------------------------------------------
    # Requests are built as Entries, one per chunk,
    # grouped by server and packed into messages of about MAX_CHUNK_BYTES: small keys share
    # a message, a big key travels chunk by chunk so servers work while the rest arrives.
    def _send(self, op, what, entries, meta, on_reply=None):
        handle = Handle(self, what, [], on_reply)
        by_server = {}
        for entry in entries:
            by_server.setdefault(entry.chunk.server, []).append(entry)
        for server, server_entries in sorted(by_server.items()):
            for group in _pack(server_entries):
                request_id = next(self._ids)
                handle.outstanding.add(request_id)
                self.handles[request_id] = handle
                payloads = pack_payloads(group)
                self.bytes_sent += sum(payload.array.nbytes for payload in payloads)
                message_meta = dict(meta, chunks=[entry.chunk.index for entry in group])
                self._send_to(server, Message(
                    op, request_id, self.sender, [entry.name for entry in group], payloads,
                    message_meta))
        return handle

    def _dense_entries(self, name, array, entries):
        shape, dtype, _, _ = self._spec(name)
        if array.shape != shape:
            raise ValueError(f"key {name!r}: array of shape {array.shape}, declared {shape}")
        flat = np.ascontiguousarray(array, dtype=dtype).reshape(-1)
        for chunk, frames, nbytes in self.frames[name]:
            entries.append(Entry(name, chunk, [("dense", start, flat[start:stop])
                                               for start, stop in frames], nbytes))

    def _empty_entries(self, name, entries):
        """A chunk named with no payload: a dense pull, or a push with no gradient."""
        self._spec(name)   # an undeclared name fails here, with the declared ones listed
        for chunk, _, nbytes in self.frames[name]:
            entries.append(Entry(name, chunk, [], nbytes))

    def _row_entries(self, name, rows, values, entries):
        """Split global rows (and their values, if any) by the chunk owning them."""
        shape, dtype, _, chunks = self._spec(name)
        rows, values = _sorted_rows(name, shape, dtype, rows, values)
        bounds = np.searchsorted(rows, [c.row_start for c in chunks] + [chunks[-1].row_stop])
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
        rows_per_frame = max(1, protocol.FRAME_BYTES // row_bytes)
        for chunk, lo, hi in zip(chunks, bounds[:-1], bounds[1:]):
            if lo == hi:
                if values is not None:   # a push still tells this chunk "nothing this clock"
                    entries.append(Entry(name, chunk, [], 0))
                continue
            pieces = []
            for s in range(lo, hi, rows_per_frame):
                e = min(hi, s + rows_per_frame)
                pieces.append(("rows", s - lo, rows[s:e]))
                if values is not None:
                    pieces.append(("values", s - lo, values[s:e]))
            entries.append(Entry(name, chunk, pieces, (hi - lo) * row_bytes))

    def _grad_entries(self, grads):
        entries = []
        for name, grad in grads.items():
            if grad is None:   # an empty push: "no gradient this clock" still counts
                self._empty_entries(name, entries)
            elif hasattr(grad, "indices"):   # RowSparseGrad
                self._row_entries(name, grad.indices, grad.values, entries)
            else:
                self._dense_entries(name, np.asarray(grad), entries)
        return entries

    def _pull_into(self, outs):
        """A reply callback writing each dense / row payload into the caller's arrays."""
        def on_reply(reply):
            pending_rows = None
            for p in reply.payloads:
                out = outs[reply.keys[p.key]]
                if p.kind == "dense":
                    out.reshape(-1)[p.start:p.start + p.array.size] = p.array
                elif p.kind == "packed":
                    offset = 0
                    for index, start, size in p.spans:
                        outs[reply.keys[index]].reshape(-1)[start:start + size] = \
                            p.array[offset:offset + size]
                        offset += size
                elif p.kind == "rows":
                    pending_rows = p.array
                else:
                    out[pending_rows] = p.array.reshape((len(pending_rows),) + out.shape[1:])
        return on_reply

    # --- the API ----------------------------------------------------------------
    def init_async(self, arrays, optimizer, mode="sync", staleness=0, observe=None,
                   recovery=False):
        """observe: {"metrics_dir": DIR} tells the servers where to write their metrics.
        recovery: the servers keep each key's previous weights (sync), for exact pulls."""
        entries = []
        for name, array in arrays.items():
            self._dense_entries(name, np.asarray(array), entries)
        handles = []
        for entry in entries:   # one message per chunk: each carries its key's spec
            shape, dtype, sparse, _ = self.specs[entry.name]
            meta = {"optimizer": optimizer, "mode": mode, "staleness": staleness,
                    "specs": [{"shape": list(shape), "dtype": dtype.name, "sparse": sparse,
                               "average": entry.name in self.averaged}]}
            if observe:
                meta["observe"] = observe
            if recovery:
                meta["recovery"] = True
            handles.append(self._send("init", "init", [entry], meta))
        return _Group(handles)

    def reinit_server(self, server, arrays, versions, optimizer, mode, staleness,
                      checkpoint=None):
        """Give restarted `server` (no replica) these weights of its chunks, at `versions`
        {(name, chunk): version}; its optimizer state comes from `checkpoint` (a step
        directory) if given. One message, sent ahead of anything re-sent to it; an error
        reply fails whichever wait is under way."""
        entries = []
        for name, array in arrays.items():
            self._dense_entries(name, np.array(array, copy=True), entries)
        entries = [entry for entry in entries if entry.chunk.server == server]
        specs = []
        for entry in entries:
            shape, dtype, sparse, _ = self.specs[entry.name]
            specs.append({"shape": list(shape), "dtype": dtype.name, "sparse": sparse,
                          "average": entry.name in self.averaged})
        request_id = next(self._ids)
        self.handles[request_id] = _Reinit(self, f"re-init of restarted server {server}",
                                           [request_id])
        self._send_to(server, Message(
            "init", request_id, self.sender, [entry.name for entry in entries],
            [protocol.Payload(index, kind, start, array) for index, entry in enumerate(entries)
             for kind, start, array in entry.pieces],
            {"optimizer": optimizer, "mode": mode, "staleness": staleness, "specs": specs,
             "chunks": [entry.chunk.index for entry in entries], "recover": True,
             "recovery": mode == "sync",   # keep previous weights (helper worker-recovery's)
             "versions": [versions[entry.name, entry.chunk.index] for entry in entries],
             "checkpoint": checkpoint}))

    def _push_meta(self, clock, lr):
        meta = {"clock": int(clock), "lr": float(lr), "rank": self.rank}
        if self.ask_checkpoint:
            meta["checkpoint"] = int(clock)
        if self.marks:
            meta.update(self.marks)
        return meta

    def request(self, op, meta, servers=None):
        """Send `op` with `meta` (no keys) to every server (or those listed); the handle's
        `.replies` collects each server's reply meta, in server order once waited for."""
        replies = {}
        handle = Handle(self, f"{op} on the servers", [],
                        lambda reply: replies.__setitem__(reply.sender, reply.meta))
        for server in range(len(self.connections)) if servers is None else servers:
            request_id = next(self._ids)
            handle.outstanding.add(request_id)
            self.handles[request_id] = handle
            self._send_to(server, Message(op, request_id, self.sender, [], [], meta))
        handle.replies = replies
        return handle

    def push_async(self, grads, clock, lr):
        """grads: {name: ndarray | RowSparseGrad | None}; None says 'no gradient this clock'."""
        meta = self._push_meta(clock, lr)
        return self._send("push", f"push of clock {clock}", self._grad_entries(grads), meta)

    def pull_async(self, outs, clock, rows=None, exact=False):
        """outs: {name: array} written in place; rows: {name: row indices} pulls only those
        rows of a key (each written at its own index of the array, so their order is free). `clock` is this worker's clock: in sync mode the
        reply waits until every worker's pushes of earlier clocks were applied. exact=True
        (a replacement worker, sync): the weights of version `clock` even where a key is
        one version further (the servers' kept previous weights)."""
        rows = rows or {}   # any order, repeats allowed: _sorted_rows puts them in order
        entries = []
        for name in outs:
            if name in rows:
                self._row_entries(name, rows[name], None, entries)
            else:
                self._empty_entries(name, entries)
        meta = {"clock": int(clock), "rank": self.rank}
        if exact:
            meta["exact"] = True
        return self._send("pull", f"pull at clock {clock}", entries, meta, self._pull_into(outs))

    def pushpull_async(self, grads, outs, clock, lr):
        """Push the gradients of clock `clock` and pull the weights of clock + 1 in one
        round trip (dense keys only; grads and outs name the same keys)."""
        meta = self._push_meta(clock, lr)
        return self._send("pushpull", f"pushpull of clock {clock}", self._grad_entries(grads),
                          meta, self._pull_into(outs))

    def init(self, arrays, optimizer, mode="sync", staleness=0, observe=None, recovery=False):
        self.init_async(arrays, optimizer, mode, staleness, observe, recovery).wait()

    def push(self, grads, clock, lr):
        self.push_async(grads, clock, lr).wait()

    def pull(self, outs, clock, rows=None, exact=False):
        self.pull_async(outs, clock, rows, exact).wait()

    def pushpull(self, grads, outs, clock, lr):
        self.pushpull_async(grads, outs, clock, lr).wait()

    # --- receiving --------------------------------------------------------------
    def _pump(self, timeout_ms):
        """Receive whatever replies have arrived (waiting up to timeout_ms for the first)
        and hand each to its Handle."""
        if self.membership is not None and \
                getattr(self.membership, "book_version", 0) != self._book_version:
            self._follow_book()
        if self._poller is None:
            self._poller = zmq.Poller()
            for connection in self.connections:
                self._poller.register(connection.socket, zmq.POLLIN)
        ready = dict(self._poller.poll(timeout_ms))
        for connection in self.connections:
            # One message per ready socket and call: the caller loops until its handle is done.
            reply = connection.receive_nowait() if connection.socket in ready else None
            if reply is not None:
                self.bytes_received += sum(payload.array.nbytes for payload in reply.payloads)
                self.unanswered.pop(reply.id, None)
                handle = self.handles.pop(reply.id, None)
                if handle is not None:
                    handle._answer(reply)

    def close(self):
        for connection in self.connections:
            connection.close()


def _sorted_rows(name, shape, dtype, rows, values):
    """Rows as sorted unique int64, values as (rows, row elements) with a repeated row's
    values summed: the order in which rows are split by chunk and checked by the servers.
    No rows at all is valid (a push of them says "no gradient this clock")."""
    rows = np.asarray(rows)
    if rows.size and rows.dtype.kind not in "iu":
        raise TypeError(f"key {name!r}: row indices must be integers, got dtype {rows.dtype}")
    rows = rows.astype(np.int64, copy=False).reshape(-1)
    num_rows = shape[0] if shape else 1
    if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
        raise ValueError(f"key {name!r}: rows {rows.min()}..{rows.max()} outside the table's "
                         f"0..{num_rows - 1}")
    if values is not None:
        row_size = int(np.prod(shape[1:], dtype=np.int64))
        values = np.ascontiguousarray(values, dtype=dtype)
        if values.size != rows.size * row_size:
            raise ValueError(f"key {name!r}: {rows.size} rows but values of shape "
                             f"{values.shape}; expected {(rows.size,) + tuple(shape[1:])}")
        values = values.reshape(rows.size, row_size)
    if rows.size > 1 and not (rows[1:] > rows[:-1]).all():
        if values is None:
            rows = np.unique(rows)
        else:
            summed = RowSparseGrad.from_rows(rows, values, (num_rows, values.shape[1]))
            rows, values = summed.indices, summed.values
    return rows, values


def _pack(entries):
    """Group a server's entries into messages of about MAX_CHUNK_BYTES each, in order."""
    group, size = [], 0
    for entry in entries:
        if group and size + entry.nbytes > MAX_CHUNK_BYTES:
            yield group
            group, size = [], 0
        group.append(entry)
        size += entry.nbytes
    if group:
        yield group


class _Reinit(Handle):
    """Nobody waits for a re-init: its refusal fails the wait under way when it arrives."""

    def _answer(self, reply):
        super()._answer(reply)
        if self.errors:
            raise PSError(f"{self.what} failed: " + "; ".join(self.errors))


class _Group:
    """Several handles waited on as one."""

    def __init__(self, handles):
        self.handles = handles

    def done(self):
        return all(h.done() for h in self.handles)

    def wait(self):
        for handle in self.handles:
            handle.wait()
