"""Stands in for `python -m disttrain.ps` in launcher tests: announces itself, then
waits for SIGTERM and exits 0, as the real scheduler and servers do."""

import os
import signal
import socket
import sys
import threading
import time

DEADLINE_S = 60.0  # never outlive a broken test


def answer_greetings():
    """The scheduler listens on DISTTRAIN_SCHEDULER, so a test can prove the workers
    reach it across hosts: each connection gets one line back."""
    host, port = os.environ["DISTTRAIN_SCHEDULER"].rsplit(":", 1)
    with socket.create_server((host, int(port))) as server:
        while True:
            connection, _ = server.accept()
            with connection:
                connection.sendall(f"hello from {socket.gethostname()} {host}\n".encode())


def main():
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    role, rank = os.environ["DISTTRAIN_ROLE"], os.environ.get("DISTTRAIN_RANK", "-")
    print(f"{role} {rank} up at {os.environ['DISTTRAIN_SCHEDULER']}", flush=True)
    if role == "scheduler":
        threading.Thread(target=answer_greetings, daemon=True).start()
    time.sleep(DEADLINE_S)
    print(f"{role} {rank}: nobody stopped me within {DEADLINE_S:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
