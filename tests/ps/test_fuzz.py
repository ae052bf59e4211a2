"""A server flooded with 1,000 malformed messages answers each with an error and then
serves a normal training run correctly."""
import random

import msgpack
import numpy as np
import zmq

from disttrain.optim import rules
from disttrain.ps import protocol, transport
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
    kind = rng.randrange(9)
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
        return [header(id=request_id, payloads=[descriptor("complex128", (750,))]), good]
    if kind == 5:    # huge declared size
        return [header(id=request_id, payloads=[descriptor(shape=(2 ** 62, 2 ** 62))]), good]
    if kind == 6:    # unknown op
        return [header(id=request_id, op=rng.choice(["drop_table", "PUSH", "", "pull2"]))]
    if kind == 7:    # push of a key nobody initialized, or a clock from the future
        if rng.random() < 0.5:
            return [header(id=request_id, keys=["ghost"], payloads=[descriptor()]), good]
        return [header(id=request_id, meta={"clock": 99, "lr": 0.1, "rank": 0, "chunks": [0]},
                       payloads=[descriptor()]), good]
    # slice outside the server's chunk
    return [header(id=request_id, payloads=[descriptor(start=10 ** 6)]), good]


def test_a_thousand_malformed_messages_get_errors_then_training_is_correct():
    rng = random.Random(1234)
    with job(1, 1) as connect:
        [(membership, store)] = connect()
        store.declare("w", KEY_SHAPE, np.float64)
        weights = np.linspace(-1, 1, 1500).reshape(KEY_SHAPE)
        store.init({"w": weights}, {"name": "sgd", "hyper": {"lr": 0.1, "momentum": 0.9}})

        fuzzer = transport.context().socket(zmq.DEALER)
        fuzzer.setsockopt(zmq.LINGER, 0)
        fuzzer.connect(store.connections[0].address)
        try:
            errors = 0
            for request_id in range(1, 1001):
                fuzzer.send_multipart(malformed(rng, request_id))
                assert fuzzer.poll(10000), f"no answer to bad message {request_id}"
                reply = protocol.decode(fuzzer.recv_multipart())
                assert reply.op == "error" and reply.meta["error"], reply
                errors += 1
        finally:
            fuzzer.close()
        assert errors == 1000

        # A normal run after the flood: 10 sync steps match the rule applied locally.
        expected, state = weights.copy(), {}
        out = np.empty_like(weights)
        for clock in range(10):
            grad = np.sin(expected + clock)
            store.push({"w": grad}, clock, lr=0.1)
            rules.sgd(expected, grad, state, lr=0.1, momentum=0.9)
            store.pull({"w": out}, clock + 1)
            np.testing.assert_array_equal(out, expected)
