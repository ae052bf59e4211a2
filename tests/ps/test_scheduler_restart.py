"""A scheduler that dies and is started again (recovery on): the job's live processes rejoin
it keeping their ranks, and their outstanding requests survive. Scheduler on a thread (killed
by ending its loop), real Memberships over loopback with the job's CURVE keys."""
import errno
import threading

import pytest
import zmq

from disttrain.observe import channel
from disttrain.ps import auth, scheduler, transport
from disttrain.ps.membership import Membership
from disttrain.ps.protocol import Message
from tests.ps.cluster import free_port
from tests.ps.inprocess import TIMEOUT
from tests.waiting import wait_until

HEARTBEAT_TIMEOUT = 1.0    # the nodes' patience with a silent scheduler, without recovery
RESTART_TIMEOUT = 60.0     # with recovery: longer than any of these tests waits for a restart
ROLES = [("server", 0), ("worker", 0), ("worker", 1)]


class Killed(Exception):
    """Ends a scheduler thread's loop where a kill -9 would end the process."""


class SchedulerThread:
    """A 2-worker, 1-server job's scheduler on a thread. Its port may still be held for a
    moment by the one killed before it (zmq closes sockets asynchronously): binding is
    retried until it is free."""

    def __init__(self, address, keys, incarnation=0, restart_timeout=RESTART_TIMEOUT):
        def bind():
            try:
                return scheduler.Scheduler(
                    address, 2, 1, heartbeat_timeout=30, timeout=TIMEOUT,
                    credentials=auth.load_credentials(keys, "scheduler"),
                    incarnation=incarnation, restart_timeout=restart_timeout)
            except zmq.ZMQError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
                return None
        self.scheduler = wait_until(bind, 10, f"the scheduler binds {address} again")
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.result = self.scheduler.run()
        except Killed:
            self.result = "killed"

    def kill(self):
        def dead(timeout_ms):
            raise Killed()
        self.scheduler.listener.receive = dead
        self.thread.join(timeout=10)
        assert self.result == "killed"

    def finish(self):
        self.thread.join(timeout=TIMEOUT)
        return self.result


@pytest.fixture
def job(tmp_path):
    """(address, keys, nodes, schedulers): the job's key directory, and lists the test fills
    with its Memberships and SchedulerThreads, all stopped at the end."""
    keys = auth.make_key_directory(str(tmp_path / "keys"), 2, 1)
    nodes, schedulers = [], []
    try:
        yield f"127.0.0.1:{free_port()}", keys, nodes, schedulers
    finally:
        for node in nodes:
            node.close()
        for sched in schedulers:
            if sched.thread.is_alive():
                sched.kill()


def start_nodes(address, keys, nodes, restart_timeout=RESTART_TIMEOUT):
    """Server 0, worker 0 and worker 1, registered (registration waits for all three)."""
    for role, rank in ROLES:
        nodes.append(Membership(role, address, HEARTBEAT_TIMEOUT, TIMEOUT,
                                credentials=auth.load_credentials(keys, role, rank),
                                restart_timeout=restart_timeout))
    books = in_threads([lambda node=node, rank=rank: node.register(
        tcp=f"tcp://127.0.0.1:{40000 + i}", ipc="", rank=rank)
        for i, (node, (_, rank)) in enumerate(zip(nodes, ROLES))])
    return books[0]


def in_threads(calls):
    """Run each call on its own thread; their results in order, or the first error."""
    results, errors = [None] * len(calls), []

    def guarded(index):
        try:
            results[index] = calls[index]()
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)
    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    if errors:
        raise errors[0]
    return results


def in_background(call):
    """Start call() on a thread; returns a function that joins it and gives its result."""
    box = {}

    def run():
        try:
            box["result"] = call()
        except BaseException as error:  # noqa: BLE001 - re-raised by the joiner
            box["error"] = error
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join(timeout=TIMEOUT)
        assert not thread.is_alive(), "the call did not return"
        if "error" in box:
            raise box["error"]
        return box["result"]
    return join


def raw_request(address, keys, name, message):
    """One request on a fresh connection holding the key `name` ("worker-0")."""
    role, rank = auth.parse_key_name(name)
    credentials = auth.load_credentials(keys, role, rank)
    connection = transport.Connection(f"tcp://{address}", b"probe-" + name.encode(),
                                      security=auth.ClientCurve(credentials, "scheduler"))
    try:
        return connection.request(message, transport.Deadline(TIMEOUT, message.op))
    finally:
        connection.close()


