"""Chain replication of the servers' shards (`--server-replicas 1`, as in the OSDI'14
parameter server): every update a server applies is copied to server (rank+1) % S before
any worker sees its result, so a restarted server fetches its shard back exactly."""
import os
import sys

import numpy as np
import zmq

from disttrain.ps import auth, protocol, snapshot, transport
from disttrain.ps.protocol import Message, Payload, RequestError

OPS = ("replicate", "fetch_replica")


def _say(text):
    print(f"disttrain: {text}", file=sys.stderr, flush=True)


def successor(rank, num_servers):
    """The server that keeps `rank`'s replica."""
    return (rank + 1) % num_servers


def predecessor(rank, num_servers):
    """The server whose replica `rank` keeps."""
    return (rank - 1) % num_servers


# --- one KeyChunk's whole state on the wire ----------------------------------------------
def chunk_record(key):
    """(meta, {part: flat array}) of a KeyChunk: weights, every optimizer state array (the
    chunk's own share where it is packed in a Group), clocks, and what rebuilds the key."""
    step, arrays = snapshot.chunk_state(key)
    meta = {"name": key.name, "chunk": key.chunk.index,
            "spec": {"shape": list(key.shape), "dtype": key.dtype.name,
                     "sparse": key.sparse, "average": key.average},
            "version": key.version, "pushes": list(key.pushes),
            # the contributions counted into applied updates (KeyChunk.applied, where kept)
            "applied": int(getattr(key, "applied", 0))}
    parts = {"param": key.param.reshape(-1)}
    parts.update((name, np.asarray(value).reshape(-1)) for name, value in arrays.items())
    if isinstance(step, np.ndarray):   # a sparse key's per-row step counts
        meta["step"] = "rows"
        parts["step"] = np.asarray(step, dtype=np.int64).reshape(-1)
    else:
        meta["step"] = None if step is None else int(step)
    return meta, parts


def encode(records, copy):
    """(keys, payloads, meta) of a message carrying `records`: one key entry per array, its
    1 MB frames as dense payloads. copy=False sends the server's own arrays (sync mode: they
    do not change before the replica has acknowledged, see Replication)."""
    keys, payloads, parts_meta = [], [], []
    for index, (meta, parts) in enumerate(records):
        for part, array in parts.items():
            entry = len(keys)
            keys.append(meta["name"])
            parts_meta.append([index, part, int(array.size)])
            if copy:
                array = array.copy()
            payloads += [Payload(entry, "dense", start, piece)
                         for start, piece in protocol.split_frames(array)]
    return keys, payloads, {"records": [meta for meta, _ in records], "parts": parts_meta}


def decode(message, previous=None):
    """The records a replicate or fetch_replica reply carries, each array a copy: into the
    same part of `previous` {(name, chunk): (meta, parts)} where its size and dtype match
    (warm pages: fresh ones cost a page fault each), else a new array."""
    records, parts = message.meta.get("records"), message.meta.get("parts")
    if type(records) is not list or type(parts) is not list or len(parts) != len(message.keys) \
            or not all(type(r) is dict for r in records):
        raise RequestError(f"{message.op}: meta needs 'records' and one 'parts' entry per key")
    pieces = [[] for _ in parts]
    for payload in message.payloads:
        pieces[payload.key].append(payload)
    out = [(meta, {}) for meta in records]
    for entry, (part, received) in enumerate(zip(parts, pieces)):
        if not (type(part) is list and len(part) == 3 and type(part[0]) is int and
                0 <= part[0] < len(records) and type(part[1]) is str and type(part[2]) is int):
            raise RequestError(f"{message.op}: bad part {part!r} (want [record, name, size])")
        index, name, size = part
        if not received or any(p.kind != "dense" for p in received):
            raise RequestError(f"{message.op}: part {name!r} of {message.keys[entry]!r} has no "
                               f"dense payload")
        old = (previous or {}).get((records[index].get("name"), records[index].get("chunk")))
        array = old[1].get(name) if old else None
        if array is None or array.size != size or array.dtype != received[0].array.dtype:
            array = np.empty(size, dtype=received[0].array.dtype)
        offset = 0
        for p in received:
            if p.start != offset or offset + p.array.size > size:
                raise RequestError(f"{message.op}: part {name!r} of {message.keys[entry]!r}: "
                                   f"frame at {p.start} of {p.array.size}, expected {offset}")
            array[offset:offset + p.array.size] = p.array.reshape(-1)
            offset += p.array.size
        if offset != size:
            raise RequestError(f"{message.op}: part {name!r} of {message.keys[entry]!r} covers "
                               f"{offset} of {size} elements")
        out[index][1][name] = array
    return out


