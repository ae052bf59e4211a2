"""The launcher's --max-restarts: a process killed with SIGKILL, or reported unresponsive
by the scheduler, is started again with the same role and rank and the next
DISTTRAIN_INCARNATION, on the local, ssh and Slurm back ends, until the job-wide budget is
spent; then the job ends as without restarts. Fake programs stand in for the job."""

import json
import os
import re
import signal
import subprocess

import pytest

from launch.lifecycle import KILL_LINE
from tests.integration.conftest import (
    PROGRAMS, PYTHON, ROOT, TAG_VARIABLE, environ_of, launcher_argv, new_tag, tagged_pids,
    wait_for_no_tagged)
from tests.integration.test_launch_slurm import salloc, slurm_env  # noqa: F401 (a fixture)
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

RESTART_PS = f"{PYTHON} {os.path.join(PROGRAMS, 'restart_ps.py')}"
RESTART_WORKER = [PYTHON, os.path.join(PROGRAMS, "restart_worker.py")]
NETNS_TEMPLATE = "ip netns exec {host}"


class Files:
    """The test's side of the fake programs: the file that lets the workers finish, the
    prefix of the frozen markers, the --log-dir."""

    def __init__(self, tmp_path):
        self.release = tmp_path / "release"
        self.frozen = tmp_path / "frozen"
        self.logs = tmp_path / "logs"

    def options(self):
        return ["--env", f"DISTTRAIN_TEST_RELEASE={self.release}",
                "--env", f"DISTTRAIN_TEST_FROZEN={self.frozen}", "--log-dir", str(self.logs)]

    def log(self, name):
        path = self.logs / (name.replace(" ", "-") + ".log")
        return path.read_text() if path.exists() else ""


def restart_argv(files, tag, *options, worker_options=(), heartbeat_timeout="1"):
    """The fake processes report a frozen one after `heartbeat_timeout` s of silence."""
    return launcher_argv("-n", "2", "--grace", "2", *files.options(), *options,
                         "--env", f"DISTTRAIN_HEARTBEAT_TIMEOUT={heartbeat_timeout}",
                         command=RESTART_WORKER + list(worker_options), tag=tag, ps_command=RESTART_PS)


