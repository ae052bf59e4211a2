"""Parameter-server benchmark: push+pull throughput for 1-256 MB models on 1 and 2 servers,
next to raw pyzmq PUSH/PULL moving the same bytes in the same run, and the round trip of a
tiny push+pull next to a raw DEALER/ROUTER round trip; then the cost of CURVE: the same
push+pull and round trip on one server over tcp with the job's keys (the default) against
DISTTRAIN_INSECURE=1, in alternating rounds (`--curve-transport ipc` measures the same-host
default instead, which has no CURVE); then the cost of chain replication: push+pull on two
servers with DISTTRAIN_SERVER_REPLICAS=1 against none, alternating rounds
(`--replication-only` runs just that). Last line: one JSON object.

    python scripts/bench_ps.py [--sizes 1,16,64,256] [--servers 1,2] [--transport ipc|tcp]

Throughput counts the bytes that cross the wire: a push+pull of an M-byte model moves 2M
(gradient out, weights back). The raw baseline moves the same 2M as 1 MB messages (raw
pyzmq's fastest message size here) through PUSH/PULL to a peer process that pushes each
message back the moment it arrives, so its two directions overlap; the parameter server
overlaps them too, by updating and answering one chunk while the next is on the wire.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from disttrain import backend  # noqa: E402
from disttrain.ps import auth, client, membership  # noqa: E402

RAW_MESSAGE_BYTES = 1 << 20
MB = 1 << 20


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- raw pyzmq baselines (the peer runs in its own process, like a server) -------------------
def raw_peer(kind, address_in, address_out):
    context = zmq.Context()
    if kind == "pushpull":
        inbound, outbound = context.socket(zmq.PULL), context.socket(zmq.PUSH)
        secret = os.environ.get("BENCH_CURVE_SECRET")   # throw-away keys, never argv
        for sock in (inbound, outbound) if secret else ():
            sock.curve_secretkey, sock.curve_publickey = secret.encode(), \
                zmq.curve_public(secret.encode())
            sock.curve_server = True
        inbound.bind(address_in)
        outbound.bind(address_out)
        while True:   # echo each message as it arrives: out and back overlap
            outbound.send(inbound.recv(copy=False), copy=False)
    else:
        router = context.socket(zmq.ROUTER)
        router.bind(address_in)
        while True:
            router.send_multipart(router.recv_multipart())


class RawPeer:
    """A raw pyzmq peer process and this process's sockets to it, kept for the whole run."""

    def __init__(self, kind, transport, curve=False):
        def address():
            if transport == "ipc":
                return f"ipc://{tempfile.gettempdir()}/bench-{uuid.uuid4().hex[:10]}.ipc"
            return f"tcp://127.0.0.1:{free_port()}"
        address_in, address_out = address(), address()
        self.ipc_paths = [a[len("ipc://"):] for a in (address_in, address_out) if a.startswith("ipc://")]
        server_public, server_secret = zmq.curve_keypair()
        env = dict(os.environ, BENCH_CURVE_SECRET=server_secret.decode()) if curve else None
        self.process = subprocess.Popen([sys.executable, __file__, "--raw-peer", kind,
                                         address_in, address_out], start_new_session=True,
                                        env=env)
        self.context = zmq.Context()
        if kind == "pushpull":
            self.out, self.back = self.context.socket(zmq.PUSH), self.context.socket(zmq.PULL)
            public, secret = zmq.curve_keypair()
            for sock in (self.out, self.back) if curve else ():
                sock.curve_publickey, sock.curve_secretkey = public, secret
                sock.curve_serverkey = server_public
            self.out.connect(address_in)
            self.back.connect(address_out)
        else:
            self.out = self.back = self.context.socket(zmq.DEALER)
            self.out.connect(address_in)

    def close(self):
        self.context.destroy(linger=0)
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for path in self.ipc_paths:   # the killed peer cannot remove the sockets it bound
            try:
                os.unlink(path)
            except OSError:
                pass


