"""Server shards of a checkpoint without sockets: written by S servers, restored on S' (the
keys re-cut to the new layout), the servers then compute exactly what unbroken ones do."""
import json

import numpy as np
import pytest

from disttrain.checkpoint_dist import FORMAT
from disttrain.ps import protocol, snapshot
from disttrain.ps.protocol import Message, Payload
from disttrain.ps.server import ServerState, chunk_layout

KEYS = {"big": ((300, 700), False), "bias": ((7,), False), "table": ((50, 8), True)}
OPTIMIZERS = [{"name": "adam", "hyper": {"lr": 0.01}},
              {"name": "sgd", "hyper": {"lr": 0.1, "momentum": 0.9}}]


def layout(num_servers):
    return {name: chunk_layout(name, shape, np.float32, num_servers)
            for name, (shape, _) in KEYS.items()}


def start(num_servers, num_workers, optimizer, weights):
    servers = [ServerState(rank, num_workers, num_servers) for rank in range(num_servers)]
    for name, chunks in layout(num_servers).items():
        shape, sparse = KEYS[name]
        flat = weights[name].reshape(-1)
        for chunk in chunks:
            payloads = [Payload(0, "dense", chunk.start + offset, piece) for offset, piece in
                        protocol.split_frames(flat[chunk.start:chunk.stop])]
            reply = servers[chunk.server].handle("w", Message(
                "init", 1, "worker-0", [name], payloads,
                {"optimizer": optimizer, "mode": "sync", "staleness": 0, "chunks": [chunk.index],
                 "specs": [{"shape": list(shape), "dtype": "float32", "sparse": sparse}]}))
            assert reply[0][1].op == "reply", reply[0][1].meta
    return servers


def push(servers, rank, clock, gradients):
    """One worker's push of a clock: dense chunks, and the rows it touched of the table."""
    for name, chunks in layout(len(servers)).items():
        for chunk in chunks:
            if name == "table":
                rows, values = gradients[name]
                mine = (rows >= chunk.row_start) & (rows < chunk.row_stop)
                payloads = [Payload(0, "rows", 0, rows[mine]), Payload(0, "values", 0, values[mine])]
            else:
                flat = gradients[name].reshape(-1)[chunk.start:chunk.stop]
                payloads = [Payload(0, "dense", chunk.start + offset, piece)
                            for offset, piece in protocol.split_frames(flat)]
            reply = servers[chunk.server].handle("w", Message(
                "push", 2, f"worker-{rank}", [name], payloads,
                {"clock": clock, "lr": 0.01, "rank": rank, "chunks": [chunk.index]}))
            assert reply[0][1].op == "reply", reply[0][1].meta


def gradients(rng):
    rows = np.sort(rng.choice(50, size=6, replace=False)).astype(np.int64)
    return {"big": rng.standard_normal((300, 700)).astype(np.float32),
            "bias": rng.standard_normal(7).astype(np.float32),
            "table": (rows, rng.standard_normal((6, 8)).astype(np.float32))}


def train(servers, num_workers, clocks, rng, first_clock=0):
    for clock in range(first_clock, first_clock + clocks):
        for rank in range(num_workers):
            push(servers, rank, clock, gradients(rng))


def write_checkpoint(servers, directory):
    files = [snapshot.write_shard(server, directory, 5) for server in servers]
    spec = {name: {"shape": list(KEYS[name][0]), "dtype": "float32", "sparse": KEYS[name][1],
                   "chunks": [[c.index, c.server, c.row_start, c.row_stop] for c in chunks]}
            for name, chunks in layout(len(servers)).items()}
    (directory / snapshot.MANIFEST).write_text(json.dumps(
        {"format": FORMAT, "step": 5, "files": files, "layout": spec}))


def whole(servers):
    """{key: (weights, {state name: array}, step)} joined from every server's chunks."""
    joined = {}
    for name, chunks in layout(len(servers)).items():
        parts = [(servers[c.server].keys[name, c.index],) + snapshot.chunk_state(
            servers[c.server].keys[name, c.index]) for c in chunks]
        param = np.concatenate([key.param for key, _, _ in parts])
        names = sorted(parts[0][2])
        steps = [step for _, step, _ in parts]
        joined[name] = (param, {n: np.concatenate([arrays[n] for _, _, arrays in parts])
                                for n in names},
                        np.concatenate(steps) if isinstance(steps[0], np.ndarray) else steps)
    return joined


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o["name"])
@pytest.mark.parametrize("before,after", [(1, 3), (3, 1), (2, 3)])
def test_shards_restored_on_another_server_count_continue_exactly(tmp_path, optimizer, before,
                                                                  after):
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32)
               for name, (shape, _) in KEYS.items()}
    unbroken = start(before, 2, optimizer, weights)
    train(unbroken, 2, 3, np.random.default_rng(1))
    write_checkpoint(unbroken, tmp_path)
    zeros = {name: np.zeros_like(array) for name, array in weights.items()}
    resumed = start(after, 2, optimizer, zeros)
    for server in resumed:
        snapshot.restore_shard(server, tmp_path, snapshot.read_manifest(tmp_path))
    rng_after = np.random.default_rng(2)
    train(unbroken, 2, 3, rng_after, first_clock=3)
    train(resumed, 2, 3, np.random.default_rng(2))
    expected, got = whole(unbroken), whole(resumed)
    for name in KEYS:
        np.testing.assert_array_equal(expected[name][0], got[name][0], err_msg=name)
        assert sorted(expected[name][1]) == sorted(got[name][1]) and expected[name][1]
        for state_name in expected[name][1]:
            np.testing.assert_array_equal(expected[name][1][state_name], got[name][1][state_name])
        np.testing.assert_array_equal(np.asarray(expected[name][2]).reshape(-1)[:1],
                                      np.asarray(got[name][2]).reshape(-1)[:1])


def test_a_shard_that_differs_from_the_manifest_is_refused_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32)
               for name, (shape, _) in KEYS.items()}
    servers = start(1, 1, OPTIMIZERS[0], weights)
    train(servers, 1, 1, rng)
    write_checkpoint(servers, tmp_path)
    shard = tmp_path / snapshot.shard_file(0)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = servers[0].keys["big", 0].param.copy()
    with pytest.raises(snapshot.SnapshotError, match=f"{shard}.*sha256"):
        snapshot.restore_shard(servers[0], tmp_path, snapshot.read_manifest(tmp_path))
    np.testing.assert_array_equal(servers[0].keys["big", 0].param, before)   # left as it was
