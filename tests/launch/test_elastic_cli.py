"""-n MIN:MAX (elastic jobs): parsing, how many workers start, what every process learns,
and the keys made for MAX workers."""
import json

import pytest

from launch.__main__ import parse_args, plan
from launch.elastic import discover, host_reader, parse_worker_range
from launch.hosts import resolve
from launch.keys import JobKeys


@pytest.mark.parametrize("text, parsed", [("3", (3, 3, None)), ("2:4", (2, 4, "elastic")),
                                          ("1:1", (1, 1, "elastic"))])
def test_n_takes_a_count_or_min_colon_max(text, parsed):
    assert parse_worker_range(text) == parsed


@pytest.mark.parametrize("text", ["0:2", "3:2", "a:b", "2:", "two"])
def test_a_bad_worker_range_exits_2_naming_the_form(capsys, text):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["-n", text, "--", "prog"])
    assert exit_info.value.code == 2
    assert f"-n {text!r}" in capsys.readouterr().err


def test_a_discovery_script_needs_an_elastic_job(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["-n", "2", "--host-discovery-script", str(tmp_path / "d"), "--", "prog"])
    assert "give -n MIN:MAX" in capsys.readouterr().err


def script(tmp_path, text):
    path = tmp_path / "discover.sh"
    path.write_text(f"#!/bin/sh\ncat <<'END'\n{text}END\n")
    path.chmod(0o755)
    return str(path)


def test_discovery_reads_host_colon_slots_lines_skipping_blanks_and_comments(tmp_path):
    hosts = discover(script(tmp_path, "a:2\n\n# spare\nb:1\n"))
    assert [(h.name, h.slots) for h in hosts] == [("a", 2), ("b", 1)]


@pytest.mark.parametrize("slots, started", [(1, 2), (3, 3), (9, 4)])
def test_an_elastic_job_starts_what_the_slots_allow_between_min_and_max(tmp_path, slots, started):
    args = parse_args(["-n", "2:4", "--host-discovery-script",
                       script(tmp_path, f"localhost:{slots}\n"), "--", "prog"])
    processes, commands = plan(args, {})
    workers = [p for p in processes if p.role == "worker"]
    assert [p.rank for p in workers] == list(range(started))
    for command in commands:
        assert (command.env["DISTTRAIN_NUM_WORKERS"], command.env["DISTTRAIN_MIN_WORKERS"],
                command.env["DISTTRAIN_MAX_WORKERS"]) == (str(started), "2", "4")


def test_an_elastic_job_has_keys_for_max_workers_and_a_plain_job_none_of_the_elastic_variables(
        tmp_path):
    job_keys = JobKeys()
    try:
        plan(parse_args(["-n", "1:3", "--", "prog"]), {}, job_keys)
        assert sorted(name for name in job_keys.pairs if name.startswith("worker")) == \
            ["worker-0", "worker-1", "worker-2"]
    finally:
        job_keys.remove()
    _, commands = plan(parse_args(["-n", "2", "--", "prog"]), {})
    assert not [c for c in commands if "DISTTRAIN_MAX_WORKERS" in c.env]


def test_the_hostfile_is_read_again_each_time_the_launcher_looks(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\n")
    read = host_reader(parse_args(["-n", "1:4", "--hostfile", str(hostfile), "--", "prog"]))
    assert [(host.name, slots) for host, slots in read()] == [("a", 1)]
    hostfile.write_text("a slots=1\nb slots=2 addr=10.0.0.2\n")
    assert [(host.name, host.address, slots) for host, slots in read()] == \
        [("a", resolve("a"), 1), ("b", "10.0.0.2", 2)]


class FakeJob:
    def __init__(self):
        self.added = []

    def add_child(self, process, command):
        self.added.append((process, command))
        return process


def test_a_new_worker_over_ssh_gets_the_remote_command_its_rank_and_only_its_own_secret_key(
        tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1 addr=10.0.0.1\nb slots=1 addr=10.0.0.2\n")
    args = parse_args(["-n", "1:3", "--hostfile", str(hostfile), "--port", "29500", "--",
                       "prog"])
    job_keys, job = JobKeys(), FakeJob()
    try:
        processes, _ = plan(args, {}, job_keys)
        assert [p.rank for p in processes if p.role == "worker"] == [0, 1]
        host = next(h for h, _ in host_reader(args)() if h.name == "b")
        process = args.start_worker(job, 2, host, 1)
        [(_, command)] = job.added
        assert (process.rank, process.env["DISTTRAIN_RANK"], process.env["DISTTRAIN_HOST"]) == \
            (2, "2", "10.0.0.2")
        assert command.argv[:-1] == ["ssh", "-o", "BatchMode=yes", "b"]
        assert "DISTTRAIN_RANK=2 " in command.argv[-1]
        assert "DISTTRAIN_MAX_WORKERS=3 " in command.argv[-1]
        files = json.loads(command.stdin_data)["files"]
        secrets = [name for name in files if name.endswith(".key_secret")]
        assert secrets == ["worker-2.key_secret"]
    finally:
        job_keys.remove()
