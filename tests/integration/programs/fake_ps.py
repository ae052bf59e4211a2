#!/usr/bin/env python3
"""Stands in for `python -m disttrain.ps` in launcher tests: a toy rendezvous over TCP,
then it waits for SIGTERM and exits 0, as the real scheduler and servers do.

The scheduler listens on DISTTRAIN_SCHEDULER; each server registers there; a worker
that connects (toy_worker.py --greet-scheduler) is answered only once every server has
registered, so a test that greets knows all of them are up, SIGTERM handler included.
"""

import os
import signal
import socket
import sys
import threading
import time

DEADLINE_S = 60.0  # never outlive a broken test


def scheduler_address():
    host, port = os.environ["DISTTRAIN_SCHEDULER"].rsplit(":", 1)
    return host, int(port)


class Registry:
    """How many servers have registered; workers wait until all of them have."""

    def __init__(self, num_servers):
        self.num_servers = num_servers
        self.registered = 0
        self.changed = threading.Condition()

    def add_server(self):
        with self.changed:
            self.registered += 1
            self.changed.notify_all()

    def wait_for_servers(self):
        with self.changed:
            return self.changed.wait_for(lambda: self.registered >= self.num_servers,
                                         timeout=DEADLINE_S)


def serve_rendezvous(num_servers):
    registry = Registry(num_servers)
    with socket.create_server(scheduler_address()) as listener:
        while True:
            connection, _ = listener.accept()
            threading.Thread(target=answer, args=(connection, registry), daemon=True).start()


def answer(connection, registry):
    with connection:
        who = connection.makefile().readline().strip()
        if who == "server":
            registry.add_server()
        elif registry.wait_for_servers():
            connection.sendall(f"hello from {socket.gethostname()} {scheduler_address()[0]}\n".encode())


def register_server():
    end = time.monotonic() + DEADLINE_S
    while True:
        try:
            with socket.create_connection(scheduler_address(), timeout=2.0) as connection:
                connection.sendall(b"server\n")
                return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def main():
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    role, rank = os.environ["DISTTRAIN_ROLE"], os.environ.get("DISTTRAIN_RANK", "-")
    # Printed before the rendezvous, so a greeted worker knows this line was written.
    print(f"{role} {rank} up at {os.environ['DISTTRAIN_SCHEDULER']}", flush=True)
    if role == "scheduler":
        num_servers = int(os.environ["DISTTRAIN_NUM_SERVERS"])
        threading.Thread(target=serve_rendezvous, args=(num_servers,), daemon=True).start()
    else:
        register_server()
    time.sleep(DEADLINE_S)
    print(f"{role} {rank}: nobody stopped me within {DEADLINE_S:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
