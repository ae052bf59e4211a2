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
