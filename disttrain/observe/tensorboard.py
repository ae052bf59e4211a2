"""TensorBoard scalars of a job (--tensorboard DIR): rank 0 writes them with tensorboardX, an
optional extra imported only when asked for, into one run directory per job (one writer per
directory: TensorBoard mixes up the events of several). Step scalars are means over
`every` steps (one add_scalar costs ~0.1 ms); the servers' throughput comes from their
metrics lines."""
import glob
import json
import os
import sys
import time

INSTALL = "pip install 'disttrain[observe]'   (or: pip install tensorboardX)"
STEP_TAGS = {"loss": "train/loss", "accuracy": "train/accuracy", "lr": "train/lr",
             "samples_per_s": "throughput/samples_per_s", "step_s": "time/step_s",
             "compute_s": "time/compute_s", "push_s": "time/push_s", "pull_s": "time/pull_s",
             "apply_s": "time/apply_s"}
SERVER_TAGS = ("messages_in", "bytes_in", "bytes_out")


def require():
    """tensorboardX's SummaryWriter, or exit saying how to install it."""
    # tensorboardX imports PyTorch whenever it is installed, only to accept its tensors: we
    # give it floats, and PyTorch in a worker cost ~4 s of start-up and slowed training
    # (bench_scaling --observe). A None entry makes that one import fail, as if absent.
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        sys.exit(f"error: --tensorboard needs the tensorboardX package: {INSTALL}")
    finally:
        if hide_torch and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def run_directory(root, program):
    """DIR/PROGRAM-DATE-TIME-PID: a new run directory for this job (rank 0's name is the one used)."""
    return os.path.join(root, f"{program}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


class Board:
    def __init__(self, run_dir, every=10, server_dir=None):
        self.writer = require()(run_dir)
        self.every, self.server_dir = max(1, every), server_dir
        self.sums, self.count, self.last_step = {}, 0, None
        self.server_offsets = {}     # server metrics file -> bytes read so far

    def step(self, record):
        for name in STEP_TAGS:
            if record.get(name) is not None:
                self.sums[name] = self.sums.get(name, 0.0) + record[name]
        self.count += 1
        self.last_step = record["step"]
        if self.count == self.every:
            self.flush(record["step"])

    def flush(self, step):
        for name, total in self.sums.items():
            self.writer.add_scalar(STEP_TAGS[name], total / self.count, step)
        self.sums, self.count = {}, 0
        self._server_lines(step)

    def scalar(self, tag, value, step):
        self.writer.add_scalar(tag, value, step)

    def _server_lines(self, step):
        """The servers' throughput since the last flush, from their metrics lines."""
        if not self.server_dir:
            return
        for path in sorted(glob.glob(os.path.join(self.server_dir, "server-*.jsonl"))):
            with open(path, "rb") as file:
                file.seek(self.server_offsets.get(path, 0))
                text = file.read()
            complete = text[:text.rfind(b"\n") + 1]
            self.server_offsets[path] = self.server_offsets.get(path, 0) + len(complete)
            lines = [json.loads(line) for line in complete.splitlines() if line.strip()]
            seconds = sum(line["interval_s"] for line in lines)
            if not lines or seconds <= 0:
                continue
            server = lines[-1]["server"]
            for name in SERVER_TAGS:
                self.writer.add_scalar(f"server{server}/{name}_per_s",
                                       sum(line[name] for line in lines) / seconds, step)
            self.writer.add_scalar(f"server{server}/busy",
                                   sum(line["busy_s"] for line in lines) / seconds, step)

    def close(self):
        if self.count:
            self.flush(self.last_step)
        elif self.last_step is not None:
            self._server_lines(self.last_step)   # the servers' last lines, written since
        self.writer.close()
