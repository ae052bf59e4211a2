"""A server's state machine without sockets: chunk layout, consistency modes, sparse rows,
and refusal of invalid requests."""
import numpy as np
import pytest

from disttrain.optim import rules
from disttrain.ps import protocol
from disttrain.ps.protocol import Message, Payload
from disttrain.ps.server import MAX_CHUNK_BYTES, MIN_SPLIT_BYTES, ServerState, chunk_layout

SGD = {"name": "sgd", "hyper": {"lr": 0.5}}


@pytest.mark.parametrize("shape", [(1000, 37), (5,), (), (3, 100000), (7, 2, 3), (1 << 18,),
                                   (5 << 20,), (2000, 1000)])
@pytest.mark.parametrize("servers", [1, 2, 3])
def test_chunks_tile_every_key_contiguously_across_all_servers(shape, servers):
    chunks = chunk_layout("k", shape, np.float32, servers)
    rows = shape[0] if shape else 1
    assert chunks[0].row_start == 0 and chunks[-1].row_stop == rows
    assert all(a.row_stop == b.row_start for a, b in zip(chunks, chunks[1:]))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    nbytes = int(np.prod(shape)) * 4
    if nbytes < MIN_SPLIT_BYTES:
        assert len(chunks) == 1
        return
    assert len({c.server for c in chunks}) == min(servers, rows)   # every server gets some
    row_bytes = nbytes // rows
    assert all((c.row_stop - c.row_start - 1) * row_bytes < MAX_CHUNK_BYTES for c in chunks)


def init_message(name, array, chunk, mode="sync", staleness=0, sparse=False):
    flat = array.reshape(-1)[chunk.start:chunk.stop]
    payloads = [Payload(0, "dense", chunk.start + o, p) for o, p in protocol.split_frames(flat)]
    return Message("init", 1, "worker-0", [name], payloads,
                   {"optimizer": SGD, "mode": mode, "staleness": staleness, "chunks": [0],
                    "specs": [{"shape": list(array.shape), "dtype": array.dtype.name,
                               "sparse": sparse}]})


def push(rank, clock, name, gradient, lr=0.5, request_id=10):
    payloads = [] if gradient is None else [Payload(0, "dense", 0, gradient.reshape(-1))]
    return Message("push", request_id, f"worker-{rank}", [name], payloads,
                   {"clock": clock, "lr": lr, "rank": rank, "chunks": [0]})


def pull(rank, clock, name, request_id=20, rows=None):
    payloads = [] if rows is None else [Payload(0, "rows", 0, np.asarray(rows, np.int64))]
    return Message("pull", request_id, f"worker-{rank}", [name], payloads,
                   {"clock": clock, "rank": rank, "chunks": [0]})


def make_server(mode="sync", staleness=0, workers=2, value=None, sparse=False):
    state = ServerState(0, workers, 1)
    value = np.arange(6, dtype=np.float32) if value is None else value
    chunk = chunk_layout("w", value.shape, value.dtype, 1)[0]
    [(_, reply)] = state.handle("w0", init_message("w", value, chunk, mode, staleness, sparse))
    assert reply.op == "reply", reply.meta
    return state


def pulled(replies):
    [(_, reply)] = replies
    assert reply.op == "reply", reply.meta
    return np.concatenate([p.array for p in reply.payloads])


def test_sync_applies_the_mean_once_all_workers_pushed_and_holds_pulls_until_then():
    state = make_server("sync")
    ones = np.ones(6, np.float32)
    assert [r.op for _, r in state.handle("w0", push(0, 0, "w", ones))] == ["reply"]
    assert state.handle("w0", pull(0, 1, "w")) == []          # waits for worker 1
    replies = state.handle("w1", push(1, 0, "w", 3 * ones))
    routes = [route for route, _ in replies]
    assert routes == ["w1", "w0"]                              # ack, then the held pull
    np.testing.assert_allclose(replies[1][1].payloads[0].array, np.arange(6) - 0.5 * 2)


