"""Stands in for `python -m disttrain.ps` in launcher tests: announces itself, then
waits for SIGTERM and exits 0, as the real scheduler and servers do."""

import os
import signal
import sys
import time

DEADLINE_S = 60.0  # never outlive a broken test


def main():
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    role, rank = os.environ["DISTTRAIN_ROLE"], os.environ.get("DISTTRAIN_RANK", "-")
    print(f"{role} {rank} up at {os.environ['DISTTRAIN_SCHEDULER']}", flush=True)
    time.sleep(DEADLINE_S)
    print(f"{role} {rank}: nobody stopped me within {DEADLINE_S:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
