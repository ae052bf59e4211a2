"""A worker program for launcher tests: prints its contract environment as one JSON
line, then behaves as told: exit 0, raise on one rank, or sleep."""

import argparse
import json
import os
import signal
import socket
import sys
import time

CONTRACT = ("DISTTRAIN_ROLE", "DISTTRAIN_SCHEDULER", "DISTTRAIN_NUM_WORKERS",
            "DISTTRAIN_NUM_SERVERS", "DISTTRAIN_DEVICE", "DISTTRAIN_RANK", "DISTTRAIN_HOST",
            "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONUNBUFFERED")


def greet(address, deadline_s=10.0):
    """One line from the scheduler; retried because it may not listen yet."""
    host, port = address.rsplit(":", 1)
    end = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0) as connection:
                connection.settimeout(deadline_s)  # the scheduler answers once all servers are up
                connection.sendall(b"worker\n")
                return connection.makefile().readline().strip()
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--raise-on-rank", type=int, help="this rank raises RuntimeError")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep before exiting")
    parser.add_argument("--stderr-line", default="", help="also print this to stderr")
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--ignore-sigterm", action="store_true", help="make the launcher use SIGKILL")
    parser.add_argument("--greet-scheduler", action="store_true",
                        help="connect to DISTTRAIN_SCHEDULER (fake_ps answers) and print the reply")
    args = parser.parse_args()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rank = int(os.environ.get("DISTTRAIN_RANK", "0"))
    env = {name: os.environ.get(name) for name in CONTRACT}
    env["affinity"] = sorted(os.sched_getaffinity(0))
    env["pid"] = os.getpid()
    env["netns_inode"] = os.stat("/proc/self/ns/net").st_ino
    keys = os.environ.get("DISTTRAIN_KEYS")
    if keys:
        env["keys"] = {"directory": keys, "mode": f"{os.stat(keys).st_mode & 0o777:o}",
                       "files": sorted(os.listdir(keys))}
    print(json.dumps(env), flush=True)
    if args.greet_scheduler:
        print("greeting:", greet(os.environ["DISTTRAIN_SCHEDULER"]), flush=True)
    if args.stderr_line:
        print(args.stderr_line, file=sys.stderr, flush=True)
    if args.raise_on_rank == rank:
        raise RuntimeError(f"worker {rank} fails on purpose")
    time.sleep(args.sleep)
    print(f"worker {rank} done", flush=True)
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