def test_a_restarted_scheduler_is_rejoined_by_every_process_keeping_ranks_and_book(job, capfd):
    address, keys, nodes, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    book = start_nodes(address, keys, nodes)
    first = dict(schedulers[0].scheduler.nodes)
    schedulers[0].kill()
    schedulers.append(SchedulerThread(address, keys, incarnation=1))
    restarted = schedulers[1].scheduler
    wait_until(lambda: restarted.book is not None, TIMEOUT, "every process rejoined")
    assert restarted.book == book
    assert {node_id: (n["role"], n["rank"]) for node_id, n in restarted.nodes.items()} == \
        {node_id: (n["role"], n["rank"]) for node_id, n in first.items()}
    assert [node.rank for node in nodes] == [0, 0, 1]
    err = capfd.readouterr().err
    assert err.count(f"rejoined scheduler incarnation {restarted.incarnation_id} (restart 1)") \
        == 3, err
    # The book is whole again: the job ends as always, once every worker said goodbye.
    in_threads([nodes[1].goodbye, nodes[2].goodbye])
    assert schedulers[1].finish() == 0
    assert nodes[0].shutdown.wait(TIMEOUT)


def test_registrations_the_dead_scheduler_swallowed_are_sent_again_to_its_restart(job):
    address, keys, nodes, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    for role, rank in ROLES:
        nodes.append(Membership(role, address, HEARTBEAT_TIMEOUT, TIMEOUT,
                                credentials=auth.load_credentials(keys, role, rank),
                                restart_timeout=RESTART_TIMEOUT))
    early = [in_background(lambda node=node, rank=rank: node.register(rank=rank))
             for node, rank in ((nodes[0], 0), (nodes[1], 0))]
    wait_until(lambda: len(schedulers[0].scheduler.pending) == 2, TIMEOUT,
               "server 0 and worker 0 registered")
    schedulers[0].kill()     # before the book was out: nobody has one
    schedulers.append(SchedulerThread(address, keys, incarnation=1))
    books = [nodes[2].register(rank=1)] + [join() for join in early]
    assert books[0] == books[1] == books[2] == schedulers[1].scheduler.book
    assert [node.rank for node in nodes] == [0, 0, 1]


def test_a_barrier_the_dead_scheduler_swallowed_is_sent_again_and_completes(job):
    address, keys, nodes, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    start_nodes(address, keys, nodes)
    first = schedulers[0].scheduler
    waiting = in_background(lambda: nodes[1].barrier("worker"))
    wait_until(lambda: len(first.barriers.get("worker", ())) == 1, TIMEOUT,
               "worker 0's barrier reached the scheduler")
    schedulers[0].kill()
    schedulers.append(SchedulerThread(address, keys, incarnation=1))
    restarted = schedulers[1].scheduler
    wait_until(lambda: restarted.book is not None, TIMEOUT, "every process rejoined")
    wait_until(lambda: len(restarted.barriers.get("worker", ())) == 1, TIMEOUT,
               "worker 0 sent its barrier again")
    nodes[2].barrier("worker")     # worker 1 arrives: the rebuilt barrier lets both through
    waiting()


def test_a_request_that_reaches_the_scheduler_twice_counts_once(job):
    address, keys, nodes, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    start_nodes(address, keys, nodes)
    sched = schedulers[0].scheduler
    worker = nodes[1]
    barrier = Message("barrier", 1000, "worker-0", meta={"group": "worker", "node": worker.node_id})
    worker._requests.send(barrier)
    worker._requests.send(barrier)    # the copy a restarted scheduler may get as well
    # A third request on the same socket: its answer means both copies were handled.
    probe = Message("barrier", 1001, "worker-0", meta={"group": "nobody", "node": worker.node_id})
    assert worker._exchange(probe, transport.Deadline(TIMEOUT, "probe")).op == "error"
    assert len(sched.barriers["worker"]) == 1
    nodes[2].barrier("worker")
    assert worker._exchange(barrier, transport.Deadline(TIMEOUT, "barrier")).op == "reply"


