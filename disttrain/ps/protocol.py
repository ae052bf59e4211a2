"""The one wire format of the parameter server: a msgpack header frame followed by raw
array frames, and the checks every received message goes through before anyone trusts it."""
import math
import sys
from dataclasses import dataclass, field

import msgpack
import numpy as np

# A message is [header, frame_0, frame_1, ...]. The header is a msgpack map:
#
#     {"v": VERSION, "op": "push", "id": 17, "sender": "worker-0", "keys": ["fc.weight", ...],
#      "payloads": [{"key": 0, "kind": "dense", "dtype": "float32", "shape": [262144],
#                    "start": 0}, ...],
#      "meta": {...op-specific small values: clock, lr, rank, chunks...}}
#
# payloads[i] describes frame_i: which key it belongs to (an index into keys), its dtype and
# shape, and where it sits in the key. kind is "dense" (a flat slice of the key starting at
# element `start`), "rows" (int64 row indices of a sparse key) or "values" (the rows named
# by the rows payload just before it) or "packed": whole chunks of several small keys back to
# back in one frame, its descriptor listing them as "spans": [[key, start, size], ...] (key
# index, the chunk's first element in the key, its element count), in frame order. A bucket of
# small gradients then costs one frame, and a server one optimizer call (see ps/group.py).
VERSION = 1

# Requests answered by servers, requests answered by the scheduler, and notifications.
SERVER_OPS = ("init", "push", "pull", "pushpull", "checkpoint", "restore", "restored",
              "recover", "stats",   # ps/recovery.py
              "replicate", "fetch_replica",   # server to server (ps/replica.py)
              "joined")             # ps/elastic.py
SCHEDULER_OPS = ("register", "barrier", "heartbeat", "goodbye", "joined")
NOTICE_OPS = ("reply", "error", "dead", "shutdown", "book")
OPS = SERVER_OPS + SCHEDULER_OPS + NOTICE_OPS

# Consistency modes a job's servers run in (init's meta "mode").
MODES = ("sync", "async", "ssp")

DTYPES = ("float16", "float32", "float64", "int32", "int64")
KINDS = ("dense", "rows", "values", "packed")
_OPS, _KINDS = frozenset(OPS), frozenset(KINDS)
_DTYPES = {name: np.dtype(name) for name in DTYPES}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}  # dtype.name is slow

# Big tensors travel as many frames of at most FRAME_BYTES each: big receive buffers are
# fresh pages every time, and 1 MB messages move faster than one big one (figure in
# docs/performance.md).
FRAME_BYTES = 1 << 20
MAX_HEADER_BYTES = 1 << 20
# Bounds checked at the door, before anything is allocated for a message: generous for any
# real model (KVStore packs about MAX_CHUNK_BYTES per message), small enough that a peer
# cannot make a server build huge Python structures from one header.
MAX_FRAMES = 1 << 16
MAX_KEYS = 1 << 16
MAX_KEY_NAME_CHARS = 1024
MAX_SENDER_CHARS = 256
DEFAULT_MAX_MESSAGE_BYTES = 1 << 31


class ProtocolError(ValueError):
    """A received message that breaks the wire format; the text names the problem."""


class RequestError(ValueError):
    """A well-formed message that asks for something invalid; the text goes back to the
    sender in an error reply."""


@dataclass
class Payload:
    key: int
    kind: str
    start: int
    array: np.ndarray
    spans: list = None      # "packed" only: [[key index, start, size], ...]


@dataclass
class Message:
    op: str
    id: int
    sender: str
    keys: list = field(default_factory=list)
    payloads: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    # Set on receipt, never sent: the key name ("worker-3") of the job member that sent it,
    # as CURVE authenticated it; "" on an insecure socket.
    peer: str = ""


