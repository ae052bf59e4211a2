"""A worker program for launcher tests: prints its contract environment as one JSON
line, then behaves as told: exit 0, raise on one rank, or sleep."""

import argparse
import json
import os
import sys
import time

CONTRACT = ("DISTTRAIN_ROLE", "DISTTRAIN_SCHEDULER", "DISTTRAIN_NUM_WORKERS",
            "DISTTRAIN_NUM_SERVERS", "DISTTRAIN_DEVICE", "DISTTRAIN_RANK", "DISTTRAIN_HOST",
            "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONUNBUFFERED")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--raise-on-rank", type=int, help="this rank raises RuntimeError")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep before exiting")
    parser.add_argument("--stderr-line", default="", help="also print this to stderr")
    parser.add_argument("--exit-code", type=int, default=0)
    args = parser.parse_args()
    rank = int(os.environ.get("DISTTRAIN_RANK", "0"))
    env = {name: os.environ.get(name) for name in CONTRACT}
    env["affinity"] = sorted(os.sched_getaffinity(0))
    env["pid"] = os.getpid()
    print(json.dumps(env), flush=True)
    if args.stderr_line:
        print(args.stderr_line, file=sys.stderr, flush=True)
    if args.raise_on_rank == rank:
        raise RuntimeError(f"worker {rank} fails on purpose")
    time.sleep(args.sleep)
    print(f"worker {rank} done", flush=True)
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