def program_of(tag, role, rank, incarnation):
    """The pid of `role` `rank` (None: the scheduler) in its `incarnation` (None: a job
    without restarts): the program, not a guard or shell around it."""
    wanted = tuple(None if value is None else str(value) for value in (rank, incarnation))
    for pid in tagged_pids(tag):
        env = environ_of(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().decode().split("\0")
        except OSError:
            continue
        if (env.get("DISTTRAIN_ROLE"), env.get("DISTTRAIN_RANK"), env.get("DISTTRAIN_INCARNATION")) \
                == (role, *wanted) \
                and any(word.endswith(("restart_ps.py", "restart_worker.py")) for word in argv) \
                and "launch.guard" not in argv:
            return pid
    return None


def wait_for_program(tag, role, rank, incarnation, deadline_s=20.0):
    return wait_until(lambda: program_of(tag, role, rank, incarnation), deadline_s,
                      f"{role} {rank} incarnation {incarnation} to start")


def worker_lines(log):
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def wait_for_started(files, name, count):
    """Until `count` incarnations of `name` printed their first line to its log."""
    def started():
        log = files.log(name)
        return len(worker_lines(log)) if name.startswith("worker") else log.count(" up at ")
    wait_until(lambda: started() == count, 20, lambda: f"{count} starts of {name}: {files.log(name)}")


def write_marker(path, node):
    """What restart_worker.py writes before it freezes, whole (restart_ps.py polls for it)."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(node))
    part.rename(path)


def summary(stderr):
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("role, rank", [("scheduler", None), ("server", 0), ("worker", 1)])
def test_a_process_killed_with_sigkill_is_restarted_in_its_place(launch_run, tmp_path, role, rank):
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag, "--max-restarts", "1"), tag)
    name = role if rank is None else f"{role} {rank}"
    first = wait_for_program(tag, role, rank, 0)
    wait_for_started(files, name, 1)
    os.kill(first, signal.SIGKILL)
    assert wait_for_program(tag, role, rank, 1) != first
    wait_for_started(files, name, 2)   # both incarnations write to the same log file
    files.release.touch()
    assert run.finish() == 0, run.stderr
    assert f"launch: restarting {name} (exit SIGKILL), restart 1 of 1\n" in run.stderr
    assert summary(run.stderr).endswith("; workers 0 0; restarts 1 of 1")
    assert wait_for_no_tagged(tag) == []


def test_each_restart_of_a_process_counts_its_incarnation_up(launch_run, tmp_path):
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag, "--max-restarts", "2"), tag)
    for incarnation in (0, 1):
        pid = wait_for_program(tag, "worker", 0, incarnation)
        wait_for_started(files, "worker 0", incarnation + 1)
        os.kill(pid, signal.SIGKILL)
    wait_for_started(files, "worker 0", 3)
    files.release.touch()
    assert run.finish() == 0, run.stderr
    assert "launch: restarting worker 0 (exit SIGKILL), restart 2 of 2\n" in run.stderr
    assert [line["incarnation"] for line in worker_lines(files.log("worker 0"))] == [0, 1, 2]
    assert [line["incarnation"] for line in worker_lines(files.log("worker 1"))] == [0]
    assert wait_for_no_tagged(tag) == []


def test_once_the_budget_is_spent_a_death_ends_the_job_naming_it(launch_run, tmp_path):
    """The budget is the job's, not each process's: worker 0's death after worker 1's
    restart ends it."""
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag, "--max-restarts", "1"), tag)
    os.kill(wait_for_program(tag, "worker", 1, 0), signal.SIGKILL)
    wait_for_program(tag, "worker", 1, 1)
    os.kill(wait_for_program(tag, "worker", 0, 0), signal.SIGKILL)
    assert run.finish() == 128 + signal.SIGKILL
    assert "launch: restarting worker 1 (exit SIGKILL), restart 1 of 1\n" in run.stderr
    assert ("launch: worker 0 exited with code -9 (SIGKILL); no restart left "
            "(all 1 of --max-restarts used)\n") in run.stderr
    assert wait_for_no_tagged(tag) == []


def test_without_max_restarts_a_death_ends_the_job_and_no_process_sees_recovery_settings(
        launch_run, tmp_path):
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag), tag)
    pid = wait_until(lambda: program_of(tag, "worker", 1, None), 20, "worker 1 to start")
    assert not [name for name in ("DISTTRAIN_INCARNATION", "DISTTRAIN_RESTART_TIMEOUT")
                if name in environ_of(pid)]
    os.kill(pid, signal.SIGKILL)
    assert run.finish() == 128 + signal.SIGKILL
    assert "launch: worker 1 exited with code -9 (SIGKILL)\n" in run.stderr
    assert "restart" not in run.stderr
    assert wait_for_no_tagged(tag) == []


def test_a_worker_that_exits_0_stays_done_and_the_job_waits_for_the_replaced_one(
        launch_run, tmp_path):
    """Worker 0 finishes, then worker 1 is killed and replaced: the job goes on until the
    replacement finishes too, and worker 0 is never started again."""
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag, "--max-restarts", "3"), tag)
    worker_1 = wait_for_program(tag, "worker", 1, 0)
    wait_for_started(files, "worker 1", 1)
    (tmp_path / "release.0").touch()
    wait_until(lambda: "worker 0 incarnation 0 done" in files.log("worker 0"), 20,
               "worker 0 to finish")
    os.kill(worker_1, signal.SIGKILL)
    wait_for_started(files, "worker 1", 2)
    assert run.popen.poll() is None
    files.release.touch()
    assert run.finish() == 0, run.stderr
    assert run.stderr.count("launch: restarting ") == 1
    assert "worker 1 incarnation 1 done" in files.log("worker 1")
    assert len(worker_lines(files.log("worker 0"))) == 1
    assert summary(run.stderr).endswith("workers 0 0; restarts 1 of 3")


def test_a_worker_reported_unresponsive_is_killed_and_restarted(launch_run, tmp_path):
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag, "--max-restarts", "1",
                                  worker_options=["--freeze-rank", "1"]), tag)
    frozen = wait_for_program(tag, "worker", 1, 0)
    wait_for_program(tag, "worker", 1, 1)
    assert not os.path.exists(f"/proc/{frozen}")   # killed and reaped before the restart
    files.release.touch()
    assert run.finish() == 0, run.stderr
    assert ("launch: scheduler reports worker 1 unresponsive (no heartbeat (test)); "
            "killing it to restart it\n") in run.stderr
    assert "launch: restarting worker 1 (no heartbeat (test)), restart 1 of 1\n" in run.stderr
    assert [line["incarnation"] for line in worker_lines(files.log("worker 1"))] == [0, 1]
    assert wait_for_no_tagged(tag) == []


def test_an_unresponsive_worker_with_no_restart_left_ends_the_job(launch_run, tmp_path):
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag, "--max-restarts", "1", worker_options=[
        "--freeze-rank", "1", "--freeze-incarnations", "0,1"]), tag)
    assert run.finish() == 128 + signal.SIGKILL
    assert "killing it (no restart left)\n" in run.stderr
    assert ("launch: worker 1 exited with code -9 (SIGKILL), killed as unresponsive (no heartbeat "
            "(test)); no restart left (all 1 of --max-restarts used)\n") in run.stderr
    assert wait_for_no_tagged(tag) == []


def test_without_max_restarts_an_unresponsive_report_is_ignored(launch_run, tmp_path):
    """The launcher acts on the report in the same pass that relays the line after it: once
    that line is in the log, a launcher that was going to kill worker 1 already has."""
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag), tag)
    wait_until(lambda: program_of(tag, "worker", 1, None), 20, "worker 1 to start")
    write_marker(tmp_path / "frozen.0", {"role": "worker", "rank": 1})
    wait_until(lambda: "reported worker 1" in files.log("scheduler"), 20, "the report")
    files.release.touch()
    assert run.finish() == 0, run.stderr
    assert "unresponsive" not in run.stderr
    assert wait_for_no_tagged(tag) == []


def test_a_late_report_about_a_replaced_worker_leaves_its_replacement_alone(launch_run, tmp_path):
    """The scheduler reports the killed worker 1 (silent since its death) only after the
    launcher restarted it: the replacement has not run for a heartbeat timeout, so the report
    (here without silent_s) is about the one it replaced."""
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag, "--max-restarts", "2", heartbeat_timeout="60"), tag)
    os.kill(wait_for_program(tag, "worker", 1, 0), signal.SIGKILL)
    wait_for_program(tag, "worker", 1, 1)
    write_marker(tmp_path / "frozen.0", {"role": "worker", "rank": 1, "at_once": True})
    # The launcher acts on a report in the pass that relays the line after it.
    wait_until(lambda: "reported worker 1" in files.log("scheduler"), 20, "the report")
    files.release.touch()
    assert run.finish() == 0, run.stderr
    assert "reports worker 1 unresponsive" not in run.stderr
    assert summary(run.stderr).endswith("restarts 1 of 2")
    assert wait_for_no_tagged(tag) == []


def test_a_scheduler_reported_unresponsive_by_most_processes_is_killed_and_restarted_once(
        launch_run, tmp_path):
    """Both workers report the frozen scheduler: two of the three workers and servers are a
    majority, and the second report kills it to restart it (the first waits for it)."""
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag, "--max-restarts", "2",
                                  worker_options=["--report-scheduler"]), tag)
    scheduler = wait_for_program(tag, "scheduler", None, 0)
    wait_for_started(files, "scheduler", 1)
    for rank in (0, 1):
        wait_for_started(files, f"worker {rank}", 1)
    os.kill(scheduler, signal.SIGSTOP)
    (tmp_path / "frozen-scheduler.0").touch()
    (tmp_path / "frozen-scheduler.1").touch()
    wait_for_started(files, "scheduler", 2)
    files.release.touch()
    assert run.finish() == 0, run.stderr
    waited = re.findall(r"launch: worker (\d) reports scheduler unresponsive \(no heartbeat "
                        r"reply \(test\)\); 1 of 3 processes do, waiting for a majority", run.stderr)
    killed = re.findall(r"launch: worker (\d) reports scheduler unresponsive \(no heartbeat "
                        r"reply \(test\)\); killing it to restart it\n", run.stderr)
    assert sorted(waited + killed) == ["0", "1"], run.stderr
    assert "launch: restarting scheduler (no heartbeat reply (test)), restart 1 of 2\n" in run.stderr
    assert summary(run.stderr).endswith("restarts 1 of 2")
    assert wait_for_no_tagged(tag) == []


def test_one_process_that_hears_no_scheduler_is_no_reason_to_restart_it(launch_run, tmp_path):
    """A host whose link is down hears no scheduler either: one worker's report alone (one of
    three workers and servers) kills nothing; the scheduler, which reports that worker in
    turn, is the one heard."""
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag, "--max-restarts", "1",
                                  worker_options=["--report-scheduler"]), tag)
    wait_for_started(files, "scheduler", 1)
    for rank in (0, 1):
        wait_for_started(files, f"worker {rank}", 1)
    (tmp_path / "frozen-scheduler.0").touch()
    wait_until(lambda: "reported scheduler" in files.log("worker 0"), 20, "worker 0's report")
    files.release.touch()
    assert run.finish() == 0, run.stderr
    assert "1 of 3 processes do, waiting for a majority" in run.stderr
    assert "restarting scheduler" not in run.stderr
    assert summary(run.stderr).endswith("restarts 0 of 1")
    assert wait_for_no_tagged(tag) == []


# ---- ssh back end ---------------------------------------------------------------

def ssh_argv(files, tag, hosts, template, *options, worker_options=()):
    return restart_argv(files, tag, "-H", hosts, "--remote-cmd", template, *options,
                        worker_options=worker_options)


def test_ssh_back_end_restarts_a_killed_remote_worker_on_its_host_with_its_keys(
        namespace_hosts, launch_run, tmp_path):
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(ssh_argv(files, tag, namespace_hosts.host_list([0, 1, 1]), NETNS_TEMPLATE,
                              "--max-restarts", "1"), tag)
    first = wait_for_program(tag, "worker", 1, 0)
    wait_for_started(files, "worker 1", 1)
    os.kill(first, signal.SIGKILL)
    second = wait_for_program(tag, "worker", 1, 1)
    host = namespace_hosts.names[2]
    assert os.stat(f"/proc/{second}/ns/net").st_ino == os.stat(f"/run/netns/{host}").st_ino
    wait_for_started(files, "worker 1", 2)
    files.release.touch()
    assert run.finish() == 0, run.stderr
    assert f"launch: restarting worker 1 (exit 137: SIGKILL on {host}), restart 1 of 1\n" in run.stderr
    lines = worker_lines(files.log("worker 1"))
    # The guard of the restarted worker got the keys on its stdin again.
    assert [(line["incarnation"], line["secrets"]) for line in lines] == \
        [(0, ["worker-1.key_secret"]), (1, ["worker-1.key_secret"])]
    assert wait_for_no_tagged(tag) == []


def test_ssh_back_end_kills_a_frozen_remote_worker_through_its_guard_and_restarts_it(
        launch_run, tmp_path):
    """`sh -c LINE HOST` as the remote command: the ssh back end's path (guard, keys on
    stdin, the rebuilt line) on this machine, no namespaces needed."""
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(ssh_argv(files, tag, "here:2@127.0.0.1", "sh -c {command} {host}",
                              "--max-restarts", "1", "--grace", "60",
                              worker_options=["--freeze-rank", "0", "--ignore-sigterm"]), tag)
    wait_for_program(tag, "worker", 0, 1)
    files.release.touch()
    # The frozen worker ignores SIGTERM, and a --grace of 60 s would outlast the test's
    # deadline: the guard's SIGKILL came at once.
    assert run.finish() == 0, run.stderr
    assert "launch: restarting worker 0 (no heartbeat (test)), restart 1 of 1\n" in run.stderr
    assert [line["incarnation"] for line in worker_lines(files.log("worker 0"))] == [0, 1]
    assert wait_for_no_tagged(tag) == []


# ---- launch.guard and a stopped program -----------------------------------------

def guarded_stopped_program(tag, *program_lines):
    """A guard (grace 60 s) whose program stops itself (SIGSTOP) once it said ready."""
    code = "\n".join(["import os, signal", *program_lines,
                      "print('ready', flush=True)", "os.kill(os.getpid(), signal.SIGSTOP)",
                      "import time; time.sleep(60)"])
    popen = subprocess.Popen([PYTHON, "-m", "launch.guard", "--grace", "60", "--",
                              PYTHON, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, TAG_VARIABLE: tag}, start_new_session=True)
    assert popen.stdout.readline().strip() == b"ready"
    wait_until(lambda: [pid for pid in tagged_pids(tag) if pid != popen.pid and state_of(pid) == "T"],
               20, "the program to stop itself")
    return popen


def state_of(pid):
    """R, S, T (stopped), Z ... from /proc, or None for a process gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def end_guard(popen):
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # gone already, as it should be
    popen.wait(timeout=20)


