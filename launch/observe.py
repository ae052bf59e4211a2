"""What the launcher gathers over the observe channel (disttrain.observe.channel) from the
marked lines of every process, on any back end: trace events, merged into one Chrome
trace-event file for --timeline, each process's end-of-run report, from which it prints
the straggler report, and word that a process stopped answering (the scheduler's about a
worker or server, any other's about the scheduler), which launch.lifecycle acts on with
--max-restarts."""

import json

from disttrain.observe import channel


def straggler_share(workers):
    """Being last at more than this share of the clocks names a worker the straggler:
    halfway between its fair share (1/N) and every clock."""
    return (1 + 1 / workers) / 2


class Collector:
    def __init__(self, timeline=None):
        self.timeline = timeline
        self.traces = {}     # process name -> {"base": seconds, "events": [...]}
        self.reports = {}    # process name -> its report
        self.unresponsive = []   # (reporter, role, rank, why, silent_s) not yet taken
        self.left = set()        # names of workers that left an elastic job gracefully

    def take(self, name, line):
        """True if `line` (bytes, no newline) was an observe message and is taken."""
        message = channel.parse(line)
        if message is None:
            return False
        if message["kind"] == "trace" and self.timeline:
            track = self.traces.setdefault(name, {"base": None, "events": []})
            if isinstance(message.get("base"), (int, float)) and isinstance(message.get("events"), list):
                events = message["events"]
                if track["base"] is None:
                    track["base"] = message["base"]
                elif message["base"] != track["base"]:
                    # A restarted process traces from a base of its own: keep the track's.
                    shift = (message["base"] - track["base"]) * 1e6
                    events = [shifted(event, shift) for event in events]
                track["events"] += events
        elif message["kind"] == "report":
            self.reports[name] = message
        elif message["kind"] == "left" and name.startswith("worker"):
            self.left.add(name)
        elif message["kind"] == "unresponsive":
            # Each node is watched by whom it heartbeats with: workers and servers by the
            # scheduler, the scheduler by them (its replies stop). Other reports are dropped.
            role, rank, why = message.get("role"), message.get("rank"), message.get("why")
            why = why if isinstance(why, str) else "unresponsive"
            silent_s = message.get("silent_s")
            silent_s = silent_s if type(silent_s) in (int, float) else None
            if name == "scheduler" and role in ("worker", "server") and type(rank) is int:
                self.unresponsive.append((name, role, rank, why, silent_s))
            elif name != "scheduler" and role == "scheduler":
                self.unresponsive.append((name, "scheduler", None, why, silent_s))
        return True

    def take_unresponsive(self):
        """(reporter, role, rank, why, silent_s) for each process reported unresponsive
        since the last call; rank None for the scheduler; silent_s (how long it had been
        silent, optional) None when not given."""
        taken, self.unresponsive = self.unresponsive, []
        return taken

    def write_timeline(self, names):
        """Write the timeline (tracks in the order of `names`); its path, or None."""
        if not self.timeline:
            return None
        with open(self.timeline, "w") as file:
            json.dump(chrome_trace({name: self.traces[name] for name in names
                                    if name in self.traces}), file, separators=(",", ":"))
        return self.timeline

    def straggler_report(self):
        return straggler_lines(self.reports)


def shifted(event, shift_us):
    """A trace event [label, start, end, args] moved later by `shift_us`; a malformed one as is."""
    try:
        label, start, end, args = event
        return [label, start + shift_us, None if end is None else end + shift_us, args]
    except (TypeError, ValueError):
        return event


def chrome_trace(tracks):
    """Chrome trace-event JSON (Perfetto, chrome://tracing): one process track per name, its
    spans as complete ("X") events and instants ("i"), in us since the first one."""
    origin = min((track["base"] for track in tracks.values()), default=0.0)
    events = []
    for pid, (name, track) in enumerate(tracks.items()):
        events += [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}},
                   {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                    "args": {"sort_index": pid}}]
        shift = (track["base"] - origin) * 1e6
        for label, start, end, args in track["events"]:
            event = {"name": label, "pid": pid, "tid": 0, "ts": round(start + shift, 1)}
            if end is None:
                event.update(ph="i", s="p")
            else:
                event.update(ph="X", dur=round(end - start, 1))
            if args:
                event["args"] = args
            events.append(event)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"clock": "the scheduler's, in us since the first process started tracing"}}


def straggler_lines(reports):
    """Each worker's median step and the share of clocks at which it pushed last (summed
    over the servers' reports)."""
    workers = sorted((message for message in reports.values() if message.get("role") == "worker"),
                     key=lambda message: message.get("rank", 0))
    if not workers:
        return []
    clocks, last, servers = 0, {}, 0
    for message in reports.values():
        if message.get("role") == "server":
            servers += 1
            clocks += message.get("clocks", 0)
            for rank, count in message.get("last", {}).items():
                last[int(rank)] = last.get(int(rank), 0) + count
    lines = ["step time and stragglers (median step; share of clocks at which the worker's "
             "push reached the servers last):"]
    for message in workers:
        rank = message.get("rank")
        line = f"  worker {rank}: median step {1e3 * message.get('median_step_s', 0):.1f} ms"
        if clocks and len(workers) > 1:
            share = last.get(rank, 0) / clocks
            line += f", last at {100 * share:.0f}% of {clocks // servers} clocks"
            if share > straggler_share(len(workers)):
                line += "  <- straggler"
        lines.append(line)
    return lines
