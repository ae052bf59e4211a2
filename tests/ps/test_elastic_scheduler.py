"""The scheduler's side of elastic membership, with a real scheduler on a thread and
Memberships in the test: a worker registering after the start on a free rank joins (the
others get a notice naming it), one that leaves frees its rank, and the job ends when every
worker in it said its final goodbye."""
import threading
from contextlib import contextmanager

from disttrain.ps import scheduler
from disttrain.ps.membership import Membership
from tests.ps.cluster import free_port
from tests.waiting import wait_until

TIMEOUT = 30


@contextmanager
def elastic_job(workers=1, max_workers=3):
    address = f"127.0.0.1:{free_port()}"
    sched = scheduler.Scheduler(address, workers, 1, heartbeat_timeout=5.0, timeout=TIMEOUT,
                                credentials=None, max_workers=max_workers)
    result = []
    thread = threading.Thread(target=lambda: result.append(sched.run()), daemon=True)
    thread.start()
    nodes = []

    def member(role, rank):
        node = Membership(role, address, 5.0, TIMEOUT, credentials=None, rank=rank)
        nodes.append(node)
        return node
    try:
        yield member, sched, lambda: thread.join(TIMEOUT) or result
    finally:
        thread.join(TIMEOUT)
        for node in nodes:
            node.close()
        assert not thread.is_alive(), "the scheduler did not stop"


def register_all(*pairs):
    threads = [threading.Thread(target=node.register, kwargs=dict(rank=rank))
               for node, rank in pairs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)


def test_a_worker_on_a_free_rank_joins_and_the_others_are_told_its_rank():
    with elastic_job() as (member, sched, finish):
        server, first = member("server", 0), member("worker", 0)
        register_all((server, 0), (first, 0))
        assert first.elastic and not first.join
        assert first.book["worker"] == [first.book["worker"][0], None, None]
        joiner = member("worker", 2)
        joiner.register(rank=2)
        assert (joiner.rank, joiner.join, joiner.elastic) == (2, True, True)
        wait_until(lambda: first.joining == [2] and server.joining == [2], 10,
                   "the book notice naming worker 2")
        assert server.book["worker"][2]["pid"] == joiner.book["worker"][2]["pid"]
        # Until it is let in, the job does not wait for the joiner's goodbye.
        first.goodbye()
        assert finish() == [0]


def test_a_worker_that_leaves_frees_its_rank_for_a_new_one_and_the_job_waits_for_the_rest():
    with elastic_job(workers=2) as (member, sched, finish):
        server, first, second = member("server", 0), member("worker", 0), member("worker", 1)
        register_all((server, 0), (first, 0), (second, 1))
        second.goodbye(leave=True)
        assert sched.book["worker"][1] is None
        again = member("worker", 1)
        again.register(rank=1)
        assert again.join
        again.joined()
        first.goodbye()
        assert sched.closing_since is None   # the joiner that was let in is waited for
        again.goodbye()
        assert finish() == [0]


def test_barriers_count_the_workers_in_the_job_now():
    with elastic_job(workers=2) as (member, sched, finish):
        server, first, second = member("server", 0), member("worker", 0), member("worker", 1)
        register_all((server, 0), (first, 0), (second, 1))
        second.goodbye(leave=True)
        first.barrier("worker")   # alone now: it does not wait for the one that left
        first.goodbye()
        assert finish() == [0]
