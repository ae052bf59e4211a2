"""launch.guard, the wrapper of remote processes: it passes the exit status on and stops
its program, with everything in its group, when its stdin closes."""

import json
import os
import signal
import subprocess
import time

import pytest

from tests.integration.conftest import PYTHON, ROOT, TAG_VARIABLE, new_tag, wait_for_no_tagged

pytestmark = pytest.mark.slow


def guard(tag, *command, grace="1"):
    return subprocess.Popen([PYTHON, "-m", "launch.guard", "--grace", grace, "--", *command],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, TAG_VARIABLE: tag}, start_new_session=True)


def kill_group(popen):
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone, as it should be
    popen.wait(timeout=20)


def wait_for_line(popen):
    assert popen.stdout.readline().strip() == b"ready"


def sleeper(seconds, ignore_sigterm=False, child=False):
    """Python code: maybe ignore SIGTERM, maybe start a grandchild, say ready, sleep."""
    code = "import signal, subprocess, sys, time\n"
    if ignore_sigterm:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    if child:
        code += f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep({seconds})'])\n"
    code += f"print('ready', flush=True)\ntime.sleep({seconds})\n"
    return [PYTHON, "-c", code]


@pytest.mark.parametrize("code", [0, 3])
def test_guard_exits_with_its_programs_code(code):
    tag = new_tag()
    popen = guard(tag, PYTHON, "-c", f"import sys; sys.exit({code})")
    try:
        assert popen.wait(timeout=20) == code
    finally:
        kill_group(popen)


def test_closing_stdin_stops_the_program_and_its_children_with_sigterm():
    tag = new_tag()
    popen = guard(tag, *sleeper(60, child=True))
    try:
        wait_for_line(popen)
        popen.stdin.close()
        assert popen.wait(timeout=20) == 128 + signal.SIGTERM
        assert wait_for_no_tagged(tag) == []
    finally:
        kill_group(popen)


def test_program_ignoring_sigterm_is_killed_after_the_grace_period():
    tag = new_tag()
    popen = guard(tag, *sleeper(60, ignore_sigterm=True), grace="0.5")
    try:
        wait_for_line(popen)
        started = time.monotonic()
        popen.stdin.close()
        assert popen.wait(timeout=20) == -signal.SIGKILL  # the guard goes with its group
        assert time.monotonic() - started >= 0.5
        assert wait_for_no_tagged(tag) == []
    finally:
        kill_group(popen)


def test_signal_ending_the_program_is_reported_as_128_plus_its_number():
    tag = new_tag()
    popen = guard(tag, *sleeper(60))
    try:
        wait_for_line(popen)
        program = [pid for pid in os.listdir("/proc") if pid.isdigit() and pid != str(popen.pid)
                   and os.path.exists(f"/proc/{pid}/stat")
                   and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1] == str(popen.pid)]
        assert len(program) == 1
        os.kill(int(program[0]), signal.SIGKILL)
        assert popen.wait(timeout=20) == 128 + signal.SIGKILL
    finally:
        kill_group(popen)


def test_keys_on_stdin_reach_the_program_in_a_private_directory_removed_at_the_end(tmp_path):
    from launch import keys
    from launch.placement import Process
    job_keys = keys.JobKeys()
    job_keys.make(num_workers=2, num_servers=1)
    line = job_keys.stdin_line(Process("worker", 1, None, 0, []))
    probe = ("import os, json; d = os.environ['DISTTRAIN_KEYS']; "
             "print(json.dumps([d, oct(os.stat(d).st_mode & 0o777), sorted(os.listdir(d))]), "
             "flush=True); input()")
    tag = new_tag()
    popen = subprocess.Popen([PYTHON, "-m", "launch.guard", "--keys-on-stdin", "--", PYTHON,
                              "-c", probe], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env={**os.environ, TAG_VARIABLE: tag},
                             start_new_session=True)
    try:
        popen.stdin.write(line)
        popen.stdin.flush()
        directory, mode, files = json.loads(popen.stdout.readline())
        assert mode == "0o700"
        assert [name for name in files if name.endswith("_secret")] == ["worker-1.key_secret"]
        popen.stdin.close()   # the launcher's stop
        popen.wait(timeout=20)
        assert not os.path.exists(directory)
    finally:
        kill_group(popen)
    assert wait_for_no_tagged(tag) == []


def test_a_guard_whose_stdin_closes_before_the_keys_arrive_exits_2():
    popen = subprocess.Popen([PYTHON, "-m", "launch.guard", "--keys-on-stdin", "--", "true"],
                             cwd=ROOT, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    _, stderr = popen.communicate(b"", timeout=20)
    assert popen.returncode == 2 and b"before the job's keys arrived" in stderr
