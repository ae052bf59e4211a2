"""The launcher on one machine: environment, prefixed output, and the lifecycle
(success, a failing worker, kill -9, SIGTERM/Ctrl-C to the launcher), leaving no process."""

import json
import os
import signal

import pytest

from tests.integration.conftest import (
    PYTHON, TOY_WORKER, environ_of, launcher_argv, new_tag, tagged_pids, wait_for_no_tagged,
    wait_for_program_pid, wait_for_tagged)
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def worker_reports(stdout):
    """rank -> the JSON line each toy worker printed (through its prefix)."""
    reports = {}
    for line in stdout.splitlines():
        if line.startswith("[worker ") and "] {" in line:
            report = json.loads(line.split("] ", 1)[1])
            reports[int(report["DISTTRAIN_RANK"])] = report
    return reports


def test_successful_workers_end_the_job_with_exit_0_and_the_servers_stopped(launch_run):
    tag = new_tag()
    run = launch_run(launcher_argv("-n", "3", "-s", "2", "--env", "EXTRA=x=y",
                                   command=TOY_WORKER + ["--stderr-line", "to stderr", "--greet-scheduler"],
                                   tag=tag), tag)
    assert run.finish() == 0, run.stderr
    reports = worker_reports(run.stdout)
    assert sorted(reports) == [0, 1, 2]
    scheduler = reports[0]["DISTTRAIN_SCHEDULER"]
    for rank, report in reports.items():
        assert report["DISTTRAIN_ROLE"] == "worker"
        assert report["DISTTRAIN_SCHEDULER"] == scheduler
        assert (report["DISTTRAIN_NUM_WORKERS"], report["DISTTRAIN_NUM_SERVERS"]) == ("3", "2")
        assert report["DISTTRAIN_DEVICE"] == "cpu"
        assert report["DISTTRAIN_HOST"] == "127.0.0.1"
        assert report["PYTHONUNBUFFERED"] == "1"
    for role in ("[scheduler] scheduler - up", "[server 0] server 0 up", "[server 1] server 1 up"):
        assert role in run.stdout
    assert run.stderr.count("to stderr") == 3 and "[worker 2] to stderr" in run.stderr
    assert "to stderr" not in run.stdout
    summary = run.stderr.strip().splitlines()[-1]
    assert summary.startswith("launch: finished in ") and "exit 0" in summary
    assert "scheduler 0; servers 0 0; workers 0 0 0" in summary
    assert wait_for_no_tagged(tag) == []


def test_workers_get_one_blas_thread_unless_the_user_set_one(launch_run):
    tag = new_tag()
    run = launch_run(launcher_argv("-n", "1", "--env", "MKL_NUM_THREADS=4",
                                   command=TOY_WORKER, tag=tag), tag, env={"OMP_NUM_THREADS": "2"})
    assert run.finish() == 0, run.stderr
    report = worker_reports(run.stdout)[0]
    assert (report["OMP_NUM_THREADS"], report["OPENBLAS_NUM_THREADS"],
            report["MKL_NUM_THREADS"]) == ("2", "1", "4")


def test_worker_that_raises_is_named_and_its_exit_code_returned(launch_run):
    tag = new_tag()
    run = launch_run(launcher_argv("-n", "2", command=TOY_WORKER + ["--raise-on-rank", "1",
                                                                    "--sleep", "60"], tag=tag), tag)
    assert run.finish() == 1
    assert "launch: worker 1 exited with code 1\n" in run.stderr
    assert "[worker 1] RuntimeError: worker 1 fails on purpose" in run.stderr
    assert "exit 1;" in run.stderr.strip().splitlines()[-1]
    assert wait_for_no_tagged(tag) == []


def test_worker_killed_with_sigkill_stops_everyone_with_code_137(launch_run):
    tag = new_tag()
    run = launch_run(launcher_argv("-n", "2", "-s", "2", command=TOY_WORKER + ["--sleep", "60"],
                                   tag=tag), tag)
    os.kill(wait_for_program_pid(tag, "worker", 1, "toy_worker.py"), signal.SIGKILL)
    assert run.finish() == 128 + signal.SIGKILL
    assert "launch: worker 1 exited with code -9 (SIGKILL)" in run.stderr
    assert wait_for_no_tagged(tag) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_launcher_stops_every_process(launch_run, signum):
    tag = new_tag()
    run = launch_run(launcher_argv("-n", "2", command=TOY_WORKER + ["--sleep", "60"], tag=tag), tag)
    wait_for_tagged(tag, 2, "worker")
    wait_for_tagged(tag, 1, "server")
    run.popen.send_signal(signum)
    assert run.finish() == 128 + signum
    assert f"launch: got {signal.Signals(signum).name}, stopping every process" in run.stderr
    assert wait_for_no_tagged(tag) == []


