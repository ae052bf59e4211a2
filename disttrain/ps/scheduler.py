"""The scheduler process (ps-lite's postoffice, rendezvous side): assigns ranks and
addresses, runs barriers and heartbeats and names dead processes; ps/membership.py is the
node side of that.

A restarted scheduler (recovery on, DISTTRAIN_INCARNATION >= 1: the launcher started it again
on the same address after it died) rebuilds its book from the live processes. Every heartbeat
reply carries `incarnation`, a random id of this scheduler process; a node that sees a new one
re-registers from its heartbeat thread (`register` with meta `rejoin: True`, keeping its node
id, rank and addresses), and re-sends the request its main thread was waiting on (barrier,
goodbye): the dead scheduler swallowed it. Barriers are rebuilt from those re-sent requests; a
request that reaches this scheduler twice (queued in the node's socket while the scheduler was
down, then re-sent) counts once. Requests from nodes that have not rejoined yet are answered
with an error marked `rejoin`, which the node ignores (it re-sends after rejoining).

The processes that do not rejoin within restart_timeout of this scheduler's start:
- if nobody came back at all, the job is gone: exit 1;
- if some registered but nobody rejoined, the previous scheduler never sent its book (it
  died during registration): they are handled as at a first start (plain re-sent
  registrations; too few within the registration timeout ends the job);
- a worker that did not rejoin counts as having left: it said goodbye to the previous
  scheduler and exited (a worker that died instead exits non-zero, which the launcher sees
  and handles: it restarts it, or ends the job). Its rank is then closed: a late rejoin is
  refused;
- a server that did not rejoin is dead (servers never leave before the job ends): `dead:`
  to everyone and exit 1, as for any death.
A barrier answered by the previous scheduler whose reply was lost in its death (killed while
sending it) is not recovered: the node re-sends it and waits, and its timeout ends it."""
import sys
import time
import uuid

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
                 timeout=300.0, credentials=auth.FROM_ENV, incarnation=0, restart_timeout=None,
                 max_workers=None):
        """incarnation (Config.incarnation): 0 at the job's start, k after the k-th restart;
        a restarted scheduler waits up to restart_timeout (else timeout) for the job's live
        processes to rejoin (see the module docstring). max_workers (elastic, launch -n
        MIN:MAX): workers may join up to this many (disttrain/ps/scheduler_elastic.py)."""
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
        self.incarnation = incarnation
        self.incarnation_id = uuid.uuid4().hex[:16]   # in every heartbeat reply
        self.rejoin_deadline = None if incarnation == 0 else \
            self.started + (timeout if restart_timeout is None else restart_timeout)
        self.rejoined = 0        # rejoins this restarted scheduler accepted
        self.barriers_answered = {}   # node id -> id of its last barrier request answered
        if incarnation > 0:
            _say(f"scheduler restarted (incarnation {incarnation}, id {self.incarnation_id}): "
                 f"waiting up to {self.rejoin_deadline - self.started:g} s for the job's "
                 f"processes to rejoin")

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
            return self.listener.send(identity, _heartbeat_reply(message, self.incarnation_id))
        if node is None and self.incarnation > 0 and self.book is None:
            return self._ask_to_rejoin(identity, message)
        if node is None:
            return self._error(identity, message, f"{message.op} from unregistered node "
                                                  f"{message.meta.get('node')!r}")
        if node["peer"] != message.peer:   # a member's key speaks only for its own node
            return self._error(identity, message, f"{message.op} for {node['role']} node "
                                                  f"{message.meta['node']!r} from {message.peer}")
        node["last_seen"] = time.monotonic()
        self.unresponsive.pop(message.meta["node"], None)   # it speaks again
        if message.op == "heartbeat":
            self.listener.send(identity, _heartbeat_reply(message, self.incarnation_id))
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
        if meta.get("node") in self.replaced:   # a replaced node re-sending its registration
            return self._refuse_replaced(identity, message)
        if meta.get("rejoin") is True:
            return self._rejoin(identity, message)
        role, node_id = meta.get("role"), meta.get("node")
        if role not in ROLES or not isinstance(node_id, str):
            return self._error(identity, message, f"register needs role in {ROLES} and a node "
                                                  f"id, got role={role!r} node={node_id!r}")
        if self._registration_sent_again(identity, message):
            return
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
                "rank": node["rank"], "book": public, "incarnation": self.incarnation_id,
                "elastic": self.elastic}))
        self.pending = []

    def _barrier(self, identity, message):
        group = message.meta.get("group")
        if group not in ("worker", "server", "all"):
            return self._error(identity, message, f"unknown barrier group {group!r}")
        node_id = message.meta["node"]
        # A node re-sends its barrier to a restarted scheduler, which may also have got the
        # copy queued while it was down: a request counts once, and is answered again.
        if message.id <= self.barriers_answered.get(node_id, 0):
            return self.listener.send(identity, Message("reply", message.id, "scheduler"))
        waiting = [entry for entry in self.barriers.get(group, []) if entry[2] != node_id]
        waiting.append((identity, message.id, node_id))
        self.barriers[group] = waiting
        needed = sum(self.size.values()) if group == "all" else self.size[group]
        if self.elastic:   # the workers in the job now
            needed = elastic.group_size(self, group)
        if len(waiting) == needed:
            for waiter, request_id, waiter_node in waiting:
                self.listener.send(waiter, Message("reply", request_id, "scheduler"))
                self.barriers_answered[waiter_node] = request_id
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
            "rank": rank, "book": self.book, "recovery": True,
            "incarnation": self.incarnation_id}))
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
                # silent_s lets the launcher drop a late report about a process it has
                # already replaced (launch/README.md).
                channel.send("unresponsive", {"role": node["role"], "rank": node.get("rank"),
                                              "why": why, "silent_s": round(silent, 3)})
            elif now - self.unresponsive[node_id] > self.restart_timeout:
                return node, silent
        return None, 0.0

    # --- a restarted scheduler: the live processes rejoin ----------------------------
    def _rejoin(self, identity, message):
        """A live process re-registering with this restarted scheduler: it keeps its node
        id, rank and addresses, and is answered at once (it already holds the book)."""
        meta = message.meta
        role, node_id = meta.get("role"), meta.get("node")
        if self.incarnation == 0:
            return self._error(identity, message, f"{role} {meta.get('rank')!r} asked to "
                                                  f"rejoin, but this scheduler is the job's "
                                                  f"first (DISTTRAIN_INCARNATION=0); start a "
                                                  f"restarted one with DISTTRAIN_INCARNATION=1")
        if role not in ROLES or not isinstance(node_id, str):
            return self._error(identity, message, f"rejoin needs role in {ROLES} and a node "
                                                  f"id, got role={role!r} node={node_id!r}")
        refusal = auth.registration_refusal(message)
        if refusal:
            return self._error(identity, message, refusal)
        rank = auth.parse_key_name(message.peer)[1] if message.peer else meta.get("rank")
        if not (isinstance(rank, int) and 0 <= rank < self.size[role]):
            return self._error(identity, message, f"{role} rejoined with rank {rank!r}, valid "
                                                  f"ranks are 0..{self.size[role] - 1}")
        node = self.nodes.get(node_id)
        if node is None:
            holder = next((n for n in self.nodes.values()
                           if n["role"] == role and n.get("rank") == rank), None)
            if holder is not None:
                why = "counted as having left" if holder.get("left") else \
                    f"held by node {holder['node']!r}"
                return self._error(identity, message, f"{role} {rank} cannot rejoin: its rank "
                                                      f"is {why}")
            node = self.nodes[node_id] = {key: meta.get(key) for key in (
                "role", "node", "tcp", "ipc", "hostname", "netns", "pid")}
            node.update(rank=rank, peer=message.peer)
            self.rejoined += 1
            _say(f"scheduler: {role} {rank} rejoined")
        elif (node["role"], node.get("rank")) != (role, rank):
            return self._error(identity, message, f"node {node_id!r} is {node['role']} "
                                                  f"{node.get('rank')}, not {role} {rank}")
        node["last_seen"] = time.monotonic()
        self.heard.add(node_id)   # it spoke on its heartbeat socket: notices reach it
        self.listener.send(identity, Message("reply", message.id, "scheduler", meta={
            "rank": rank, "incarnation": self.incarnation_id, "restart": self.incarnation}))
        if self.book is None and len(self.nodes) == sum(self.size.values()):
            _say(f"scheduler: all {len(self.nodes)} processes are back (incarnation "
                 f"{self.incarnation})")
            self._send_book()   # answers registrations re-sent by processes without a book

    def _ask_to_rejoin(self, identity, message):
        """A request from a node that has not rejoined yet (queued in its socket while no
        scheduler ran): it re-sends the request once it rejoined, so the answer says only
        that (meta `rejoin`, which the node ignores)."""
        reply = protocol.error_reply(message.id, "scheduler", f"{message.op} from node "
                                     f"{message.meta.get('node')!r}, which has not rejoined "
                                     f"scheduler incarnation {self.incarnation} yet")
        reply.meta["rejoin"] = True
        self.listener.send(identity, reply)

    def _registration_sent_again(self, identity, message):
        """A registration that reached this scheduler twice (with recovery on a node sends
        it again to each scheduler process it hears of until it has its book; a restarted
        one may also get the copy queued while no scheduler ran). Before the book, the later
        copy takes the earlier's place; after it, it is answered again. True if it was one."""
        node = self.nodes.get(message.meta["node"])
        if node is None or node["peer"] != message.peer or node["role"] != message.meta["role"]:
            return False    # not the same member's node: the checks of _register apply
        if self.book is not None:
            self.listener.send(identity, Message("reply", message.id, "scheduler", meta={
                "rank": node["rank"], "book": self.book, "incarnation": self.incarnation_id}))
            return True
        for index, (_, earlier) in enumerate(self.pending):
            if earlier.meta["node"] == message.meta["node"]:
                self.pending[index] = (identity, message)
                return True
        return False

    def _close_the_book(self):
        """restart_timeout after a restart, some processes have not rejoined (see the module
        docstring): a missing server is dead, as is a job with nobody left (exit code 1);
        missing workers have left. None when the job goes on."""
        waited = self.rejoin_deadline - self.started
        if not self.nodes:
            _say(f"scheduler: no process of the job came back within {waited:g} s")
            return 1
        missing = {}
        for role in ROLES:
            nodes = [n for n in self.nodes.values() if n["role"] == role]
            held = {n["rank"] for n in nodes if n.get("rank") is not None}
            free = [rank for rank in range(self.size[role]) if rank not in held]
            # Registrations without a rank take the lowest free ranks (_send_book).
            missing[role] = free[sum(n.get("rank") is None for n in nodes):]
        if missing["server"]:
            text = (f"dead: server {missing['server'][0]} (did not rejoin the restarted "
                    f"scheduler within {waited:g} s)")
            _say(text)
            self.broadcast("dead", text)
            return 1
        _say(f"scheduler: worker {', '.join(map(str, missing['worker']))} did not rejoin "
             f"within {waited:g} s: counted as having left (a worker that said goodbye to "
             f"the previous scheduler has exited)")
        for rank in missing["worker"]:
            node_id = f"left-worker-{rank}"
            self.nodes[node_id] = {"role": "worker", "rank": rank, "node": node_id, "tcp": "",
                                   "ipc": "", "hostname": "", "netns": 0, "pid": 0,
                                   "peer": None, "left": True, "last_seen": time.monotonic()}
            self.said_goodbye.add(node_id)
            self.heard.add(node_id)
        self._send_book()
        return None

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
        if self.book is None:   # a restarted scheduler that not everyone has rejoined yet
            return False
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
                if self.book is None and (self.rejoined or not self.nodes) and \
                        self.rejoin_deadline is not None and \
                        time.monotonic() > self.rejoin_deadline:
                    code = self._close_the_book()
                    if code is not None:
                        return code
                if self.book is None and not self.rejoined and \
                        time.monotonic() - self.started > self.timeout:
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


def _heartbeat_reply(message, incarnation_id):
    """The answer to a heartbeat carries our clock and echoes the sender's: the node
    measures its offset to this clock from it (timelines of several hosts line up); and
    this scheduler process's incarnation id, whose change tells the node to rejoin."""
    sent = message.meta.get("sent")
    return Message("reply", message.id, "scheduler", meta={
        "time": time.time(), "sent": sent if isinstance(sent, float) else None,
        "incarnation": incarnation_id})
