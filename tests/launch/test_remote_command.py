"""Building the commands of the ssh and slurm back ends."""

import json
import os
import subprocess
import sys

from launch.hosts import Host
from launch.placement import Process
from launch.slurm import SRUN_TEMPLATE
from launch.ssh import guard_argv, remote_argv, shell_line, ssh_command


def test_ssh_gets_the_shell_line_as_one_last_argument():
    argv = remote_argv("ssh -o BatchMode=yes {host}", "node1", "cd /x && exec env A=1 prog")
    assert argv == ["ssh", "-o", "BatchMode=yes", "node1", "cd /x && exec env A=1 prog"]


def test_argv_runners_get_sh_dash_c():
    argv = remote_argv("ip netns exec {host}", "ns1", "cd /x && prog")
    assert argv == ["ip", "netns", "exec", "ns1", "sh", "-c", "cd /x && prog"]


def test_command_placeholder_puts_the_line_where_the_template_says():
    argv = remote_argv("docker exec {host} bash -lc {command}", "box", "prog")
    assert argv == ["docker", "exec", "box", "bash", "-lc", "prog"]


def test_srun_template_names_the_node_and_runs_the_line_in_sh():
    argv = remote_argv(SRUN_TEMPLATE, "node07", "prog")
    assert argv[:4] == ["srun", "--nodes=1", "--ntasks=1", "--nodelist=node07"]
    assert "--overlap" in argv and argv[-3:] == ["sh", "-c", "prog"]


def test_shell_line_survives_sh_with_odd_characters(tmp_path):
    """What sh runs is exactly our cwd, environment and argv, quotes and all."""
    odd = "it's \"quoted\" $HOME `x` ; & | *"
    program = [sys.executable, "-c",
               "import json, os, sys; print(json.dumps([os.getcwd(), os.environ['ODD'], sys.argv[1:]]))",
               odd, "two words"]
    line = shell_line(str(tmp_path), {"ODD": odd}, program)
    output = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True, timeout=30)
    assert json.loads(output.stdout) == [str(tmp_path), odd, [odd, "two words"]]


def test_guard_wraps_the_command_with_grace_and_core_index():
    assert guard_argv("/py", ["prog", "-x"], 2.5, bind_index=3) == [
        "/py", "-m", "launch.guard", "--grace", "2.5", "--bind-index", "3", "--", "prog", "-x"]
    assert "--bind-index" not in guard_argv("/py", ["prog"], 5)


def test_ssh_command_exports_only_the_process_environment_and_is_stopped_by_stdin():
    process = Process("worker", 1, Host("ns1", 2, "10.77.0.2"), 1, ["python", "train.py"],
                      {"DISTTRAIN_ROLE": "worker", "DISTTRAIN_RANK": "1"})
    command = ssh_command(process, "ip netns exec {host}", 5.0, bind=True, cwd="/work dir",
                          python="/venv/bin/python")
    assert command.argv[:6] == ["ip", "netns", "exec", "ns1", "sh", "-c"]
    assert command.argv[6] == ("cd '/work dir' && exec env DISTTRAIN_RANK=1 DISTTRAIN_ROLE=worker "
                               "/venv/bin/python -m launch.guard --grace 5 --bind-index 1 -- "
                               "python train.py")
    assert command.stopped_by_closing_stdin
    assert command.env == dict(os.environ)


def test_ssh_command_rebuilt_for_a_restart_carries_the_incarnation_and_the_same_keys():
    process = Process("server", 0, Host("ns0", 1, "10.77.0.1"), 0, ["python", "-m", "disttrain.ps"],
                      {"DISTTRAIN_ROLE": "server", "DISTTRAIN_INCARNATION": "0"})
    first = ssh_command(process, "ip netns exec {host}", 2.0, bind=False, cwd="/w",
                        python="/py", keys_line=b'{"files": {}}\n')
    second = first.with_env({"DISTTRAIN_INCARNATION": "1"}).with_env({"DISTTRAIN_INCARNATION": "2"})
    assert "DISTTRAIN_INCARNATION=0 " in first.argv[6]
    assert second.argv[6] == first.argv[6].replace("DISTTRAIN_INCARNATION=0 ", "DISTTRAIN_INCARNATION=2 ")
    assert second.argv[:6] == first.argv[:6]
    assert (second.stdin_data, second.stopped_by_closing_stdin) == (first.stdin_data, True)
    assert process.env["DISTTRAIN_INCARNATION"] == "0"   # the plan itself is left alone


def test_srun_command_rebuilt_for_a_restart_is_the_same_step_with_the_new_incarnation():
    process = Process("worker", 3, Host("node2", 2, "node2"), 1, ["prog"], {"DISTTRAIN_RANK": "3"})
    first = ssh_command(process, SRUN_TEMPLATE, 5.0, bind=False, cwd="/w", python="/py")
    again = first.with_env({"DISTTRAIN_INCARNATION": "1"})
    assert again.argv[:-1] == first.argv[:-1] and again.argv[0] == "srun"
    assert again.argv[-1] == first.argv[-1].replace("DISTTRAIN_RANK=3", "DISTTRAIN_INCARNATION=1 DISTTRAIN_RANK=3")


def test_rebuilt_ssh_line_runs_with_the_new_environment(tmp_path):
    """Through a real `sh -c` and guard: the restarted line exports the changed value."""
    process = Process("worker", 0, Host("here", 1, "127.0.0.1"), 0,
                      [sys.executable, "-c", "import os; print(os.environ['DISTTRAIN_INCARNATION'])"],
                      {"DISTTRAIN_INCARNATION": "0"})
    command = ssh_command(process, "sh -c {command} {host}", 1.0, bind=False, cwd=str(tmp_path),
                          python=sys.executable).with_env({"DISTTRAIN_INCARNATION": "4"})
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # The guard's stdin stays open (its EOF would stop the program) until the program is done.
    with subprocess.Popen(command.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": root}) as guard:
        try:
            assert (guard.stdout.read(), guard.wait(timeout=60)) == ("4\n", 0)
        finally:
            guard.kill()


def test_local_command_rebuilt_for_a_restart_changes_only_its_environment():
    from launch.local import local_command
    process = Process("worker", 1, Host("localhost", 2, "127.0.0.1"), 1, ["prog"], {"DISTTRAIN_RANK": "1"})
    first = local_command(process, bind=False)
    again = first.with_env({"DISTTRAIN_INCARNATION": "1"})
    assert (again.argv, again.cpu, again.stopped_by_closing_stdin) == (first.argv, first.cpu, False)
    assert again.env == {**first.env, "DISTTRAIN_INCARNATION": "1"}
    assert "DISTTRAIN_INCARNATION" not in first.env
