"""Do packed groups pay? Replays LeNet-5's steps (2 workers, one bucket, SGD with momentum,
sync, one server) through the wire format and a ServerState in this process, with packing
on (the shipped path) and off (each gradient its own dense payload, so the server updates
key by key), in alternating rounds. Prints the server's time per step (decode, handle,
encode the replies) for both and their ratio; the whole round trip is counted too
(workers' message building and reply decoding included), which is the part to run under
callgrind for a figure that does not depend on the machine's load:

    python scripts/bench_ps_groups.py [--steps 300] [--rounds 3]
    valgrind --tool=callgrind python scripts/bench_ps_groups.py --only packed --steps N
"""
import argparse
import itertools
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "workers"))

import disttrain as dt  # noqa: E402
from disttrain.ps import client, group, protocol  # noqa: E402
from disttrain.ps.server import ServerState  # noqa: E402
from mnist import lenet  # noqa: E402

WORKERS = 2
_shipped_packed = group._packed


def _unpacked(run):
    return [protocol.Payload(index, "dense", start, array) for index, start, array in run]


class _Capture:
    """Stands in for a worker's connection to the server: keeps what is sent."""

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)


def _store(rank, params, names):
    """A KVStore without sockets (one server), its keys declared in bucket order."""
    store = client.KVStore.__new__(client.KVStore)
    store.rank, store.membership, store.timeout = rank, None, 60
    store.connections, store.num_workers = [_Capture()], WORKERS
    store.specs, store.frames, store.handles = {}, {}, {}
    store._ids, store._poller, store.sender = itertools.count(1), None, f"worker-{rank}"
    for name in names:
        store.declare(name, params[name].shape, params[name].dtype)
    return store


def _wire(message):
    return [bytes(frame) for frame in protocol.encode(message)]


def run(packed, steps):
    """(server seconds per step, final weights) of `steps` LeNet-5 steps."""
    group._packed = _shipped_packed if packed else _unpacked
    dt.manual_seed(0)   # the same initial weights for both variants
    model = lenet()
    optimizer = dt.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params = {name: p.data for name, p in model.named_parameters()}
    names = list(reversed(params))   # one bucket, in the order backward finishes them
    stores = [_store(rank, params, names) for rank in range(WORKERS)]
    state = ServerState(0, WORKERS, 1)
    stores[0].init_async({n: params[n] for n in names}, optimizer.config(), "sync")
    for message in stores[0].connections[0].sent:
        state.handle(b"worker-0", protocol.decode(_wire(message)))
    rng = np.random.default_rng(0)
    grads = [{n: (rng.standard_normal(params[n].shape) * 1e-3).astype(params[n].dtype)
              for n in names} for _ in range(WORKERS)]
    outs = [{n: np.empty_like(params[n]) for n in names} for _ in range(WORKERS)]
    server_s = 0.0
    for clock in range(steps):
        requests = []
        for store, grad, out in zip(stores, grads, outs):
            store.pushpull_async(grad, out, clock, 0.05)
            requests += [(store.sender.encode(), _wire(m)) for m in store.connections[0].sent]
            store.connections[0].sent.clear()
        replies = []
        for route, frames in requests:
            start = time.perf_counter()
            replies += [(to, protocol.encode(reply))
                        for to, reply in state.handle(route, protocol.decode(frames))]
            server_s += time.perf_counter() - start
        for route, frames in replies:
            reply = protocol.decode([bytes(frame) for frame in frames])
            stores[int(route.decode().rsplit("-", 1)[1])].handles.pop(reply.id)._answer(reply)
    group._packed = _shipped_packed
    return server_s / steps, outs[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("packed", "plain"),
                        help="run one variant once (for callgrind)")
    args = parser.parse_args()
    if args.only:
        seconds, _ = run(args.only == "packed", args.steps)
        print(f"{args.only}: server {1e6 * seconds:.1f} us/step")
        return
    times = {"packed": [], "plain": []}
    for round_ in range(args.rounds):
        order = ("packed", "plain") if round_ % 2 == 0 else ("plain", "packed")
        results = {variant: run(variant == "packed", args.steps) for variant in order}
        for variant in order:
            times[variant].append(results[variant][0])
        for name in results["packed"][1]:   # packing must not change a single weight
            np.testing.assert_array_equal(results["packed"][1][name], results["plain"][1][name])
    packed, plain = statistics.median(times["packed"]), statistics.median(times["plain"])
    print(f"server per LeNet-5 step (2 workers, median of {args.rounds}): packed groups "
          f"{1e6 * packed:.0f} us, key by key {1e6 * plain:.0f} us, ratio {packed / plain:.2f}")


if __name__ == "__main__":
    main()
