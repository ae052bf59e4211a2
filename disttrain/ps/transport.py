"""Sockets, framing and deadlines: moves protocol Messages between processes over tcp or
ipc. It knows nothing of keys, clocks or roles."""
import os
import socket
import tempfile
import time
import uuid

import zmq

from disttrain.ps import protocol


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


def configure(sock, max_message_bytes):
    sock.setsockopt(zmq.LINGER, 0)
    # zmq drops a peer that sends a frame larger than this before we ever see it.
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    return sock


class Listener:
    """A ROUTER socket bound on tcp (any free port on `host`) and, for peers on the same
    host, on an ipc path. Replies go back to the identity a request came from."""

    def __init__(self, host, max_message_bytes=protocol.DEFAULT_MAX_MESSAGE_BYTES,
                 tcp_port=None, with_ipc=True):
        self.max_message_bytes = max_message_bytes
        self._timeout_ms = -1
        self.socket = configure(context().socket(zmq.ROUTER), max_message_bytes)
        # A reply to a peer that went away is dropped rather than blocking the server.
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if tcp_port is None:
            port = self.socket.bind_to_random_port(f"tcp://{host}")
        else:
            self.socket.bind(f"tcp://{host}:{tcp_port}")
            port = tcp_port
        self.tcp_address = f"tcp://{host}:{port}"
        self.ipc_path = None
        self.ipc_address = ""
        if with_ipc:
            self.ipc_path = os.path.join(tempfile.gettempdir(),
                                         f"disttrain-{uuid.uuid4().hex[:12]}.ipc")
            self.ipc_address = f"ipc://{self.ipc_path}"
            self.socket.bind(self.ipc_address)

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
            return identity, protocol.decode(body, self.max_message_bytes)
        except protocol.ProtocolError as error:
            error.identity = identity
            error.request_id = protocol.peek_request_id(body) if body else 0
            raise

    def send(self, identity, message):
        self.socket.send_multipart([identity] + protocol.encode(message), copy=False)

    def close(self, linger_ms=0):
        """linger_ms > 0 lets queued replies and notices leave before the socket goes."""
        self.socket.close(linger=linger_ms)
        if self.ipc_path:
            try:
                os.unlink(self.ipc_path)
            except OSError:
                pass


class Connection:
    """A DEALER socket connected to one peer's Listener."""

    def __init__(self, address, identity, max_message_bytes=protocol.DEFAULT_MAX_MESSAGE_BYTES):
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.socket = configure(context().socket(zmq.DEALER), max_message_bytes)
        self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.connect(address)

    def send(self, message):
        self.socket.send_multipart(protocol.encode(message), copy=False)

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
