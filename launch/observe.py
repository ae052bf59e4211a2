"""What the launcher gathers over the observe channel (disttrain.observe.channel) from the
marked lines of every process, on any back end: trace events, merged into one Chrome
trace-event file for --timeline, and each process's end-of-run report, from which it prints
the straggler report."""

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

    def take(self, name, line):
        """True if `line` (bytes, no newline) was an observe message and is taken."""
        message = channel.parse(line)
        if message is None:
            return False
        if message["kind"] == "trace" and self.timeline:
            track = self.traces.setdefault(name, {"base": None, "events": []})
            if isinstance(message.get("base"), (int, float)) and isinstance(message.get("events"), list):
                track["base"] = message["base"]
                track["events"] += message["events"]
        elif message["kind"] == "report":
            self.reports[name] = message
        return True

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
