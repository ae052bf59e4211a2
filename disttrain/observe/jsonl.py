"""Append-only files of JSON lines (DIR/worker-R.jsonl, DIR/server-S.jsonl), and reading them back."""
import json
import os


class JsonLines:
    """Line-buffered: each record reaches the operating system as it is written, so what a
    crashed process logged is on disk."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.file = open(path, "a", buffering=1)

    def write(self, record):
        self.file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self):
        self.file.close()


def read(path):
    """The records of a JSON-lines file; a last line cut short by a crash is left out."""
    records = []
    with open(path) as file:
        for line in file:
            try:
                records.append(json.loads(line))
            except ValueError:
                if line.endswith("\n"):
                    raise ValueError(f"{path}: line {len(records) + 1} is not JSON: {line[:80]!r}") from None
    return records


def worker_path(directory, rank):
    return os.path.join(directory, f"worker-{rank}.jsonl")


def server_path(directory, rank):
    return os.path.join(directory, f"server-{rank}.jsonl")
