"""Runs one program on a remote host for the launcher, and stops it with everything it
started when the launcher goes away: `python -m launch.guard [--grace S] [--bind-index K]
[--keys-on-stdin] -- COMMAND...`"""

# Why: ssh (and srun) cannot signal a remote process group, and a dying ssh client does
# not end the remote command. The launcher holds this guard's stdin open instead; when it
# closes it (to stop the job) or dies, stdin reaches EOF here and the guard sends SIGTERM
# to its process group (and SIGCONT: a stopped program gets its SIGTERM only once it runs
# again), then SIGKILL after the grace period. A `kill` line on stdin (the launcher
# replacing a frozen process) skips the grace: SIGKILL at once. The program stays in the
# guard's group so that a launcher that *can* signal the group locally
# (`ip netns exec`) reaches it too.

import argparse
import os
import signal
import subprocess
import sys
import threading

from launch.lifecycle import KILL_LINE
from launch.local import core_for

POLL_S = 0.1


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m launch.guard")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--bind-index", type=int, help="pin the program to this host's k-th core")
    parser.add_argument("--keys-on-stdin", action="store_true",
                        help="read the job's keys as the first line of stdin into a private "
                             "directory, DISTTRAIN_KEYS for the program, removed at the end")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command given after --")
    return args


def watch_stdin(stop, kill):
    """Sets `stop` when stdin reaches EOF: the launcher closed it or went away; sets
    `kill` first when the launcher wrote KILL_LINE."""
    received = b""
    while True:
        try:
            chunk = os.read(0, 65536)
        except OSError:
            break
        if not chunk:
            break
        received = (received + chunk)[-len(KILL_LINE):]
        if received == KILL_LINE:
            kill.set()
            break
    stop.set()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # a group of our own, so the stop reaches nothing else
    if args.bind_index is not None:
        os.sched_setaffinity(0, {core_for(args.bind_index, os.sched_getaffinity(0))})
    stop, kill = threading.Event(), threading.Event()
    # A signal to us asks for the same stop as a closed stdin; our own SIGTERM to the
    # group comes back here too and must not end the guard before its program.
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.set())
    env = dict(os.environ)
    remove_keys = lambda: None  # noqa: E731
    if args.keys_on_stdin:
        from launch import keys   # imports zmq: only guards that need it pay for it
        try:
            directory = env["DISTTRAIN_KEYS"] = keys.receive_on_stdin()
        except (OSError, EOFError, ValueError, KeyError) as error:
            print(f"launch.guard: cannot receive the job's keys: {error}", file=sys.stderr)
            return 2
        remove_keys = lambda: keys.auth.remove_key_directory(directory)  # noqa: E731
    try:
        return run_guarded(args, env, stop, kill, remove_keys)
    finally:
        remove_keys()


def run_guarded(args, env, stop, kill, remove_keys):
    try:
        program = subprocess.Popen(args.command, stdin=subprocess.DEVNULL, env=env)
    except OSError as error:
        print(f"launch.guard: cannot start {' '.join(args.command)}: {error}", file=sys.stderr)
        return 127
    threading.Thread(target=watch_stdin, args=(stop, kill), daemon=True).start()

    while program.poll() is None and not stop.wait(POLL_S):
        pass
    if program.poll() is None:
        if not kill.is_set():
            os.killpg(os.getpgrp(), signal.SIGTERM)
            os.killpg(os.getpgrp(), signal.SIGCONT)
        try:
            program.wait(timeout=0 if kill.is_set() else args.grace)
        except subprocess.TimeoutExpired:
            remove_keys()   # SIGKILL to the group ends the guard as well
            os.killpg(os.getpgrp(), signal.SIGKILL)
    # Anything the program left running in our group goes too.
    os.killpg(os.getpgrp(), signal.SIGTERM)
    code = program.returncode
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
