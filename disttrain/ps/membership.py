"""Membership: a server's or worker's link to the scheduler (register, barriers, goodbye,
heartbeats, dead-peer and shutdown notices); ps/scheduler.py is the other end.

With recovery on (restart_timeout set) the scheduler may die and be started again: a silent
scheduler is waited for up to restart_timeout, a new scheduler incarnation (the id in every
heartbeat reply) is rejoined from the heartbeat thread, and the request the main thread waits
on is sent again (ps/scheduler.py's docstring has the whole protocol)."""
import itertools
import os
import sys
import threading
import time

from disttrain.observe import channel
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

    # A replaced process ends at once (os._exit); tests running nodes on threads switch it off.
    exit_when_replaced = True

    def __init__(self, role, scheduler_address, heartbeat_timeout=10.0, timeout=300.0,
                 exit_on_dead=False, credentials=auth.FROM_ENV, rank=None,
                 restart_timeout=None):
        """restart_timeout (Config.restart_timeout, recovery on): how long a silent scheduler
        is waited for (it may be restarted) before it counts as dead; None: heartbeat_timeout,
        and a scheduler is never rejoined."""
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
        # Scheduler restarts (recovery): see _follow_incarnation.
        self._registration = None          # what register() sent, sent again to rejoin
        self._scheduler_incarnation = None  # id of the scheduler whose book holds this node
        self._seen_incarnation = None       # the latest heartbeat reply's, before registering
        self._rejoin = None                 # (incarnation, request id, sent at) in flight
        self._rejoins = 0   # +1 per rejoin (or lost registration): the main thread re-sends
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
        reply = self._exchange(message, transport.Deadline(self.timeout, what))
        if reply.op == "error" and str(reply.meta.get("error")).startswith("replaced"):
            # A replacement holds our rank (we were given up): the same end as the
            # heartbeat thread's, whichever of the two hears it first.
            self.replaced = self.dead = f"{self.role} {self.rank}: {reply.meta['error']}"
            raise transport.PeerDied(self.dead)
        if reply.op == "error":
            raise RuntimeError(f"scheduler refused {op}: {reply.meta.get('error')}")
        return reply

    def _exchange(self, message, deadline):
        """Send `message`, wait for its reply. A scheduler restarted meanwhile never saw the
        request (or answered it with `rejoin` before this node rejoined): it is sent again
        each time the heartbeat thread rejoined (the scheduler counts a request once)."""
        rejoins = self._rejoins
        self._requests.send(message)
        while True:
            self.check()
            deadline.check()
            if self._rejoins != rejoins:
                rejoins = self._rejoins
                self._requests.send(message)
            reply = self._requests.receive(deadline.poll_ms())
            if reply is None or reply.id != message.id:
                continue
            if reply.op == "error" and reply.meta.get("rejoin") is True:
                continue   # sent again once this node rejoined
            return reply

    def register(self, tcp="", ipc="", rank=None):
        """Blocks until every process registered; returns the address book
        {"server": [...], "worker": [...]} (entries have rank, tcp, ipc, hostname, netns, pid)."""
        hostname, netns = transport.host_identity()
        if rank is None and self.credentials is not None:
            rank = self.credentials.rank
        self._registration = dict(role=self.role, tcp=tcp, ipc=ipc, hostname=hostname,
                                  netns=netns, pid=os.getpid())
        self._start_heartbeats()
        reply = self._request("register", f"register with the scheduler at "
                                          f"{self.scheduler_address}",
                              rank=rank, **self._registration)
        self.rank = reply.meta["rank"]
        self.recovery = reply.meta.get("recovery") is True
        self.elastic = reply.meta.get("elastic") is True
        self.join = reply.meta.get("join") is True
        self.book = reply.meta["book"]
        # After the rank (the heartbeat thread reads both). Every register reply names its
        # scheduler; where one would not, the one heard last answered it.
        self._scheduler_incarnation = reply.meta.get("incarnation", self._seen_incarnation)
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
        waiting_said = False     # the "waiting for its restart" line, once per silence
        try:
            while not self._stop.is_set():
                # Not blocking: a scheduler away for restart_timeout would fill the queue.
                connection.send(Message("heartbeat", 0, f"{self.role}-{self.rank}",
                                        meta={"node": self.node_id, "sent": time.time()}),
                                block=False)
                next_beat = time.monotonic() + interval
                while time.monotonic() < next_beat and not self._stop.is_set():
                    notice = connection.receive(50)
                    if notice is None:
                        continue
                    last_answer, waiting_said = time.monotonic(), False
                    if self._rejoin is not None and notice.id == self._rejoin[1]:
                        refused = self._rejoin_answered(notice)
                        if refused:
                            return self._peer_died(refused)
                        continue
                    if notice.op == "reply" and isinstance(notice.meta.get("time"), float) \
                            and isinstance(notice.meta.get("sent"), float):
                        self.clock.sample(notice.meta["sent"], time.time(), notice.meta["time"])
                    if notice.op == "reply" and self.restart_timeout is not None:
                        self._follow_incarnation(connection, notice.meta.get("incarnation"))
                    if notice.op == "dead":
                        return self._peer_died(notice.meta.get("text", "dead: unknown peer"))
                    if notice.op == "shutdown":
                        self.shutdown.set()
                        return
                    if self._recovery_notice(notice):
                        return
                silent = time.monotonic() - last_answer
                if silent > self.heartbeat_timeout and not self._stop.is_set():
                    if self.restart_timeout is None or \
                            silent > max(self.restart_timeout, self.heartbeat_timeout):
                        return self._peer_died(f"dead: scheduler (no heartbeat for "
                                               f"{silent:.1f} s)")
                    if not waiting_said:
                        waiting_said = True
                        self._report_silent_scheduler(silent)
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

    # --- a restarted scheduler (heartbeat thread) -----------------------------------
    def _report_silent_scheduler(self, silent):
        """Once per silence: say so, and tell the launcher (observe channel), which kills a
        frozen scheduler and restarts it; it drops the reports of the other processes
        (silent_s: a report about a process younger than that is about its predecessor)."""
        _say(f"scheduler silent for {silent:.0f} s; waiting up to {self.restart_timeout:g} s "
             f"for its restart")
        channel.send("unresponsive", {"role": "scheduler", "silent_s": round(silent, 1),
                                      "why": f"no heartbeat reply for {silent:.1f} s"})

    def _follow_incarnation(self, connection, incarnation):
        """A heartbeat reply named scheduler process `incarnation`. Another one than the
        scheduler that holds this node in its book was restarted: rejoin it. Before this
        node has its book, each scheduler process it hears of may not have its register
        (the first may have been sent to one that died): the main thread sends it again
        (a copy a scheduler already holds replaces the first)."""
        if not isinstance(incarnation, str):
            return
        if self._scheduler_incarnation is None:
            if self._seen_incarnation != incarnation:
                self._seen_incarnation = incarnation
                self._rejoins += 1
            return
        if incarnation == self._scheduler_incarnation:
            return
        in_flight = self._rejoin
        if in_flight is not None and in_flight[0] == incarnation and \
                time.monotonic() - in_flight[2] < self.heartbeat_timeout:
            return   # answered at once; heartbeats queued while it was down come first
        request_id = in_flight[1] if in_flight is not None else next(self._ids)
        self._rejoin = (incarnation, request_id, time.monotonic())
        connection.send(Message("register", request_id, f"{self.role}-{self.rank}",
                                meta=dict(self._registration, rank=self.rank,
                                          node=self.node_id, rejoin=True)))

    def _rejoin_answered(self, reply):
        """The restarted scheduler's answer to our rejoin: None when rejoined, else the
        text this node dies with."""
        incarnation = self._rejoin[0]
        self._rejoin = None
        if reply.op != "reply":
            return (f"dead: scheduler (restarted as incarnation {incarnation}) refused the "
                    f"rejoin of {self.role} {self.rank}: {reply.meta.get('error')}")
        self._scheduler_incarnation = incarnation
        self._rejoins += 1   # the main thread re-sends its request now
        _say(f"rejoined scheduler incarnation {incarnation} (restart "
             f"{reply.meta.get('restart')}) as {self.role} {self.rank}")
        return None

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
