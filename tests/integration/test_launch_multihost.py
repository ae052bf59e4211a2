"""The ssh back end across three network-namespace "hosts" (10.77.0.0/24 exists only
between them), run through `--remote-cmd 'ip netns exec {host}'`: placement, addresses,
and stopping remote processes, including when the launcher itself is killed -9."""

import json
import os
import signal

import pytest

from tests.integration.conftest import (
    PYTHON, TOY_WORKER, launcher_argv, new_tag, wait_for_no_tagged, wait_for_program_pid)

pytestmark = pytest.mark.slow

NETNS_TEMPLATE = "ip netns exec {host}"


def worker_reports(stdout):
    reports, greetings = {}, {}
    for line in stdout.splitlines():
        if not line.startswith("[worker "):
            continue
        rank = int(line[len("[worker "):line.index("]")])
        body = line.split("] ", 1)[1]
        if body.startswith("{"):
            reports[rank] = json.loads(body)
        elif body.startswith("greeting: "):
            greetings[rank] = body[len("greeting: "):]
    return reports, greetings


def netns_inode(name):
    return os.stat(f"/run/netns/{name}").st_ino


def multihost_argv(hosts, tag, command, *options):
    return launcher_argv("-n", "2", "-s", "2", "-H", hosts.host_list([0, 1, 1]),
                         "--remote-cmd", NETNS_TEMPLATE, "--grace", "2", *options,
                         command=command, tag=tag)


def test_workers_run_on_their_hosts_and_reach_the_scheduler_on_the_first(namespace_hosts, launch_run):
    tag = new_tag()
    run = launch_run(multihost_argv(namespace_hosts, tag, TOY_WORKER + ["--greet-scheduler"]), tag)
    assert run.finish() == 0, run.stderr
    reports, greetings = worker_reports(run.stdout)
    scheduler_address = namespace_hosts.addresses[0]
    for rank in (0, 1):
        host_index = rank + 1  # host 0 has no worker slot
        assert reports[rank]["netns_inode"] == netns_inode(namespace_hosts.names[host_index])
        assert reports[rank]["DISTTRAIN_HOST"] == namespace_hosts.addresses[host_index]
        assert reports[rank]["DISTTRAIN_SCHEDULER"].startswith(scheduler_address + ":")
        assert greetings[rank].endswith(scheduler_address), greetings
    assert "servers 0 0; workers 0 0" in run.stderr.strip().splitlines()[-1]
    assert wait_for_no_tagged(tag) == []


def test_remote_worker_killed_with_sigkill_stops_every_host(namespace_hosts, launch_run):
    tag = new_tag()
    run = launch_run(multihost_argv(namespace_hosts, tag, TOY_WORKER + ["--sleep", "60"]), tag)
    os.kill(wait_for_program_pid(tag, "worker", 1, "toy_worker.py"), signal.SIGKILL)
    # launch.guard reports the remote signal as 128+9, as ssh would.
    assert run.finish() == 128 + signal.SIGKILL
    assert f"worker 1 exited with code 137 (SIGKILL on {namespace_hosts.names[2]})" in run.stderr
    assert wait_for_no_tagged(tag) == []


def test_sigterm_to_the_launcher_stops_every_host(namespace_hosts, launch_run):
    tag = new_tag()
    run = launch_run(multihost_argv(namespace_hosts, tag, TOY_WORKER + ["--sleep", "60"]), tag)
    wait_for_program_pid(tag, "worker", 1, "toy_worker.py")
    wait_for_program_pid(tag, "worker", 0, "toy_worker.py")
    run.popen.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM
    assert wait_for_no_tagged(tag) == []


def test_remote_processes_stop_when_the_launcher_is_killed_with_sigkill(namespace_hosts, launch_run):
    """The launcher gets no chance to clean up: only the guards' closed stdin stops the rest."""
    tag = new_tag()
    run = launch_run(multihost_argv(namespace_hosts, tag, TOY_WORKER + ["--sleep", "60"]), tag)
    for rank in (0, 1):
        wait_for_program_pid(tag, "worker", rank, "toy_worker.py")
    run.popen.kill()  # the launcher alone, not its children's groups
    run.popen.communicate(timeout=20)
    assert wait_for_no_tagged(tag, deadline_s=10.0) == []


def test_bind_pins_remote_workers_through_the_guard(namespace_hosts, launch_run):
    tag = new_tag()
    run = launch_run(multihost_argv(namespace_hosts, tag, TOY_WORKER, "--bind"), tag)
    assert run.finish() == 0, run.stderr
    reports, _ = worker_reports(run.stdout)
    first_core = sorted(os.sched_getaffinity(0))[0]
    assert [reports[rank]["affinity"] for rank in (0, 1)] == [[first_core], [first_core]]


def test_timeline_and_straggler_report_come_back_from_every_host(namespace_hosts, launch_run, tmp_path):
    """Trace events and reports travel in the processes' output, which ssh brings back."""
    from tests.integration.test_observe import MNIST, timeline_tracks
    tag = new_tag()
    timeline = tmp_path / "timeline.json"
    run = launch_run([PYTHON, "-m", "launch", "--env", f"DISTTRAIN_TEST_TAG={tag}", "-n", "2", "-s", "1",
                      "-H", namespace_hosts.host_list([0, 1, 1]), "--remote-cmd", NETNS_TEMPLATE,
                      "--timeline", str(timeline), "--", *MNIST, "--max-steps", "20",
                      "--slow-ms", "60", "--slow-rank", "0"], tag)
    assert run.finish(300) == 0, run.stderr[-3000:]
    assert sorted(timeline_tracks(timeline).values()) == ["server 0", "worker 0", "worker 1"]
    report = [line for line in run.stderr.splitlines() if line.startswith("launch:   worker")]
    assert "<- straggler" in report[0] and "<- straggler" not in report[1], report
    assert wait_for_no_tagged(tag) == []