def test_a_restarted_scheduler_ends_the_job_only_once_every_process_is_back(job):
    """Workers that rejoined and said goodbye do not end the job before the server is back:
    it would never hear the shutdown."""
    address, keys, nodes, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    start_nodes(address, keys, nodes)
    server, late = nodes[0], threading.Event()
    follow = server._follow_incarnation
    server._follow_incarnation = lambda connection, incarnation: \
        late.is_set() and follow(connection, incarnation)
    schedulers[0].kill()
    schedulers.append(SchedulerThread(address, keys, incarnation=1))
    in_threads([nodes[1].goodbye, nodes[2].goodbye])
    # Answered on a later turn of its loop: the scheduler has decided on the goodbyes.
    raw_request(address, keys, "worker-0", Message("heartbeat", 3, "worker-0",
                                                   meta={"node": "worker-x", "sent": 1.0}))
    assert schedulers[1].thread.is_alive() and schedulers[1].scheduler.closing_since is None
    late.set()
    assert schedulers[1].finish() == 0
    assert server.shutdown.wait(TIMEOUT) and server.dead is None


def test_a_registration_sent_again_after_the_book_is_answered_with_the_same_book(job):
    """A node re-sends its register to each scheduler process it hears of before it has
    its book; a copy that arrives after the book is no second member (nor a recovery)."""
    address, keys, nodes, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    book = start_nodes(address, keys, nodes)
    worker = nodes[1]
    again = Message("register", 99, "worker-0",
                    meta=dict(worker._registration, rank=0, node=worker.node_id))
    reply = worker._exchange(again, transport.Deadline(TIMEOUT, "register again"))
    assert (reply.op, reply.meta["rank"], reply.meta["book"]) == ("reply", 0, book)
    assert len(schedulers[0].scheduler.nodes) == 3


def test_a_worker_gone_before_the_restart_counts_as_left_and_the_job_ends(job, capfd):
    address, keys, nodes, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    start_nodes(address, keys, nodes)
    nodes[2].goodbye()       # worker 1 is done and leaves
    nodes[2].close()
    schedulers[0].kill()
    schedulers.append(SchedulerThread(address, keys, incarnation=1, restart_timeout=2))
    restarted = schedulers[1].scheduler
    wait_until(lambda: restarted.book is not None, TIMEOUT, "the restarted book is closed")
    assert "scheduler: worker 1 did not rejoin within 2 s: counted as having left" in \
        capfd.readouterr().err
    nodes[1].goodbye()
    assert schedulers[1].finish() == 0
    assert nodes[0].shutdown.wait(TIMEOUT)
    assert nodes[0].dead is None


def test_a_server_that_does_not_rejoin_is_named_dead_to_everyone(job):
    address, keys, nodes, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    start_nodes(address, keys, nodes)
    nodes[0].close()         # the server is gone (without a word, as a crash)
    schedulers[0].kill()
    schedulers.append(SchedulerThread(address, keys, incarnation=1, restart_timeout=2))
    assert schedulers[1].finish() == 1
    wait_until(lambda: nodes[1].dead and nodes[2].dead, TIMEOUT, "the workers heard of it")
    assert nodes[1].dead == "dead: server 0 (did not rejoin the restarted scheduler within 2 s)"
    for node in nodes:       # before their grace period ends the process
        node.close()


def test_a_restarted_scheduler_nobody_comes_back_to_ends_non_zero(job, capfd):
    address, keys, _, schedulers = job
    schedulers.append(SchedulerThread(address, keys, incarnation=1, restart_timeout=1))
    assert schedulers[0].finish() == 1
    assert "no process of the job came back within 1 s" in capfd.readouterr().err


def test_with_recovery_a_silent_scheduler_is_waited_for_past_the_heartbeat_timeout(job, capfd):
    address, keys, nodes, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    start_nodes(address, keys, nodes)
    schedulers[0].kill()
    said = []
    # (At least: a node an earlier test left behind may still be saying it too.)
    wait_until(lambda: said.append(capfd.readouterr().err) or
               min("".join(said).count("waiting up to 60 s for its restart"),
                   "".join(said).count('{"role":"scheduler"')) >= 3,
               TIMEOUT, "the three nodes say they wait for the restart, and tell the launcher")
    # Silent for longer than the heartbeat timeout: still alive, and rejoin the restart.
    assert [node.dead for node in nodes] == [None] * 3
    # Each told the launcher, which kills a frozen scheduler to restart it.
    reports = [channel.parse(line.encode()) for line in "".join(said).split("\n")]
    assert [r["silent_s"] >= HEARTBEAT_TIMEOUT for r in reports
            if r and r["role"] == "scheduler"][:3] == [True] * 3
    schedulers.append(SchedulerThread(address, keys, incarnation=1))
    wait_until(lambda: schedulers[1].scheduler.book is not None, TIMEOUT, "every process rejoined")
    assert [node.dead for node in nodes] == [None] * 3


