"""The command line: defaults, checks, and the plan it makes for each back end."""

import os
import sys

import pytest

from launch.__main__ import parse_args, plan
from launch.local import core_for, cpu_count


def test_defaults_are_local_with_one_server():
    args = parse_args(["--", "python", "train.py", "--epochs", "1"])
    assert (args.launcher, args.num_servers, args.num_workers) == ("local", 1, None)
    assert args.command == ["python", "train.py", "--epochs", "1"]


def test_hosts_imply_the_ssh_back_end():
    assert parse_args(["-H", "a:2", "--", "prog"]).launcher == "ssh"
    assert parse_args(["--hostfile", "f", "--", "prog"]).launcher == "ssh"


@pytest.mark.parametrize("argv, message", [
    (["-n", "2"], "no worker command"),
    (["-n", "0", "--", "prog"], "-n 0: need at least one worker"),
    (["-s", "0", "--", "prog"], "-s 0: need at least one server"),
    (["--launcher", "ssh", "--", "prog"], "needs -H or --hostfile"),
    (["--launcher", "slurm", "-H", "a:1", "--", "prog"], "not slurm"),
])
def test_bad_command_lines_exit_2_with_the_reason(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_local_plan_defaults_to_one_worker_per_core_and_a_local_scheduler():
    processes, commands = plan(parse_args(["--", "prog"]), {})
    workers = [p for p in processes if p.role == "worker"]
    assert len(workers) == cpu_count()
    assert processes[0].env["DISTTRAIN_SCHEDULER"].startswith("127.0.0.1:")
    assert commands[0].argv == [sys.executable, "-m", "disttrain.ps"]
    assert commands[-1].argv == ["prog"] and not commands[-1].stopped_by_closing_stdin
    assert commands[-1].env["DISTTRAIN_ROLE"] == "worker"


def test_bind_pins_local_workers_to_successive_allowed_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5})
    _, commands = plan(parse_args(["-n", "3", "--bind", "--", "prog"]), {})
    assert [command.cpu for command in commands] == [None, None, 2, 5, 2]


@pytest.mark.parametrize("bind", [False, True])
def test_bind_runs_servers_and_only_servers_at_realtime_priority(monkeypatch, bind):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    processes, commands = plan(parse_args(["-n", "2", "-s", "2"] + ["--bind"] * bind + ["--", "prog"]), {})
    marked = [p.name for p, c in zip(processes, commands) if c.env.get("DISTTRAIN_REALTIME") == "1"]
    assert marked == (["server 0", "server 1"] if bind else [])


def test_slurm_plan_runs_every_process_as_a_one_task_srun_step():
    environ = {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS": "4"}
    args = parse_args(["--launcher", "slurm", "--port", "29500", "-s", "2", "--", "prog"])
    processes, commands = plan(args, environ)
    assert [p.name for p in processes] == ["scheduler", "server 0", "server 1", "worker 0",
                                           "worker 1", "worker 2", "worker 3"]
    assert processes[0].env["DISTTRAIN_SCHEDULER"] == "node1:29500"
    assert [c.argv[3] for c in commands] == ["--nodelist=node1"] * 5 + ["--nodelist=node2"] * 2
    assert all(c.argv[0] == "srun" and c.stopped_by_closing_stdin for c in commands)


def test_core_for_wraps_around_the_allowed_cores():
    assert [core_for(index, {4, 6}) for index in range(3)] == [4, 6, 4]


RECOVERY_VARIABLES = ("DISTTRAIN_RESTART_TIMEOUT", "DISTTRAIN_INCARNATION", "DISTTRAIN_SERVER_REPLICAS")


def test_without_restart_flags_no_process_gets_a_recovery_variable():
    processes, commands = plan(parse_args(["-n", "2", "-s", "2", "--", "prog"]), {})
    assert not [name for command in commands for name in RECOVERY_VARIABLES if name in command.env]


def test_max_restarts_gives_every_process_the_restart_timeout_and_incarnation_0():
    args = parse_args(["-n", "2", "--max-restarts", "2", "--restart-timeout", "7.5", "--", "prog"])
    assert (args.max_restarts, args.restart_timeout) == (2, 7.5)
    processes, commands = plan(args, {})
    assert [p.role for p in processes] == ["scheduler", "server", "worker", "worker"]
    for command in commands:
        assert (command.env["DISTTRAIN_RESTART_TIMEOUT"], command.env["DISTTRAIN_INCARNATION"]) == \
            ("7.5", "0")
        assert "DISTTRAIN_SERVER_REPLICAS" not in command.env


def test_restart_timeout_defaults_to_60_seconds():
    _, commands = plan(parse_args(["-n", "1", "--max-restarts", "1", "--", "prog"]), {})
    assert {command.env["DISTTRAIN_RESTART_TIMEOUT"] for command in commands} == {"60.0"}


def test_server_replicas_reaches_every_process_over_ssh_too():
    args = parse_args(["-H", "a:1,b:1", "--port", "29500", "-s", "2", "--server-replicas", "1",
                       "--", "prog"])
    _, commands = plan(args, {})
    assert len(commands) == 5
    assert all("DISTTRAIN_SERVER_REPLICAS=1 " in command.argv[-1] for command in commands)


@pytest.mark.parametrize("argv, message", [
    (["--server-replicas", "1", "--", "prog"], "--server-replicas 1 with -s 1"),
    (["-s", "2", "--server-replicas", "2", "--", "prog"], "invalid choice: 2"),
    (["--max-restarts", "-1", "--", "prog"], "--max-restarts -1"),
    (["--max-restarts", "1", "--restart-timeout", "0", "--", "prog"], "--restart-timeout 0"),
])
def test_bad_restart_flags_exit_2_with_the_reason(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
