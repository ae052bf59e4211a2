"""Fault matrix: runs a 2-worker, 2-server MNIST MLP job through the launcher once without a
fault (the baseline) and once per fault, and prints how each run ended. Last line: one JSON object.

    python scripts/fault_matrix.py                        # every fault, --max-restarts 1
    python scripts/fault_matrix.py --max-restarts 0       # today's fail-fast behaviour
    python scripts/fault_matrix.py --faults kill-worker,stop-server --epochs 0.5
    python scripts/fault_matrix.py --limit-train 4000 -- --slow-ms 50   # after --: worker flags

Faults (pick with --faults): kill-worker, stop-worker, kill-server, stop-server, kill-scheduler,
stop-scheduler (kill -9 / SIGSTOP of worker 1, server 1 or the scheduler of the job this script
started, found in that launcher's process tree by DISTTRAIN_ROLE / DISTTRAIN_RANK in
/proc/PID/environ); link-down-3s, link-down-30s (the ssh back end over network namespaces made
here, worker 1's host loses its link: needs root and iproute2); worker-add, worker-remove
(elastic membership: `-n 2:3` / `-n 1:2` with a --host-discovery-script made here whose slots
go from 2 to 3 / from 2 to 1, followed by SIGTERM to worker 1). Each fault is injected
--inject-after seconds after the first step a worker recorded in its --metrics-dir file.

Columns: "detected after": from the injection to the first line that names the fault (a
`launch: restarting`, `disttrain: dead:`, `unresponsive` or launcher failure line; for the
elastic rows `launch: worker 2 joined on host ...` / `launch: worker 1 left on host ...`);
"recovered": exit 0 and test accuracy >= --min-accuracy; "extra wall": the run's wall time
minus the baseline's, measured first in the same invocation (the link rows against a baseline
of their own on the namespaces); "left over": processes of the launcher's tree (recorded from
/proc while it ran) still alive once it exited; the script then kills exactly those.
A row that runs past 5 x baseline + 60 s is "hung": the launcher gets SIGTERM, then SIGKILL.
JSON: rows that could not run here (link rows without root) are not counted and are listed
under "not_counted"; "worst_extra_s" is over recovered rows; "min_accuracy" is null when a counted row produced no accuracy.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(ROOT, "workers", "mnist.py")
TAG_VARIABLE = "DISTTRAIN_FAULT_MATRIX_TAG"
POLL_S = 0.05
SETTLE_S = 5.0           # an exiting process gets this long before it counts as left over
BASELINE_DEADLINE_S = 1800.0
STOP_WAIT_S = 30.0       # a hung launcher's time to stop its job after our SIGTERM
# What names a fault: the launcher restarting or failing, a process naming a dead or
# frozen peer (`[worker 0] disttrain: dead: worker 1 (no heartbeat for 10.2 s)`).
DETECTION = re.compile(r"^launch: restarting |^launch: .* exited with code |"
                       r"disttrain: (.* )?dead: |unresponsive")
SUBNET = "10.78.0"       # the namespace hosts' private subnet (tests use 10.77.0)


# ---- the launcher's process tree, from /proc ---------------------------------------

def read_stat(pid):
    """(state, parent pid, start time in clock ticks) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[1]), int(fields[19])


def environ_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            pairs = environ.read().split(b"\0")
    except OSError:
        return {}
    return dict(pair.decode(errors="replace").split("=", 1) for pair in pairs if b"=" in pair)