def frame_bounds(size, itemsize, frame_bytes=FRAME_BYTES):
    """The (start, stop) element ranges that cut `size` elements into frames of at most
    frame_bytes each; one empty range when size is 0 (an empty key still sends a frame)."""
    step = max(1, frame_bytes // max(1, itemsize))
    return [(start, min(start + step, size)) for start in range(0, size, step)] or [(0, 0)]


def split_frames(flat, frame_bytes=FRAME_BYTES):
    """Yield (start, piece) views of a 1-D array, each at most frame_bytes long."""
    for start, stop in frame_bounds(flat.size, flat.itemsize, frame_bytes):
        yield start, flat[start:stop]


def encode(message):
    """Header bytes followed by the payload arrays as zero-copy buffers."""
    descriptors = []
    frames = []
    for p in message.payloads:
        array = np.ascontiguousarray(p.array)
        name = _DTYPE_NAMES.get(array.dtype)
        if name is None:
            raise ValueError(f"cannot send dtype {array.dtype}: the wire carries {DTYPES}")
        descriptor = {"key": p.key, "kind": p.kind, "dtype": name, "shape": list(array.shape),
                      "start": int(p.start)}
        if p.spans is not None:   # Python ints: msgpack writes the tuples as arrays
            descriptor["spans"] = p.spans
        descriptors.append(descriptor)
        frames.append(memoryview(array).cast("B") if array.size else b"")
    header = {"v": VERSION, "op": message.op, "id": message.id, "sender": message.sender,
              "keys": list(message.keys), "payloads": descriptors, "meta": message.meta}
    return [msgpack.packb(header, use_bin_type=True)] + frames


def _frame_bytes(frame):
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _field(header, name, kind):
    value = header.get(name)
    # type() rather than isinstance(): a bool is not an int here, and this runs per message.
    if type(value) is not kind:
        raise ProtocolError(f"header field {name!r} must be {kind.__name__}, "
                            f"got {type(value).__name__}")
    return value


def decode(frames, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES):
    """Parse and validate one received message (frames as bytes or zmq.Frame). Each check
    builds its error text only when it fails: this is on every message's path."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > MAX_FRAMES + 1:
        raise ProtocolError(f"message of {len(frames)} frames exceeds {MAX_FRAMES + 1}")
    raw_header = _frame_bytes(frames[0])
    if len(raw_header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw_header, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises many types for garbage input
        raise ProtocolError(f"header is not valid msgpack: {type(error).__name__}") from None
    if type(header) is not dict:
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    if header.get("v") != VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r}, expected {VERSION}")
    op = _field(header, "op", str)
    if op not in _OPS:
        raise ProtocolError(f"unknown op {op!r}")
    request_id = _field(header, "id", int)
    sender = _field(header, "sender", str)
    if len(sender) > MAX_SENDER_CHARS:
        raise ProtocolError(f"sender name of {len(sender)} characters exceeds {MAX_SENDER_CHARS}")
    keys = _field(header, "keys", list)
    if len(keys) > MAX_KEYS:
        raise ProtocolError(f"{len(keys)} keys in one message exceed {MAX_KEYS}")
    for key in keys:
        if type(key) is not str or len(key) > MAX_KEY_NAME_CHARS:
            raise ProtocolError(f"keys must all be strings of at most {MAX_KEY_NAME_CHARS} "
                                f"characters")
    descriptors = _field(header, "payloads", list)
    meta = _field(header, "meta", dict)
    if len(descriptors) != len(frames) - 1:
        raise ProtocolError(f"header lists {len(descriptors)} payloads but "
                            f"{len(frames) - 1} frames follow")
    buffers = [_frame_bytes(f) for f in frames[1:]]
    total = len(raw_header) + sum(len(b) for b in buffers)
    if total > max_message_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_message_bytes}")
    payloads = [_decode_payload(d, buffers[i], len(keys), i) for i, d in enumerate(descriptors)]
    return Message(op, request_id, sender, keys, payloads, meta)


def _decode_payload(descriptor, buffer, num_keys, index):
    if type(descriptor) is not dict:
        raise ProtocolError(f"payload {index} descriptor is not a map")
    key, kind = descriptor.get("key"), descriptor.get("kind")
    dtype, shape, start = descriptor.get("dtype"), descriptor.get("shape"), descriptor.get("start")
    if type(key) is not int or not 0 <= key < num_keys:
        raise ProtocolError(f"payload {index}: key index {key!r} not in 0..{num_keys - 1}")
    if kind not in _KINDS:
        raise ProtocolError(f"payload {index}: unknown kind {kind!r}")
    if dtype not in _DTYPES:
        raise ProtocolError(f"payload {index}: unsupported dtype {dtype!r}")
    if type(start) is not int or start < 0:
        raise ProtocolError(f"payload {index}: bad start {start!r}")
    if type(shape) is not list or len(shape) > 8 or \
            not all(type(n) is int and n >= 0 for n in shape):
        raise ProtocolError(f"payload {index}: bad shape {shape!r}")
    dtype = _DTYPES[dtype]
    declared = math.prod(shape) * dtype.itemsize  # Python ints: a huge shape cannot overflow
    if declared != len(buffer):
        raise ProtocolError(f"payload {index}: {dtype.name}{tuple(shape)} needs {declared} "
                            f"bytes, frame has {len(buffer)}")
    array = np.frombuffer(buffer, dtype=dtype).reshape(shape) if declared else \
        np.empty(shape, dtype=dtype)
    spans = _decode_spans(descriptor.get("spans"), array, key, num_keys, index) \
        if kind == "packed" else None
    return Payload(key, kind, start, array, spans)


def _decode_spans(spans, array, key, num_keys, index):
    """The [key index, start, size] spans of a packed payload, checked to tile its 1-D frame;
    the payload's own key is its first span's."""
    if type(spans) is not list or not spans or array.ndim != 1:
        raise ProtocolError(f"payload {index}: a packed payload needs a 1-D frame and a "
                            f"non-empty 'spans' list")
    total = 0
    for span in spans:
        if type(span) is not list or len(span) != 3:
            raise ProtocolError(f"payload {index}: bad span {span!r}")
        k, start, size = span
        if type(k) is not int or type(start) is not int or type(size) is not int or \
                not 0 <= k < num_keys or start < 0 or size < 0:
            raise ProtocolError(f"payload {index}: bad span {span!r} (want [key index < "
                                f"{num_keys}, start >= 0, size >= 0])")
        total += size
    if total != array.size or spans[0][0] != key:
        raise ProtocolError(f"payload {index}: spans (first {spans[0]}, covering {total}) must "
                            f"start at the payload's key {key} and cover its {array.size} "
                            f"elements")
    return spans


def error_reply(request_id, sender, text):
    return Message("error", request_id if isinstance(request_id, int) else 0, sender,
                   meta={"error": text})


class RejectionLog:
    """Log lines about rejected messages, bounded so that a peer sending garbage cannot flood
    the log: the first `first` in full, then one line per `every` with the count."""

    def __init__(self, who, first=10, every=1000):
        self.who, self.first, self.every = who, first, every
        self.count = 0

    def say(self, text):
        self.count += 1
        if self.count <= self.first or self.count % self.every == 0:
            more = "" if self.count < self.first else \
                f" (further rejections are logged once per {self.every})"
            print(f"disttrain: {self.who} rejected message #{self.count}: {text}{more}",
                  file=sys.stderr, flush=True)


def peek_request_id(frames):
    """Best-effort request id of a message that failed validation, so the error reply
    can still be matched to the request; 0 when even that is unreadable."""
    try:
        raw_header = _frame_bytes(frames[0])
        if len(raw_header) > MAX_HEADER_BYTES:
            return 0
        header = msgpack.unpackb(raw_header, raw=False)
        request_id = header.get("id", 0)
        return request_id if isinstance(request_id, int) and not isinstance(request_id, bool) else 0
    except Exception:
        return 0