def install(state, message):
    """Give a fresh ServerState the shard a fetch_replica reply carries: every chunk with
    its weights, optimizer state and clocks, as the dead server had them."""
    keys = {}
    for meta, parts in decode(message):
        try:
            name, chunk = meta["name"], meta["chunk"]
            key = state._new_key(name, meta["spec"], chunk)   # checks the chunk is ours
            param = parts.pop("param").reshape(key.param.shape)
            step = parts.pop("step") if meta["step"] == "rows" else meta["step"]
            key.version, key.pushes = int(meta["version"]), [int(n) for n in meta["pushes"]]
            if hasattr(key, "applied"):
                key.applied = int(meta.get("applied", 0))
        except (KeyError, TypeError, ValueError) as error:
            raise RequestError(f"fetch_replica: bad record {meta!r}: {error}") from None
        if len(key.pushes) != state.num_workers:
            raise RequestError(f"fetch_replica: key {name!r} has pushes of {len(key.pushes)} "
                               f"workers, this job has {state.num_workers}")
        snapshot.install_chunk(key, step, {part: array.reshape(key.param.shape)
                                           for part, array in parts.items()}, param)
        keys[name, chunk] = key
    state.config = message.meta.get("config")
    if hasattr(state, "keep_previous"):   # helper worker-recovery's exact worker pulls
        state.keep_previous = message.meta.get("keep_previous") is True
    state.keys.update(keys)
    return keys


# --- the keeping side ----------------------------------------------------------------------
class Holder:
    """What a server keeps of its predecessor's shard, and the answers to its ops."""

    def __init__(self, rank, num_servers):
        self.rank, self.source = rank, predecessor(rank, num_servers)
        self.sender = f"server-{rank}"
        self.config = None
        self.keep_previous = False   # the predecessor's ServerState.keep_previous
        self.records = {}   # (name, chunk) -> (meta, {part: array})
        self.incarnation = 0   # the newest incarnation of the predecessor heard from

    def refusal(self, message):
        """Why `message` must be refused: only the predecessor's key may replicate here or
        fetch its replica back (in an insecure job nobody's identity is known)."""
        expected = auth.key_name("server", self.source)
        if message.peer and message.peer != expected:
            return (f"{message.op} from {message.peer}: server {self.rank} keeps the replica "
                    f"of {expected} only")
        return None

    def handle(self, message):
        refusal = self.refusal(message)
        if refusal:
            return protocol.error_reply(message.id, self.sender, refusal)
        try:
            if message.op == "replicate":
                incarnation = message.meta.get("incarnation", 0)
                if type(incarnation) is not int or incarnation < self.incarnation:
                    raise RequestError(f"replicate from incarnation {incarnation!r} of "
                                       f"server-{self.source}, which incarnation "
                                       f"{self.incarnation} replaced")
                self.incarnation = incarnation
                records = decode(message, self.records)
                if message.meta.get("full"):
                    self.records.clear()
                self.config = message.meta.get("config", self.config)
                self.keep_previous = message.meta.get("keep_previous") is True
                for meta, parts in records:
                    self.records[meta.get("name"), meta.get("chunk")] = (meta, parts)
                return Message("reply", message.id, self.sender)
            # A copy: the next replicate writes into these arrays (decode's `previous`).
            keys, payloads, meta = encode(list(self.records.values()), copy=True)
            meta.update(config=self.config, keep_previous=self.keep_previous)
            return Message("reply", message.id, self.sender, keys, payloads, meta)
        except RequestError as error:
            return protocol.error_reply(message.id, self.sender, str(error))


