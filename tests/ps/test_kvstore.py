"""KVStore against a real scheduler and servers over loopback sockets, all in this process
(threads): chunked keys and sparse rows round-trip exactly, SSP keeps its bound, async
training converges."""
import random
import threading
import time

import numpy as np

from tests.ps.inprocess import job, run_workers


SGD1 = {"name": "sgd", "hyper": {"lr": 1.0}}


def test_chunked_keys_round_trip_exactly_across_three_servers():
    rng = np.random.default_rng(0)
    arrays = {"big": rng.standard_normal((1001, 301)).astype(np.float32),   # > 1 MB: frames
              "matrix": rng.standard_normal((70, 300)).astype(np.float64),
              "bias": rng.standard_normal(3).astype(np.float32),
              "scalar": np.array(2.5, np.float32),
              "counts": np.arange(100000, dtype=np.int64)}
    with job(1, 3) as connect:
        [(_, store)] = connect()
        for name, array in arrays.items():
            store.declare(name, array.shape, array.dtype)
        assert len({c.server for c in store.specs["big"][3]}) == 3
        store.init(arrays, SGD1)
        outs = {name: np.zeros_like(a) for name, a in arrays.items()}
        store.pull(outs, 0)
        for name, array in arrays.items():
            np.testing.assert_array_equal(outs[name], array, err_msg=name)
        grads = {name: np.ones_like(a) for name, a in arrays.items() if a.dtype.kind == "f"}
        store.pushpull(grads, {n: outs[n] for n in grads}, 0, lr=0.25)
        for name in grads:
            np.testing.assert_array_equal(outs[name], arrays[name] - arrays[name].dtype.type(0.25))


def test_sparse_rows_round_trip_exactly_and_only_named_rows_change():
    table = np.arange(200 * 128, dtype=np.float32).reshape(200, 128)   # split over 2 servers
    with job(1, 2) as connect:
        [(_, store)] = connect()
        store.declare("emb", table.shape, table.dtype, sparse=True)
        store.init({"emb": table}, SGD1)
        rows = np.array([0, 5, 99, 100, 150, 199], np.int64)
        values = np.arange(len(rows) * 128, dtype=np.float32).reshape(len(rows), 128)

        class Sparse:   # the shape of disttrain.RowSparseGrad
            indices, values_ = rows, values
        grad = Sparse()
        grad.values = values
        store.push({"emb": grad}, 0, lr=1.0)
        out = np.full_like(table, -1)
        store.pull({"emb": out}, 1, rows={"emb": rows})
        np.testing.assert_array_equal(out[rows], table[rows] - values)
        untouched = np.setdiff1d(np.arange(200), rows)
        assert (out[untouched] == -1).all()          # only the asked rows were written
        store.pull({"emb": out}, 1)
        np.testing.assert_array_equal(out[untouched], table[untouched])


def test_ssp_never_lets_a_worker_get_more_than_staleness_clocks_ahead():
    staleness, steps, workers = 2, 12, 3
    clocks = [0] * workers            # pushes sent by each worker, recorded before sending
    lock = threading.Lock()
    violations, starts = [], []
    with job(workers, 1) as connect:
        connections = connect()
        _, store0 = connections[0]
        for _, store in connections:
            store.declare("w", (4,), np.float32)
        store0.init({"w": np.zeros(4, np.float32)}, SGD1, mode="ssp", staleness=staleness)

        def body(rank):
            _, store = connections[rank]
            out = np.zeros(4, np.float32)
            speed = random.Random(rank)
            for clock in range(steps):
                store.pull({"w": out}, clock)
                with lock:
                    starts.append((rank, clock))
                    slowest = min(clocks)
                    if clock - slowest > staleness:
                        violations.append((rank, clock, list(clocks)))
                    clocks[rank] += 1
                # worker 0 is fast, the others slow: the bound is what holds worker 0 back
                time.sleep(0 if rank == 0 else speed.uniform(0.005, 0.02))
                store.push({"w": np.ones(4, np.float32)}, clock, lr=0.01)
        run_workers(workers, body)
    assert not violations, violations
    assert len(starts) == workers * steps
    # The bound was actually exercised: worker 0 got to be `staleness` ahead at some point.
    ahead = [c - min(c2 for r2, c2 in starts[:i] if r2 != 0) for i, (r, c) in enumerate(starts)
             if r == 0 and any(r2 != 0 for r2, _ in starts[:i])]
    assert max(ahead) >= staleness


def test_async_training_converges_on_least_squares():
    rng = np.random.default_rng(3)
    truth = rng.standard_normal(5).astype(np.float32)
    x = rng.standard_normal((400, 5)).astype(np.float32)
    y = x @ truth
    with job(2, 2) as connect:
        connections = connect()
        for _, store in connections:
            store.declare("w", (5,), np.float32)
        connections[0][1].init({"w": np.zeros(5, np.float32)},
                               {"name": "sgd", "hyper": {"lr": 0.05}}, mode="async")
        final = {}

        def body(rank):
            _, store = connections[rank]
            w = np.zeros(5, np.float32)
            store.pull({"w": w}, 0)
            for clock in range(150):
                batch = slice((clock * 2 + rank) * 8 % 400, (clock * 2 + rank) * 8 % 400 + 8)
                grad = 2 * x[batch].T @ (x[batch] @ w - y[batch]) / 8
                store.pushpull({"w": grad.astype(np.float32)}, {"w": w}, clock, lr=0.05)
            final[rank] = w
        run_workers(2, body)
    start_loss = float(np.mean(y ** 2))
    for w in final.values():
        assert float(np.mean((x @ w - y) ** 2)) < 1e-3 * start_loss
