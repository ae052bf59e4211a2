"""Sockets, framing and deadlines: moves protocol Messages between processes over tcp or
ipc. It knows nothing of keys, clocks or roles."""
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid

import zmq
from zmq.utils.monitor import parse_monitor_message

from disttrain.ps import auth, protocol


class PeerDied(RuntimeError):
    """Raised from a blocking call when the scheduler reported a dead process."""


class Deadline:
    """A point in time after which a wait gives up with a TimeoutError naming what it waited for."""

    def __init__(self, seconds, what):
        self.seconds, self.what = seconds, what
        self.end = time.monotonic() + seconds

    def remaining(self):
        return self.end - time.monotonic()

    def check(self):
        if self.remaining() <= 0:
            raise TimeoutError(f"{self.what}: no answer within {self.seconds:g} s "
                               f"(DISTTRAIN_TIMEOUT)")

    def poll_ms(self, slice_s=0.1):
        """Milliseconds to block in one poll: short slices so dead-peer notices and
        signals are seen quickly, never past the deadline."""
        return max(0, int(1000 * min(slice_s, self.remaining())))


_context = None
_context_pid = None


def context():
    """One zmq context per process (recreated after fork). Two I/O threads, so several
    concurrent big transfers (one per server) do not share one thread."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        _context = zmq.Context(io_threads=2)
        _context_pid = os.getpid()
    return _context


def host_identity():
    """What makes two processes 'the same host' for ipc: hostname and network namespace
    (multi-host tests put hosts in network namespaces of one machine)."""
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = 0
    return socket.gethostname(), netns


def split_host_port(address):
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def advertised_host(scheduler_address):
    """The local address of the route to the scheduler (where DISTTRAIN_HOST does not say
    what to advertise). A UDP connect() only picks the route; it sends no packet."""
    host, port = split_host_port(scheduler_address)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host, port))
        return probe.getsockname()[0]
    finally:
        probe.close()


def new_identity(role):
    return f"{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()


def configure(sock, max_message_bytes, security=None):
    sock.setsockopt(zmq.LINGER, 0)
    # zmq drops a peer that sends a frame larger than this before we ever see it.
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if security is not None:   # CURVE keys must be set before connect
        security.apply(sock)
    return sock


class Listener:
    """A ROUTER socket bound on tcp (any free port on `host`) and, for peers on the same
    host, on an ipc path in a private (0700) directory. Replies go back to the identity a
    request came from.

    With `security` (an auth.ServerCurve) the tcp endpoint speaks CURVE and ipc does not:
    libzmq fixes an endpoint's mechanism when it is bound, so ipc is bound first. The 0700
    directory admits only this user's processes, and the kernel names each one's pid (the
    ipc connection's ZAP User-Id), which security.peer_of maps to a job member. CURVE on ipc
    slowed same-host training too much (figure in docs/performance.md)."""

    def __init__(self, host, max_message_bytes=protocol.DEFAULT_MAX_MESSAGE_BYTES,
                 tcp_port=None, with_ipc=True, security=None):
        self.max_message_bytes = max_message_bytes
        self._timeout_ms = -1
        self.security = security
        self.socket = configure(context().socket(zmq.ROUTER), max_message_bytes)
        # A reply to a peer that went away is dropped rather than blocking the server.
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.ipc_directory = None
        self.ipc_address = ""
        self._watch = None
        try:
            if with_ipc:
                self.ipc_directory = tempfile.mkdtemp(prefix="disttrain-")
                self.ipc_address = f"ipc://{os.path.join(self.ipc_directory, 'listener.ipc')}"
                if security is not None:
                    security.apply_local(self.socket)
                self.socket.bind(self.ipc_address)
            if security is not None:
                security.apply(self.socket)   # for the tcp endpoint bound next
            if tcp_port is None:
                port = self.socket.bind_to_random_port(f"tcp://{host}")
            else:
                self.socket.bind(f"tcp://{host}:{tcp_port}")
                port = tcp_port
            # A peer libzmq drops at the handshake (no CURVE at all) never reaches ZAP.
            self._watch = (HandshakeWatch(self.socket, security.handshake_failed)
                           if security is not None else None)
        except BaseException:
            self.close()
            raise
        self.tcp_address = f"tcp://{host}:{port}"

    def receive(self, timeout_ms):
        """(identity, Message) for the next request, or None after timeout_ms. A bad
        message raises ProtocolError carrying the sender's identity and request id."""
        # One blocking receive with a timeout costs less than poll() then recv().
        if timeout_ms != self._timeout_ms:
            self.socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
            self._timeout_ms = timeout_ms
        try:
            frames = self.socket.recv_multipart(copy=False)
        except zmq.Again:
            return None
        identity, body = frames[0].bytes, frames[1:]
        try:
            message = protocol.decode(body, self.max_message_bytes)
        except protocol.ProtocolError as error:
            error.identity = identity
            error.request_id = protocol.peek_request_id(body) if body else 0
            raise
        if self.security is not None:
            message.peer = self.security.peer_of(body[0])
        return identity, message

    def send(self, identity, message):
        self.socket.send_multipart([identity] + protocol.encode(message), copy=False)

    def close(self, linger_ms=0):
        """linger_ms > 0 lets queued replies and notices leave before the socket goes."""
        if self._watch is not None:
            self._watch.stop()
        self.socket.close(linger=linger_ms)
        if self.security is not None:
            self.security.release()
        if self.ipc_directory:
            shutil.rmtree(self.ipc_directory, ignore_errors=True)


HANDSHAKE_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class HandshakeWatch:
    """A thread reading a listening socket's monitor: reports every tcp connection whose
    handshake failed as report(address, event, detail), where address is the peer's host
    or None and event/detail are zmq's names (HANDSHAKE_FAILED_PROTOCOL,
    PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH). Failures that ZAP refused (a wrong key) are
    HANDSHAKE_FAILED_AUTH, not watched: the ZAP handler reports those itself.

    libzmq 4.3.5's monitor (v1) names only the local endpoint (monitor v2, which carries the
    remote one, needs libzmq's draft API, which pyzmq's wheels lack). So the peer's address
    is read from the accepted fd (EVENT_ACCEPTED's value) as soon as that event arrives:
    - a peer that fails at once may already be closed by then: address unknown;
    - the fd number may already belong to a newer connection; libzmq reports DISCONNECTED
      before it closes an fd, so an address read while no DISCONNECTED of that fd is queued
      is the right one, and any other is dropped;
    - a failure event carries an error code, not the fd; libzmq follows it at once with the
      DISCONNECTED of the failed connection, so a failure followed directly by a
      DISCONNECTED takes that fd's address. (Only another I/O thread's event landing
      between the two could misname it; any other event in between makes it unknown.)"""

    POLL_MS = 100

    def __init__(self, sock, report):
        self.report = report
        self.socket = sock
        # Not get_monitor_socket(): its name reuses the socket's fd number, which a closing
        # listener's monitor may still hold, and its queue has a high-water mark, at which
        # libzmq's blocking event send would stall an I/O thread (a flood of strangers).
        address = f"inproc://disttrain-handshake-{uuid.uuid4().hex}"
        sock.monitor(address, HANDSHAKE_EVENTS)
        self.monitor = sock.context.socket(zmq.PAIR)
        self.monitor.setsockopt(zmq.RCVHWM, 0)
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.monitor.connect(address)
        self.peers = {}           # fd -> host of an open tcp connection, where it was read
        self.failure = None       # (event, detail) waiting for its DISCONNECTED
        self.queue = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="disttrain-handshake-watch",
                                       daemon=True)
        self.thread.start()

    def stop(self):
        """Call from the thread that owns `sock`, before closing it. libzmq sends monitor
        events with a blocking send from its I/O thread: were the reading end closed first,
        the next event would stall that thread, and every connection it serves."""
        self.socket.disable_monitor()
        self.stopping.set()
        self.thread.join(timeout=10 * self.POLL_MS / 1000)

    def _run(self):
        try:
            while not self.stopping.is_set():
                if self.queue or self.monitor.poll(self.POLL_MS):
                    self._handle(self.queue.pop(0) if self.queue else self._next())
        except zmq.ZMQError:
            pass              # the context is going away: nothing left to watch
        finally:
            self.monitor.close(linger=0)

    def _next(self):
        return parse_monitor_message(self.monitor.recv_multipart())

    def _handle(self, event):
        kind, value = event["event"], int(event["value"])
        if not event["endpoint"].startswith(b"tcp://"):
            return            # ipc peers are this user's processes, named by pid
        if self.failure is not None:
            failure, self.failure = self.failure, None
            failed_fd = value if kind == zmq.EVENT_DISCONNECTED else None
            self.report(self.peers.get(failed_fd), *failure)
        if kind == zmq.EVENT_ACCEPTED:
            address = peer_host(value)
            while self.monitor.poll(0):
                self.queue.append(self._next())
            if address is not None and not any(
                    e["event"] == zmq.EVENT_DISCONNECTED and int(e["value"]) == value
                    for e in self.queue):
                self.peers[value] = address
        elif kind == zmq.EVENT_DISCONNECTED:
            self.peers.pop(value, None)
        else:
            self.failure = (zmq.Event(kind).name, _detail(kind, value))


