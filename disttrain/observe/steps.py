"""Where a worker's training step goes. DataParallel marks the phases; the harness writes
`StepTimer.last` to the metrics file and the report reaches the launcher at the end.

The phases of a step, measured from the end of the previous one (their sum is the step):
  compute  the program's work between two steps (data, forward, backward), less the sends
  push     sending gradients (from backward's hooks, or in step())
  pull     waiting for the replies that carry the next weights: the servers' update and, in
           sync mode, the slowest worker's push (a pushpull's acknowledgement is its reply)
  apply    writing received weights into the parameters (the optimizer step when local)
"""
import statistics
import time
from array import array

from disttrain.observe import channel

PHASES = ("compute", "push", "pull", "apply")


class StepTimer:
    def __init__(self, rank=0, tracer=None, traffic=None, report=False):
        """tracer: a trace.Tracer for --timeline; traffic: has bytes_sent / bytes_received
        (a ps.client.KVStore); report: send the end-of-run report when closed."""
        self.rank, self.tracer, self.traffic, self.report = rank, tracer, traffic, report
        self.started = time.perf_counter()     # the end of the previous step
        self.entered = None                    # when step() was called
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.communicated = 0.0                # push/pull/apply time before step() began
        self.durations = array("d")            # every step's seconds, for the median
        self.last = None                       # {"compute_s": ..., "step_s": ...} of the last step
        self._bytes = (0, 0)

    def restart(self):
        """Count the next step from now (what the program did before is not a step)."""
        self.started, self.entered = time.perf_counter(), None
        self.totals = dict.fromkeys(PHASES, 0.0)

    def add(self, phase, start, end):
        self.totals[phase] += end - start
        if self.tracer is not None:
            self.tracer.span(phase, start, end)

    def wait_for(self, handles):
        """Wait for the handles (ps.client.Handle) one by one; returns when done."""
        start = time.perf_counter()
        for handle in handles:
            handle.wait()
        end = time.perf_counter()
        self.waited(start, end, handles)
        return end

    def waited(self, start, end, handles):
        """Time blocked on replies: what their callbacks spent writing weights is apply."""
        applied = 0.0
        for handle in handles:
            for begin, finish in handle.applied:
                applied += finish - begin
                if self.tracer is not None:
                    self.tracer.span("apply", begin, finish)
        self.totals["apply"] += applied
        self.totals["pull"] += end - start - applied
        if self.tracer is not None:
            self.tracer.span("pull wait", start, end)

    def step_entered(self):
        self.entered = time.perf_counter()
        self.communicated = sum(self.totals.values())

    def step_done(self):
        now = time.perf_counter()
        entered = self.entered if self.entered is not None else now
        totals = self.totals
        totals["compute"] = max(0.0, entered - self.started - self.communicated)
        split = {f"{phase}_s": totals[phase] for phase in PHASES}
        split["step_s"] = now - self.started
        if self.traffic is not None:
            sent, received = self.traffic.bytes_sent, self.traffic.bytes_received
            split["bytes_sent"], split["bytes_received"] = sent - self._bytes[0], received - self._bytes[1]
            self._bytes = (sent, received)
        if self.tracer is not None:
            self.tracer.span("compute", self.started, entered)
            self.tracer.span("step", self.started, now)
        self.durations.append(split["step_s"])
        self.last = split
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.started, self.entered = now, None

    def close(self):
        """Send the end-of-run report (and the rest of the trace) to the launcher."""
        if self.tracer is not None:
            self.tracer.flush()
        if self.report and self.durations:
            channel.send("report", {"role": "worker", "rank": self.rank, "steps": len(self.durations),
                                    "median_step_s": statistics.median(self.durations)})
