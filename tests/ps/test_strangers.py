"""Real processes: strangers (a fresh key pair, no CURVE, a key from an earlier job) get
nothing from a job's scheduler and server and change nothing; an insider holding a member's
key floods a server with fuzzed messages, which costs it no memory, and MNIST still trains."""
import json
import os
import random

import numpy as np
import pytest
import zmq

from disttrain.ps import auth, protocol
from disttrain.ps.protocol import Message, Payload
from tests.ps import test_fuzz
from tests.ps.cluster import ROOT, Cluster
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

STEPS = ["--steps", 20, "--batch", 8, "--sleep", 0.02]
DEADLINE_S = 120
NO_CURVE_BY_ADDRESS = "refused a connection from 127.0.0.1: it does not speak CURVE"


def listening_tcp_ports(pid):
    """The TCP ports process `pid` listens on (its socket inodes matched in /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = []
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:   # 0A: LISTEN
                ports.append(int(fields[1].split(":")[1], 16))
    return ports


def listening_ipc_paths(pid):
    """The unix socket paths process `pid` listens on (/proc/net/unix, by inode)."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[len("socket:["):-1]
              for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    with open("/proc/net/unix") as table:
        return [fields[7] for fields in (line.split() for line in list(table)[1:])
                if len(fields) == 8 and fields[6] in inodes]


def server_port(cluster):
    process = cluster.processes["server0"]
    wait_until(lambda: listening_tcp_ports(process.pid), DEADLINE_S, "the server to listen")
    return listening_tcp_ports(process.pid)[0]


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def stranger_messages():
    """register for the scheduler; init, push, pull for the server: requests that would
    change or reveal the model if anyone answered them."""
    grad = np.full(10 * 12, 1e6, np.float32)
    chunk = {"chunks": [0]}
    return {
        "scheduler": [Message("register", 1, "worker-0", meta=dict(
            role="worker", rank=0, node="stranger", tcp="", ipc="", hostname="h", netns=0))],
        "server": [
            Message("init", 2, "worker-0", ["w1"], [Payload(0, "dense", 0, grad)], dict(
                chunk, optimizer={"name": "sgd", "hyper": {}}, mode="sync", staleness=0,
                specs=[{"shape": [10, 12], "dtype": "float32", "sparse": False}])),
            Message("push", 3, "worker-0", ["w1"], [Payload(0, "dense", 0, grad)],
                    dict(chunk, clock=0, lr=0.1, rank=0)),
            Message("pull", 4, "worker-0", ["w1"], [], dict(chunk, clock=0, rank=0)),
        ]}


def run_job(directory, strangers=None):
    """A seeded 2-worker sync job; `strangers(cluster)` runs once scheduler and server are
    up, before the workers start. Returns the cluster's final parameters and its logs."""
    os.makedirs(directory)
    with Cluster(directory, num_workers=2, num_servers=1) as cluster:
        cluster.start_roles()
        if strangers is not None:
            strangers(cluster)
        cluster.start_workers(*STEPS)
        codes = cluster.wait(DEADLINE_S)
        assert codes == {name: 0 for name in codes}, \
            {name: cluster.read(name)[-2000:] for name, code in codes.items() if code != 0}
        logs = {name: cluster.read(name) for name in cluster.processes}
    return [dict(np.load(os.path.join(directory, f"params-{rank}.npz"))) for rank in (0, 1)], logs


def test_strangers_get_no_reply_and_the_job_is_bit_for_bit_unchanged(tmp_path):
    reference, _ = run_job(str(tmp_path / "alone"))
    earlier_job_key = auth.load_credentials(str(tmp_path / "alone" / "keys"), "worker", 0)
    context = zmq.Context()
    sockets = []

    def strangers(cluster):
        targets = {"scheduler": "tcp://" + cluster.env["DISTTRAIN_SCHEDULER"],
                   "server": f"tcp://127.0.0.1:{server_port(cluster)}"}
        # Public keys are public: a stranger may well know the real ones.
        job_public = {"scheduler": auth.load_credentials(cluster.keys, "scheduler").public,
                      "server": auth.load_credentials(cluster.keys, "server", 0).public}
        fresh_public, fresh_secret = zmq.curve_keypair()
        variants = {"fresh key": (fresh_public, fresh_secret),
                    "earlier job's key": (earlier_job_key.public, earlier_job_key.secret),
                    "no CURVE": None}
        for variant, pair in variants.items():
            for target, messages in stranger_messages().items():
                for message in messages:
                    sock = context.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    if pair is not None:
                        sock.curve_publickey, sock.curve_secretkey = pair
                        sock.curve_serverkey = job_public[target]
                    sock.connect(targets[target])
                    sock.send_multipart(protocol.encode(message))
                    sockets.append((variant, target, message.op, sock))
        # A stranger with no CURVE is dropped by libzmq before ZAP; the listener's monitor logs
        # it all the same. The address is read from the accepted fd, which a fast failure may
        # have closed first ("an unknown address"), so it comes back until it was read once.
        def no_curve_logged_by_address(target, log):
            if NO_CURVE_BY_ADDRESS in cluster.read(log):
                return True
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(targets[target])
            sock.send_multipart(protocol.encode(stranger_messages()[target][0]))
            sockets.append(("no CURVE, again", target, "", sock))
            return False

        for target, log in (("scheduler", "scheduler"), ("server", "server0")):
            wait_until(lambda: no_curve_logged_by_address(target, log), DEADLINE_S,
                       f"the {target}'s log of a stranger without CURVE, by address")
        # A process of the same user on the same host reaches the ipc socket, but is no
        # member: the kernel tells the server its pid, which is in no one's registration.
        [ipc_path] = [path for path in listening_ipc_paths(cluster.processes["server0"].pid)
                      if path.endswith(".ipc")]
        local = context.socket(zmq.DEALER)
        local.setsockopt(zmq.LINGER, 0)
        local.connect(f"ipc://{ipc_path}")
        local.send_multipart(protocol.encode(stranger_messages()["server"][2]))
        sockets.append(("same user, ipc", "server", "pull", local))
        # Both keyed strangers were turned away at the door before any worker starts.
        wait_until(lambda: "server 0 refused a connection from 127.0.0.1" in cluster.read("server0")
                   and "scheduler refused a connection from 127.0.0.1" in cluster.read("scheduler"),
                   DEADLINE_S, "the refusals in the logs")

    try:
        attacked, logs = run_job(str(tmp_path / "attacked"), strangers)
        answered = [(variant, target, op) for variant, target, op, sock in sockets[:-1]
                    if sock.poll(0)]
        assert answered == []
        local = sockets[-1][-1]
        assert local.poll(DEADLINE_S * 1000)
        reply = protocol.decode(local.recv_multipart())
        assert reply.op == "error" and not reply.payloads, reply
        assert f"from process {os.getpid()}, which is no worker of this job" in reply.meta["error"]
    finally:
        for *_, sock in sockets:
            sock.close()
        context.term()
    for name in ("server0", "scheduler"):
        lines = logs[name].splitlines()
        refusals = [line for line in lines if "is not one of this job's" in line]
        assert len(refusals) == 1 and "refused a connection from 127.0.0.1" in refusals[0], \
            refusals
        # Several no-CURVE attempts, one line for their address (and at most one saying the
        # address could not be read).
        no_curve = [line for line in lines if "does not speak CURVE" in line]
        by_address = [line for line in no_curve if NO_CURVE_BY_ADDRESS in line]
        unknown = [line for line in no_curve if "from an unknown address" in line]
        assert len(by_address) == 1 and len(unknown) <= 1, no_curve
        assert len(no_curve) == len(by_address) + len(unknown), no_curve
    for rank in (0, 1):
        assert reference[rank].keys() == attacked[rank].keys()
        for name, value in reference[rank].items():
            assert np.array_equal(value, attacked[rank][name]), f"{name} of worker {rank}"


MNIST = os.path.join(ROOT, "workers", "mnist.py")
FUZZ_WINDOW = 64


def test_insider_fuzz_costs_the_server_no_memory_and_mnist_still_reaches_97_percent(tmp_path):
    """10,000 fuzzed messages with worker 0's own key, while the job trains: each is answered
    with an error, the server's RSS grows by less than 50 MB, and the model is unharmed."""
    rng = random.Random(14)
    with Cluster(str(tmp_path), num_workers=2, num_servers=1, timeout=600) as cluster:
        cluster.start_roles()
        port = server_port(cluster)
        cluster.start_workers(program=[MNIST, "--epochs", "1", "--no-progress", "--seed", "1"])
        context = zmq.Context()
        fuzzer = context.socket(zmq.DEALER)
        fuzzer.setsockopt(zmq.LINGER, 0)
        auth.ClientCurve(auth.load_credentials(cluster.keys, "worker", 0), "server-0").apply(fuzzer)
        fuzzer.connect(f"tcp://127.0.0.1:{port}")
        server_pid = cluster.processes["server0"].pid
        try:
            rss_before = None
            # FUZZ_WINDOW messages in flight: one round trip per message would make the fuzz
            # latency-bound, and on a busy host the job could end before it does. Replies come
            # back in order (one DEALER, one server loop), so each is still matched to its own.
            ids = range(1, test_fuzz.FUZZED_MESSAGES + 1)
            for window in (ids[i:i + FUZZ_WINDOW] for i in range(0, len(ids), FUZZ_WINDOW)):
                for request_id in window:
                    fuzzer.send_multipart(test_fuzz.malformed(rng, request_id))
                for request_id in window:
                    # The first answer comes once every worker registered and the server serves.
                    assert fuzzer.poll(DEADLINE_S * 1000), (
                        f"no answer to bad message {request_id}; "
                        f"server exit code {cluster.processes['server0'].poll()}")
                    reply = protocol.decode(fuzzer.recv_multipart())
                    assert reply.op == "error" and reply.id in (request_id, 0), (reply, request_id)
                    if rss_before is None:
                        rss_before = rss_bytes(server_pid)
            rss_growth = rss_bytes(server_pid) - rss_before
        finally:
            fuzzer.close()
            context.term()
        codes = cluster.wait(600)
        assert codes == {name: 0 for name in codes}, \
            {name: cluster.read(name)[-2000:] for name, code in codes.items() if code != 0}
        summary = json.loads(cluster.read("worker0", "out").strip().splitlines()[-1])
        server_log = cluster.read("server0")
    print(f"server RSS grew by {rss_growth / 2**20:.1f} MB during the fuzz; "
          f"test accuracy {summary['test_accuracy']}")
    assert rss_growth < 50 << 20, rss_growth
    assert summary["test_accuracy"] >= 0.97, summary
    # The log says what was rejected, in a bounded number of lines.
    assert 10 <= server_log.count("rejected message #") <= 30, server_log[-2000:]