def raw_throughput(peer, nbytes, repeats):
    """Bytes/s of sending nbytes out and back through PUSH/PULL in 1 MB messages."""
    data = np.ones(nbytes // 4, np.float32)
    step = RAW_MESSAGE_BYTES // 4
    pieces = [data[i:i + step] for i in range(0, data.size, step)]

    def once():
        for piece in pieces:
            peer.out.send(piece, copy=False)
        for _ in pieces:
            peer.back.recv(copy=False)
    once()   # connect and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def raw_round_trip(peer, repeats):
    message = np.ones(4, np.float32).tobytes()
    times = []
    for i in range(repeats + 100):
        start = time.perf_counter()
        peer.out.send(message)
        peer.out.recv()
        if i >= 100:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


# --- the parameter server ---------------------------------------------------------------------
class Job:
    """Scheduler and servers as `python -m disttrain.ps` processes; this process is the one
    worker. `secure`: CURVE with fresh keys, as launched jobs run; else DISTTRAIN_INSECURE=1."""

    def __init__(self, num_servers, transport, secure=True, replicas=0):
        port = free_port()
        self.keys = tempfile.mkdtemp(prefix="bench-keys-") if secure else None
        if secure:
            auth.make_key_directory(self.keys, 1, num_servers)
        security = {"DISTTRAIN_KEYS": self.keys} if secure else {"DISTTRAIN_INSECURE": "1"}
        self.env = dict(os.environ, DISTTRAIN_SCHEDULER=f"127.0.0.1:{port}",
                        DISTTRAIN_NUM_WORKERS="1", DISTTRAIN_NUM_SERVERS=str(num_servers),
                        DISTTRAIN_HOST="127.0.0.1", DISTTRAIN_TIMEOUT="120",
                        DISTTRAIN_SERVER_REPLICAS=str(replicas), **security)
        self.processes = [self._start("scheduler")] + [
            self._start("server", rank) for rank in range(num_servers)]
        credentials = auth.load_credentials(self.keys, "worker", 0) if secure else None
        self.membership = membership.Membership("worker", f"127.0.0.1:{port}", 10, 120,
                                                credentials=credentials)
        book = self.membership.register()
        if transport == "tcp":   # without an ipc address the client connects over tcp
            for entry in book["server"]:
                entry["ipc"] = ""
        backend.keep_freed_memory()   # as in a worker program: heap pages for received frames
        self.store = client.KVStore(book, self.membership.rank, self.membership, 120)
        self.arrays = {}

    def _start(self, role, rank=None):
        env = dict(self.env, DISTTRAIN_ROLE=role)
        if rank is not None:
            env["DISTTRAIN_RANK"] = str(rank)
        return subprocess.Popen([sys.executable, "-m", "disttrain.ps"], env=env,
                                start_new_session=True)

    def close(self):
        try:
            self.membership.goodbye()
        finally:
            self.store.close()
            self.membership.close()
            for process in self.processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            auth.remove_key_directory(self.keys)


def ps_throughput(job, nbytes, repeats, key, clock):
    """Bytes/s of push+pull of an nbytes key (declared on first use); returns (rate, clock)."""
    store = job.store
    if key not in store.specs:
        weights = np.zeros(nbytes // 4, np.float32)
        store.declare(key, weights.shape, weights.dtype)
        store.init({key: weights}, {"name": "sgd", "hyper": {"lr": 1e-3}})
        job.arrays[key] = (weights, np.ones_like(weights))
    weights, grad = job.arrays[key]
    store.pushpull({key: grad}, {key: weights}, clock, lr=1e-3)   # warm up
    start = time.perf_counter()
    for step in range(clock + 1, clock + repeats + 1):
        store.pushpull({key: grad}, {key: weights}, step, lr=1e-3)
    elapsed = time.perf_counter() - start
    expected = -1e-3 * (clock + repeats + 1)
    assert abs(float(weights[0]) - expected) < 1e-4, (weights[0], expected)   # it really trained
    return 2 * nbytes * repeats / elapsed, clock + repeats + 1


def ps_round_trip(job, repeats):
    """Median seconds of a push+pull of a 16-byte key."""
    store = job.store
    if "tiny" not in store.specs:
        store.declare("tiny", (4,), np.float32)
        store.init({"tiny": np.zeros(4, np.float32)}, {"name": "sgd", "hyper": {"lr": 1e-3}})
        job.arrays["tiny"] = [np.zeros(4, np.float32), np.ones(4, np.float32), 0]
    weights, grad, first = job.arrays["tiny"]
    times = []
    for clock in range(first, first + repeats + 100):
        start = time.perf_counter()
        store.pushpull({"tiny": grad}, {"tiny": weights}, clock, lr=1e-3)
        if clock >= first + 100:
            times.append(time.perf_counter() - start)
    job.arrays["tiny"][2] = first + repeats + 100
    return float(np.median(times))


def repeats_for(nbytes):
    return max(3, min(30, (512 * MB) // nbytes))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-peer":
        return raw_peer(*sys.argv[2:5])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,64,256", help="model sizes in MB")
    parser.add_argument("--servers", default="1,2")
    parser.add_argument("--transport", default="ipc", choices=["ipc", "tcp"])
    parser.add_argument("--curve-transport", default="tcp", choices=["ipc", "tcp"],
                        help="transport of the CURVE against --insecure comparison")
    parser.add_argument("--rtt-repeats", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--replication-only", action="store_true",
                        help="measure only replicas=1 against replicas=0 (2 servers)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    server_counts = [int(s) for s in args.servers.split(",")]
    if args.replication_only:
        print(json.dumps({f"replication_throughput_ratio_{size}mb": ratio
                          for size, ratio in replication_cost(args, sizes).items()}))
        return

    print(f"transport {args.transport}, raw messages of {RAW_MESSAGE_BYTES // MB} MB, "
          f"{os.cpu_count()} cpus, best of {args.rounds} interleaved rounds")
    print(f"{'model MB':>8} {'servers':>7} {'ps GB/s':>8} {'raw GB/s':>9} {'ratio':>6}")
    ratios = {}
    raw_peer_ = RawPeer("pushpull", args.transport)
    echo = RawPeer("echo", args.transport)
    try:
        for servers in server_counts:
            job = Job(servers, args.transport)
            try:
                for size in sizes:
                    # Rounds alternate raw and PS so both see the same machine load.
                    raw, ps, clock = 0.0, 0.0, 0
                    for _ in range(args.rounds):
                        raw = max(raw, raw_throughput(raw_peer_, size * MB, repeats_for(size * MB)))
                        rate, clock = ps_throughput(job, size * MB, repeats_for(size * MB),
                                                    f"model{size}", clock)
                        ps = max(ps, rate)
                    ratios.setdefault(size, []).append(ps / raw)
                    print(f"{size:>8} {servers:>7} {ps / 1e9:>8.2f} {raw / 1e9:>9.2f} "
                          f"{ps / raw:>6.2f}", flush=True)
                if servers == server_counts[0]:
                    ps_rtt = raw_rtt = float("inf")
                    for _ in range(args.rounds):
                        raw_rtt = min(raw_rtt, raw_round_trip(echo, args.rtt_repeats))
                        ps_rtt = min(ps_rtt, ps_round_trip(job, args.rtt_repeats))
            finally:
                job.close()
    finally:
        raw_peer_.close()
        echo.close()
    print(f"tiny push+pull round trip {ps_rtt * 1e6:.0f} us (median), raw DEALER/ROUTER "
          f"{raw_rtt * 1e6:.0f} us, ratio {ps_rtt / raw_rtt:.2f}")
    curve_ratios, curve_rtt_ratio = curve_cost(args, sizes)
    replication_ratios = replication_cost(args, sizes)
    # The figure per size is the best server count's ratio; the table shows each.
    summary = {"throughput_ratio_16mb": round(max(ratios[16]), 3) if 16 in ratios else None,
               "throughput_ratio_256mb": round(max(ratios[256]), 3) if 256 in ratios else None,
               "rtt_ratio": round(ps_rtt / raw_rtt, 3),
               "curve_throughput_ratio_16mb": curve_ratios.get(16),
               "curve_rtt_ratio": curve_rtt_ratio,
               "replication_throughput_ratio_16mb": replication_ratios.get(16)}
    print(json.dumps(summary))


def libsodium_rate(nbytes=MB, repeats=200):
    """Bytes/s of libsodium's crypto_box_afternm (XSalsa20-Poly1305, what every CURVE
    message costs once to send and once to receive) on one core, from the libsodium pyzmq
    bundles (or the system's); None where neither is found."""
    import ctypes
    import ctypes.util
    import glob
    bundled = glob.glob(os.path.join(os.path.dirname(os.path.dirname(zmq.__file__)),
                                     "pyzmq.libs", "libsodium*"))
    path = (bundled or [ctypes.util.find_library("sodium")])[0]
    if not path:
        return None
    sodium = ctypes.CDLL(path)
    sodium.sodium_init()
    plain = ctypes.create_string_buffer(nbytes + 32)
    cipher = ctypes.create_string_buffer(nbytes + 32)
    key, nonce = ctypes.create_string_buffer(32), ctypes.create_string_buffer(24)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            sodium.crypto_box_afternm(cipher, plain, ctypes.c_ulonglong(nbytes + 32), nonce, key)
        best = max(best, nbytes * repeats / (time.perf_counter() - start))
    return best


def curve_cost(args, sizes):
    """({size: CURVE / insecure push+pull throughput}, CURVE / insecure round trip), one
    server each, rounds alternating between the two jobs so both see the same machine load."""
    print(f"keys (the default: CURVE on tcp) against DISTTRAIN_INSECURE=1, 1 server, "
          f"{args.curve_transport}")
    print(f"{'model MB':>8} {'curve GB/s':>10} {'insecure GB/s':>13} {'ratio':>6} "
          f"{'raw pyzmq curve/plain':>22}")
    jobs = {"curve": Job(1, args.curve_transport, secure=True),
            "insecure": Job(1, args.curve_transport, secure=False)}
    # What CURVE costs raw pyzmq on the same bytes: the ceiling of the ratio above.
    raw = {"curve": RawPeer("pushpull", args.curve_transport, curve=True),
           "insecure": RawPeer("pushpull", args.curve_transport)}
    ratios = {}
    try:
        for size in sizes:
            best = {"curve": 0.0, "insecure": 0.0}
            best_raw = {"curve": 0.0, "insecure": 0.0}
            clocks = {"curve": 0, "insecure": 0}
            for _ in range(args.rounds):
                for name, job in jobs.items():
                    rate, clocks[name] = ps_throughput(job, size * MB, repeats_for(size * MB),
                                                       f"model{size}", clocks[name])
                    best[name] = max(best[name], rate)
                    best_raw[name] = max(best_raw[name], raw_throughput(
                        raw[name], size * MB, repeats_for(size * MB)))
            ratios[size] = round(best["curve"] / best["insecure"], 3)
            print(f"{size:>8} {best['curve'] / 1e9:>10.2f} {best['insecure'] / 1e9:>13.2f} "
                  f"{ratios[size]:>6.2f} {best_raw['curve'] / best_raw['insecure']:>22.2f}",
                  flush=True)
        rtt = {"curve": float("inf"), "insecure": float("inf")}
        for _ in range(args.rounds):
            for name, job in jobs.items():
                rtt[name] = min(rtt[name], ps_round_trip(job, args.rtt_repeats))
    finally:
        for job in jobs.values():
            job.close()
        for peer in raw.values():
            peer.close()
    print(f"tiny push+pull round trip: curve {rtt['curve'] * 1e6:.0f} us, insecure "
          f"{rtt['insecure'] * 1e6:.0f} us (medians), ratio {rtt['curve'] / rtt['insecure']:.2f}")
    sodium = libsodium_rate()
    if sodium:
        print(f"libsodium XSalsa20-Poly1305 on one core: {sodium / 1e9:.2f} GB/s (a push+pull "
              f"encrypts and decrypts every byte both ways)")
    return ratios, round(rtt["curve"] / rtt["insecure"], 3)


def replication_cost(args, sizes):
    """{size: push+pull throughput with --server-replicas 1 / without}, two servers each,
    rounds alternating between the two jobs so both see the same machine load."""
    print(f"--server-replicas 1 against 0: 2 servers, {args.transport}, sgd (no optimizer "
          f"state: Adam's two moments would triple what a replica receives)")
    print(f"{'model MB':>8} {'replicated GB/s':>15} {'plain GB/s':>10} {'ratio':>6}")
    jobs = {"replicated": Job(2, args.transport, replicas=1),
            "plain": Job(2, args.transport, replicas=0)}
    ratios = {}
    try:
        for size in sizes:
            best = {name: 0.0 for name in jobs}
            clocks = {name: 0 for name in jobs}
            for _ in range(args.rounds):
                for name, job in jobs.items():
                    rate, clocks[name] = ps_throughput(job, size * MB, repeats_for(size * MB),
                                                       f"model{size}", clocks[name])
                    best[name] = max(best[name], rate)
            ratios[size] = round(best["replicated"] / best["plain"], 3)
            print(f"{size:>8} {best['replicated'] / 1e9:>15.2f} {best['plain'] / 1e9:>10.2f} "
                  f"{ratios[size]:>6.2f}", flush=True)
    finally:
        for job in jobs.values():
            job.close()
    return ratios


if __name__ == "__main__":
    main()
