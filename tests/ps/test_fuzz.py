"""A job member's key (an insider) floods a server with 10,000 malformed messages: each
gets an error reply, and the server then serves a normal training run correctly."""
import random

import msgpack
import numpy as np
import zmq

from disttrain.optim import rules
from disttrain.ps import auth, protocol, transport
from tests.ps.inprocess import job

KEY_SHAPE = (300, 5)


def header(**fields):
    base = {"v": protocol.VERSION, "op": "push", "id": 1, "sender": "fuzz", "keys": ["w"],
            "payloads": [], "meta": {"clock": 0, "lr": 0.1, "rank": 0, "chunks": [0]}}
    base.update(fields)
    return msgpack.packb(base)


def descriptor(dtype="float64", shape=(1500,), start=0, kind="dense", key=0):
    return {"key": key, "kind": kind, "dtype": dtype, "shape": list(shape), "start": start}


def malformed(rng, request_id):
    """One bad message (a list of frames) of a randomly chosen kind."""
    kind = rng.randrange(17)
    good = np.zeros(1500).tobytes()
    if kind == 0:    # random bytes
        return [rng.randbytes(rng.randrange(1, 200))]
    if kind == 1:    # a valid header, then random extra frames
        return [header(id=request_id)] + [rng.randbytes(8) for _ in range(rng.randrange(1, 4))]
    if kind == 2:    # truncated payload frame
        return [header(id=request_id, payloads=[descriptor()]), good[:rng.randrange(0, 11999)]]
    if kind == 3:    # wrong dtype for the key (float32 where it is float64)
        return [header(id=request_id, payloads=[descriptor("float32", (3000,))]), good]
    if kind == 4:    # dtype nobody supports
        return [header(id=request_id, payloads=[descriptor(rng.choice(
            ["complex128", "object", "V8", "<f8", "bool"]), (750,))]), good]
    if kind == 5:    # huge declared size (a 1 TB shape, and more)
        shape = rng.choice([(2 ** 62, 2 ** 62), (1 << 37,), (1 << 20, 1 << 20)])
        return [header(id=request_id, payloads=[descriptor(shape=shape)]), good]
    if kind == 6:    # unknown op
        return [header(id=request_id, op=rng.choice(["drop_table", "PUSH", "", "pull2"]))]
    if kind == 7:    # push of a key nobody initialized, or a clock from the future
        if rng.random() < 0.5:
            return [header(id=request_id, keys=["ghost"], payloads=[descriptor()]), good]
        return [header(id=request_id, meta={"clock": 99, "lr": 0.1, "rank": 0, "chunks": [0]},
                       payloads=[descriptor()]), good]
    if kind == 8:    # another worker's identity (this key is worker 0's)
        op = rng.choice(["push", "pull", "init", "pushpull"])
        return [header(id=request_id, op=op, meta={"clock": 0, "lr": 0.1, "rank": 1,
                                                   "chunks": [0]}, payloads=[descriptor()]), good]
    if kind == 9:    # truncated header
        raw = header(id=request_id, payloads=[descriptor()])
        return [raw[:rng.randrange(1, len(raw))], good]
    if kind == 10:   # header fields of the wrong type
        field, value = rng.choice([("id", "1"), ("keys", "w"), ("meta", []), ("payloads", {}),
                                   ("sender", 7), ("v", 2), ("id", True)])
        return [header(**{"id": request_id, field: value})]
    if kind == 11:   # key names and sender names past their limits
        if rng.random() < 0.5:
            return [header(id=request_id, keys=["k" * (protocol.MAX_KEY_NAME_CHARS + 1)])]
        return [header(id=request_id, sender="s" * (protocol.MAX_SENDER_CHARS + 1))]
    if kind == 12:   # a packed payload whose spans do not tile its frame
        spans = rng.choice([[[0, 0, 10 ** 9]], [], [[5, 0, 1500]], [[0, 0, 1500], [0, 0, 1]]])
        return [header(id=request_id, payloads=[dict(descriptor(kind="packed"), spans=spans)]),
                good]
    if kind == 13:   # sparse rows: wrong index dtype, rows outside the key, rows without values
        rows = np.array([0, 10 ** 6], np.int64)
        choice = rng.randrange(3)
        if choice == 0:
            return [header(id=request_id, payloads=[descriptor("float64", (2,), kind="rows")]),
                    rows.astype(np.float64).tobytes()]
        if choice == 1:
            return [header(id=request_id, payloads=[
                descriptor("int64", (2,), kind="rows"),
                descriptor("float64", (10,), kind="values")]),
                rows.tobytes(), np.zeros(10).tobytes()]
        return [header(id=request_id, payloads=[descriptor("int64", (2,), kind="rows")]),
                rows[:1].repeat(2).tobytes()]
    if kind == 14:   # more payload descriptors than frames, or a key index out of range
        if rng.random() < 0.5:
            return [header(id=request_id, payloads=[descriptor(), descriptor()]), good]
        return [header(id=request_id, payloads=[descriptor(key=rng.choice([1, -1, 10 ** 12]))]),
                good]
    if kind == 15:   # a shape of the wrong type or rank
        shape = rng.choice([[-1500], [1500.0], ["1500"], [1] * 9, None])
        return [header(id=request_id, payloads=[dict(descriptor(), shape=shape)]), good]
    # slice outside the server's chunk
    return [header(id=request_id, payloads=[descriptor(start=rng.choice([10 ** 6, -1]))]), good]


FUZZED_MESSAGES = 10_000


def test_ten_thousand_malformed_messages_from_a_member_get_errors_then_training_is_correct():
    rng = random.Random(1234)
    with job(1, 1) as connect:
        [(membership, store)] = connect()
        store.declare("w", KEY_SHAPE, np.float64)
        weights = np.linspace(-1, 1, 1500).reshape(KEY_SHAPE)
        store.init({"w": weights}, {"name": "sgd", "hyper": {"lr": 0.1, "momentum": 0.9}})

        # The insider holds worker 0's own key: it passes the door, so every message must be
        # caught by the checks behind it.
        fuzzer = transport.context().socket(zmq.DEALER)
        fuzzer.setsockopt(zmq.LINGER, 0)
        auth.ClientCurve(auth.load_credentials(connect.keys, "worker", 0), "server-0").apply(fuzzer)
        fuzzer.connect(store.connections[0].address)
        try:
            errors = 0
            for request_id in range(1, FUZZED_MESSAGES + 1):
                fuzzer.send_multipart(malformed(rng, request_id))
                assert fuzzer.poll(10000), f"no answer to bad message {request_id}"
                reply = protocol.decode(fuzzer.recv_multipart())
                assert reply.op == "error" and reply.meta["error"], reply
                assert reply.id in (request_id, 0), (reply, request_id)
                errors += 1
        finally:
            fuzzer.close()
        assert errors == FUZZED_MESSAGES

        # A normal run after the flood: 10 sync steps match the rule applied locally.
        expected, state = weights.copy(), {}
        out = np.empty_like(weights)
        for clock in range(10):
            grad = np.sin(expected + clock)
            store.push({"w": grad}, clock, lr=0.1)
            rules.sgd(expected, grad, state, lr=0.1, momentum=0.9)
            store.pull({"w": out}, clock + 1)
            np.testing.assert_array_equal(out, expected)
