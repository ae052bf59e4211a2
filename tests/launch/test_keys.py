"""The launcher's side of a job's keys: `python -m launch keys`, how each back end hands
the keys to its processes (never on a command line), and --insecure."""
import json
import os
import stat
import subprocess
import sys

import pytest

from disttrain.ps import auth
from launch import keys
from launch.__main__ import parse_args, plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_launch(*argv):
    return subprocess.run([sys.executable, "-m", "launch", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))


def test_keys_subcommand_writes_the_documented_layout(tmp_path):
    directory = tmp_path / "job-keys"
    result = run_launch("keys", str(directory), "-n", "2", "-s", "1")
    assert result.returncode == 0, result.stderr
    assert f"DISTTRAIN_KEYS={directory}" in result.stdout
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(os.listdir(directory)) == [
        "scheduler.key", "scheduler.key_secret", "server-0.key", "server-0.key_secret",
        "worker-0.key", "worker-0.key_secret", "worker-1.key", "worker-1.key_secret"]
    assert auth.load_credentials(str(directory), "worker", 1).name == "worker-1"


def test_keys_subcommand_never_reuses_a_directory_that_holds_files(tmp_path):
    (tmp_path / "old").write_text("x")
    result = run_launch("keys", str(tmp_path), "-n", "1")
    assert result.returncode == 2 and "is not empty" in result.stderr


def test_local_plan_gives_every_process_one_private_key_directory():
    job_keys = keys.JobKeys()
    try:
        processes, commands = plan(parse_args(["-n", "2", "--", "prog"]), {}, job_keys)
        directories = {command.env["DISTTRAIN_KEYS"] for command in commands}
        assert directories == {job_keys.directory}
        assert stat.S_IMODE(os.stat(job_keys.directory).st_mode) == 0o700
        assert not any(job_keys.directory in " ".join(command.argv) for command in commands)
    finally:
        job_keys.remove()
    assert not os.path.exists(next(iter(directories)))


def test_ssh_plan_sends_each_process_its_own_secret_on_stdin_only():
    job_keys = keys.JobKeys()
    processes, commands = plan(parse_args(["-H", "a:1,b:1", "--port", "1234", "-n", "2", "--",
                                           "prog"]), {}, job_keys)
    assert job_keys.directory is None   # nothing written on this machine
    for process, command in zip(processes, commands):
        files = json.loads(command.stdin_data)["files"]
        secrets = [name for name in files if name.endswith(".key_secret")]
        assert secrets == [f"{keys.process_key_name(process)}.key_secret"]
        assert len([name for name in files if name.endswith(".key")]) == 4
        line = " ".join(command.argv)
        assert "--keys-on-stdin" in line and "secret-key" not in line
        assert "DISTTRAIN_KEYS" not in line


def test_insecure_plan_says_so_to_every_process_and_makes_no_keys():
    job_keys = keys.JobKeys()
    processes, commands = plan(parse_args(["--insecure", "-n", "2", "--", "prog"]), {}, job_keys)
    assert all(command.env["DISTTRAIN_INSECURE"] == "1" for command in commands)
    assert job_keys.pairs == {} and job_keys.directory is None


@pytest.mark.parametrize("insecure", [False, True])
def test_a_launched_job_removes_its_keys_and_insecure_warns(tmp_path, insecure):
    probe = ("import os, json; d = os.environ.get('DISTTRAIN_KEYS'); "
             "print(json.dumps([d, sorted(os.listdir(d)) if d else None]))")
    result = run_launch(*(["--insecure"] if insecure else []), "-n", "1", "--ps-command",
                        f"{sys.executable} -c pass", "--", sys.executable, "-c", probe)
    assert result.returncode == 0, result.stderr
    directory, files = json.loads(result.stdout.splitlines()[-1][len("[worker 0] "):])
    if insecure:
        assert directory is None and "WARNING: --insecure" in result.stderr
    else:
        assert "worker-0.key_secret" in files
        assert not os.path.exists(directory)
