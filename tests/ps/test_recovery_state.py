"""A server's side of worker recovery, without sockets: a (worker, clock, key) push applied
once however often it arrives, the contributions counted, and a replacement's `recover` and
exact pulls (ps/recovery.py)."""
import io
import json

import numpy as np
import pytest

from disttrain.ps import recovery
from disttrain.ps.layout import chunk_layout
from disttrain.ps.protocol import Message
from disttrain.ps.server import ServerState
from tests.ps.test_group import (MOMENTUM, SHAPES, assert_same_weights, gradients, keyed_push,
                                 keyed_server)
from tests.ps.test_server import init_message, make_server, pull, pulled, push


def ops(replies):
    return [reply.op for _, reply in replies]


def recovering_server(workers=2, names=("a", "b")):
    """A sync server of keys `names` (SHAPES) whose init asked for recovery."""
    state = ServerState(0, workers, 1)
    for i, name in enumerate(names):
        value = np.linspace(-1, 1, int(np.prod(SHAPES[name])), dtype=np.float32) * (i + 1)
        message = init_message(name, value.reshape(SHAPES[name]),
                               chunk_layout(name, SHAPES[name], np.float32, 1)[0])
        message.meta.update(optimizer=MOMENTUM, recovery=True)
        assert ops(state.handle("w", message)) == ["reply"]
    return state


def one_key_push(rank, clock, name, gradient):
    return keyed_push(rank, clock, {name: gradient}, packed=False)


def exact_pull(rank, clock, names):
    return Message("pull", 7, f"worker-{rank}", list(names), [],
                   {"clock": clock, "rank": rank, "chunks": [0] * len(names), "exact": True})


# --- dedupe ---------------------------------------------------------------------------------
def test_a_push_sent_twice_is_acknowledged_twice_but_applied_and_counted_once():
    state, reference = make_server("sync"), make_server("sync")
    ones = np.ones(6, np.float32)
    for server, pushes in ((state, [(0, ones), (0, ones), (1, 3 * ones), (1, 3 * ones)]),
                           (reference, [(0, ones), (1, 3 * ones)])):
        for rank, gradient in pushes:
            assert ops(server.handle(f"w{rank}", push(rank, 0, "w", gradient))) == ["reply"]
    key = state.keys["w", 0]
    assert (key.version, key.pushes, key.applied) == (1, [1, 1], 2)
    np.testing.assert_array_equal(pulled(state.handle("w0", pull(0, 1, "w"))),
                                  pulled(reference.handle("w0", pull(0, 1, "w"))))


def test_a_replayed_pushpull_skips_its_push_and_still_answers_the_next_clocks_weights():
    state = make_server("sync")
    ones = np.ones(6, np.float32)
    state.handle("w0", push(0, 0, "w", ones))
    replayed = push(0, 0, "w", 5 * ones)
    replayed.op = "pushpull"
    assert state.handle("w0", replayed) == []     # the pull half waits for worker 1
    replies = state.handle("w1", push(1, 0, "w", 3 * ones))
    assert ops(replies) == ["reply", "reply"]
    # The mean of the first pushes (1 and 3): the replay's 5 was never added.
    np.testing.assert_allclose(replies[1][1].payloads[0].array, np.arange(6) - 0.5 * 2)
    assert state.keys["w", 0].applied == 2


def test_a_replayed_packed_push_leaves_the_group_as_if_it_came_once():
    script = [(clock, rank) for clock in range(3) for rank in range(2)]
    state, reference = keyed_server(2, MOMENTUM), keyed_server(2, MOMENTUM)
    for clock, rank in script:
        message = keyed_push(rank, clock, gradients(rank, clock), packed=True)
        assert ops(state.handle(f"w{rank}", message)) == ["reply"]
        assert ops(state.handle(f"w{rank}", message)) == ["reply"]   # the same push again
        assert ops(reference.handle(f"w{rank}", keyed_push(rank, clock, gradients(rank, clock),
                                                           packed=True))) == ["reply"]
    assert state.keys["a", 0].group is not None
    assert_same_weights(state, reference)
    assert all(state.keys[name, 0].applied == 2 * 3 for name in SHAPES)


def test_a_push_ahead_of_the_clock_a_key_expects_is_refused_and_changes_nothing():
    state = make_server("sync")
    [(_, reply)] = state.handle("w0", push(0, 1, "w", np.ones(6, np.float32)))
    assert reply.op == "error" and "expected clock 0" in reply.meta["error"]
    assert state.keys["w", 0].pushes == [0, 0]


# --- counting -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_every_key_counts_the_contributions_it_applied_and_stats_reports_them(mode):
    state = keyed_server(2, MOMENTUM, mode)
    for clock in range(3):
        for rank in range(2):
            grads = gradients(rank, clock)
            if clock == 1:
                grads["b"] = None     # "no gradient this clock" is a contribution too
            state.handle(f"w{rank}", keyed_push(rank, clock, grads, packed=rank == 0))
    [(_, reply)] = state.handle("w0", Message("stats", 3, "worker-0", [], [], {"rank": 0}))
    versions = {"sync": 3, "async": 6}[mode]
    assert reply.meta["stats"] == {f"{name}#0": [6, versions] for name in SHAPES}


