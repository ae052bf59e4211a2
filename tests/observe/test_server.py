"""What a server observes: the worker that came last at each clock, and its metrics lines."""
from types import SimpleNamespace

import numpy as np

from disttrain.observe import channel, jsonl
from disttrain.observe.server import ServerObserver
from disttrain.ps.protocol import Message, Payload


def fake_state(chunks=3, workers=2):
    """What the observer reads of a ServerState: its key chunks, workers and held pulls."""
    return SimpleNamespace(keys={(f"k{i}", 0): None for i in range(chunks)}, num_workers=workers,
                           waiting_pulls=[])


def push(rank, clock, keys, floats=4):
    return Message("push", 1, f"worker-{rank}", keys,
                   [Payload(0, "dense", 0, np.zeros(floats, np.float32))],
                   {"clock": clock, "rank": rank, "lr": 0.1})


def reply_to(message, op="reply"):
    return [(b"route", Message(op, message.id, "server-0"))]


def handle(observer, message, replies=None):
    observer.handled(message, reply_to(message) if replies is None else replies, 0.0)


def test_a_worker_arrives_at_a_clock_once_it_pushed_every_chunk_and_the_last_one_is_counted(capfd):
    observer = ServerObserver(0, fake_state(), observe={"report"})
    handle(observer, push(1, 0, ["k0", "k1"]))
    handle(observer, push(0, 0, ["k0", "k1", "k2"]))     # worker 0 complete first
    handle(observer, push(1, 0, ["k2"]))                 # worker 1 completes clock 0 last
    handle(observer, push(0, 1, ["k0", "k1", "k2"]))
    refused = push(1, 1, ["k0", "k1", "k2"])
    handle(observer, refused, reply_to(refused, "error"))   # refused: it did not arrive
    assert observer.clocks == 1 and dict(observer.last_counts) == {1: 1}
    handle(observer, push(1, 1, ["k0", "k1", "k2"]))
    observer.close()
    [line] = capfd.readouterr().err.encode().splitlines()
    assert channel.parse(line) == {"kind": "report", "role": "server", "rank": 0, "clocks": 2,
                                   "last": {"1": 2}}


def test_the_metrics_lines_count_messages_bytes_and_name_the_last_worker(tmp_path):
    observer = ServerObserver(0, fake_state(chunks=1))
    assert observer.file is None     # until a worker's init names the directory
    init = Message("init", 1, "worker-0", ["k0"], [], {"observe": {"metrics_dir": str(tmp_path)}})
    handle(observer, init)
    for rank in (1, 0):
        handle(observer, push(rank, 0, ["k0"], floats=10))
    observer.close()
    [line] = jsonl.read(jsonl.server_path(tmp_path, 0))
    assert line["messages_in"] == 3 and line["messages_out"] == 3
    assert line["bytes_in"] == 2 * 10 * 4 and line["bytes_out"] == 0
    assert set(line["update_s"]) == {"k0"}
    assert [entry[:2] for entry in line["last_at_clock"]] == [[0, 0]]