def ignores_sigterm(pid, deadline_s=10.0):
    """Whether `pid` has set SIGTERM to ignored (its SigIgn mask in /proc) within the deadline."""
    def ignored():
        with open(f"/proc/{pid}/status") as status:
            mask = next(line for line in status if line.startswith("SigIgn:")).split()[1]
        return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))
    return wait_until(ignored, deadline_s)


def test_worker_ignoring_sigterm_is_killed_after_the_grace_period(launch_run):
    tag = new_tag()
    run = launch_run(launcher_argv("-n", "2", "--grace", "1", command=TOY_WORKER + [
        "--sleep", "60", "--ignore-sigterm"], tag=tag), tag)
    assert ignores_sigterm(wait_for_program_pid(tag, "worker", 1, "toy_worker.py"))
    os.kill(wait_for_program_pid(tag, "worker", 0, "toy_worker.py"), signal.SIGKILL)
    assert run.finish() == 128 + signal.SIGKILL
    assert "launch: worker 1 did not stop within 1 s; killing it" in run.stderr
    assert "workers SIGKILL SIGKILL" in run.stderr.strip().splitlines()[-1]
    assert wait_for_no_tagged(tag) == []


def test_log_dir_gets_one_unprefixed_file_per_process(launch_run, tmp_path):
    tag = new_tag()
    run = launch_run(launcher_argv("-n", "2", "--log-dir", str(tmp_path), command=TOY_WORKER + [
        "--stderr-line", "err line"], tag=tag), tag)
    assert run.finish() == 0, run.stderr
    assert sorted(os.listdir(tmp_path)) == ["scheduler.log", "server-0.log", "worker-0.log",
                                            "worker-1.log"]
    lines = (tmp_path / "worker-1.log").read_text().splitlines()
    assert json.loads(lines[0])["DISTTRAIN_RANK"] == "1"
    assert "err line" in lines and "worker 1 done" in lines


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--bind needs two cores to show")
def test_bind_pins_each_worker_to_its_own_core(launch_run):
    tag = new_tag()
    run = launch_run(launcher_argv("-n", "2", "--bind", command=TOY_WORKER, tag=tag), tag)
    assert run.finish() == 0, run.stderr
    reports = worker_reports(run.stdout)
    cores = sorted(os.sched_getaffinity(0))
    assert [reports[rank]["affinity"] for rank in (0, 1)] == [[cores[0]], [cores[1]]]


def test_bind_runs_the_server_real_time_or_it_says_why_not(launch_run):
    tag = new_tag()
    # The real server (it sets its priority before registering); the toy worker never
    # registers, so the server waits until the launcher stops it after the worker's exit.
    run = launch_run(launcher_argv("-n", "1", "--bind", command=TOY_WORKER + ["--sleep", "3"],
                                   tag=tag, ps_command=f"{PYTHON} -m disttrain.ps"), tag)
    server = wait_for_program_pid(tag, "server", 0, "disttrain.ps")
    # Set right after start-up; a refusal is reported instead.
    realtime = wait_until(lambda: os.sched_getscheduler(server) == os.SCHED_FIFO, 5)
    assert run.finish() == 0, run.stderr
    refused = "[server 0] disttrain: server 0 keeps normal priority (SCHED_FIFO refused"
    assert realtime or refused in run.stderr, run.stderr


def test_missing_worker_program_fails_with_127_and_names_it(launch_run):
    tag = new_tag()
    run = launch_run(launcher_argv("-n", "1", command=["/nonexistent/program"], tag=tag), tag)
    assert run.finish() == 127
    assert "launch: cannot start worker 0 (/nonexistent/program)" in run.stderr
    assert wait_for_no_tagged(tag) == []



def test_second_ctrl_c_kills_without_waiting_for_the_grace_period(launch_run):
    tag = new_tag()
    run = launch_run(launcher_argv("-n", "1", "--grace", "60", command=TOY_WORKER + [
        "--sleep", "60", "--ignore-sigterm"], tag=tag), tag)
    assert ignores_sigterm(wait_for_program_pid(tag, "worker", 0, "toy_worker.py"))
    run.popen.send_signal(signal.SIGINT)
    # The first one has been handled once the launcher stopped the (fake) scheduler, which
    # exits on SIGTERM; the worker ignores its SIGTERM and keeps running.
    wait_until(lambda: not [pid for pid in tagged_pids(tag)
                            if environ_of(pid).get("DISTTRAIN_ROLE") == "scheduler"], 10,
               "the launcher to stop the scheduler after the first SIGINT")
    run.popen.send_signal(signal.SIGINT)
    assert run.finish() == 128 + signal.SIGINT  # well before the 60 s grace period
    assert "launch: second signal: killing every process now" in run.stderr
    assert wait_for_no_tagged(tag) == []
