#!/usr/bin/env python3
"""A worker program for the launcher's restart tests: prints one JSON line (rank,
incarnation, pid, keys), may freeze itself (SIGSTOP) as a hung process would, then waits
for the test's release file ($DISTTRAIN_TEST_RELEASE, or that name with .RANK for this
rank alone) and exits 0.

--freeze-rank R: worker R, in the incarnations given by --freeze-incarnations, writes
$DISTTRAIN_TEST_FROZEN.INCARNATION (what restart_ps.py, the fake scheduler, watches for)
and stops itself.

--report-scheduler: worker R, once $DISTTRAIN_TEST_FROZEN-scheduler.R exists, tells the
launcher that the scheduler is unresponsive, silent since $DISTTRAIN_TEST_FROZEN-scheduler.0
was made (as a real process does when the scheduler's heartbeat replies stop), and prints
`reported scheduler` on stderr.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from disttrain.observe import channel  # noqa: E402

DEADLINE_S = 60.0  # never outlive a broken test


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--freeze-rank", type=int)
    parser.add_argument("--freeze-incarnations", default="0", help="comma-separated")
    parser.add_argument("--report-scheduler", action="store_true")
    parser.add_argument("--ignore-sigterm", action="store_true",
                        help="as a worker busy writing its checkpoint would: only SIGKILL ends it")
    args = parser.parse_args()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rank = int(os.environ["DISTTRAIN_RANK"])
    incarnation = int(os.environ.get("DISTTRAIN_INCARNATION", "-1"))
    keys = os.environ.get("DISTTRAIN_KEYS")
    print(json.dumps({"rank": rank, "incarnation": incarnation, "pid": os.getpid(),
                      "secrets": sorted(name for name in os.listdir(keys) if name.endswith("_secret"))
                      if keys else None}), flush=True)
    frozen = incarnation in {int(word) for word in args.freeze_incarnations.split(",")}
    if rank == args.freeze_rank and frozen:
        marker = f"{os.environ['DISTTRAIN_TEST_FROZEN']}.{incarnation}"
        with open(marker + ".part", "w") as file:
            json.dump({"role": "worker", "rank": rank}, file)
        os.rename(marker + ".part", marker)   # whole, for the scheduler that polls for it
        os.kill(os.getpid(), signal.SIGSTOP)
    release = os.environ["DISTTRAIN_TEST_RELEASE"]
    report = f"{os.environ['DISTTRAIN_TEST_FROZEN']}-scheduler.{rank}" if args.report_scheduler else None
    end = time.monotonic() + DEADLINE_S
    while not (os.path.exists(release) or os.path.exists(f"{release}.{rank}")):
        if report and os.path.exists(report):
            silent_since = os.stat(f"{os.environ['DISTTRAIN_TEST_FROZEN']}-scheduler.0").st_mtime
            channel.send("unresponsive", {"role": "scheduler", "why": "no heartbeat reply (test)",
                                          "silent_s": time.time() - silent_since})
            print("reported scheduler", file=sys.stderr, flush=True)
            report = None
        if time.monotonic() > end:
            print(f"worker {rank}: {release} did not appear within {DEADLINE_S:g} s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"worker {rank} incarnation {incarnation} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
