"""A server's side of elastic membership, without sockets: each sync clock is averaged over
the workers that count at that clock, learnt from the pushes' "leave" and "join" marks, and
every reply tells the workers who counts (ps/elastic.py)."""
import io

import numpy as np
import pytest

from disttrain.ps import elastic, recovery
from disttrain.ps.protocol import Message
from tests.ps.test_server import make_server, pull, pulled, push

SGD_LR = 0.5   # test_server's SGD with push's default lr


def elastic_server(workers=3, present=(0, 1)):
    """A sync server of key "w" (0..5) with room for `workers` ranks, `present` at clock 0."""
    state = make_server("sync", workers=workers)
    state.roster = elastic.Roster(present)
    return state


def marked(message, **marks):
    message.meta.update(marks)
    return message


def ops(replies):
    return [reply.op for _, reply in replies]


def test_a_leaver_counts_at_its_marked_clock_and_the_next_clock_averages_over_the_rest():
    state = elastic_server()
    ones = np.ones(6, np.float32)
    state.handle("w0", push(0, 0, "w", ones))
    state.handle("w1", marked(push(1, 0, "w", 3 * ones), leave=0))
    key = state.keys["w", 0]
    assert key.version == 1                                 # 2 pushes complete clock 0
    after_clock_0 = np.arange(6) - SGD_LR * 2               # mean of 1 and 3
    np.testing.assert_allclose(pulled(state.handle("w0", pull(0, 1, "w"))), after_clock_0)
    state.handle("w0", push(0, 1, "w", 4 * ones))           # alone now: its push completes 1
    assert (key.version, key.applied) == (2, 3)
    np.testing.assert_allclose(pulled(state.handle("w0", pull(0, 2, "w"))),
                               after_clock_0 - SGD_LR * 4)


def test_a_joiner_counts_from_its_join_clock_and_its_first_push_is_expected_there():
    state = elastic_server()
    ones = np.ones(6, np.float32)
    position = {"step": 1, "epoch": 1, "start": 0}
    state.handle("w0", marked(push(0, 0, "w", ones), join=[[2, 1, position]]))
    state.handle("w1", push(1, 0, "w", ones))
    key = state.keys["w", 0]
    assert key.version == 1 and key.pushes[2] == 1
    state.handle("w0", push(0, 1, "w", ones))
    state.handle("w1", push(1, 1, "w", ones))
    assert key.version == 1                                 # clock 1 waits for worker 2
    state.handle("w2", push(2, 1, "w", 7 * ones))
    assert (key.version, key.applied) == (2, 5)
    np.testing.assert_allclose(pulled(state.handle("w0", pull(0, 2, "w"))),
                               np.arange(6) - SGD_LR * 1 - SGD_LR * 3)   # means 1, then 3


def test_joined_answers_a_new_worker_its_clock_and_position_once_a_push_marked_it():
    state = elastic_server()
    ask = Message("joined", 5, "worker-2", [], [], {"rank": 2})
    [(_, reply)] = state.handle("w2", ask)
    assert reply.meta["clock"] is None
    position = {"step": 4, "epoch": 2, "start": 0}
    state.handle("w0", marked(push(0, 0, "w", None), join=[[2, 1, position]]))
    [(_, reply)] = state.handle("w2", ask)
    assert (reply.meta["clock"], reply.meta["position"]) == (1, position)
    assert [2, 1, None] in reply.meta["members"]


def test_an_earlier_process_of_a_rank_that_left_does_not_answer_a_new_joiner_of_it():
    state = elastic_server(present=(0, 1, 2))
    ask = Message("joined", 5, "worker-2", [], [], {"rank": 2})
    for rank in range(3):
        marks = {"join": [[2, 0, {}]]} if rank == 0 else {}
        state.handle(f"w{rank}", marked(push(rank, 0, "w", None), leave=0, **marks)
                     if rank == 2 else marked(push(rank, 0, "w", None), **marks))
    [(_, reply)] = state.handle("w2", ask)
    assert reply.meta["clock"] is None


def test_every_reply_carries_the_spans_of_who_counts_when():
    state = elastic_server()
    replies = state.handle("w1", marked(push(1, 0, "w", None), leave=0))
    assert ops(replies) == ["reply"]
    assert replies[0][1].meta["members"] == [[0, 0, None], [1, 0, 0]]


def test_the_exit_line_checks_applied_against_the_workers_present_at_each_clock():
    state = elastic_server()
    ones = np.ones(6, np.float32)
    state.handle("w0", push(0, 0, "w", ones))
    state.handle("w1", marked(push(1, 0, "w", ones), leave=0))
    state.handle("w0", push(0, 1, "w", ones))
    stream = io.StringIO()
    recovery.say_counts(state, stream)
    assert "every chunk applied the present workers x its clocks" in stream.getvalue()
    assert elastic.contributions_expected(state, 2) == 3


def test_a_leave_mark_for_another_clock_than_its_push_is_refused():
    state = elastic_server()
    [(_, reply)] = state.handle("w1", marked(push(1, 0, "w", None), leave=5))
    assert reply.op == "error" and "marks the pushes of its last clock" in reply.meta["error"]
    assert state.roster.spans == [[0, 0, None], [1, 0, None]]


@pytest.mark.parametrize("join", [[[9, 1, {}]], [[1, "x", {}]], "2", [[2, 1]]])
def test_a_malformed_join_mark_is_refused_naming_the_form(join):
    state = elastic_server()
    [(_, reply)] = state.handle("w0", marked(push(0, 0, "w", None), join=join))
    assert reply.op == "error" and "[rank, clock, position]" in reply.meta["error"]
