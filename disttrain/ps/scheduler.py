"""The scheduler process (ps-lite's postoffice, rendezvous side): assigns ranks and
addresses, runs barriers and heartbeats and names dead processes; ps/membership.py is the
node side of that."""
import sys
import time

from disttrain.observe import channel
from disttrain.ps import auth, protocol, scheduler_elastic as elastic, transport
from disttrain.ps.membership import heartbeat_identity
from disttrain.ps.protocol import Message

ROLES = ("server", "worker")
PUBLIC = ("rank", "tcp", "ipc", "hostname", "netns", "pid")   # a node's address-book entry


def _say(text):
    print(f"disttrain: {text}", file=sys.stderr, flush=True)


class Scheduler:
    """The rendezvous process. Single-threaded: one ROUTER socket, one loop."""

    def __init__(self, address, num_workers, num_servers, heartbeat_timeout=10.0,
                 timeout=300.0, credentials=auth.FROM_ENV, restart_timeout=None,
                 max_workers=None):
        host, port = transport.split_host_port(address)
        bind_host = "*" if host in ("0.0.0.0", "") else host
        credentials = auth.resolve(credentials, "scheduler")
        security = credentials and auth.ServerCurve(credentials, ("server", "worker"), "scheduler")
        # Scheduler messages carry no arrays: a header's worth is plenty.
        self.listener = transport.Listener(bind_host, protocol.MAX_HEADER_BYTES, tcp_port=port,
                                           with_ipc=False, security=security)
        self.rejections = protocol.RejectionLog("scheduler")
        # Elastic (max_workers set, launch -n MIN:MAX): ranks 0..max_workers-1 exist, the
        # job starts once num_workers of them registered, and workers join and leave later.
        self.elastic = max_workers is not None
        self.size = {"worker": max_workers or num_workers, "server": num_servers}
        self.starting = {"worker": num_workers, "server": num_servers}
        self.heartbeat_timeout, self.timeout = heartbeat_timeout, timeout
        self.nodes = {}          # node id -> info dict from register (+ rank, last_seen)
        self.pending = []        # (identity, message) registrations before the book is out
        self.book = None
        self.barriers = {}       # group -> list of (identity, request id)
        self.said_goodbye = set()
        self.heard = set()       # node ids whose heartbeat socket has spoken: notices reach them
        self.closing_since = None   # when every worker had said goodbye
        self.started = time.monotonic()
        # Recovery (config.Config.restart_timeout set): a silent node is reported
        # unresponsive and given restart_timeout s to be replaced before it is named dead.
        self.restart_timeout = restart_timeout
        self.unresponsive = {}   # node id -> when it was reported unresponsive
        self.replaced = set()    # node ids a replacement took over: their beats get `replaced`

    # --- requests -------------------------------------------------------------
    def handle(self, identity, message):
        if message.op == "register":
            return self._register(identity, message)
        if message.meta.get("node") in self.replaced:
            return self._refuse_replaced(identity, message)
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
        self.unresponsive.pop(message.meta["node"], None)   # it speaks again
        if message.op == "heartbeat":
            self.listener.send(identity, _heartbeat_reply(message))
        elif message.op == "barrier":
            self._barrier(identity, message)
        elif message.op == "goodbye" and message.meta.get("leave") is True and self.elastic:
            elastic.leave(self, identity, message)
        elif message.op == "goodbye":
            self.said_goodbye.add(message.meta["node"])
            self.listener.send(identity, Message("reply", message.id, "scheduler"))
        elif message.op == "joined" and self.elastic:
            node.pop("joining", None)
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
        if self.book is not None and elastic.may_join(self, message):
            return elastic.register_joiner(self, identity, message)
        if self.book is not None:
            return self._register_replacement(identity, message)
        refusal = auth.registration_refusal(message)
        if refusal:
            return self._error(identity, message, refusal)
        # A key is bound to one rank: a keyed process gets its key's rank.
        requested = auth.parse_key_name(message.peer)[1] if message.peer else meta.get("rank")
        if requested is not None and not (isinstance(requested, int)
                                          and 0 <= requested < self.size[role]):
            return self._error(identity, message, f"{role} asked for rank {requested!r}, "
                                                  f"valid ranks are 0..{self.size[role] - 1}")
        self._forget_predecessor(role, requested)
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
        if len(self.nodes) == sum(self.starting.values()):
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
        public = {role: [n and {k: n[k] for k in PUBLIC} for n in nodes]   # None: a free rank
                  for role, nodes in book.items()}
        self.book = public
        for identity, message in self.pending:
            node = self.nodes[message.meta["node"]]
            self.listener.send(identity, Message("reply", message.id, "scheduler", meta={
                "rank": node["rank"], "book": public, "elastic": self.elastic}))
        self.pending = []

    def _barrier(self, identity, message):
        group = message.meta.get("group")
        if group not in ("worker", "server", "all"):
            return self._error(identity, message, f"unknown barrier group {group!r}")
        waiting = self.barriers.setdefault(group, [])
        waiting.append((identity, message.id))
        needed = sum(self.size.values()) if group == "all" else self.size[group]
        if self.elastic:   # the workers in the job now
            needed = elastic.group_size(self, group)
        if len(waiting) == needed:
            for waiter, request_id in waiting:
                self.listener.send(waiter, Message("reply", request_id, "scheduler"))
            self.barriers[group] = []

    # --- recovery: a replacement takes over a dead node's rank ---------------------
    def _register_replacement(self, identity, message):
        """A register once the book is out: with recovery on, the replacement of the node
        holding that role and rank (the key's rank, else meta rank). It gets the node's
        place in the book, the answer {"rank", "book", "recovery": True}, and every other
        node a `book` notice; the node it replaces is forgotten (its beats get `replaced`)."""
        meta = message.meta
        role, node_id = meta["role"], meta["node"]
        if self.restart_timeout is None:
            return self._error(identity, message, f"{role} registered after the job started")
        refusal = auth.registration_refusal(message)
        if refusal:
            return self._error(identity, message, refusal)
        rank = auth.parse_key_name(message.peer)[1] if message.peer else meta.get("rank")
        if not (type(rank) is int and 0 <= rank < self.size[role]):
            return self._error(identity, message, f"a replacement {role} must give its rank, "
                                                  f"one of 0..{self.size[role] - 1}, got "
                                                  f"{rank!r}")
        if node_id in self.nodes or node_id in self.replaced:
            return self._error(identity, message, f"node id {node_id!r} registered twice")
        old_id = next(i for i, n in self.nodes.items() if n["role"] == role and n["rank"] == rank)
        if old_id in self.said_goodbye:
            return self._error(identity, message, f"{role} {rank} already finished; there is "
                                                  f"nothing to replace")
        old = self.nodes.pop(old_id)
        self.replaced.add(old_id)
        self.unresponsive.pop(old_id, None)
        self.heard.discard(old_id)
        node = self.nodes[node_id] = dict(meta, rank=rank, peer=message.peer,
                                          last_seen=time.monotonic())
        self.book[role][rank] = {k: node[k] for k in PUBLIC}
        _say(f"{role} {rank} recovered: a replacement (pid {node.get('pid')}) took over from "
             f"pid {old.get('pid')}")
        self.listener.send(identity, Message("reply", message.id, "scheduler", meta={
            "rank": rank, "book": self.book, "recovery": True}))
        for other in self.nodes:
            if other != node_id:
                self.listener.send(heartbeat_identity(other), Message(
                    "book", 0, "scheduler", meta={"book": self.book, "role": role, "rank": rank}))

    def _forget_predecessor(self, role, rank):
        """Before the book is out, with recovery on: a register for a rank already taken
        comes from the replacement of a process that died while the job started (a launcher
        starts one only after the death), which takes its place in the registration."""
        if self.restart_timeout is None or rank is None:
            return
        for node_id, node in list(self.nodes.items()):
            if node["role"] == role and node.get("rank") == rank:
                del self.nodes[node_id]
                self.unresponsive.pop(node_id, None)
                self.replaced.add(node_id)
                self.pending = [(i, m) for i, m in self.pending if m.meta["node"] != node_id]
                _say(f"{role} {rank} registers again (a replacement, before the job started)")

    def _refuse_replaced(self, identity, message):
        """A node that a replacement took over speaks again (it was frozen): it must go."""
        self.listener.send(identity, protocol.error_reply(
            message.id, "scheduler", f"replaced: node {message.meta['node']} was given up and "
                                     f"a replacement holds its rank now"))

    def _given_up(self):
        """With recovery on, what dead_node is without: the first node silent for longer
        than the heartbeat timeout is reported unresponsive (once; the launcher then kills
        and restarts it) and named dead only if no replacement came within restart_timeout."""
        now = time.monotonic()
        for node_id, node in self.nodes.items():
            silent = now - node["last_seen"]
            if node_id in self.said_goodbye or silent <= self.heartbeat_timeout:
                continue
            if node_id not in self.unresponsive:
                self.unresponsive[node_id] = now
                rank = "?" if node.get("rank") is None else node["rank"]
                why = f"no heartbeat for {silent:.1f} s"
                _say(f"unresponsive: {node['role']} {rank} ({why}); waiting up to "
                     f"{self.restart_timeout:g} s for its replacement")
                channel.send("unresponsive", {"role": node["role"], "rank": node.get("rank"),
                                              "why": why})
            elif now - self.unresponsive[node_id] > self.restart_timeout:
                return node, silent
        return None, 0.0

    # --- liveness -------------------------------------------------------------
    def dead_node(self):
        """The first watched node silent for longer than the heartbeat timeout."""
        now = time.monotonic()
        for node_id, node in self.nodes.items():
            if node_id in self.said_goodbye:
                continue
            if now - node["last_seen"] > self.heartbeat_timeout:
                return node, now - node["last_seen"]
        return None, 0.0

    def broadcast(self, op, text=""):
        for node_id in self.nodes:
            self.listener.send(heartbeat_identity(node_id),
                               Message(op, 0, "scheduler", meta={"text": text}))

    def all_workers_left(self):
        if self.elastic:
            return elastic.all_workers_left(self)
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
                node, silent = self.dead_node() if self.restart_timeout is None else \
                    self._given_up()
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


def _heartbeat_reply(message):
    """The answer to a heartbeat carries our clock and echoes the sender's: the node
    measures its offset to this clock from it (timelines of several hosts line up)."""
    sent = message.meta.get("sent")
    return Message("reply", message.id, "scheduler", meta={
        "time": time.time(), "sent": sent if isinstance(sent, float) else None})