# --- the primary side ----------------------------------------------------------------------
class Replication:
    """A server's part in the chain: it keeps its predecessor's replica (Holder), and after
    every request that changed keys it sends those chunks to its successor and holds every
    reply until the successor has acknowledged them (replies leave in order), so no worker
    ever holds weights that the replica lacks. In sync mode a push is answered only once
    its clock was applied (ServerState.hold_pushes): an unanswered push is re-sent to a
    restarted server, an answered one is in the replica.

    Over tcp the servers speak CURVE (each listener admits the other servers' keys, for these
    two ops only). A successor on the same host is reached over ipc, where it names this
    server by pid from its address book, except by a restarted server (incarnation > 0):
    its new pid reaches the others in a book notice, which its first replica could outrun;
    it uses tcp. Each replica names the sender's incarnation, so that a replaced process
    that still runs (it was frozen) cannot overwrite its replacement's."""

    def __init__(self, state, listener, membership, book, max_message_bytes, incarnation=0):
        self.state, self.listener, self.membership = state, listener, membership
        self.max_message_bytes = max_message_bytes
        self.incarnation = incarnation
        self.rank, self.num_servers = state.rank, state.num_servers
        self.target = successor(self.rank, self.num_servers)
        self.holder = Holder(self.rank, self.num_servers)
        self.book_version = getattr(membership, "book_version", 0)
        self.sent = self.acked = 0   # replicate request ids: the newest sent and acknowledged
        self.held = []               # (request id needed, route, reply)
        self.connection = self.entry = None
        self.poller = zmq.Poller()
        self.poller.register(listener.socket, zmq.POLLIN)
        state.hold_pushes = True
        self._connect(book["server"][self.target])

    def _connect(self, entry):
        if self.connection is not None:
            self.poller.unregister(self.connection.socket)
            self.connection.close()
        keys = self.membership.credentials
        self.entry = entry
        # One pid running two servers (an in-process test job) names neither over ipc.
        ipc = not self.incarnation and entry.get("pid") != os.getpid()
        self.connection = transport.Connection(
            transport.pick_address(entry) if ipc else entry["tcp"],
            transport.new_identity(f"server{self.rank}-replica"),
            self.max_message_bytes,
            keys and auth.ClientCurve(keys, auth.key_name("server", self.target)))
        self.poller.register(self.connection.socket, zmq.POLLIN)

    def receive(self, timeout_ms):
        """Like Listener.receive, while also taking the successor's acknowledgements (and
        sending the replies they release)."""
        self._follow_book()
        ready = dict(self.poller.poll(timeout_ms))
        if self.connection.socket in ready:
            while (ack := self.connection.receive_nowait()) is not None:
                self._acknowledged(ack)
        return self.listener.receive(0) if self.listener.socket in ready else None

    def after(self, replies):
        """Replicate what the request changed; returns the replies that may leave now."""
        if self.state.updated:
            keys, self.state.updated = list(self.state.updated.values()), {}
            self._replicate(keys)
        if self.acked >= self.sent:
            return replies
        self.held += [(self.sent, route, reply) for route, reply in replies]
        return []

    def _replicate(self, keys, full=False):
        self.sent += 1
        copy = (self.state.config or {}).get("mode") != "sync"
        names, payloads, meta = encode([chunk_record(key) for key in keys], copy)
        meta.update(config=self.state.config, full=full, incarnation=self.incarnation,
                    keep_previous=getattr(self.state, "keep_previous", False))
        self.connection.send(Message("replicate", self.sent, self.state.sender, names,
                                     payloads, meta))

    def _acknowledged(self, ack):
        if ack.op == "error":   # a bug or a stranger: the held replies wait, workers time out
            _say(f"server {self.rank}: server {self.target} refused a replica: "
                 f"{ack.meta.get('error')}")
            return
        self.acked = max(self.acked, ack.id)
        released = [(route, reply) for needed, route, reply in self.held if needed <= self.acked]
        self.held = [held for held in self.held if held[0] > self.acked]
        for route, reply in released:
            self.listener.send(route, reply)

    def _follow_book(self):
        """A restarted successor (a book notice): connect to it and send it everything."""
        version = getattr(self.membership, "book_version", 0)
        if version == self.book_version:
            return
        self.book_version = version
        entry = self.membership.book["server"][self.target]
        if (entry.get("tcp"), entry.get("pid")) == (self.entry.get("tcp"), self.entry.get("pid")):
            return
        self._connect(entry)
        keys = list(self.state.keys.values())
        self.state.updated = {}
        _say(f"server {self.rank}: server {self.target} was restarted; sending it the replica "
             f"of this shard ({len(keys)} chunks)")
        self._replicate(keys, full=True)

    def close(self):
        self.connection.close()


def fetch_shard(state, book, membership, max_message_bytes):
    """A restarted server's first act: its shard back from the replica on its successor."""
    source = successor(state.rank, state.num_servers)
    keys = membership.credentials
    connection = transport.Connection(
        book["server"][source]["tcp"], transport.new_identity(f"server{state.rank}-fetch"),
        max_message_bytes, keys and auth.ClientCurve(keys, auth.key_name("server", source)))
    try:
        reply = connection.request(
            Message("fetch_replica", 1, state.sender),
            transport.Deadline(membership.timeout, f"fetch_replica from server {source}"),
            membership.check)
    finally:
        connection.close()
    if reply.op == "error":
        raise RuntimeError(f"server {state.rank}: server {source} refused fetch_replica: "
                           f"{reply.meta.get('error')}")
    keys = install(state, reply)
    versions = sorted({key.version for key in keys.values()})
    _say(f"server {state.rank} restarted: rebuilt {len(keys)} chunks exactly from the replica "
         f"on server {source} (versions {versions[0] if versions else '-'}.."
         f"{versions[-1] if versions else '-'})")
    return keys
