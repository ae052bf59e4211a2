"""workers/mnist.py that stops moving once it has written the checkpoint of step
$DISTTRAIN_TEST_PAUSE_AT (it touches $DISTTRAIN_TEST_MARKER.RANK): the test then kills
every process of the job with SIGKILL, as a crash would."""
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "workers"))

import mnist  # noqa: E402
from disttrain import checkpoint_dist  # noqa: E402

PAUSE_AT = int(os.environ["DISTTRAIN_TEST_PAUSE_AT"])
MARKER = os.environ["DISTTRAIN_TEST_MARKER"]
_write = checkpoint_dist.Checkpoints.write


def write(self, step, *args, **kwargs):
    _write(self, step, *args, **kwargs)
    if step == PAUSE_AT:
        Path(f"{MARKER}.{self.trainer.rank}").write_text("written\n")
        time.sleep(120)   # the test kills us long before; a forgotten process still ends
        sys.exit(3)


checkpoint_dist.Checkpoints.write = write
sys.exit(mnist.main())
