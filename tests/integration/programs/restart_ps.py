#!/usr/bin/env python3
"""fake_ps.py for the launcher's restart tests, whose scheduler also plays the heartbeat
watcher: for each $DISTTRAIN_TEST_FROZEN.K file that restart_worker.py writes before it
freezes, it sends the launcher one `unresponsive` message over the observe channel, as
the real scheduler does for a node silent for longer than DISTTRAIN_HEARTBEAT_TIMEOUT
(counted from the file's mtime), then prints `reported ROLE RANK` on stderr. A file
that says "at_once": true is reported at once and without silent_s (a report that comes
late, about a process that was replaced meanwhile)."""

import glob
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import fake_ps  # noqa: E402
from disttrain.observe import channel  # noqa: E402


def report_frozen(pattern, heartbeat_timeout):
    reported = set()
    end = time.monotonic() + fake_ps.DEADLINE_S
    while time.monotonic() < end:
        for path in sorted(set(glob.glob(pattern)) - reported):
            if path.endswith(".part"):
                continue
            with open(path) as file:
                node = json.load(file)
            silent_s = time.time() - os.stat(path).st_mtime
            report = {"role": node["role"], "rank": node["rank"], "why": "no heartbeat (test)"}
            if not node.get("at_once"):
                if silent_s <= heartbeat_timeout:
                    continue
                report["silent_s"] = silent_s
            reported.add(path)
            channel.send("unresponsive", report)
            print(f"reported {node['role']} {node['rank']}", file=sys.stderr, flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    if os.environ["DISTTRAIN_ROLE"] == "scheduler" and os.environ.get("DISTTRAIN_TEST_FROZEN"):
        threading.Thread(target=report_frozen, daemon=True, args=(
            os.environ["DISTTRAIN_TEST_FROZEN"] + ".*",
            float(os.environ.get("DISTTRAIN_HEARTBEAT_TIMEOUT", "10")))).start()
    sys.exit(fake_ps.main())
