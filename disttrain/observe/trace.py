"""Trace events of one process for the launcher's timeline (--timeline): spans and instants
recorded on time.perf_counter(), sent in batches over the observe channel with their times
moved onto the scheduler's clock, so that the tracks of every host line up."""
import math
import time

from disttrain.observe import channel

FLUSH_S = 1.0   # a batch about every second: a crash loses at most that much of the trace


class ClockOffset:
    """How far the scheduler's clock (time.time() there) is ahead of ours, NTP-style: from
    exchanges (our send time, our receive time, the scheduler's time in between), the one
    with the shortest round trip bounds the error best (half that round trip)."""

    def __init__(self):
        self.offset = 0.0
        self.round_trip = math.inf

    def sample(self, sent, received, remote):
        round_trip = received - sent
        if 0 <= round_trip < self.round_trip:
            self.round_trip = round_trip
            self.offset = remote - (sent + received) / 2

    def __call__(self):
        return self.offset


class Tracer:
    """Collects (name, start, end, args) spans and instants; `flush()` sends them. `clock`
    gives the current offset to the scheduler's clock (a ClockOffset, refined by heartbeats)."""

    def __init__(self, clock=None):
        self.clock = clock or (lambda: 0.0)
        self.events = []
        self.origin = time.perf_counter()
        self.origin_wall = time.time()
        self.next_flush = self.origin + FLUSH_S

    def span(self, name, start, end, args=None):
        self.events.append((name, start, end, args))
        if end is not None and end >= self.next_flush:
            self.flush()

    def instant(self, name, at, args=None):
        self.events.append((name, at, None, args))

    def flush(self):
        self.next_flush = time.perf_counter() + FLUSH_S
        if not self.events:
            return
        origin = self.origin
        # [name, start, end or None, args], in us since `base`; times stay relative to
        # one origin so that nesting survives rounding, whatever the clock offset.
        batch = [[name, round((start - origin) * 1e6, 1),
                  None if end is None else round((end - origin) * 1e6, 1), args]
                 for name, start, end, args in self.events]
        self.events = []
        # base: our origin on the scheduler's clock, in seconds (the latest estimate holds).
        channel.send("trace", {"base": self.origin_wall + self.clock(), "events": batch})
