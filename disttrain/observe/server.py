"""What a server tells about itself: which worker was last to push at each clock (the
end-of-run report, for the launcher's straggler report), a line a second in
DIR/server-S.jsonl (messages and bytes in and out, busy and update time per key group, queue
depth, the clocks completed), and one trace span per request for --timeline.

serve() calls `handled()` after each message and `idle()` when none came; the server's state
machine knows nothing of this."""
import time
from collections import Counter

from disttrain.observe import channel, jsonl
from disttrain.observe.trace import Tracer
from disttrain.ps import elastic

WINDOW_S = 1.0
MAX_DIR_CHARS = 4096


def group_name(keys):
    """A request's key group as one label: its first key, and how many more it carries."""
    return keys[0] if len(keys) == 1 else f"{keys[0]} +{len(keys) - 1}"


def payload_bytes(message):
    return sum(payload.array.nbytes for payload in message.payloads)


class ServerObserver:
    """observe: what the launcher asked for (config.Config.observe: "report", "trace");
    metrics_dir: where to write the metrics lines from the start (else from rank 0's init)."""

    def __init__(self, rank, state, clock=None, observe=frozenset(), metrics_dir=None):
        self.rank, self.state = rank, state
        self.report = "report" in observe
        self.tracer = Tracer(clock) if "trace" in observe else None
        self.file = None
        self.arrivals = {}           # clock -> {worker rank: key chunks pushed so far}
        self.arrived = {}            # clock -> {worker rank: when its last chunk came}
        self.last_counts = Counter()   # worker rank -> clocks at which it came last
        self.clocks = 0
        self._new_window(time.perf_counter())
        if metrics_dir:
            self._open(metrics_dir)

    # --- hooks called by serve() ----------------------------------------------------------
    def handled(self, message, replies, started):
        now = time.perf_counter()
        op = message.op
        if op == "init" and self.file is None:
            settings = message.meta.get("observe")
            directory = settings.get("metrics_dir") if isinstance(settings, dict) else None
            if isinstance(directory, str) and 0 < len(directory) <= MAX_DIR_CHARS:
                self._open(directory)
        refused = any(reply.op == "error" and reply.id == message.id for _, reply in replies)
        pushed = op in ("push", "pushpull") and not refused
        if pushed and (self.report or self.file or self.tracer):
            self._arrival(message, now)
        if self.file is not None:
            self.messages_in += 1
            self.bytes_in += payload_bytes(message)
            self.messages_out += len(replies)
            self.bytes_out += sum(payload_bytes(reply) for _, reply in replies)
            self.busy += now - started
            if pushed:
                group = group_name(message.keys)
                self.update_s[group] = self.update_s.get(group, 0.0) + (now - started)
            self.queue_depth = max(self.queue_depth, len(self.state.waiting_pulls))
            if now >= self.window_end:
                self._write_window(now)
        if self.tracer is not None:
            name = "update" if pushed else op
            self.tracer.span(name, started, now, {"worker": message.meta.get("rank"),
                                                  "clock": message.meta.get("clock")})

    def idle(self):
        """No request for a while (serve() waits 100 ms at a time): write what the window
        holds, so that the lines keep up with a job that pauses or ends."""
        if self.file is not None and self.messages_in:
            self._write_window(time.perf_counter())

    def close(self):
        if self.file is not None:
            if self.messages_in:
                self._write_window(time.perf_counter())
            self.file.close()
            self.file = None
        if self.tracer is not None:
            self.tracer.flush()
        if self.report and self.clocks:
            channel.send("report", {"role": "server", "rank": self.rank, "clocks": self.clocks,
                                    "last": {str(rank): count for rank, count in self.last_counts.items()}})

    # --- which worker came last ---------------------------------------------------------
    def _arrival(self, message, now):
        """A worker has arrived at a clock once every key chunk of this server came from it
        (each worker pushes each chunk once a clock, if only to say "no gradient")."""
        clock, rank = message.meta.get("clock"), message.meta.get("rank")
        counts = self.arrivals.setdefault(clock, {})
        counts[rank] = counts.get(rank, 0) + len(message.keys)
        if counts[rank] < len(self.state.keys):
            return
        times = self.arrived.setdefault(clock, {})
        times[rank] = now
        if len(times) < (elastic.expected(self.state, clock) if type(clock) is int
                         else self.state.num_workers):   # elastic: the workers at that clock
            return
        del self.arrivals[clock], self.arrived[clock]
        order = sorted(times, key=times.get)
        last = order[-1]
        # How long the others waited for it: behind the one before it.
        behind = times[last] - times[order[-2]] if len(order) > 1 else 0.0
        self.clocks += 1
        self.last_counts[last] += 1
        if self.file is not None:
            self.completed.append([clock, last, round(behind, 6)])
        if self.tracer is not None:
            self.tracer.instant(f"last: worker {last}", now, {"clock": clock,
                                                              "behind_ms": round(behind * 1e3, 3)})

    # --- the metrics file ---------------------------------------------------------------
    def _open(self, directory):
        self.file = jsonl.JsonLines(jsonl.server_path(directory, self.rank))
        self._new_window(time.perf_counter())

    def _new_window(self, now):
        self.window_start, self.window_end = now, now + WINDOW_S
        self.messages_in = self.messages_out = self.bytes_in = self.bytes_out = 0
        self.busy, self.queue_depth = 0.0, 0
        self.update_s, self.completed = {}, []

    def _write_window(self, now):
        self.file.write({
            "time": round(time.time(), 3), "server": self.rank,
            "interval_s": round(now - self.window_start, 4),
            "messages_in": self.messages_in, "messages_out": self.messages_out,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "busy_s": round(self.busy, 6),
            "update_s": {group: round(seconds, 6) for group, seconds in self.update_s.items()},
            "queue_depth": self.queue_depth,
            # [clock, the worker that came last, seconds behind the one before it]
            "last_at_clock": self.completed})
        self._new_window(now)