def _detail(kind, value):
    if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return os.strerror(value) if value else "no detail"
    try:
        return zmq.Event(value).name
    except ValueError:
        return f"protocol error {value:#x}"


def peer_host(fd):
    """The peer host of an open tcp socket fd, or None where it is closed or no socket."""
    try:
        duplicate = os.dup(fd)
    except OSError:
        return None
    try:
        probe = socket.socket(fileno=duplicate)
    except OSError:          # the number is now some other kind of fd
        os.close(duplicate)
        return None
    try:
        return probe.getpeername()[0]
    except (OSError, IndexError, TypeError):
        return None
    finally:
        probe.close()


class Connection:
    """A DEALER socket connected to one peer's Listener."""

    def __init__(self, address, identity, max_message_bytes=protocol.DEFAULT_MAX_MESSAGE_BYTES,
                 security=None):
        self.address = address
        self.max_message_bytes = max_message_bytes
        # security: an auth.ClientCurve holding the peer's public key, or None (insecure).
        # ipc needs none: a secure Listener knows its ipc peers by pid (see there).
        self.socket = configure(context().socket(zmq.DEALER), max_message_bytes,
                                None if address.startswith("ipc://") else security)
        self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.connect(address)

    def send(self, message, block=True):
        """Queue `message` for the peer. While the peer is away zmq queues up to its
        high-water mark (1000 messages), then blocks; block=False drops the message there
        instead and returns False."""
        try:
            self.socket.send_multipart(protocol.encode(message), 0 if block else zmq.NOBLOCK,
                                       copy=False)
        except zmq.Again:
            return False
        return True

    def receive(self, timeout_ms):
        """The next Message, or None if none arrived within timeout_ms."""
        if not self.socket.poll(timeout_ms):
            return None
        return self.receive_nowait()

    def receive_nowait(self):
        try:
            frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        return protocol.decode(frames, self.max_message_bytes)

    def request(self, message, deadline, check=None):
        """Send and wait for the reply with the same id; `check()` runs between polls
        (it raises when a peer was reported dead)."""
        self.send(message)
        while True:
            if check:
                check()
            deadline.check()
            reply = self.receive(deadline.poll_ms())
            if reply is not None and reply.id == message.id:
                return reply

    def close(self):
        self.socket.close(linger=0)


def pick_address(peer, me=None):
    """ipc when the peer shares our hostname and network namespace, else tcp."""
    hostname, netns = me or host_identity()
    if peer.get("ipc") and peer.get("hostname") == hostname and peer.get("netns") == netns:
        return peer["ipc"]
    return peer["tcp"]
