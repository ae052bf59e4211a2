"""Test helper: a parameter-server job inside the test process (scheduler, servers and
workers on threads, talking over loopback sockets), for fast tests of the real protocol."""
import os
import tempfile
import threading
from contextlib import contextmanager

from disttrain.ps import auth, client, scheduler, server
from disttrain.ps.membership import Membership
from tests.ps.cluster import free_port

TIMEOUT = 60


@contextmanager
def job(num_workers, num_servers, insecure=False, replicas=0):
    """Scheduler and servers on threads; yields connect(), which registers all workers
    at once (registration waits for everyone) and returns their (membership, store) in
    rank order. Everything is shut down on exit. Every socket speaks CURVE with the job's
    own keys, as in a launched job; connect.keys is their directory (for DISTTRAIN_KEYS).
    insecure=True: no CURVE (DISTTRAIN_INSECURE=1), for several DataParallel workers in
    one process, which cannot each find their own rank's key in one environment.
    replicas=1: the servers replicate their shards (ps/replica.py)."""
    address = f"127.0.0.1:{free_port()}"
    keys = os.path.join(tempfile.mkdtemp(prefix="disttrain-test-"), "keys")
    auth.make_key_directory(keys, num_workers, num_servers)

    def credentials(role, rank=None):
        return None if insecure else auth.load_credentials(keys, role, rank)

    sched = scheduler.Scheduler(address, num_workers, num_servers, heartbeat_timeout=30,
                                timeout=TIMEOUT, credentials=credentials("scheduler"))
    threads = [threading.Thread(target=sched.run, daemon=True)]
    threads += [threading.Thread(target=server.serve, daemon=True, kwargs=dict(
        membership=Membership("server", address, 30, TIMEOUT,
                              credentials=credentials("server", rank)),
        host="127.0.0.1", replicas=replicas))
        for rank in range(num_servers)]
    for thread in threads:
        thread.start()
    connected = []

    def connect():
        def one(rank):
            membership = Membership("worker", address, 30, TIMEOUT,
                                    credentials=credentials("worker", rank))
            book = membership.register(rank=rank)
            # All workers here share one pid, which names no one over ipc: tcp and CURVE.
            for entry in book["server"]:
                entry["ipc"] = ""
            connected.append((membership, client.KVStore(book, rank, membership, TIMEOUT)))
        run_workers(num_workers, one)
        return sorted(connected, key=lambda pair: pair[0].rank)

    connect.address = address   # for a worker that registers by itself (DataParallel)
    connect.keys = keys
    try:
        yield connect
    finally:
        for membership, store in connected:
            try:
                membership.goodbye()
            finally:
                store.close()
                membership.close()
        for thread in threads:
            thread.join(timeout=TIMEOUT)   # a loaded CI machine can be slow to wind down
        auth.remove_key_directory(keys)
        os.rmdir(os.path.dirname(keys))
        assert not any(t.is_alive() for t in threads), "scheduler or server did not stop"


def run_workers(num_workers, body):
    """Run body(rank) on one thread per worker; re-raise the first failure."""
    errors = []

    def guarded(rank):
        try:
            body(rank)
        except BaseException as error:  # noqa: BLE001 - reported to the test below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(r,)) for r in range(num_workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    if errors:
        raise errors[0]