def test_the_exit_line_says_whether_every_key_applied_workers_times_clocks():
    state = keyed_server(2, MOMENTUM)
    for rank in range(2):
        state.handle(f"w{rank}", keyed_push(rank, 0, gradients(rank, 0), packed=False))
    out = io.StringIO()
    recovery.say_counts(state, out)
    line = out.getvalue()
    counts = json.loads(line[line.index("{"):line.index("}") + 1])
    assert counts == {f"{name}#0": [2, 1] for name in SHAPES}
    assert "every chunk applied 2 workers x its clocks" in line
    state.keys["a", 0].applied += 1   # as if a push had been applied twice
    out = io.StringIO()
    recovery.say_counts(state, out)
    assert 'NOT workers x clocks for {"a#0": [3, 1]}' in out.getvalue()


# --- recover and exact pulls ----------------------------------------------------------------
def test_a_replacement_learns_its_clock_and_pulls_the_exact_weights_of_it():
    """Worker 0 dies in clock 1 after pushing key a but not b; worker 1 pushed both. The
    replacement must redo clock 1 from the weights of version 1 of both keys: a is at
    version 2 by then (the kept previous weights), b still at 1."""
    state = recovering_server()
    for rank in range(2):
        for name in ("a", "b"):
            state.handle(f"w{rank}", one_key_push(rank, 0, name, gradients(rank, 0)[name]))
    at_version_1 = {name: state.keys[name, 0].param.copy() for name in ("a", "b")}
    state.handle("w0", one_key_push(0, 1, "a", gradients(0, 1)["a"]))
    for name in ("a", "b"):
        state.handle("w1", one_key_push(1, 1, name, gradients(1, 1)[name]))
    assert (state.keys["a", 0].version, state.keys["b", 0].version) == (2, 1)

    [(_, reply)] = state.handle("r0", Message("recover", 5, "worker-0", [], [], {"rank": 0}))
    assert reply.meta == {"keys": {"a#0": [2, 2], "b#0": [1, 1]}, "clock": 1}
    [(_, reply)] = state.handle("r0", exact_pull(0, 1, ["a", "b"]))
    assert reply.op == "reply", reply.meta
    for payload in reply.payloads:
        np.testing.assert_array_equal(payload.array, at_version_1[reply.keys[payload.key]]
                                      .reshape(-1))
    # Its redo of clock 1: a's push is a replay (skipped), b's completes the clock.
    for name in ("a", "b"):
        assert ops(state.handle("r0", one_key_push(0, 1, name, gradients(0, 1)[name]))) == \
            ["reply"]
    assert [(state.keys[n, 0].version, state.keys[n, 0].applied) for n in ("a", "b")] == \
        [(2, 4), (2, 4)]


def test_a_server_that_lived_through_a_replacement_ends_as_an_unbroken_one():
    state, reference = recovering_server(), recovering_server()
    for clock in range(3):
        for rank in range(2):
            for name in ("a", "b"):
                gradient = gradients(rank, clock)[name]
                reference.handle(f"w{rank}", one_key_push(rank, clock, name, gradient))
                if (clock, rank, name) != (1, 0, "b"):   # worker 0 dies before this push
                    state.handle(f"w{rank}", one_key_push(rank, clock, name, gradient))
            if (clock, rank) == (1, 0):   # its replacement redoes clock 1
                assert ops(state.handle("r0", exact_pull(0, 1, ["a", "b"]))) == ["reply"]
                for name in ("a", "b"):
                    state.handle("r0", one_key_push(0, 1, name, gradients(0, 1)[name]))
    for name in ("a", "b"):
        got, expected = state.keys[name, 0], reference.keys[name, 0]
        np.testing.assert_array_equal(got.param, expected.param, err_msg=name)
        assert (got.version, got.applied) == (expected.version, expected.applied) == (3, 6)


def test_an_exact_pull_needs_a_server_that_keeps_the_previous_weights():
    state = keyed_server(2, MOMENTUM)   # no recovery: true in its init
    [(_, reply)] = state.handle("w0", exact_pull(0, 0, ["a"]))
    assert reply.op == "error" and "recovery: true" in reply.meta["error"]
    assert state.keys["a", 0].previous is None


def test_an_exact_pull_of_a_version_no_longer_kept_is_refused():
    state = recovering_server(names=("a",))
    for clock in range(2):
        for rank in range(2):
            state.handle(f"w{rank}", one_key_push(rank, clock, "a", gradients(rank, clock)["a"]))
    [(_, reply)] = state.handle("w0", exact_pull(0, 0, ["a"]))
    assert reply.op == "error" and "version 2" in reply.meta["error"]