def cmdline_of(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().decode(errors="replace").split("\0")
    except OSError:
        return []


class ProcessTree:
    """Every process descended from `root` that a scan has seen, kept by (pid, start time) so
    that one reparented to init when its parent died still counts, and a reused pid does not."""

    def __init__(self, root, tag):
        self.root, self.tag = root, tag
        stat = read_stat(root)
        self.known = {root: stat[2] if stat else None}

    def scan(self):
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = read_stat(int(entry))
                if stat is not None:
                    stats[int(entry)] = stat
        grew = True
        while grew:   # a child of a new member is a member too, whatever order /proc listed them
            grew = False
            for pid, (_, parent, started) in stats.items():
                if pid not in self.known and parent in self.known and self._alive_in(parent, stats):
                    self.known[pid] = started
                    grew = True
        return self

    def _alive_in(self, pid, stats):
        return pid in stats and stats[pid][2] == self.known[pid]

    def alive(self):
        """Known pids still running (zombies excluded), plus any process carrying our tag in
        its environment that a scan missed (forked and reparented between two scans)."""
        pids = set()
        for pid, started in self.known.items():
            stat = read_stat(pid)
            if stat is not None and stat[2] == started and stat[0] != "Z":
                pids.add(pid)
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in pids and int(entry) != os.getpid():
                stat = read_stat(int(entry))
                if stat is not None and stat[0] != "Z" and \
                        environ_of(int(entry)).get(TAG_VARIABLE) == self.tag:
                    self.known[int(entry)] = stat[2]
                    pids.add(int(entry))
        return sorted(pids)

    def program(self, role, rank):
        """The pid running as `role` `rank`: the topmost such process that is not a
        launch.guard (under the ssh back end the guard carries the same environment)."""
        matches = []
        for pid in self.alive():
            env = environ_of(pid)
            if env.get("DISTTRAIN_ROLE") == role and \
                    (rank is None or env.get("DISTTRAIN_RANK") == str(rank)) and \
                    "launch.guard" not in cmdline_of(pid):
                matches.append(pid)
        for pid in matches:
            stat = read_stat(pid)
            if stat is not None and stat[1] not in matches:
                return pid
        return None

    def kill(self, pids):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---- output, timestamped as it arrives -----------------------------------------------

class Lines:
    """Reads a stream in a thread, keeping (monotonic time, line) pairs."""

    def __init__(self, stream):
        self.lines = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
        stream.close()

    def first_match(self, after, pattern):
        for at, line in list(self.lines):
            if at >= after and pattern.search(line):
                return at, line
        return None

    def text(self):
        return "\n".join(line for _, line in self.lines)


def summary_of(stdout_lines):
    """The JSON summary: the last `[worker 0] {...}` line, or None."""
    for _, line in reversed(stdout_lines.lines):
        if line.startswith("[worker 0] {"):
            with contextlib.suppress(ValueError):
                return json.loads(line[len("[worker 0] "):])
    return None


# ---- network namespaces as hosts ------------------------------------------------------

def namespaces_unavailable():
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"dtfmprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is refused here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args):
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


class NamespaceHosts:
    """Three hosts as namespaces: host 0 (scheduler and servers) holds a bridge with a veth
    link to hosts 1 and 2 (worker 0, worker 1). `link(2, up)` cuts or restores host 2's."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.names = [f"dtfm{tag}h{index}" for index in range(3)]
        self.addresses = [f"{SUBNET}.{index + 1}" for index in range(3)]

    def __enter__(self):
        hub = self.names[0]
        try:
            for name in self.names:
                ip("netns", "add", name)
                ip("-n", name, "link", "set", "lo", "up")
            ip("-n", hub, "link", "add", "br0", "type", "bridge")
            ip("-n", hub, "addr", "add", f"{self.addresses[0]}/24", "dev", "br0")
            ip("-n", hub, "link", "set", "br0", "up")
            for index, name in enumerate(self.names[1:], 1):
                ip("-n", hub, "link", "add", f"h{index}", "type", "veth", "peer", "name", "eth0",
                   "netns", name)
                ip("-n", hub, "link", "set", f"h{index}", "master", "br0", "up")
                ip("-n", name, "addr", "add", f"{self.addresses[index]}/24", "dev", "eth0")
                ip("-n", name, "link", "set", "eth0", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def link(self, index, up):
        ip("-n", self.names[0], "link", "set", f"h{index}", "up" if up else "down")

    def pids(self):
        pids = []
        for name in self.names:
            listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            pids += [int(word) for word in listed.stdout.split() if word.isdigit()]
        return pids

    def __exit__(self, *error):
        for name in self.names:
            for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                      text=True).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        return False

    def launcher_options(self):
        hosts = ",".join(f"{name}:{slots}@{address}" for name, slots, address
                         in zip(self.names, (0, 1, 1), self.addresses))
        return ["-H", hosts, "--remote-cmd", "ip netns exec {host}"]


# ---- faults ---------------------------------------------------------------------------

class ProcessFault:
    """kill -9 or SIGSTOP of one process of the job."""
    backend = "local"

    def __init__(self, signum, role, rank):
        self.signum, self.role, self.rank = signum, role, rank

    def inject(self, run):
        pid = run.tree.scan().program(self.role, self.rank)
        if pid is None:
            return f"no {self.role} {self.rank if self.rank is not None else ''} found to signal"
        os.kill(pid, self.signum)
        return None

    def tick(self, run):
        pass

    def finish(self, run):
        pass


class LinkFault:
    """Worker 1's host loses its link for `seconds`, then gets it back."""
    backend = "netns"

    def __init__(self, seconds):
        self.seconds = seconds
        self.up_at = None

    def inject(self, run):
        run.hosts.link(2, up=False)
        self.up_at = time.monotonic() + self.seconds
        return None

    def tick(self, run):
        if self.up_at is not None and time.monotonic() >= self.up_at:
            self.finish(run)

    def finish(self, run):
        if self.up_at is not None:
            self.up_at = None
            run.hosts.link(2, up=True)


class ElasticFault:
    """A worker added or removed mid-run in an elastic job (`-n MIN:MAX`, local back end): the
    launcher reads its slots from a --host-discovery-script made here, which prints a file that
    holds `localhost:SLOTS`. At injection the file is rewritten to `localhost:TO`; to remove
    a worker, worker 1 then gets SIGTERM (it leaves after its step and exits 0)."""
    backend = "elastic"

    def __init__(self, workers, slots, to, leaver=None):
        self.workers, self.slots, self.to, self.leaver = workers, slots, to, leaver
        self.detection = re.compile(
            rf"^launch: worker {leaver} left on host \S+; its rank is free" if leaver is not None
            else r"^launch: worker \d+ joined on host ")
        self.slots_file = None

    def launcher_options(self, directory):
        """Writes the slots file and the discovery script into `directory`; the launcher's
        options that name the script."""
        self.slots_file = os.path.join(directory, "slots")
        write_atomically(self.slots_file, f"localhost:{self.slots}\n")
        script = os.path.join(directory, "discover.sh")
        write_atomically(script, f"#!/bin/sh\ncat '{self.slots_file}'\n")
        os.chmod(script, 0o755)
        return ["--host-discovery-script", script]

    def inject(self, run):
        # The slots first: the launcher must not start a new worker on the leaver's slot.
        write_atomically(self.slots_file, f"localhost:{self.to}\n")
        if self.leaver is None:
            return None
        pid = run.tree.scan().program("worker", self.leaver)
        if pid is None:
            return f"no worker {self.leaver} found to send SIGTERM"
        os.kill(pid, signal.SIGTERM)
        return None

    def tick(self, run):
        pass

    def finish(self, run):
        pass


def write_atomically(path, text):
    """A reader (the discovery script) sees the old content or the new, never a part."""
    with open(path + ".tmp", "w") as out:
        out.write(text)
    os.replace(path + ".tmp", path)


FAULTS = {
    "kill-worker": ProcessFault(signal.SIGKILL, "worker", 1),
    "stop-worker": ProcessFault(signal.SIGSTOP, "worker", 1),
    "kill-server": ProcessFault(signal.SIGKILL, "server", 1),
    "stop-server": ProcessFault(signal.SIGSTOP, "server", 1),
    "kill-scheduler": ProcessFault(signal.SIGKILL, "scheduler", None),
    "stop-scheduler": ProcessFault(signal.SIGSTOP, "scheduler", None),
    "link-down-3s": LinkFault(3.0),
    "link-down-30s": LinkFault(30.0),
    "worker-add": ElasticFault("2:3", slots=2, to=3),
    "worker-remove": ElasticFault("1:2", slots=2, to=1, leaver=1),
}


# ---- one launcher run -----------------------------------------------------------------

class Run:
    """One launcher, watched until it exits: injects `fault` (if any) after the first step,
    times the first line that names it, and counts what the launcher left behind."""

    def __init__(self, argv, metrics_dir, hosts=None, detection=DETECTION):
        self.detection_pattern = detection
        self.tag = uuid.uuid4().hex[:12]
        self.metrics_dir, self.hosts = metrics_dir, hosts
        env = {**os.environ, TAG_VARIABLE: self.tag,
               "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        self.argv = argv[:3] + ["--env", f"{TAG_VARIABLE}={self.tag}"] + argv[3:]
        self.started = time.monotonic()
        self.popen = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True)
        self.tree = ProcessTree(self.popen.pid, self.tag)
        self.stdout, self.stderr = Lines(self.popen.stdout), Lines(self.popen.stderr)
        self.injected_at = self.ended_at = None
        self.notes = []
        self.hung = False
        self.left_over = None

    def training(self):
        """True once a worker recorded its first step."""
        with contextlib.suppress(OSError):
            for name in os.listdir(self.metrics_dir):
                if name.startswith("worker-") and os.path.getsize(os.path.join(self.metrics_dir, name)):
                    return True
        return False

    def watch(self, fault=None, inject_after_s=0.0, deadline_s=BASELINE_DEADLINE_S):
        training_at = None
        last_scan = 0.0
        try:
            while self.popen.poll() is None:
                now = time.monotonic()
                if now - last_scan >= 0.2:
                    self.tree.scan()
                    last_scan = now
                if fault is not None and self.injected_at is None:
                    if training_at is None and self.training():
                        training_at = now
                    if training_at is not None and now - training_at >= inject_after_s:
                        problem = fault.inject(self)
                        self.injected_at = time.monotonic()
                        if problem:
                            self.notes.append(problem)
                if fault is not None:
                    fault.tick(self)
                if now - self.started > deadline_s:
                    self.hung = True
                    self._stop_hung(deadline_s)
                    break
                time.sleep(POLL_S)
            self.popen.wait()
            self.ended_at = time.monotonic()
        finally:
            if self.popen.poll() is None:   # interrupted (Ctrl-C, SIGTERM): end it, then its tree
                self.popen.kill()
                self.popen.wait()
                self.ended_at = time.monotonic()
            if fault is not None:
                fault.finish(self)
            self._collect_left_over()   # first: a leftover may hold the output pipes open
            self.stdout.thread.join(10)
            self.stderr.thread.join(10)
        if fault is not None and self.injected_at is None:
            self.notes.append("not injected: the job ended before its first step was recorded "
                              f"+ {inject_after_s:g} s")
        return self

    def _stop_hung(self, deadline_s):
        self.notes.append(f"hung: still running after {deadline_s:.0f} s; sent the launcher SIGTERM")
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.notes.append(f"the launcher ignored SIGTERM for {STOP_WAIT_S:g} s; killed it")
            self.popen.kill()

    def _collect_left_over(self):
        """What still runs SETTLE_S after the launcher exited counts; then it is killed."""
        end = time.monotonic() + SETTLE_S
        while True:
            alive = [pid for pid in self.tree.scan().alive() if pid != self.popen.pid]
            if self.hosts is not None:
                alive = sorted(set(alive) | set(self.hosts.pids()))
            if not alive or time.monotonic() >= end:
                break
            time.sleep(POLL_S)
        self.left_over = len(alive)
        if alive:
            described = ", ".join(f"{pid} ({' '.join(cmdline_of(pid))[:80]})" for pid in alive)
            self.notes.append(f"left over, killed now: {described}")
        for _ in range(20):   # a leftover may still fork: kill until none is left
            alive = [pid for pid in self.tree.scan().alive() if pid != self.popen.pid]
            if not alive:
                break
            self.tree.kill(alive)
            time.sleep(POLL_S)

    @property
    def wall_s(self):
        return self.ended_at - self.started

    @property
    def detection(self):
        if self.injected_at is None:
            return None
        found = [match for match in (self.stderr.first_match(self.injected_at, self.detection_pattern),
                                     self.stdout.first_match(self.injected_at, self.detection_pattern))
                 if match]
        return min(found) if found else None


# ---- the matrix -----------------------------------------------------------------------

def worker_command(args, metrics_dir):
    command = [sys.executable, MNIST, "--epochs", f"{args.epochs:g}", "--metrics-dir", metrics_dir]
    if args.limit_train:
        command += ["--limit-train", str(args.limit_train)]
    return command + args.worker_args


def launcher_argv(args, workers="2", backend_options=(), command=()):
    argv = [sys.executable, "-m", "launch", "-n", workers, "-s", "2", *backend_options]
    if args.max_restarts:   # the flag is left out at 0, so today's launcher runs the rows too
        argv += ["--max-restarts", str(args.max_restarts)]
        if args.restart_timeout is not None:
            argv += ["--restart-timeout", f"{args.restart_timeout:g}"]
    if args.server_replicas:
        argv += ["--server-replicas", str(args.server_replicas)]
    if args.heartbeat_timeout is not None:   # how long a silence must last to be a fault
        argv += ["--env", f"DISTTRAIN_HEARTBEAT_TIMEOUT={args.heartbeat_timeout:g}"]
    return argv + ["--", *command]


def say(text):
    print(f"fault_matrix: {text}", file=sys.stderr, flush=True)


def keep_log(args, name, run):
    """Each line with its arrival time in seconds from the launch (`+12.345`), and the
    injection as a line of its own, so that a log shows which message came when."""
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        for stream in ("stdout", "stderr"):
            lines = list(getattr(run, stream).lines)
            if run.injected_at is not None:
                lines.append((run.injected_at, "fault_matrix: fault injected"))
            with open(os.path.join(args.log_dir, f"{name}.{stream}"), "w") as log:
                for at, line in sorted(lines, key=lambda pair: pair[0]):
                    log.write(f"+{at - run.started:.3f} {line}\n")


def baseline(args, scratch, backend, hosts=None):
    metrics_dir = tempfile.mkdtemp(dir=scratch)
    options = hosts.launcher_options() if hosts else []
    say(f"baseline ({backend}): {' '.join(launcher_argv(args, backend_options=options))} ...")
    run = Run(launcher_argv(args, backend_options=options, command=worker_command(args, metrics_dir)),
              metrics_dir, hosts).watch()
    keep_log(args, f"baseline-{backend}", run)
    summary = summary_of(run.stdout)
    if run.popen.returncode != 0 or summary is None:
        tail = "\n".join(run.stderr.text().splitlines()[-15:])
        if "unrecognized arguments" in tail:
            tail += ("\n(a launcher without --max-restarts / --server-replicas: run with "
                     "--max-restarts 0 and without --server-replicas)")
        raise SystemExit(f"fault_matrix: the fault-free {backend} baseline failed (exit "
                         f"{run.popen.returncode}); no row can be measured against it:\n{tail}")
    say(f"baseline ({backend}): {run.wall_s:.1f} s, test accuracy {summary['test_accuracy']:.4f}, "
        f"{run.left_over} left over")
    return {"wall_s": run.wall_s, "accuracy": summary["test_accuracy"], "left_over": run.left_over}


def fault_argv(args, fault, directory, metrics_dir, hosts=None):
    """The launcher command of one fault's run; an elastic row's discovery script goes into
    `directory`."""
    if fault.backend == "elastic":
        return launcher_argv(args, workers=fault.workers,
                             backend_options=fault.launcher_options(directory),
                             command=worker_command(args, metrics_dir))
    options = hosts.launcher_options() if hosts else []
    return launcher_argv(args, backend_options=options, command=worker_command(args, metrics_dir))


def measure(args, scratch, name, fault, base, hosts=None):
    metrics_dir = tempfile.mkdtemp(dir=scratch)
    argv = fault_argv(args, fault, tempfile.mkdtemp(dir=scratch), metrics_dir, hosts)
    deadline_s = 5 * base["wall_s"] + 60
    say(f"{name}: running (deadline {deadline_s:.0f} s) ...")
    run = Run(argv, metrics_dir, hosts, getattr(fault, "detection", DETECTION)).watch(
        fault, args.inject_after, deadline_s)
    keep_log(args, name, run)
    summary = summary_of(run.stdout)
    accuracy = summary.get("test_accuracy") if summary else None
    detection = run.detection
    if detection:
        run.notes.insert(0, f"detected by: {detection[1]}")
    code = run.popen.returncode
    row = {
        "fault": name, "counted": True, "exit": code, "hung": run.hung,
        "detected_s": None if detection is None else detection[0] - run.injected_at,
        "ended_s": None if run.injected_at is None else run.ended_at - run.injected_at,
        "recovered": (code == 0 and not run.hung and run.injected_at is not None
                      and accuracy is not None and accuracy >= args.min_accuracy),
        "extra_s": run.wall_s - base["wall_s"],
        "accuracy": accuracy, "left_over": run.left_over, "notes": run.notes,
    }
    say(f"{name}: exit {code}, {run.wall_s:.1f} s, {run.left_over} left over")
    return row


def skipped(name, why):
    return {"fault": name, "counted": False, "why": why, "left_over": None, "notes": []}


def figure(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows):
    header = ["fault", "detected after (s)", "recovered", "extra wall (s)", "test accuracy",
              "left over", "exit", "ended after (s)"]
    lines = []
    for row in rows:
        if not row["counted"]:
            lines.append([row["fault"], row["why"]])
            continue
        exit_text = "hung" if row["hung"] else str(row["exit"])
        lines.append([row["fault"], figure(row["detected_s"]), "yes" if row["recovered"] else "no",
                      figure(row["extra_s"]), figure(row["accuracy"], 4), str(row["left_over"]),
                      exit_text, figure(row["ended_s"])])
    widths = [max(len(header[i]), *(len(line[i]) for line in lines if len(line) > 2))
              for i in range(len(header))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for line in lines:
        if len(line) == 2:
            out.append(f"| {line[0].ljust(widths[0])} | {line[1]}")
        else:
            out.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |")
    return out


def totals(args, rows, bases):
    counted = [row for row in rows if row["counted"]]
    recovered = [row for row in counted if row["recovered"]]
    accuracies = [row["accuracy"] for row in counted]
    ended = [row["ended_s"] for row in counted if row["ended_s"] is not None]
    return {
        "faults": len(counted),
        "recovered": len(recovered),
        "worst_extra_s": round(max(row["extra_s"] for row in recovered), 1) if recovered else None,
        "min_accuracy": None if not accuracies or None in accuracies else min(accuracies),
        "max_restarts": args.max_restarts,
        "baseline_s": {backend: round(base["wall_s"], 1) for backend, base in bases.items()},
        "nonzero_exits": sum(row["exit"] != 0 or row["hung"] for row in counted),
        "hung": sum(row["hung"] for row in counted),
        "longest_end_after_fault_s": round(max(ended), 1) if ended else None,
        "left_over": sum(row["left_over"] or 0 for row in rows)
        + sum(base["left_over"] for base in bases.values()),
        "not_counted": {row["fault"]: row["why"] for row in rows if not row["counted"]},
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-restarts", type=int, default=1,
                        help="passed to the launcher (left out at 0: today's fail-fast launcher)")
    parser.add_argument("--restart-timeout", type=float, help="passed to the launcher when given")
    parser.add_argument("--heartbeat-timeout", type=float,
                        help="DISTTRAIN_HEARTBEAT_TIMEOUT for every process (default 10 s): a "
                             "link down for less than this is ridden out, not a fault")
    parser.add_argument("--server-replicas", type=int, default=0,
                        help="passed to the launcher when not 0")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"comma-separated rows (default all: {','.join(FAULTS)})")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--limit-train", type=int, help="train on the first N examples only")
    parser.add_argument("--min-accuracy", type=float, default=0.97,
                        help="test accuracy a recovered run must reach (default %(default)g)")
    parser.add_argument("--inject-after", type=float, default=2.0,
                        help="seconds after the first recorded step (default %(default)g)")
    parser.add_argument("--log-dir", help="keep each run's launcher output here, lines timed")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    parser.add_argument("worker_args", nargs=argparse.REMAINDER,
                        help="after --: more flags for workers/mnist.py")
    args = parser.parse_args(argv)
    if args.worker_args[:1] == ["--"]:
        args.worker_args = args.worker_args[1:]
    names = [name.strip() for name in args.faults.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAULTS]
    if unknown or not names:
        parser.error(f"--faults {args.faults!r}: unknown {unknown}; choose from {','.join(FAULTS)}")
    args.faults = names
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM unwinds like Ctrl-C: every launcher tree is killed and the namespaces deleted.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rows, bases = [], {}
    with tempfile.TemporaryDirectory(prefix="fault-matrix-") as scratch:
        for name in args.faults:
            fault = FAULTS[name]
            if fault.backend in ("local", "elastic"):   # elastic rows: the same job, local
                if "local" not in bases:
                    bases["local"] = baseline(args, scratch, "local")
                rows.append(measure(args, scratch, name, fault, bases["local"]))
        link_rows = [name for name in args.faults if FAULTS[name].backend == "netns"]
        if link_rows:
            why = namespaces_unavailable()
            if why:
                rows += [skipped(name, f"skipped: {why}") for name in link_rows]
            else:
                with NamespaceHosts() as hosts:
                    bases["netns"] = baseline(args, scratch, "netns", hosts)
                    for name in link_rows:
                        rows.append(measure(args, scratch, name, FAULTS[name], bases["netns"], hosts))
    rows.sort(key=lambda row: args.faults.index(row["fault"]))
    result = totals(args, rows, bases)
    if not args.json_only:
        print(f"max-restarts {args.max_restarts}; baseline "
              + ", ".join(f"{backend} {base['wall_s']:.1f} s (accuracy {base['accuracy']:.4f})"
                          for backend, base in bases.items()))
        for line in table(rows):
            print(line)
        for row in rows:
            for note in row["notes"]:
                print(f"  {row['fault']}: {note}")
        if result["not_counted"]:
            print(f"not counted in the JSON totals: {', '.join(result['not_counted'])}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
