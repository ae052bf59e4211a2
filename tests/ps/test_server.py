"""A server's state machine without sockets: consistency modes, sparse rows, and refusal
of invalid requests."""
import numpy as np
import pytest

from disttrain.optim import rules
from disttrain.ps import protocol
from disttrain.ps.protocol import Message, Payload
from disttrain.ps.layout import chunk_layout
from disttrain.ps.server import ServerState

SGD = {"name": "sgd", "hyper": {"lr": 0.5}}


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