def test_with_recovery_a_scheduler_not_back_within_the_restart_timeout_is_dead(job):
    address, keys, nodes, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    start_nodes(address, keys, nodes, restart_timeout=2)
    schedulers[0].kill()
    wait_until(lambda: all(node.dead for node in nodes), TIMEOUT, "the nodes gave up")
    for node in nodes:       # before their grace period ends the process
        node.close()
    assert all(node.dead.startswith("dead: scheduler (no heartbeat for ") for node in nodes)


def test_without_recovery_a_silent_scheduler_is_dead_after_the_heartbeat_timeout(job, capfd):
    address, keys, nodes, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    start_nodes(address, keys, nodes, restart_timeout=None)
    schedulers[0].kill()
    wait_until(lambda: all(node.dead for node in nodes), TIMEOUT, "the nodes gave up")
    for node in nodes:
        node.close()
    assert all(node.dead.startswith("dead: scheduler (no heartbeat for ") for node in nodes)
    assert "for its restart" not in capfd.readouterr().err


def test_a_request_from_a_node_that_has_not_rejoined_is_answered_rejoin_first(job):
    address, keys, _, schedulers = job
    schedulers.append(SchedulerThread(address, keys, incarnation=1))
    reply = raw_request(address, keys, "worker-0", Message(
        "barrier", 7, "worker-0", meta={"group": "worker", "node": "worker-x"}))
    assert reply.op == "error" and reply.meta["rejoin"] is True, reply.meta


@pytest.mark.parametrize("claimed_role, claimed_rank", [("worker", 1), ("server", 0)])
def test_a_key_rejoins_only_as_its_own_role_and_rank(job, claimed_role, claimed_rank):
    address, keys, _, schedulers = job
    schedulers.append(SchedulerThread(address, keys, incarnation=1))
    reply = raw_request(address, keys, "worker-0", Message("register", 1, "worker-0", meta=dict(
        rejoin=True, role=claimed_role, rank=claimed_rank, node="worker-x", tcp="", ipc="",
        hostname="h", netns=0, pid=1)))
    assert reply.op == "error"
    assert "the key of worker-0 cannot register as" in reply.meta["error"]
    assert schedulers[0].scheduler.nodes == {}


def test_a_rejoin_to_a_scheduler_that_was_never_restarted_is_refused(job):
    address, keys, _, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    reply = raw_request(address, keys, "worker-0", Message("register", 1, "worker-0", meta=dict(
        rejoin=True, role="worker", rank=0, node="worker-x", tcp="", ipc="", hostname="h",
        netns=0, pid=1)))
    assert reply.op == "error" and "DISTTRAIN_INCARNATION=1" in reply.meta["error"]


def test_every_heartbeat_reply_names_the_scheduler_process(job):
    address, keys, _, schedulers = job
    schedulers.append(SchedulerThread(address, keys))
    reply = raw_request(address, keys, "worker-0", Message(
        "heartbeat", 3, "worker-0", meta={"node": "worker-x", "sent": 1.0}))
    assert reply.meta["incarnation"] == schedulers[0].scheduler.incarnation_id
    schedulers[0].kill()
    schedulers.append(SchedulerThread(address, keys, incarnation=1))
    again = raw_request(address, keys, "worker-0", Message(
        "heartbeat", 3, "worker-0", meta={"node": "worker-x", "sent": 1.0}))
    assert again.meta["incarnation"] == schedulers[1].scheduler.incarnation_id \
        != reply.meta["incarnation"]


def test_heartbeats_to_a_scheduler_that_is_away_are_dropped_once_queued_not_blocking():
    """A node waits up to restart_timeout for a restart: beats queued all that time must
    not block its heartbeat thread once zmq's queue is full."""
    connection = transport.Connection(f"tcp://127.0.0.1:{free_port()}", b"beats")
    try:
        sent = [connection.send(Message("heartbeat", 0, "worker-0", meta={"node": "n"}),
                                block=False) for _ in range(1001)]
    finally:
        connection.close()
    assert sent[0] and not sent[-1]