def test_closing_the_guards_stdin_stops_a_stopped_program_with_sigterm_not_after_the_grace():
    tag = new_tag()
    popen = guarded_stopped_program(tag)
    try:
        popen.stdin.close()
        # SIGTERM alone waits for a SIGCONT; the guard sends both, so SIGTERM is what ends it.
        assert popen.wait(timeout=20) == 128 + signal.SIGTERM
        assert wait_for_no_tagged(tag) == []
    finally:
        end_guard(popen)


def test_the_kill_line_makes_the_guard_kill_a_stopped_program_that_ignores_sigterm_at_once():
    tag = new_tag()
    popen = guarded_stopped_program(tag, "signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    try:
        popen.stdin.write(KILL_LINE)
        popen.stdin.flush()
        assert popen.wait(timeout=20) == -signal.SIGKILL   # the guard goes with its group
        assert wait_for_no_tagged(tag) == []
    finally:
        end_guard(popen)


# ---- Slurm back end (a private single-node Slurm, as in test_launch_slurm) ------------

def test_slurm_back_end_restarts_a_killed_srun_step_as_a_new_step(
        slurm_env, launch_run, tmp_path):
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag, "--launcher", "slurm", "--max-restarts", "1"), tag,
                     prefix=salloc(2), env=slurm_env)
    first = wait_for_program(tag, "worker", 1, 0)
    wait_for_started(files, "worker 1", 1)
    os.kill(first, signal.SIGKILL)
    wait_for_started(files, "worker 1", 2)
    files.release.touch()
    assert run.finish() == 0, run.stderr
    assert "launch: restarting worker 1 (exit 137: SIGKILL on " in run.stderr
    assert [line["incarnation"] for line in worker_lines(files.log("worker 1"))] == [0, 1]
    assert wait_for_no_tagged(tag) == []


def test_slurm_back_end_kills_a_frozen_step_through_srun_and_restarts_it(
        slurm_env, launch_run, tmp_path):
    tag, files = new_tag(), Files(tmp_path)
    run = launch_run(restart_argv(files, tag, "--launcher", "slurm", "--max-restarts", "1",
                                  "--grace", "60",
                                  worker_options=["--freeze-rank", "1", "--ignore-sigterm"]),
                     tag, prefix=salloc(2), env=slurm_env)
    wait_for_started(files, "worker 1", 2)
    files.release.touch()
    # Only the guard's SIGKILL, on the kill line that srun forwarded, ends the frozen worker
    # within the test's deadline (it ignores SIGTERM; --grace is 60 s).
    assert run.finish() == 0, run.stderr
    assert "launch: restarting worker 1 (no heartbeat (test)), restart 1 of 1\n" in run.stderr
    assert wait_for_no_tagged(tag) == []
