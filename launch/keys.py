"""A job's CURVE keys, from the launcher's side: made fresh for every job, handed to each
process (a private directory locally and under Slurm, the ssh connection's stdin on remote
hosts) and removed when the job ends. `python -m launch keys DIR -n W -s S` makes the same
directory for processes that another launcher starts."""

import argparse
import json
import os
import select
import sys
import tempfile
import time

from disttrain.ps import auth

STDIN_DEADLINE_S = 60.0   # how long launch.guard waits for its keys on stdin


def process_key_name(process):
    return auth.key_name(process.role, process.rank)


class JobKeys:
    """One job's key pairs (in memory) and the directory they were written to, if any."""

    def __init__(self):
        self.pairs = {}
        self.directory = None

    def make(self, num_workers, num_servers):
        self.pairs = auth.new_key_pairs(num_workers, num_servers)

    def write_directory(self, parent=None):
        """Every key in a fresh 0700 directory under `parent` (default: the temp dir)."""
        self.directory = tempfile.mkdtemp(prefix=".disttrain-keys-" if parent else
                                          "disttrain-keys-", dir=parent)
        auth.write_key_directory(self.directory, auth.key_files(self.pairs))
        return self.directory

    def stdin_line(self, process):
        """What a remote process's guard reads from stdin: every public key and only that
        process's own secret key, as one JSON line."""
        files = auth.key_files(self.pairs, secrets_for={process_key_name(process)})
        return (json.dumps({"files": files}) + "\n").encode()

    def remove(self):
        if self.directory is not None:
            auth.remove_key_directory(self.directory)
            self.directory = None


def receive_on_stdin(deadline_s=STDIN_DEADLINE_S):
    """launch.guard's side of stdin_line(): read the line (never past the first newline, as
    the rest of stdin is the launcher's stop signal) and write a private key directory."""
    data = b""
    end = time.monotonic() + deadline_s
    while not data.endswith(b"\n"):
        remaining = end - time.monotonic()
        if remaining <= 0 or not select.select([0], [], [], remaining)[0]:
            raise TimeoutError(f"no keys on stdin within {deadline_s:g} s")
        byte = os.read(0, 1)
        if not byte:
            raise EOFError("stdin closed before the job's keys arrived")
        data += byte
    files = json.loads(data)["files"]
    return auth.write_key_directory(tempfile.mkdtemp(prefix="disttrain-keys-"), files)


def main(argv):
    """`python -m launch keys DIR -n W -s S`."""
    parser = argparse.ArgumentParser(
        prog="python -m launch keys",
        description="Make a job's CURVE keys in DIR (created mode 0700, files 0600): "
                    "NAME.key (public) and NAME.key_secret for NAME in scheduler, server-0.., "
                    "worker-0... Give every process DISTTRAIN_KEYS=DIR (or a copy holding "
                    "every .key file and its own .key_secret), and delete DIR after the job.")
    parser.add_argument("directory", metavar="DIR", help="new or empty directory")
    parser.add_argument("-n", "--num-workers", type=int, required=True)
    parser.add_argument("-s", "--num-servers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.num_workers < 1 or args.num_servers < 1:
        parser.error("need at least one worker and one server")
    try:
        auth.make_key_directory(args.directory, args.num_workers, args.num_servers)
    except (OSError, RuntimeError, ValueError) as error:
        print(f"launch keys: {error}", file=sys.stderr)
        return 2
    print(f"launch keys: wrote the keys of 1 scheduler, {args.num_servers} servers and "
          f"{args.num_workers} workers to {args.directory}; set DISTTRAIN_KEYS={args.directory}")
    return 0
