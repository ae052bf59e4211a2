"""The observe channel: the processes of a launched job hand trace events and their end-of-run
report to the launcher as marked lines on stderr. The launcher already collects every
process's output, locally, through ssh and through srun, so this needs no shared filesystem
and no extra connection; it takes the marked lines out before it prints the rest."""
import json
import os
import sys

# A line starting with the ASCII record separator is never something a program meant to show.
MARKER = b"\x1edisttrain-observe "


def send(kind, payload):
    """One marked line on stderr, written in one piece after whatever the program printed."""
    line = MARKER + json.dumps(dict(payload, kind=kind), separators=(",", ":")).encode() + b"\n"
    try:
        sys.stderr.flush()
        view = memoryview(line)
        while view:
            view = view[os.write(2, view):]
    except OSError:   # stderr closed, or its reader gone: observing must not end the run
        pass


def parse(line):
    """The message of a marked line (bytes, without its newline), or None for any other line."""
    if not line.startswith(MARKER):
        return None
    try:
        message = json.loads(line[len(MARKER):])
    except ValueError:
        return None
    return message if isinstance(message, dict) and isinstance(message.get("kind"), str) else None
