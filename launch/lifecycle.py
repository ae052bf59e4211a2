"""Runs the processes of one job: starts them, relays their output, restarts a failed one
while --max-restarts allows, and stops them all when the workers are done, when one process
fails for good, or on Ctrl-C/SIGTERM."""

import contextlib
import dataclasses
import functools
import os
import select
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from disttrain import config
from launch.output import LinePrefixer, prefix_for

STOP_GRACE_S = 5.0      # SIGTERM, then SIGKILL this much later
DRAIN_DEADLINE_S = 2.0  # output still buffered in pipes after the last exit
# The scheduler and servers exit by themselves once every worker has said goodbye; a
# SIGTERM in the middle of that (Python has already reset its handlers while it shuts
# down) would end them by the signal. So they get this long before we send it.
SELF_EXIT_WAIT_S = 2.0
POLL_S = 0.05
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Exit code of a job stopped by SIGTERM (preemption) whose workers all wrote their
# checkpoint and stopped with it (EX_TEMPFAIL): rerun the same command to resume.
PREEMPTED_EXIT = 75
# A line on a remote process's stdin that makes launch.guard SIGKILL its program at once
# (a frozen process, which a SIGTERM would reach only once it runs again).
KILL_LINE = b"kill\n"


@dataclass
class LaunchCommand:
    """How a back end starts one process on this machine."""
    argv: list
    env: dict
    # Remote processes run under launch.guard, which stops its program when its
    # stdin closes: that is how a stop reaches a process behind ssh or srun.
    stopped_by_closing_stdin: bool = False
    cpu: int | None = None  # pin the process to this core (--bind, local back end)
    stdin_data: bytes = b""  # written to its stdin at start: a remote process's keys
    # remake(env_changes) -> the command with those changes to the process's environment,
    # for a back end whose environment is not `env` (ssh, srun: it is in the remote line).
    remake: object = None

    def with_env(self, changes):
        """The same command, the process's environment changed by `changes` (a restart's
        DISTTRAIN_INCARNATION)."""
        if self.remake is not None:
            return self.remake(changes)
        return dataclasses.replace(self, env={**self.env, **changes})


class Child:
    """One started process: its Popen, its output relays, and how it ended."""

    def __init__(self, process, command, incarnation=0):
        self.process = process
        self.command = command
        self.incarnation = incarnation  # how many times this process was restarted before
        self.popen = None
        self.started_at = None  # time.monotonic() at its start
        self.returncode = None
        self.killed_by_us = False
        self.asked_to_stop = False
        self.unresponsive = None  # why we killed it: the scheduler's "no heartbeat ..."
        self.relays = {}  # fd -> LinePrefixer

    @property
    def name(self):
        return self.process.name

    def start(self, log_file, collector=None):
        prefix = prefix_for(self.name)
        divert = functools.partial(collector.take, self.name) if collector else None
        stdin = subprocess.PIPE if self.command.stopped_by_closing_stdin else subprocess.DEVNULL
        with pinned_to(self.command.cpu):
            # A session of its own: Ctrl-C at the terminal reaches only us, and we
            # can signal the process with everything it started, as one group.
            self.popen = subprocess.Popen(
                self.command.argv, env=self.command.env, stdin=stdin,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.started_at = time.monotonic()
        if self.command.stdin_data:
            # Keys travel inside the ssh connection, never on a command line; a process that
            # died at once shows in its exit code, not here.
            with contextlib.suppress(OSError):
                self.popen.stdin.write(self.command.stdin_data)
                self.popen.stdin.flush()
        self.relays[self.popen.stdout.fileno()] = LinePrefixer(prefix, sys.stdout.buffer, log_file, divert)
        self.relays[self.popen.stderr.fileno()] = LinePrefixer(prefix, sys.stderr.buffer, log_file, divert)

    def poll(self):
        if self.returncode is None and self.popen is not None:
            self.returncode = self.popen.poll()
            if self.returncode is not None:
                # Whatever it left behind in its group goes with it.
                self.signal_group(signal.SIGKILL)
        return self.returncode

    @property
    def running(self):
        return self.popen is not None and self.returncode is None

    def ask_to_stop(self):
        self.asked_to_stop = True
        if self.command.stopped_by_closing_stdin:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        else:
            self.signal_group(signal.SIGTERM)
            # A stopped (SIGSTOPped) process gets its SIGTERM only once it runs again.
            self.signal_group(signal.SIGCONT)

    def kill(self):
        self.killed_by_us = True
        self.signal_group(signal.SIGKILL)

    def kill_at_once(self):
        """SIGKILL for the process and all it started, wherever it runs: a remote process's
        guard is told on its stdin (launch.guard KILL_LINE) and closing it is the fall-back."""
        if not self.command.stopped_by_closing_stdin:
            self.kill()
            return
        self.killed_by_us = True
        try:
            self.popen.stdin.write(KILL_LINE)
            self.popen.stdin.flush()
        except (OSError, ValueError):
            pass
        with contextlib.suppress(OSError):
            self.popen.stdin.close()

    def signal_group(self, signum):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)


