"""The scheduler's side of recovery, with a real scheduler on a thread and Memberships in
the test: a register after the job started replaces the node of that rank (with recovery on
only), the others get a book notice, the replaced node is told so, and a silent node is first
reported unresponsive on the observe channel and named dead only when no replacement came."""
import threading
from contextlib import contextmanager

import pytest

from disttrain.observe import channel
from disttrain.ps import scheduler
from disttrain.ps.membership import Membership
from tests.ps.cluster import free_port
from tests.waiting import wait_until

TIMEOUT = 30


@contextmanager
def recovery_job(heartbeat_timeout=5.0, restart_timeout=30.0):
    """An insecure scheduler for 1 worker and 1 server on a thread; yields (address, the
    result list that gets run()'s exit code, join(), the Scheduler)."""
    address = f"127.0.0.1:{free_port()}"
    sched = scheduler.Scheduler(address, 1, 1, heartbeat_timeout=heartbeat_timeout,
                                timeout=TIMEOUT, credentials=None,
                                restart_timeout=restart_timeout)
    result = []
    thread = threading.Thread(target=lambda: result.append(sched.run()), daemon=True)
    thread.start()
    try:
        yield address, result, lambda: thread.join(TIMEOUT) or result, sched
    finally:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the scheduler did not stop"


def member(role, address, heartbeat_timeout=5.0):
    node = Membership(role, address, heartbeat_timeout, TIMEOUT, credentials=None, rank=0,
                      restart_timeout=30.0)
    node.exit_when_replaced = False   # a thread of the test, not a process of its own
    return node


def register_all(*nodes):
    """Register nodes at once (each register waits for everyone)."""
    threads = [threading.Thread(target=node.register, kwargs=dict(tcp=f"tcp://first-{i}", rank=0))
               for i, node in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert all(node.rank == 0 and not node.recovery for node in nodes), [(n.role, n.rank, n.recovery, n.dead) for n in nodes]


class Stderr:
    """What the test process wrote on stderr so far (capfd), kept across reads."""

    def __init__(self, capfd):
        self.capfd, self.text = capfd, ""

    def __call__(self):
        self.text += self.capfd.readouterr().err
        return self.text


def marked(text, kind):
    """The observe-channel messages of `kind` in captured stderr."""
    # Not splitlines(): it splits at the marker's record separator too.
    found = [channel.parse(line.encode()) for line in text.split("\n")]
    return [message for message in found if message and message["kind"] == kind]


def test_a_register_after_the_start_replaces_that_rank_and_tells_everyone():
    with recovery_job() as (address, result, join, _):
        server, worker = member("server", address), member("worker", address)
        register_all(server, worker)
        replacement = member("worker", address)
        try:
            book = replacement.register(tcp="tcp://replacement", rank=0)
            assert replacement.recovery and replacement.rank == 0
            assert book["worker"][0]["tcp"] == "tcp://replacement"
            assert book["server"][0]["tcp"] == "tcp://first-0"
            # The server learns the new address book from a notice on its heartbeat socket.
            wait_until(lambda: server.book_version == 1, TIMEOUT, "the server's book notice")
            assert server.book["worker"][0]["tcp"] == "tcp://replacement"
            # The replaced worker's next beat is answered `replaced`; its process would end.
            wait_until(lambda: worker.replaced, TIMEOUT, "the replaced worker being told")
            assert "replaced" in worker.dead and replacement.dead is None
            replacement.goodbye()
            assert join() == [0]
        finally:
            for node in (server, worker, replacement):
                node.close()


def test_without_recovery_a_register_after_the_start_is_refused(monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    sched = scheduler.Scheduler(address, 1, 1, heartbeat_timeout=5, timeout=TIMEOUT,
                                credentials=None)
    thread = threading.Thread(target=sched.run, daemon=True)
    thread.start()
    server, worker, late = (member("server", address), member("worker", address),
                            member("worker", address))
    try:
        register_all(server, worker)
        with pytest.raises(RuntimeError, match="worker registered after the job started"):
            late.register(rank=0)
        worker.goodbye()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    finally:
        for node in (server, worker, late):
            node.close()


def test_a_silent_node_is_reported_unresponsive_once_and_the_job_goes_on_with_its_replacement(
        capfd):
    stderr = Stderr(capfd)
    with recovery_job(heartbeat_timeout=2.0) as (address, result, join, _):
        server, worker = member("server", address, 2.0), member("worker", address, 2.0)
        register_all(server, worker)
        worker.close()    # silent from now on, as a SIGSTOPped process
        wait_until(lambda: marked(stderr(), "unresponsive"), TIMEOUT,
                   lambda: f"the unresponsive message in {stderr.text!r}")
        replacement = member("worker", address, 2.0)
        try:
            replacement.register(rank=0)
            assert replacement.recovery
            replacement.goodbye()
            assert join() == [0]
            assert [(m["role"], m["rank"]) for m in marked(stderr(), "unresponsive")] == \
                [("worker", 0)]
            assert "dead:" not in stderr()
        finally:
            server.close()
            replacement.close()


def test_a_silent_node_is_named_dead_once_no_replacement_came_within_the_restart_timeout(
        capfd):
    with recovery_job(heartbeat_timeout=2.0, restart_timeout=1.0) as (address, result, join, _):
        server, worker = member("server", address, 2.0), member("worker", address, 2.0)
        try:
            register_all(server, worker)
            worker.close()
            assert join() == [1]
            err = capfd.readouterr().err
            assert [(m["role"], m["rank"]) for m in marked(err, "unresponsive")] == [("worker", 0)]
            assert "no heartbeat for" in marked(err, "unresponsive")[0]["why"]
            assert err.index("unresponsive: worker 0") < err.index("dead: worker 0")
            wait_until(lambda: server.dead, TIMEOUT, "the server hearing of the death")
        finally:
            server.close()


def test_a_replacement_before_the_start_takes_the_place_of_the_one_it_replaces():
    with recovery_job() as (address, result, join, sched):
        dead, worker, server = (member("worker", address), member("worker", address),
                                member("server", address))
        try:
            threads, errors = [], []

            def register(node):
                try:
                    node.register(tcp=f"tcp://{id(node)}", rank=0)
                except Exception as error:   # `dead`'s, never answered: it was replaced
                    errors.append((node, error))
            for node in (dead, worker):   # in this order: the worker replaces `dead`
                threads.append(threading.Thread(target=register, args=(node,), daemon=True))
                threads[-1].start()
                wait_until(lambda: node.node_id in sched.nodes, TIMEOUT, "its registration")
            assert dead.node_id not in sched.nodes
            book = server.register(rank=0)   # the last one: the book goes out
            threads[1].join(TIMEOUT)
            assert worker.rank == 0 and not worker.recovery
            assert book["worker"][0]["tcp"] == f"tcp://{id(worker)}"
            wait_until(lambda: dead.replaced, TIMEOUT, "the first registrant being told")
            threads[0].join(TIMEOUT)
            assert [(node, type(error).__name__) for node, error in errors] == [(dead, "PeerDied")]
            worker.goodbye()
            assert join() == [0]
        finally:
            for node in (dead, server, worker):
                node.close()
