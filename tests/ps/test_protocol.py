"""The wire format: what goes in comes out, and every malformed message is refused with a
reason."""
import re
import tracemalloc

import msgpack
import numpy as np
import pytest

from disttrain.ps import protocol
from disttrain.ps.protocol import Message, Payload, ProtocolError


def header(**fields):
    base = {"v": protocol.VERSION, "op": "push", "id": 1, "sender": "w", "keys": ["k"],
            "payloads": [], "meta": {}}
    base.update(fields)
    return msgpack.packb(base)


def test_encode_decode_round_trips_arrays_and_meta():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    rows = np.array([0, 5], dtype=np.int64)
    message = Message("push", 7, "worker-1", ["a", "b"],
                      [Payload(0, "dense", 4, a), Payload(1, "rows", 0, rows)],
                      {"clock": 3, "lr": 0.5})
    decoded = protocol.decode([bytes(f) for f in protocol.encode(message)])
    assert (decoded.op, decoded.id, decoded.sender, decoded.keys, decoded.meta) == \
        ("push", 7, "worker-1", ["a", "b"], {"clock": 3, "lr": 0.5})
    np.testing.assert_array_equal(decoded.payloads[0].array, a)
    assert decoded.payloads[0].start == 4 and decoded.payloads[1].kind == "rows"
    np.testing.assert_array_equal(decoded.payloads[1].array, rows)


def test_a_packed_payload_round_trips_with_its_spans():
    frame = np.arange(7, dtype=np.float32)
    message = Message("push", 1, "w", ["a", "b"],
                      [Payload(0, "packed", 0, frame, [(0, 0, 3), (1, 8, 4)])])
    [payload] = protocol.decode([bytes(f) for f in protocol.encode(message)]).payloads
    assert (payload.kind, payload.spans) == ("packed", [[0, 0, 3], [1, 8, 4]])
    np.testing.assert_array_equal(payload.array, frame)


def test_split_frames_covers_the_array_in_pieces_of_at_most_frame_bytes():
    flat = np.arange(1000, dtype=np.float64)
    pieces = list(protocol.split_frames(flat, frame_bytes=800))
    assert all(piece.nbytes <= 800 for _, piece in pieces)
    assert [start for start, _ in pieces] == list(range(0, 1000, 100))
    np.testing.assert_array_equal(np.concatenate([p for _, p in pieces]), flat)


def test_decoded_arrays_share_the_received_buffer():
    frame = bytearray(np.arange(4, dtype=np.float32).tobytes())
    descriptor = {"key": 0, "kind": "dense", "dtype": "float32", "shape": [4], "start": 0}
    decoded = protocol.decode([header(payloads=[descriptor]), frame])
    frame[0:4] = np.float32(9).tobytes()
    assert decoded.payloads[0].array[0] == 9


PACKED = {"key": 0, "kind": "packed", "dtype": "float32", "shape": [2], "start": 0}


@pytest.mark.parametrize("frames, reason", [
    ([], "empty message"),
    ([b"\xc1\xff garbage"], "not valid msgpack"),
    ([msgpack.packb([1, 2])], "must be a map"),
    ([header(v=99)], "protocol version 99"),
    ([header(op="explode")], "unknown op 'explode'"),
    ([header(id="1")], "'id' must be int"),
    ([header(keys=[1])], "keys must all be strings"),
    ([header(payloads=[{"key": 0, "kind": "dense", "dtype": "float32", "shape": [2],
                        "start": 0}])], "lists 1 payloads but 0 frames"),
    ([header(payloads=[{"key": 3, "kind": "dense", "dtype": "float32", "shape": [1],
                        "start": 0}]), b"abcd"], "key index 3"),
    ([header(payloads=[{"key": 0, "kind": "dense", "dtype": "object", "shape": [1],
                        "start": 0}]), b"abcd"], "unsupported dtype 'object'"),
    ([header(payloads=[{"key": 0, "kind": "dense", "dtype": "float32", "shape": [3],
                        "start": 0}]), b"abcd"], "needs 12 bytes, frame has 4"),
    ([header(payloads=[{"key": 0, "kind": "dense", "dtype": "float32",
                        "shape": [2 ** 40, 2 ** 40], "start": 0}]), b"abcd"], "frame has 4"),
    ([header(payloads=[{"key": 0, "kind": "sideways", "dtype": "float32", "shape": [1],
                        "start": 0}]), b"abcd"], "unknown kind"),
    ([header(keys=["a", "b"], payloads=[dict(PACKED, spans=[[0, 0, 1], [1, 0, 2]])]), bytes(8)],
     "cover its 2 elements"),
    ([header(keys=["a", "b"], payloads=[dict(PACKED, spans=[[1, 0, 1], [0, 0, 1]])]), bytes(8)],
     "must start at the payload's key 0"),
    ([header(keys=["a", "b"], payloads=[dict(PACKED, spans=[[0, 0, 1], [2, 0, 1]])]), bytes(8)],
     "bad span [2, 0, 1]"),
    ([header(keys=["a", "b"], payloads=[dict(PACKED, spans=[[0, 0, 1], [1, -1, 1]])]), bytes(8)],
     "bad span [1, -1, 1]"),
    ([header(keys=["a", "b"], payloads=[dict(PACKED, spans=[[0, 0, 2]], shape=[1, 2])]),
      bytes(8)], "needs a 1-D frame"),
    ([header(keys=["a", "b"], payloads=[dict(PACKED, spans=[0, 2])]), bytes(8)], "bad span 0"),
    ([header(keys=["a", "b"], payloads=[PACKED]), bytes(8)], "non-empty 'spans' list"),
])
def test_malformed_messages_are_refused_with_the_reason(frames, reason):
    with pytest.raises(ProtocolError, match=re.escape(reason)):
        protocol.decode(frames)


@pytest.mark.parametrize("frames, reason", [
    ([header()] + [b""] * (protocol.MAX_FRAMES + 1), "frames exceeds"),
    ([header(keys=["k" * (protocol.MAX_KEY_NAME_CHARS + 1)])], "at most 1024 characters"),
    ([header(keys=["k"] * (protocol.MAX_KEYS + 1))], "keys in one message exceed"),
    ([header(sender="s" * (protocol.MAX_SENDER_CHARS + 1))], "sender name of 257"),
])
def test_counts_and_names_past_their_bounds_are_refused(frames, reason):
    with pytest.raises(ProtocolError, match=re.escape(reason)):
        protocol.decode(frames)


def test_a_message_claiming_a_terabyte_shape_allocates_nothing():
    descriptor = {"key": 0, "kind": "dense", "dtype": "float64", "shape": [1 << 37],
                  "start": 0}
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="needs 1099511627776 bytes, frame has 8"):
            protocol.decode([header(payloads=[descriptor]), bytes(8)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak   # parsing and the exception; nothing sized by the claim


def test_rejection_log_lines_are_bounded(capsys):
    log = protocol.RejectionLog("server", first=10, every=1000)
    for _ in range(10_000):
        log.say("bad")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 + 10 and "#10000" in lines[-1], lines[-3:]


def test_messages_over_the_size_limit_are_refused():
    descriptor = {"key": 0, "kind": "dense", "dtype": "float32", "shape": [256], "start": 0}
    with pytest.raises(ProtocolError, match="exceeds the limit of 512"):
        protocol.decode([header(payloads=[descriptor]), bytes(1024)], max_message_bytes=512)


def test_request_id_is_recovered_from_a_bad_message_for_the_error_reply():
    assert protocol.peek_request_id([header(id=42, op="nope")]) == 42
    assert protocol.peek_request_id([b"\x00\x01"]) == 0
