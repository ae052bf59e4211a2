"""The scheduler process (ps-lite's postoffice, rendezvous side): assigns ranks and
addresses, runs barriers and heartbeats and names dead processes; ps/membership.py is the
node side of that."""
import sys
import time

from disttrain.ps import auth, protocol, transport
from disttrain.ps.membership import heartbeat_identity
from disttrain.ps.protocol import Message

ROLES = ("server", "worker")


def _say(text):
    print(f"disttrain: {text}", file=sys.stderr, flush=True)


class Scheduler:
    """The rendezvous process. Single-threaded: one ROUTER socket, one loop."""

    def __init__(self, address, num_workers, num_servers, heartbeat_timeout=10.0,
                 timeout=300.0, credentials=auth.FROM_ENV, restart_timeout=None):
        host, port = transport.split_host_port(address)
        bind_host = "*" if host in ("0.0.0.0", "") else host
        credentials = auth.resolve(credentials, "scheduler")
        security = credentials and auth.ServerCurve(credentials, ("server", "worker"), "scheduler")
        # Scheduler messages carry no arrays: a header's worth is plenty.
        self.listener = transport.Listener(bind_host, protocol.MAX_HEADER_BYTES, tcp_port=port,
                                           with_ipc=False, security=security)
        self.rejections = protocol.RejectionLog("scheduler")
        self.size = {"worker": num_workers, "server": num_servers}
        self.heartbeat_timeout, self.timeout = heartbeat_timeout, timeout
        self.nodes = {}          # node id -> info dict from register (+ rank, last_seen)
        self.pending = []        # (identity, message) registrations before the book is out
        self.book = None
        self.barriers = {}       # group -> list of (identity, request id)
        self.said_goodbye = set()
        self.heard = set()       # node ids whose heartbeat socket has spoken: notices reach them
        self.closing_since = None   # when every worker had said goodbye
        self.started = time.monotonic()
        # Recovery (DISTTRAIN_RESTART_TIMEOUT): a silent node's replacement may register.
        self.restart_timeout = restart_timeout
        self.replaced = set()    # node ids whose rank a replacement took over
        self.awaited = set()     # silent node ids already said to be awaited

    # --- requests -------------------------------------------------------------
    def handle(self, identity, message):
        if message.op == "register":
            return self._register(identity, message)
        if message.meta.get("node") in self.replaced:
            return self._error(identity, message, "replaced: another process took this rank")
        node = self.nodes.get(message.meta.get("node"))
        if message.op == "heartbeat":
            self.heard.add(message.meta.get("node"))
            if self.closing_since is not None:   # the shutdown broadcast had no route to it
                self.listener.send(identity, Message("shutdown", 0, "scheduler", meta={"text": ""}))
        if node is None and message.op == "heartbeat":
            # The heartbeat thread starts before registration is answered.
            return self.listener.send(identity, _heartbeat_reply(message))
        if node is None:
            return self._error(identity, message, f"{message.op} from unregistered node "
                                                  f"{message.meta.get('node')!r}")
        if node["peer"] != message.peer:   # a member's key speaks only for its own node
            return self._error(identity, message, f"{message.op} for {node['role']} node "
                                                  f"{message.meta['node']!r} from {message.peer}")
        node["last_seen"] = time.monotonic()
        if message.op == "heartbeat":
            self.listener.send(identity, _heartbeat_reply(message))
        elif message.op == "barrier":
            self._barrier(identity, message)
        elif message.op == "goodbye":
            self.said_goodbye.add(message.meta["node"])
            self.listener.send(identity, Message("reply", message.id, "scheduler"))
        else:
            self._error(identity, message, f"the scheduler does not serve op {message.op!r}")

    def _error(self, identity, message, text):
        self.rejections.say(f"bad request from {message.peer or message.sender}: {text}")
        self.listener.send(identity, protocol.error_reply(message.id, "scheduler", text))

    def _register(self, identity, message):
        meta = message.meta
        role, node_id = meta.get("role"), meta.get("node")
        if role not in ROLES or not isinstance(node_id, str):
            return self._error(identity, message, f"register needs role in {ROLES} and a node "
                                                  f"id, got role={role!r} node={node_id!r}")
        if self.book is not None and self.restart_timeout is not None:
            return self._recover(identity, message)
        if self.book is not None:
            return self._error(identity, message, f"{role} registered after the job started")
        refusal = auth.registration_refusal(message)
        if refusal:
            return self._error(identity, message, refusal)
        # A key is bound to one rank: a keyed process gets its key's rank.
        requested = auth.parse_key_name(message.peer)[1] if message.peer else meta.get("rank")
        if requested is not None and not (isinstance(requested, int)
                                          and 0 <= requested < self.size[role]):
            return self._error(identity, message, f"{role} asked for rank {requested!r}, "
                                                  f"valid ranks are 0..{self.size[role] - 1}")
        taken = [n for n in self.nodes.values() if n["role"] == role]
        if requested is not None and any(n.get("rank") == requested for n in taken):
            return self._error(identity, message, f"{role} rank {requested} registered twice")
        if len(taken) >= self.size[role]:
            return self._error(identity, message, f"more than {self.size[role]} {role}s "
                                                  f"registered")
        if node_id in self.nodes:
            return self._error(identity, message, f"node id {node_id!r} registered twice")
        self.nodes[node_id] = dict(meta, rank=requested, peer=message.peer,
                                   last_seen=time.monotonic())
        self.pending.append((identity, message))
        if len(self.nodes) == sum(self.size.values()):
            self._send_book()

    def _send_book(self):
        book = {"worker": [None] * self.size["worker"], "server": [None] * self.size["server"]}
        for node in self.nodes.values():
            if node.get("rank") is not None:
                book[node["role"]][node["rank"]] = node
        # Processes without a launcher rank fill the free ranks in registration order.
        for identity, message in self.pending:
            node = self.nodes[message.meta["node"]]
            if node.get("rank") is None:
                node["rank"] = book[node["role"]].index(None)
                book[node["role"]][node["rank"]] = node
        public = {role: [_public(n) for n in nodes] for role, nodes in book.items()}
        self.book = public
        for identity, message in self.pending:
            node = self.nodes[message.meta["node"]]
            self.listener.send(identity, Message("reply", message.id, "scheduler",
                                                 meta={"rank": node["rank"], "book": public}))
        self.pending = []

    # --- recovery (minimal: helper worker-recovery owns the full version) ---------------
    def _recover(self, identity, message):
        """A register after the book is out, with recovery on: the replacement of a rank.
        It takes that rank's place in the book, is answered at once, and every other node
        gets a `book` notice."""
        meta = message.meta
        role, node_id = meta["role"], meta["node"]
        refusal = auth.registration_refusal(message)
        if refusal:
            return self._error(identity, message, refusal)
        rank = auth.parse_key_name(message.peer)[1] if message.peer else meta.get("rank")
        if not (isinstance(rank, int) and 0 <= rank < self.size[role]):
            return self._error(identity, message, f"a replacement {role} must name its rank "
                                                  f"(0..{self.size[role] - 1}), got {rank!r}")
        if node_id in self.nodes:
            return self._error(identity, message, f"node id {node_id!r} registered twice")
        for old in [i for i, n in self.nodes.items() if n["role"] == role and n["rank"] == rank]:
            del self.nodes[old]
            self.replaced.add(old)
            self.said_goodbye.discard(old)
            self.heard.discard(old)
        self.nodes[node_id] = dict(meta, rank=rank, peer=message.peer, last_seen=time.monotonic())
        self.book[role][rank] = _public(self.nodes[node_id])
        _say(f"{role} {rank} registered again (a replacement, pid {meta.get('pid')})")
        self.listener.send(identity, Message("reply", message.id, "scheduler", meta={
            "rank": rank, "book": self.book, "recovery": True}))
        for other in self.nodes:
            if other != node_id:
                self.listener.send(heartbeat_identity(other), Message(
                    "book", 0, "scheduler", meta={"book": self.book, "role": role, "rank": rank}))

    def _silent_limit(self, node_id, node, silent):
        """With recovery on, a silent node is awaited up to restart_timeout more."""
        if self.restart_timeout is None:
            return self.heartbeat_timeout
        if silent > self.heartbeat_timeout and node_id not in self.awaited:
            self.awaited.add(node_id)
            _say(f"{node['role']} {node.get('rank')} is silent; waiting up to "
                 f"{self.restart_timeout:g} s for its replacement")
        return self.heartbeat_timeout + self.restart_timeout

    def _barrier(self, identity, message):
        group = message.meta.get("group")
        if group not in ("worker", "server", "all"):
            return self._error(identity, message, f"unknown barrier group {group!r}")
        waiting = self.barriers.setdefault(group, [])
        waiting.append((identity, message.id))
        needed = sum(self.size.values()) if group == "all" else self.size[group]
        if len(waiting) == needed:
            for waiter, request_id in waiting:
                self.listener.send(waiter, Message("reply", request_id, "scheduler"))
            self.barriers[group] = []

    # --- liveness -------------------------------------------------------------
    def dead_node(self):
        """The first watched node silent for longer than the heartbeat timeout."""
        now = time.monotonic()
        for node_id, node in self.nodes.items():
            if node_id in self.said_goodbye:
                continue
            if now - node["last_seen"] > self._silent_limit(node_id, node, now - node["last_seen"]):
                return node, now - node["last_seen"]
        return None, 0.0

    def broadcast(self, op, text=""):
        for node_id in self.nodes:
            self.listener.send(heartbeat_identity(node_id),
                               Message(op, 0, "scheduler", meta={"text": text}))

    def all_workers_left(self):
        workers = [i for i, n in self.nodes.items() if n["role"] == "worker"]
        return len(workers) == self.size["worker"] and set(workers) <= self.said_goodbye

    def run(self):
        """Serve until every worker said goodbye (exit 0) or a peer died (exit 1)."""
        try:
            while True:
                try:
                    received = self.listener.receive(100)
                except protocol.ProtocolError as error:
                    self.rejections.say(str(error))
                    self.listener.send(error.identity, protocol.error_reply(
                        error.request_id, "scheduler", str(error)))
                    continue
                if received is not None:
                    self.handle(*received)
                if self.book is None and time.monotonic() - self.started > self.timeout:
                    _say(f"scheduler: only {len(self.nodes)} of {sum(self.size.values())} "
                         f"processes registered within {self.timeout:g} s")
                    return 1
                node, silent = self.dead_node()
                if node is not None:
                    rank = "?" if node.get("rank") is None else node["rank"]
                    text = f"dead: {node['role']} {rank} (no heartbeat for {silent:.1f} s)"
                    _say(text)
                    self.broadcast("dead", text)
                    return 1
                if self.all_workers_left():
                    if self.closing_since is None:
                        self.closing_since = time.monotonic()
                        self.broadcast("shutdown")
                    # A ROUTER drops a notice to a heartbeat socket it has not heard from yet
                    # (a short job, a slow CURVE handshake): such a node gets the shutdown in
                    # the answer to its first beat, so wait for that, within one timeout.
                    if self.heard >= set(self.nodes) or \
                            time.monotonic() - self.closing_since > self.heartbeat_timeout:
                        return 0
        finally:
            # Linger so the dead / shutdown notices leave even on a busy machine.
            self.listener.close(linger_ms=2000)


def _public(node):
    """A node's entry in the address book every process receives."""
    return {k: node[k] for k in ("rank", "tcp", "ipc", "hostname", "netns", "pid")}


def _heartbeat_reply(message):
    """The answer to a heartbeat carries our clock and echoes the sender's: the node
    measures its offset to this clock from it (timelines of several hosts line up)."""
    sent = message.meta.get("sent")
    return Message("reply", message.id, "scheduler", meta={
        "time": time.time(), "sent": sent if isinstance(sent, float) else None})
