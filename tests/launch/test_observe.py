"""The launcher's side of observing: marked lines taken out of the output, the merged
timeline and the straggler report."""
import io

from disttrain.observe import channel
from launch.observe import Collector, chrome_trace, straggler_lines
from launch.output import LinePrefixer


def marked(payload):
    import json
    return channel.MARKER + json.dumps(payload).encode()


def test_marked_lines_go_to_the_collector_and_the_rest_is_printed():
    collector = Collector(timeline="unused.json")
    sink = io.BytesIO()
    relay = LinePrefixer("[worker 1] ", sink, divert=lambda line: collector.take("worker 1", line))
    relay.feed(b"loss 0.5\n" + marked({"kind": "trace", "base": 10.0, "events": [["step", 0, 5, None]]})
               + b"\n" + marked({"kind": "report", "role": "worker", "rank": 1}) + b"\ndone\n")
    assert sink.getvalue() == b"[worker 1] loss 0.5\n[worker 1] done\n"
    assert collector.traces["worker 1"] == {"base": 10.0, "events": [["step", 0, 5, None]]}
    assert collector.reports["worker 1"]["rank"] == 1


def test_tracks_are_lined_up_on_the_schedulers_clock():
    trace = chrome_trace({
        "server 0": {"base": 100.0, "events": [["update", 2000.0, 2500.0, {"clock": 0}]]},
        "worker 0": {"base": 100.5, "events": [["step", 0.0, 1000.0, None],
                                               ["last: worker 0", 10.0, None, None]]},
    })
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {0: "server 0", 1: "worker 0"}
    update = next(e for e in events if e["name"] == "update")
    step = next(e for e in events if e["name"] == "step")
    instant = next(e for e in events if e["name"] == "last: worker 0")
    assert (update["ts"], update["dur"], update["args"]) == (2000.0, 500.0, {"clock": 0})
    assert (step["pid"], step["ts"], step["dur"], step["ph"]) == (1, 500000.0, 1000.0, "X")
    assert (instant["ph"], instant["ts"]) == ("i", 500010.0)


def test_the_straggler_report_sums_the_servers_counts_and_names_the_worker_last_most_often():
    reports = {
        "worker 0": {"role": "worker", "rank": 0, "median_step_s": 0.012},
        "worker 1": {"role": "worker", "rank": 1, "median_step_s": 0.0125},
        "server 0": {"role": "server", "rank": 0, "clocks": 100, "last": {"1": 90, "0": 10}},
        "server 1": {"role": "server", "rank": 1, "clocks": 100, "last": {"1": 86, "0": 14}},
    }
    lines = straggler_lines(reports)
    assert lines[1] == "  worker 0: median step 12.0 ms, last at 12% of 100 clocks"
    assert lines[2] == "  worker 1: median step 12.5 ms, last at 88% of 100 clocks  <- straggler"
    assert straggler_lines({"server 0": reports["server 0"]}) == []   # no worker reported


def test_the_schedulers_unresponsive_reports_are_taken_once_each():
    collector = Collector()
    report = {"kind": "unresponsive", "role": "worker", "rank": 1, "why": "no heartbeat for 10.3 s"}
    assert collector.take("scheduler", marked(report))
    assert collector.take("scheduler", marked({**report, "role": "server", "rank": 0}))
    assert collector.take_unresponsive() == [("scheduler", "worker", 1, "no heartbeat for 10.3 s", None),
                                             ("scheduler", "server", 0, "no heartbeat for 10.3 s", None)]
    assert collector.take_unresponsive() == []


def test_any_other_process_may_report_the_scheduler_unresponsive():
    collector = Collector()
    assert collector.take("server 1", marked({"kind": "unresponsive", "role": "scheduler",
                                              "why": "no heartbeat reply for 10.3 s",
                                              "silent_s": 10.3}))
    assert collector.take_unresponsive() == [("server 1", "scheduler", None,
                                              "no heartbeat reply for 10.3 s", 10.3)]


def test_unresponsive_reports_from_others_or_malformed_are_dropped():
    collector = Collector()
    report = {"kind": "unresponsive", "role": "worker", "rank": 1, "why": "no heartbeat"}
    assert collector.take("worker 0", marked(report))          # only the scheduler watches it
    for bad in ({"role": "scheduler", "rank": 0}, {"role": "worker", "rank": "1"},
                {"role": "worker", "rank": True}, {"role": "worker"}):
        assert collector.take("scheduler", marked({"kind": "unresponsive", "why": "x", **bad}))
    assert collector.take_unresponsive() == []


def test_a_restarted_process_traces_onto_its_first_incarnations_track():
    collector = Collector(timeline="unused.json")
    collector.take("worker 1", marked({"kind": "trace", "base": 10.0, "events": [["step", 0, 5, None]]}))
    collector.take("worker 1", marked({"kind": "trace", "base": 12.5, "events": [["step", 1, 3, None],
                                                                                 ["mark", 2, None, None]]}))
    assert collector.traces["worker 1"] == {"base": 10.0, "events": [
        ["step", 0, 5, None], ["step", 2500001.0, 2500003.0, None], ["mark", 2500002.0, None, None]]}
