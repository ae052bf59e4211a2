"""Packed groups: a bucket's small gradients packed in one frame by the worker, and kept
back to back and updated with one rule call by the server."""
import numpy as np
import pytest

from disttrain.ps import protocol
from disttrain.ps.client import Entry
from disttrain.ps.group import pack_payloads
from disttrain.ps.layout import chunk_layout
from disttrain.ps.protocol import Message, Payload
from disttrain.ps.server import ServerState
from tests.ps.test_server import init_message, pull


# --- worker side: which payloads travel packed --------------------------------------------
def test_small_whole_chunks_travel_packed_in_frames_of_at_most_frame_bytes():
    def whole(n, dtype=np.float32):
        array = np.full(n, n, dtype)
        return Entry("k", None, [("dense", 0, array)], array.nbytes)
    near_frame = protocol.FRAME_BYTES // 4 * 3 // 4   # float32 elements: 3/4 of a frame
    big = np.zeros(protocol.FRAME_BYTES // 2, np.float32)   # two frames
    entries = [whole(3), whole(5), Entry("k", None, [], 8),                 # no gradient: alone
               whole(2), whole(4, np.float64), whole(6, np.float64),   # new dtype, new pack
               Entry("k", None, [("dense", 0, big[:len(big) // 2]),
                                 ("dense", len(big) // 2, big[len(big) // 2:])], big.nbytes),
               whole(near_frame), whole(near_frame), whole(7)]          # a pack <= one frame
    payloads = pack_payloads(entries)
    assert [(p.kind, p.key, p.spans and [k for k, _, _ in p.spans]) for p in payloads] == [
        ("packed", 0, [0, 1]), ("dense", 3, None), ("packed", 4, [4, 5]),
        ("dense", 6, None), ("dense", 6, None), ("dense", 7, None), ("packed", 8, [8, 9])]
    np.testing.assert_array_equal(payloads[0].array, [3, 3, 3, 5, 5, 5, 5, 5])


# --- packed payloads and groups ---------------------------------------------------------
# A worker sends a bucket of small gradients packed in one frame; the server then keeps
# those chunks back to back (a Group) and updates them with one rule call. Every check
# below compares with a reference server that gets the same gradients one payload per key.

SHAPES = {"a": (2, 3), "b": (4,), "c": (5,)}
ADAM = {"name": "adam", "hyper": {"lr": 0.1}}
MOMENTUM = {"name": "sgd", "hyper": {"lr": 0.1, "momentum": 0.9}}


def keyed_server(workers, optimizer, mode="sync"):
    state = ServerState(0, workers, 1)
    for i, (name, shape) in enumerate(SHAPES.items()):
        value = np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape) * (i + 1)
        message = init_message(name, value, chunk_layout(name, shape, np.float32, 1)[0], mode)
        message.meta["optimizer"] = optimizer
        [(_, reply)] = state.handle("w", message)
        assert reply.op == "reply", reply.meta
    return state


def gradients(rank, clock):
    rng = np.random.default_rng(100 * clock + rank)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def keyed_push(rank, clock, grads, packed, op="push"):
    """A push of {name: gradient or None}: the names with a gradient packed in one frame
    (packed=True), or one dense payload each."""
    names = list(grads)
    present = [(i, grads[name].reshape(-1)) for i, name in enumerate(names)
               if grads[name] is not None]
    if packed:
        payloads = [Payload(present[0][0], "packed", 0, np.concatenate([g for _, g in present]),
                            [(i, 0, g.size) for i, g in present])]
    else:
        payloads = [Payload(i, "dense", 0, g) for i, g in present]
    return Message(op, 100 + clock, f"worker-{rank}", names, payloads,
                   {"clock": clock, "lr": 0.1, "rank": rank, "chunks": [0] * len(names)})


def weights(state):
    """Every key's weights, as a pull of each key alone returns them."""
    out = {}
    for name in SHAPES:
        [(_, reply)] = state.handle("x", pull(0, 0, name))
        out[name] = reply.payloads[0].array.copy()
    return out


def replay(script, workers, optimizer, mode="sync"):
    """Feed (clock, rank, missing key or None, packed?) pushes to a server, and the same
    gradients unpacked to a reference server; return both servers."""
    state = keyed_server(workers, optimizer, mode)
    reference = keyed_server(workers, optimizer, mode)
    for clock, rank, missing, packed in script:
        grads = {name: None if name == missing else g for name, g in gradients(rank, clock).items()}
        for server, pack in ((state, packed), (reference, False)):
            [(_, reply)] = server.handle(f"w{rank}", keyed_push(rank, clock, grads, pack))
            assert reply.op == "reply", reply.meta
    return state, reference


def assert_same_weights(state, reference):
    got, expected = weights(state), weights(reference)
    for name in SHAPES:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.parametrize("optimizer", [MOMENTUM, ADAM])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_packed_pushes_update_every_key_exactly_as_one_payload_per_key(optimizer, mode):
    script = [(clock, rank, None, True) for clock in range(4) for rank in range(2)]
    state, reference = replay(script, 2, optimizer, mode)
    group = state.keys["a", 0].group
    assert group is not None and [key.name for key in group.members] == ["a", "b", "c"]
    assert all(state.keys[name, 0].version == reference.keys[name, 0].version for name in SHAPES)
    assert_same_weights(state, reference)


def test_a_pushpull_of_the_whole_group_is_answered_in_one_packed_frame():
    state, reference = replay([(0, r, None, True) for r in range(2)], 2, MOMENTUM)
    assert state.handle("w1", keyed_push(1, 1, gradients(1, 1), True, op="pushpull")) == []
    replies = state.handle("w0", keyed_push(0, 1, gradients(0, 1), True))
    assert [route for route, _ in replies] == ["w0", "w1"]    # ack, then the held pushpull
    for rank in (1, 0):
        reference.handle(f"w{rank}", keyed_push(rank, 1, gradients(rank, 1), False))
    [payload] = replies[1][1].payloads
    assert payload.kind == "packed" and payload.spans == [(0, 0, 6), (1, 0, 4), (2, 0, 5)]
    expected = weights(reference)
    np.testing.assert_array_equal(payload.array,
                                  np.concatenate([expected[n].reshape(-1) for n in SHAPES]))
    # Asked for in another order, the same keys come back one payload each.
    message = pull(0, 2, "c")
    message.keys, message.meta["chunks"] = ["c", "a"], [0, 0]
    [(_, reply)] = state.handle("w0", message)
    assert [(p.kind, p.key) for p in reply.payloads] == [("dense", 0), ("dense", 1)]


@pytest.mark.parametrize("script", [
    # b without gradient at clock 2: the group splits, the next clocks go key by key
    [(c, r, "b" if (c, r) == (2, 1) else None, True) for c in range(5) for r in range(3)],
    # split while clock 2 holds one packed push (kept as received) ...
    [(c, r, None, (c, r) != (2, 1)) for c in range(5) for r in range(3)],
    # ... or two (already summed)
    [(c, r, None, (c, r) != (2, 2)) for c in range(5) for r in range(3)],
    # packed with fewer keys than the group: split, and those two stay plain keys
    [(c, r, "c" if c >= 2 else None, True) for c in range(5) for r in range(3)],
])
def test_a_group_member_pushed_otherwise_splits_the_group_and_changes_no_result(script):
    state, reference = replay(script, 3, ADAM)
    assert all(state.keys[name, 0].group is None for name in SHAPES)
    assert_same_weights(state, reference)


def test_a_group_forms_only_from_keys_never_pushed_before():
    state, reference = replay([(0, r, None, False) for r in range(2)] +
                              [(1, r, None, True) for r in range(2)], 2, ADAM)
    assert state.keys["a", 0].group is None
    assert_same_weights(state, reference)


@pytest.mark.parametrize("change, reason", [
    (lambda m: m.payloads.append(Payload(1, "dense", 0, np.ones(4, np.float32))),
     "key 'b' is in more than one payload"),
    (lambda m: setattr(m.payloads[0], "array", m.payloads[0].array.astype(np.float64)),
     "is float32, payload is float64"),
    (lambda m: m.payloads[0].spans.__setitem__(1, (1, 1, 4)),
     "key 'b' got 4 elements at 1"),
    (lambda m: m.keys.__setitem__(2, "a"), "a key chunk is named twice"),
])
def test_bad_packed_pushes_are_refused_and_change_nothing(change, reason):
    state = keyed_server(2, ADAM)
    before = weights(state)
    message = keyed_push(0, 0, gradients(0, 0), packed=True)
    change(message)
    [(_, reply)] = state.handle("w0", message)
    assert reply.op == "error" and reason in reply.meta["error"], reply.meta
    after = weights(state)
    for name in SHAPES:
        np.testing.assert_array_equal(after[name], before[name])
        assert state.keys[name, 0].pushes == [0, 0]
