"""`python -m disttrain.ps` whose server stalls in the middle of writing its shard of the
checkpoint of step $DISTTRAIN_TEST_STALL_AT: its bytes are in the temporary file, not yet
fsynced nor renamed (it touches $DISTTRAIN_TEST_MARKER first), so that the test can kill
every process with SIGKILL there."""
import os
import sys
import time
from pathlib import Path

from disttrain import checkpoint
from disttrain.ps import __main__ as ps_main
from disttrain.ps import snapshot

STALL_AT = int(os.environ["DISTTRAIN_TEST_STALL_AT"])
MARKER = os.environ["DISTTRAIN_TEST_MARKER"]
_write_shard, _fsync = snapshot.write_shard, os.fsync
writing = {"step": None}


def write_shard(server, directory, step):
    writing["step"] = step
    return _write_shard(server, directory, step)


def fsync(descriptor):
    if writing["step"] == STALL_AT:
        Path(MARKER).write_text("stalled\n")
        time.sleep(120)
        sys.exit(3)
    _fsync(descriptor)


snapshot.write_shard = write_shard
checkpoint.os = type(os)("os_with_stalling_fsync")
checkpoint.os.__dict__.update(os.__dict__)
checkpoint.os.fsync = fsync
if __name__ == "__main__":
    sys.exit(ps_main.main())
