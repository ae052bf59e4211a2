"""Membership: a server's or worker's link to the scheduler (register, barriers, goodbye,
heartbeats, dead-peer and shutdown notices); ps/scheduler.py is the other end."""
import itertools
import os
import sys
import threading
import time

from disttrain.observe.trace import ClockOffset
from disttrain.ps import auth, transport
from disttrain.ps.protocol import Message


def _say(text):
    print(f"disttrain: {text}", file=sys.stderr, flush=True)


def heartbeat_identity(node_id):
    """The socket identity of a node's heartbeat thread: the scheduler sends dead-peer and
    shutdown notices there, even before the first beat arrived."""
    return (node_id + "/heartbeat").encode()


def heartbeat_interval(timeout):
    # Several beats per timeout, so one late beat (a busy GIL) is never fatal.
    return min(1.0, timeout / 5)


class Membership:
    """A server's or worker's link to the scheduler: register, barrier, goodbye from the
    calling thread; heartbeats and dead-peer notices on a background thread with its own
    socket (zmq sockets are never shared between threads)."""

    def __init__(self, role, scheduler_address, heartbeat_timeout=10.0, timeout=300.0,
                 exit_on_dead=False, credentials=auth.FROM_ENV, rank=None, restart_timeout=None):
        self.role, self.timeout = role, timeout
        # Keys are per rank, so a keyed process knows its rank before it registers.
        self.credentials = auth.resolve(credentials, role, rank)
        self._scheduler_key = self.credentials and auth.ClientCurve(self.credentials, "scheduler")
        self.scheduler_address = f"tcp://{scheduler_address}"
        self.heartbeat_timeout = heartbeat_timeout
        self.exit_on_dead = exit_on_dead
        self.node_id = transport.new_identity(role).decode()
        self.rank = None
        self.dead = None          # text of the dead-peer notice, once one arrived
        self.shutdown = threading.Event()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._requests = transport.Connection(self.scheduler_address, self.node_id.encode(),
                                              security=self._scheduler_key)
        self._beats = None
        self.clock = ClockOffset()   # the scheduler's clock minus ours, from heartbeats
        # Recovery (config.Config.restart_timeout set): a dead process is replaced.
        self.restart_timeout = restart_timeout
        self.recovery = False     # our register was answered as the replacement of our rank
        self.book = None          # the current public address book
        self.book_version = 0     # +1 per book notice (a replacement took over a rank)
        self.replaced = None      # text of the scheduler's `replaced` answer, once it came
        # Elastic membership (launch -n MIN:MAX; disttrain/elastic.py, ps/elastic.py).
        self.elastic = False      # the job lets workers join and leave
        self.join = False         # we registered as a joiner of a running job
        self.joining = []         # worker ranks that registered to join, in notice order

    @classmethod
    def from_config(cls, role, settings, **kwargs):
        """The Membership a job process's config.Config describes: its rank (the launcher's)
        and its keys (or none, insecure)."""
        kwargs.setdefault("rank", settings.rank)
        kwargs.setdefault("restart_timeout", settings.restart_timeout)
        if "credentials" not in kwargs:
            kwargs["credentials"] = auth.credentials_from_config(settings, role, kwargs["rank"])
        return cls(role, settings.required("scheduler"),
                   heartbeat_timeout=settings.heartbeat_timeout, timeout=settings.timeout,
                   **kwargs)

    def check(self):
        if self.dead:
            raise transport.PeerDied(self.dead)

    def _request(self, op, what, **meta):
        message = Message(op, next(self._ids), f"{self.role}-{self.rank}",
                          meta=dict(meta, node=self.node_id))
        reply = self._requests.request(message, transport.Deadline(self.timeout, what),
                                       self.check)
        if reply.op == "error":
            raise RuntimeError(f"scheduler refused {op}: {reply.meta.get('error')}")
        return reply

    def register(self, tcp="", ipc="", rank=None):
        """Blocks until every process registered; returns the address book
        {"server": [...], "worker": [...]} (entries have rank, tcp, ipc, hostname, netns, pid)."""
        hostname, netns = transport.host_identity()
        if rank is None and self.credentials is not None:
            rank = self.credentials.rank
        self._start_heartbeats()
        reply = self._request("register", f"register with the scheduler at "
                                          f"{self.scheduler_address}",
                              role=self.role, rank=rank, tcp=tcp, ipc=ipc,
                              hostname=hostname, netns=netns, pid=os.getpid())
        self.rank = reply.meta["rank"]
        self.recovery = reply.meta.get("recovery") is True
        self.elastic = reply.meta.get("elastic") is True
        self.join = reply.meta.get("join") is True
        self.book = reply.meta["book"]
        return reply.meta["book"]

    def barrier(self, group="worker"):
        self._request("barrier", f"barrier of group {group!r}", group=group)

    def goodbye(self, leave=False):
        """leave=True (elastic): this worker leaves a job that goes on without it."""
        if leave:
            self._request("goodbye", "goodbye to the scheduler", leave=True)
        else:
            self._request("goodbye", "goodbye to the scheduler")

    def joined(self):
        """A joiner was let in (elastic): the job now waits for its goodbye too."""
        self._request("joined", "joined, to the scheduler")

    def _start_heartbeats(self):
        self._beats = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                       name="disttrain-heartbeat")
        self._beats.start()

    def _heartbeat_loop(self):
        connection = transport.Connection(self.scheduler_address,
                                          heartbeat_identity(self.node_id),
                                          security=self._scheduler_key)
        interval = heartbeat_interval(self.heartbeat_timeout)
        last_answer = time.monotonic()
        try:
            while not self._stop.is_set():
                connection.send(Message("heartbeat", 0, f"{self.role}-{self.rank}",
                                        meta={"node": self.node_id, "sent": time.time()}))
                next_beat = time.monotonic() + interval
                while time.monotonic() < next_beat and not self._stop.is_set():
                    notice = connection.receive(50)
                    if notice is None:
                        continue
                    last_answer = time.monotonic()
                    if notice.op == "reply" and isinstance(notice.meta.get("time"), float) \
                            and isinstance(notice.meta.get("sent"), float):
                        self.clock.sample(notice.meta["sent"], time.time(), notice.meta["time"])
                    if notice.op == "dead":
                        return self._peer_died(notice.meta.get("text", "dead: unknown peer"))
                    if notice.op == "shutdown":
                        self.shutdown.set()
                        return
                    if self._recovery_notice(notice):
                        return
                silent = time.monotonic() - last_answer
                if silent > self.heartbeat_timeout and not self._stop.is_set():
                    return self._peer_died(f"dead: scheduler (no heartbeat for {silent:.1f} s)")
        finally:
            connection.close()

    def _recovery_notice(self, notice):
        """A book notice (a replacement took over a rank: its new addresses), or the
        scheduler's answer that this node itself was replaced (it was frozen or cut off long
        enough to be given up: a replacement now holds its rank, so it must go). True: stop
        beating."""
        if notice.op == "book" and isinstance(notice.meta.get("book"), dict):
            self.book = notice.meta["book"]
            self.book_version += 1
            if type(notice.meta.get("join")) is int:   # elastic: a new worker
                self.joining.append(notice.meta["join"])
                return False
            _say(f"{notice.meta.get('role')} {notice.meta.get('rank')} was replaced; "
                 f"{self.role} {self.rank} carries on")
        elif notice.op == "error" and str(notice.meta.get("error", "")).startswith("replaced"):
            self.replaced = f"{self.role} {self.rank}: {notice.meta['error']}"
            _say(self.replaced)
            self.dead = self.replaced
            if self.exit_when_replaced:
                os._exit(1)
            return True
        return False

    # A replaced process ends at once; tests running nodes on threads switch it off.
    exit_when_replaced = True

    def _peer_died(self, text):
        _say(text)
        self.dead = text
        if self.exit_on_dead:
            os._exit(1)
        # Workers get a grace period to raise PeerDied from their blocking call and exit
        # by themselves; a worker stuck elsewhere is ended so nothing is left behind.
        if not self._stop.wait(5.0):
            os._exit(1)

    def close(self):
        self._stop.set()
        if self._beats is not None:
            self._beats.join(timeout=2)
        self._requests.close()