def test_an_empty_push_counts_as_a_zero_gradient_in_the_mean():
    state = make_server("sync")
    state.handle("w0", push(0, 0, "w", np.ones(6, np.float32)))
    state.handle("w1", push(1, 0, "w", None))
    np.testing.assert_allclose(pulled(state.handle("w0", pull(0, 1, "w"))),
                               np.arange(6) - 0.5 * 0.5)


def test_ssp_lets_a_worker_run_at_most_staleness_clocks_ahead():
    state = make_server("ssp", staleness=1)
    g = np.zeros(6, np.float32)
    state.handle("w0", push(0, 0, "w", g))
    assert len(state.handle("w0", pull(0, 1, "w"))) == 1      # 1 ahead of worker 1: allowed
    state.handle("w0", push(0, 1, "w", g))
    assert state.handle("w0", pull(0, 2, "w")) == []          # 2 ahead: held
    replies = state.handle("w1", push(1, 0, "w", g))
    assert [route for route, _ in replies] == ["w1", "w0"]


def test_async_applies_each_push_at_once():
    state = make_server("async")
    state.handle("w0", push(0, 0, "w", np.ones(6, np.float32)))
    np.testing.assert_allclose(pulled(state.handle("w1", pull(1, 0, "w"))), np.arange(6) - 0.5)


def test_sparse_rows_update_lazily_like_the_local_optimizer():
    table = np.arange(20, dtype=np.float32).reshape(5, 4)
    state = make_server("sync", workers=1, value=table, sparse=True)
    rows, values = np.array([1, 3], np.int64), np.ones((2, 4), np.float32)
    message = Message("push", 3, "worker-0", ["w"],
                      [Payload(0, "rows", 0, rows), Payload(0, "values", 0, values)],
                      {"clock": 0, "lr": 0.5, "rank": 0, "chunks": [0]})
    assert state.handle("w0", message)[0][1].op == "reply"
    expected, local_state = table.copy(), {}
    rules.apply_rows(rules.sgd, expected, rows, values, local_state, lr=0.5)
    [(_, reply)] = state.handle("w0", pull(0, 1, "w", rows=[0, 1, 3]))
    assert [p.kind for p in reply.payloads] == ["rows", "values"]
    np.testing.assert_array_equal(reply.payloads[1].array, expected[[0, 1, 3]])
    np.testing.assert_array_equal(state.keys["w", 0].state["step"], [0, 1, 0, 1, 0])


@pytest.mark.parametrize("message, reason", [
    (push(0, 0, "nope", np.ones(6, np.float32)), "unknown key 'nope' chunk 0"),
    (push(0, 0, "w", np.ones(6, np.float64)), "is float32, payload is float64"),
    (push(0, 0, "w", np.ones(5, np.float32)), "cover elements 0..5"),
    (push(0, 4, "w", np.ones(6, np.float32)), "sent clock 4 for key 'w', expected clock 0"),
    (push(7, 0, "w", np.ones(6, np.float32)), "worker rank 7 not in 0..1"),
    (push(0, 0, "w", np.ones(6, np.float32), lr="fast"), "lr 'fast' must be a number"),
    (pull(0, 0, "w", rows=[9]), "rows outside 0..5"),
    (Message("barrier", 5, "worker-0"), "does not serve op 'barrier'"),
])
def test_invalid_requests_get_an_error_naming_the_problem_and_change_nothing(message, reason):
    state = make_server("async")
    [(route, reply)] = state.handle("w0", message)
    assert reply.op == "error" and reason in reply.meta["error"], reply.meta
    assert reply.id == message.id
    np.testing.assert_array_equal(state.keys["w", 0].param.reshape(-1), np.arange(6))
    assert state.keys["w", 0].pushes == [0, 0]


def test_a_second_init_of_a_key_is_refused():
    state = make_server()
    chunk = chunk_layout("w", (6,), np.float32, 1)[0]
    [(_, reply)] = state.handle("w0", init_message("w", np.zeros(6, np.float32), chunk))
    assert reply.op == "error" and "already initialized" in reply.meta["error"]


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
