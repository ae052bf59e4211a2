"""scripts/fault_matrix.py on a tiny MNIST job: the shape of its table and JSON line, and
nothing left running after a fault; the elastic rows' launcher command and discovery script."""

import contextlib
import importlib.util
import types
import json
import os
import signal
import subprocess

import pytest

from tests.integration.conftest import (
    PYTHON, ROOT, TAG_VARIABLE, kill_tagged, new_tag, wait_for_no_tagged)
from launch.elastic import discover
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

SCRIPT = os.path.join(ROOT, "scripts", "fault_matrix.py")
COLUMNS = ["fault", "detected after (s)", "recovered", "extra wall (s)", "test accuracy",
           "left over", "exit", "ended after (s)"]


def table_rows(stdout):
    """{fault: cells} from the `| ... |` table (a row not measured has two cells)."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return header, rows


def test_killed_worker_without_restarts_ends_the_job_detected_and_with_nothing_left_over():
    tag = new_tag()
    # A 32-step job (2000 examples over 2 workers), slowed so the fault lands mid-run.
    result = subprocess.run(
        [PYTHON, SCRIPT, "--max-restarts", "0", "--faults", "kill-worker",
         "--limit-train", "2000", "--inject-after", "0", "--min-accuracy", "0.5",
         "--", "--slow-ms", "50", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, TAG_VARIABLE: tag})
    # Apart from the script's own count: every process of its launches carried the tag.
    tagged_left = wait_for_no_tagged(tag)
    kill_tagged(tag)
    assert result.returncode == 0, result.stderr[-3000:]
    header, rows = table_rows(result.stdout)
    assert header == COLUMNS
    killed = rows["kill-worker"]
    assert len(killed) == len(COLUMNS)
    detected_s, recovered, _, accuracy, left_over, exit_code, _ = killed[1:]
    assert float(detected_s) >= 0
    assert (recovered, accuracy, left_over) == ("no", "-", "0")
    assert exit_code == "137"   # the launcher's 128 + SIGKILL, naming the killed worker
    assert "launch: worker 1 exited with code -9" in result.stdout
    totals = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(totals)[:4] == ["faults", "recovered", "worst_extra_s", "min_accuracy"]
    assert (totals["faults"], totals["recovered"], totals["worst_extra_s"]) == (1, 0, None)
    assert totals["min_accuracy"] is None   # the killed job printed no accuracy
    assert totals["not_counted"] == {}
    assert totals["left_over"] == 0
    assert tagged_left == []


def load_script():
    spec = importlib.util.spec_from_file_location("fault_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_process_tree_still_counts_a_child_orphaned_when_its_parent_exited():
    """What "left over" rests on: a process whose parent exited is reparented to init and no
    longer descends from the root, yet the tree recorded it while it did."""
    fault_matrix = load_script()
    shell = subprocess.Popen(["sh", "-c", "sleep 60 >/dev/null & echo $!; read line"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    orphan = int(shell.stdout.readline())
    try:
        tree = fault_matrix.ProcessTree(shell.pid, tag=new_tag()).scan()
        shell.communicate("\n", timeout=20)   # the shell exits; its sleep lives on
        assert fault_matrix.read_stat(orphan)[1] != shell.pid
        assert orphan in tree.scan().alive()
        tree.kill([orphan])
        wait_until(lambda: orphan not in tree.alive(), 10, "the orphan to be killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)


class FakeTree:
    """Stands in for a run's ProcessTree: `program` hands out one process of the test's own
    and records what the slots file held at that moment."""

    def __init__(self, pid, slots_file):
        self.pid, self.slots_file, self.asked = pid, slots_file, []

    def scan(self):
        return self

    def program(self, role, rank):
        with open(self.slots_file) as slots:
            self.asked.append((role, rank, slots.read().strip()))
        return self.pid


def test_elastic_rows_give_the_launcher_a_discovery_script_whose_slots_change_at_injection(tmp_path):
    fault_matrix = load_script()
    args = fault_matrix.parse_args(["--max-restarts", "0", "--faults", "worker-add,worker-remove"])
    add = fault_matrix.FAULTS["worker-add"]
    for directory in ("add", "remove"):
        os.makedirs(tmp_path / directory)
    argv = fault_matrix.fault_argv(args, add, str(tmp_path / "add"), str(tmp_path / "metrics"))
    options = argv[argv.index("-m"):argv.index("--")]
    assert options[:5] == ["-m", "launch", "-n", "2:3", "-s"]
    script = options[options.index("--host-discovery-script") + 1]
    # The launcher's own reader of the script: one host, this machine, with 2 slots, then 3.
    assert [(host.name, host.slots) for host in discover(script)] == [("localhost", 2)]
    assert add.inject(run=None) is None   # adding a worker signals nobody
    assert [(host.name, host.slots) for host in discover(script)] == [("localhost", 3)]

    remove = fault_matrix.FAULTS["worker-remove"]
    argv = fault_matrix.fault_argv(args, remove, str(tmp_path / "remove"), str(tmp_path / "metrics"))
    assert argv[argv.index("-n") + 1] == "1:2"
    script = argv[argv.index("--host-discovery-script") + 1]
    assert [(host.name, host.slots) for host in discover(script)] == [("localhost", 2)]
    leaver = subprocess.Popen(["sleep", "60"])
    try:
        tree = FakeTree(leaver.pid, remove.slots_file)
        assert remove.inject(types.SimpleNamespace(tree=tree)) is None
        assert leaver.wait(timeout=20) == -signal.SIGTERM   # SIGTERM: a graceful leave, not -9
        # The slot was gone before the worker was looked up and signalled, so the launcher
        # cannot start a replacement on it.
        assert tree.asked == [("worker", 1, "localhost:1")]
        assert [(host.name, host.slots) for host in discover(script)] == [("localhost", 1)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            leaver.kill()
        leaver.wait()
