#!/usr/bin/env python3
"""fake_ps.py for the launcher's restart tests, whose scheduler also plays the heartbeat
watcher: for each $DISTTRAIN_TEST_FROZEN.K file that restart_worker.py writes before it
freezes, it sends the launcher one `unresponsive` message over the observe channel, as
the real scheduler does for a silent node, then prints `reported ROLE RANK` on stderr."""

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


def report_frozen(pattern):
    reported = set()
    end = time.monotonic() + fake_ps.DEADLINE_S
    while time.monotonic() < end:
        for path in sorted(set(glob.glob(pattern)) - reported):
            if path.endswith(".part"):
                continue
            reported.add(path)
            with open(path) as file:
                node = json.load(file)
            channel.send("unresponsive", {**node, "why": "no heartbeat for 1.5 s (test)"})
            print(f"reported {node['role']} {node['rank']}", file=sys.stderr, flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    if os.environ["DISTTRAIN_ROLE"] == "scheduler" and os.environ.get("DISTTRAIN_TEST_FROZEN"):
        threading.Thread(target=report_frozen, args=(os.environ["DISTTRAIN_TEST_FROZEN"] + ".*",),
                         daemon=True).start()
    sys.exit(fake_ps.main())