@contextlib.contextmanager
def pinned_to(cpu):
    """Runs the body with this thread pinned to `cpu`, so a child forked inside
    is born pinned (no window where its BLAS threads start elsewhere)."""
    if cpu is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def describe_status(code):
    """0, 3, or a signal's name for a process that a signal ended."""
    if code is None:
        return "-"
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return str(code)


def heartbeat_timeout(child):
    """The DISTTRAIN_HEARTBEAT_TIMEOUT `child` runs with (0 when unknown). A remote process
    gets only its contract environment; a local one ours as well."""
    if child is None:
        return 0.0
    env = child.process.env if child.command.stopped_by_closing_stdin else child.command.env
    try:
        return config.from_env(env).heartbeat_timeout
    except config.ConfigError:
        return 0.0


def exit_code_for(code):
    """The launcher's own exit code for a child's: shells' 128+N for signal N."""
    return 128 - code if code < 0 else code


class Job:
    """The children of one launch and the rules that end it: all workers exited 0
    (exit 0), any process exited non-zero (its code) with no restart left, or a signal to
    us (128+N). `max_restarts` (--max-restarts) is the job-wide budget of restarts."""

    def __init__(self, processes, commands, log_dir=None, grace_s=STOP_GRACE_S, collector=None,
                 max_restarts=0, elastic=None):
        self.children = [Child(process, command) for process, command in zip(processes, commands)]
        self.max_restarts = max_restarts
        self.elastic = elastic   # a launch.elastic.Elastic (-n MIN:MAX): workers come and go
        self.restarts = 0
        self.scheduler_silent = {}  # reporter name -> when it last reported the scheduler silent
        self.log_file_of = {}  # process name -> its --log-dir file, which a replacement continues
        self.collector = collector  # a launch.observe.Collector: timeline and reports
        self.log_dir = log_dir
        self.grace_s = grace_s
        self.selector = selectors.DefaultSelector()
        self.log_files = []
        self.exit_code = 0
        self.stopping = False
        self.kill_at = None
        self.stop_at = None  # when to stop scheduler and servers once all workers are done
        self.signal_received = None
        self.preempting = False  # SIGTERM: workers checkpoint and stop first, then the rest
        self.kill_now = False
        self.started_at = None

    def run(self):
        """Runs the job to its end and returns the launcher's exit code."""
        self.started_at = time.monotonic()
        previous_handlers = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        try:
            self._start_all()
            while any(child.running for child in self.children):
                self._relay_output(POLL_S)
                self._check_signal()
                self._check_unresponsive()
                self._check_exits()
                if self.elastic is not None:
                    self.elastic.check(self)
                self._check_preempted_workers()
                self._check_kill_deadline()
        finally:
            for child in self.children:
                if child.running:
                    child.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.popen.wait(timeout=self.grace_s)
                    child.returncode = child.popen.returncode
            self._drain_output()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            for log_file in self.log_files:
                log_file.close()
        self._report_observations()
        self._print_summary()
        return self.exit_code

    def _report_observations(self):
        if self.collector is None:
            return
        for line in self.collector.straggler_report():
            self._say(line)
        try:
            path = self.collector.write_timeline([child.name for child in self.children])
        except OSError as error:
            self._say(f"cannot write the timeline: {error}")
        else:
            if path:
                self._say(f"timeline written to {path} (open it in https://ui.perfetto.dev "
                          f"or chrome://tracing)")

    def _start_all(self):
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
        for child in self.children:
            if self.stopping:
                return
            if self.log_dir:
                log_file = open(os.path.join(self.log_dir, child.name.replace(" ", "-") + ".log"), "wb")
                self.log_files.append(log_file)
                self.log_file_of[child.name] = log_file
            if not self._start(child):
                return

    def add_child(self, process, command):
        """Starts one more process (elastic: a worker on a new slot); its Child, or None."""
        child = Child(process, command)
        if self.log_dir and child.name not in self.log_file_of:
            log_file = open(os.path.join(self.log_dir, child.name.replace(" ", "-") + ".log"), "ab")
            self.log_files.append(log_file)
            self.log_file_of[child.name] = log_file
        self.children.append(child)
        return child if self._start(child) else None

    def _start(self, child):
        try:
            child.start(self.log_file_of.get(child.name), self.collector)
        except OSError as error:
            self._fail(f"cannot start {child.name} ({' '.join(child.command.argv)}): {error}", 127)
            return False
        for fd in child.relays:
            self.selector.register(fd, selectors.EVENT_READ, child)
        return True

    def _on_signal(self, signum, frame):
        if self.signal_received is not None and (signum, self.signal_received) != \
                (signal.SIGTERM, signal.SIGTERM):
            # A second Ctrl-C: the user does not want to wait for the grace period. (Slurm
            # may send a preemption's SIGTERM to the batch script and to us: that is one.)
            self.kill_now = True
        if self.signal_received is None or signum != signal.SIGTERM:
            self.signal_received = signum

    def _check_signal(self):
        if self.signal_received == signal.SIGTERM and not self.stopping:
            self._preempt()
        elif self.signal_received is not None and not self.stopping:
            name = signal.Signals(self.signal_received).name
            self._say(f"got {name}, stopping every process")
            self.exit_code = 128 + self.signal_received
            self._stop_all()

    def _preempt(self):
        """SIGTERM (a scheduler preempting the job): ask only the workers to stop; a worker
        with --checkpoint-dir writes a checkpoint at the next step, which needs the servers
        up, and exits PREEMPTED_EXIT. The rest is stopped once the workers are gone."""
        self._say(f"got SIGTERM, stopping every process (workers first: they may write a "
                  f"checkpoint within --grace {self.grace_s:g} s)")
        self.exit_code = 128 + signal.SIGTERM
        self.stopping = self.preempting = True
        self.kill_at = time.monotonic() + self.grace_s
        for child in self.children:
            if child.running and child.process.role == "worker":
                child.ask_to_stop()

    def _check_preempted_workers(self):
        workers = [child for child in self.children if child.process.role == "worker"]
        if self.preempting and not any(child.running for child in workers):
            self.preempting = False
            if all(child.returncode == PREEMPTED_EXIT for child in workers):
                self.exit_code = PREEMPTED_EXIT
                self._say("every worker wrote its checkpoint; rerun the same command to resume")
            self._stop_all()

    def _check_exits(self):
        for index, child in enumerate(self.children):
            was_running = child.running
            code = child.poll()
            if not was_running or code is None:
                continue
            if code != 0 and not self.stopping:
                if self._may_restart():
                    self._restart(index, child, code)
                else:
                    self._fail(self._failure_message(child, code), exit_code_for(code))
            elif code != 0 and self.exit_code == 0 and not self._stopped_as_asked(child, code):
                # Every worker succeeded, but a server failed while shutting down.
                self._say(f"{child.name} exited with code {code} while stopping")
                self.exit_code = exit_code_for(code)
        workers = [child for child in self.children if child.process.role == "worker"]
        if not self.stopping and all(child.returncode == 0 for child in workers):
            if self.stop_at is None:
                self.stop_at = time.monotonic() + SELF_EXIT_WAIT_S
            elif time.monotonic() >= self.stop_at:
                self._stop_all()

    def _may_restart(self):
        # Once every worker is done the job is ending: a failing server ends it as today.
        return self.restarts < self.max_restarts and self.stop_at is None

    def _restart(self, index, child, code):
        """Starts `child`'s process again in its place: same role, rank, host, command and
        keys; DISTTRAIN_INCARNATION counts its restarts."""
        self.restarts += 1
        reason = child.unresponsive or self._exit_reason(child, code)
        self._say(f"restarting {child.name} ({reason}), "
                  f"restart {self.restarts} of {self.max_restarts}")
        self._retire(child)
        incarnation = child.incarnation + 1
        replacement = Child(child.process,
                            child.command.with_env({"DISTTRAIN_INCARNATION": str(incarnation)}),
                            incarnation)
        self.children[index] = replacement
        self._start(replacement)

    def _failure_message(self, child, code):
        message = f"{child.name} exited with code {code}{self._signal_hint(child, code)}"
        if child.unresponsive:
            message += f", killed as unresponsive ({child.unresponsive})"
        if self.max_restarts:
            message += f"; no restart left (all {self.max_restarts} of --max-restarts used)"
        return message

    @classmethod
    def _exit_reason(cls, child, code):
        """`exit SIGKILL`, `exit 3`, `exit 137: SIGKILL on node2` (a remote guard's 128+N)."""
        if code < 0:
            return f"exit {describe_status(code)}"
        hint = cls._signal_hint(child, code).strip(" ()")
        return f"exit {code}: {hint}" if hint else f"exit {code}"

    def _check_unresponsive(self):
        """Kills a process reported silent (launch.observe passes the `unresponsive`
        messages on: the scheduler's about a worker or server, any other process's about
        the scheduler) so that _check_exits restarts it. Without --max-restarts they are
        ignored: the processes end the job as before."""
        if self.collector is None:
            return
        for reporter, role, rank, why, silent_s in self.collector.take_unresponsive():
            child = self._child(role, rank)
            # Once every worker is done (stop_at), the rest is ending anyway.
            if not self.max_restarts or self.stopping or self.stop_at is not None \
                    or child is None or not child.running or child.unresponsive:
                continue
            # A process is reported only once silent for longer than the reporter's
            # heartbeat timeout: a report about one that has not run that long (or as long
            # as the report's silent_s) is about its predecessor, which this one replaced.
            silent_s = max(silent_s or 0.0, heartbeat_timeout(self._child_named(reporter)))
            if time.monotonic() - child.started_at < silent_s:
                continue
            if role == "scheduler" and not self._most_report_the_scheduler(reporter, why):
                continue
            then = "to restart it" if self._may_restart() else "(no restart left)"
            self._say(f"{reporter} reports {child.name} unresponsive ({why}); killing it {then}")
            child.unresponsive = why
            child.kill_at_once()

    def _most_report_the_scheduler(self, reporter, why):
        """True once more than half of the running workers and servers reported the
        scheduler silent within one heartbeat timeout. A frozen scheduler falls silent for
        all of them at once; a host whose link is down hears nothing either, but its
        processes alone are no majority, and the scheduler reports them instead."""
        now = time.monotonic()
        self.scheduler_silent[reporter] = now
        voters = {child.name for child in self.children
                  if child.running and child.process.role != "scheduler"}
        window = heartbeat_timeout(self._child_named(reporter)) or STOP_GRACE_S
        agreeing = {name for name, at in self.scheduler_silent.items()
                    if name in voters and now - at <= window}
        if 2 * len(agreeing) > len(voters):
            self.scheduler_silent.clear()
            return True
        self._say(f"{reporter} reports scheduler unresponsive ({why}); {len(agreeing)} of "
                  f"{len(voters)} processes do, waiting for a majority (a host cut off "
                  f"hears no scheduler either)")
        return False

    def _child(self, role, rank):
        return next((child for child in self.children
                     if (child.process.role, child.process.rank) == (role, rank)), None)

    def _child_named(self, name):
        return next((child for child in self.children if child.name == name), None)

    @staticmethod
    def _stopped_as_asked(child, code):
        """A process we killed, or one that our SIGTERM ended before it could install
        its handler (a server still starting when the last worker finished)."""
        by_sigterm = -signal.SIGTERM if not child.command.stopped_by_closing_stdin else 128 + signal.SIGTERM
        return child.killed_by_us or (child.asked_to_stop and code == by_sigterm)

    @staticmethod
    def _signal_hint(child, code):
        if code < 0:
            return f" ({describe_status(code)})"
        if child.command.stopped_by_closing_stdin and code > 128:
            # launch.guard reports a signal on the remote host as 128+N.
            with contextlib.suppress(ValueError):
                return f" ({signal.Signals(code - 128).name} on {child.process.host.name})"
        return ""

    def _fail(self, message, exit_code):
        self._say(message)
        self.exit_code = exit_code
        self._stop_all()

    def _stop_all(self):
        self.stopping = True
        self.kill_at = time.monotonic() + self.grace_s
        for child in self.children:
            if child.running:
                child.ask_to_stop()

    def _check_kill_deadline(self):
        if self.kill_now:
            self.kill_now = False
            self._say("second signal: killing every process now")
            for child in self.children:
                if child.running:
                    child.kill()
        if self.kill_at is not None and time.monotonic() >= self.kill_at:
            for child in self.children:
                if child.running:
                    self._say(f"{child.name} did not stop within {self.grace_s:g} s; killing it")
                    child.kill()
            self.kill_at = None

    def _relay_output(self, timeout):
        if not self.selector.get_map():
            time.sleep(timeout)
            return
        for key, _ in self.selector.select(timeout):
            self._relay_chunk(key.fd, key.data)

    def _relay_chunk(self, fd, child):
        """Relays what `fd` of `child` holds; False at its end (then it is unregistered)."""
        chunk = os.read(fd, 65536)
        relay = child.relays[fd]
        if chunk:
            relay.feed(chunk)
            return True
        relay.close()
        self.selector.unregister(fd)
        return False

    def _retire(self, child):
        """Relays what a dead child left in its pipes, so that its replacement's lines come
        after its own (a pipe that a stray process holds open is given up after
        DRAIN_DEADLINE_S), then closes them."""
        end = time.monotonic() + DRAIN_DEADLINE_S
        registered = self.selector.get_map()
        fds = [fd for fd in child.relays if fd in registered]
        while fds and time.monotonic() < end:
            ready, _, _ = select.select(fds, [], [], max(0.0, end - time.monotonic()))
            fds = [fd for fd in fds if fd not in ready or self._relay_chunk(fd, child)]
        for fd in fds:
            self.selector.unregister(fd)
        self._close_pipes(child)

    def _drain_output(self):
        """Relays what is left in the pipes; a pipe that a stray process still holds
        open is given up after DRAIN_DEADLINE_S rather than waited for."""
        deadline = time.monotonic() + DRAIN_DEADLINE_S
        while self.selector.get_map() and time.monotonic() < deadline:
            self._relay_output(POLL_S)
        for child in self.children:
            self._close_pipes(child)
        self.selector.close()

    @staticmethod
    def _close_pipes(child):
        for relay in child.relays.values():
            relay.close()
        if child.popen is not None:
            for stream in (child.popen.stdin, child.popen.stdout, child.popen.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def _print_summary(self):
        wall_s = time.monotonic() - self.started_at
        parts = []
        for role, label in (("scheduler", "scheduler"), ("server", "servers"), ("worker", "workers")):
            codes = [describe_status(child.returncode) for child in self.children
                     if child.process.role == role]
            if codes:
                parts.append(f"{label} {' '.join(codes)}")
        if self.max_restarts:
            parts.append(f"restarts {self.restarts} of {self.max_restarts}")
        self._say(f"finished in {wall_s:.1f} s, exit {self.exit_code}; " + "; ".join(parts))

    @staticmethod
    def _say(message):
        sys.stderr.write(f"launch: {message}\n")
        sys.stderr.flush()
