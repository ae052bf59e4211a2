"""The job's keys and who they let in: the key directory's layout and modes, a key bound to
its role and rank, and a clear failure (never plaintext) without keys or without CURVE."""
import dataclasses
import os
import stat
import threading

import numpy as np
import pytest
import zmq

from disttrain import config
from disttrain.ps import auth, client, protocol, scheduler, transport
from disttrain.ps.membership import Membership
from disttrain.ps.protocol import Message
from tests.ps.cluster import free_port
from tests.ps.inprocess import job
from tests.waiting import wait_until

TIMEOUT = 30


def test_key_directory_is_private_and_holds_every_member_of_the_job(tmp_path):
    directory = str(tmp_path / "keys")
    auth.make_key_directory(directory, num_workers=3, num_servers=2)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    names = ["scheduler", "server-0", "server-1", "worker-0", "worker-1", "worker-2"]
    assert sorted(os.listdir(directory)) == sorted(
        [n + ".key" for n in names] + [n + ".key_secret" for n in names])
    for file_name in os.listdir(directory):
        assert stat.S_IMODE(os.stat(os.path.join(directory, file_name)).st_mode) == 0o600
    # zmq's own certificate reader understands the files.
    public, secret = zmq.auth.load_certificate(os.path.join(directory, "worker-2.key_secret"))
    assert zmq.curve_public(secret) == public
    credentials = auth.load_credentials(directory, "worker", 2)
    assert (credentials.name, credentials.role, credentials.rank) == ("worker-2", "worker", 2)
    assert sorted(credentials.members) == sorted(names)
    auth.remove_key_directory(directory)
    assert not os.path.exists(directory)


def test_every_job_gets_fresh_keys(tmp_path):
    first = auth.new_key_pairs(2, 1)
    second = auth.new_key_pairs(2, 1)
    assert not {public for public, _ in first.values()} & {public for public, _ in second.values()}


def test_a_key_directory_others_can_read_is_refused(tmp_path):
    directory = str(tmp_path / "keys")
    auth.make_key_directory(directory, 1, 1)
    os.chmod(directory, 0o755)
    with pytest.raises(auth.KeysError, match="chmod 700"):
        auth.load_credentials(directory, "server", 0)


def test_without_keys_or_insecure_a_process_refuses_to_start_naming_the_fix(monkeypatch):
    monkeypatch.delenv(auth.KEYS_VARIABLE, raising=False)
    monkeypatch.delenv(auth.INSECURE_VARIABLE, raising=False)
    with pytest.raises(auth.KeysError, match="python -m launch keys DIR"):
        Membership("worker", f"127.0.0.1:{free_port()}", 10, TIMEOUT)


def test_without_curve_in_libzmq_keys_and_sockets_fail_loudly(monkeypatch, tmp_path):
    real_has = zmq.has
    monkeypatch.setattr(zmq, "has",
                        lambda capability: capability != "curve" and real_has(capability))
    with pytest.raises(auth.KeysError, match="built without CURVE"):
        auth.new_key_pairs(1, 1)
    monkeypatch.setenv(auth.KEYS_VARIABLE, str(tmp_path))
    monkeypatch.delenv(auth.INSECURE_VARIABLE, raising=False)
    with pytest.raises(auth.KeysError, match="built without CURVE"):
        scheduler.Scheduler(f"127.0.0.1:{free_port()}", 1, 1, timeout=TIMEOUT)


def test_insecure_is_said_in_the_log(monkeypatch, capsys):
    monkeypatch.setenv(auth.INSECURE_VARIABLE, "1")
    monkeypatch.setattr(auth, "_warned_insecure", False)
    assert auth.credentials_from_env("worker", 0) is None
    assert "runs without authentication or encryption" in capsys.readouterr().err


def test_membership_takes_its_keys_and_rank_from_the_config_not_the_environment(
        monkeypatch, tmp_path, capsys):
    directory = str(tmp_path / "keys")
    auth.make_key_directory(directory, 2, 1)
    monkeypatch.delenv(auth.KEYS_VARIABLE, raising=False)
    monkeypatch.setenv(auth.INSECURE_VARIABLE, "1")   # ignored: the Config given is what counts
    settings = config.Config(scheduler=f"127.0.0.1:{free_port()}", rank=1, keys=directory)
    keyed = Membership.from_config("worker", settings)
    try:
        assert keyed.credentials.name == "worker-1"
    finally:
        keyed.close()
    monkeypatch.setattr(auth, "_warned_insecure", False)
    insecure = Membership.from_config(
        "worker", dataclasses.replace(settings, keys=None, insecure=True))
    try:
        assert insecure.credentials is None
    finally:
        insecure.close()
    assert "runs without authentication or encryption" in capsys.readouterr().err


@pytest.fixture
def lone_scheduler(tmp_path):
    """A scheduler of a 2-worker, 1-server job on a thread, and its key directory."""
    directory = str(tmp_path / "keys")
    auth.make_key_directory(directory, 2, 1)
    address = f"127.0.0.1:{free_port()}"
    sched = scheduler.Scheduler(address, 2, 1, heartbeat_timeout=30, timeout=TIMEOUT,
                                credentials=auth.load_credentials(directory, "scheduler"))
    thread = threading.Thread(target=sched.run, daemon=True)
    thread.start()
    yield address, directory
    sched.timeout = 0     # ends its loop (nobody completes registration)
    thread.join(timeout=10)


def register_reply(address, credentials, role, rank):
    connection = transport.Connection(f"tcp://{address}", b"probe",
                                      security=auth.ClientCurve(credentials, "scheduler"))
    try:
        return connection.request(Message("register", 1, "probe", meta=dict(
            role=role, rank=rank, node="probe-node", tcp="", ipc="", hostname="h", netns=0)),
            transport.Deadline(TIMEOUT, "register"))
    finally:
        connection.close()


@pytest.mark.parametrize("role, rank", [("server", 0), ("worker", 1)])
def test_a_workers_key_cannot_register_as_a_server_or_another_rank(lone_scheduler, role, rank):
    address, directory = lone_scheduler
    reply = register_reply(address, auth.load_credentials(directory, "worker", 0), role, rank)
    assert reply.op == "error"
    assert "the key of worker-0 cannot register as" in reply.meta["error"]


def test_a_server_refuses_a_member_claiming_another_workers_rank():
    with job(2, 1) as connect:
        stores = [store for _, store in connect()]
        stores[0].declare("w", (10,), np.float32)
        stores[1].declare("w", (10,), np.float32)
        stores[0].init({"w": np.zeros(10, np.float32)}, {"name": "sgd", "hyper": {}})
        # Worker 0's connection, speaking in worker 1's name.
        stores[0].rank = 1
        with pytest.raises(client.PSError, match="from worker-0 claims worker rank 1"):
            stores[0].push({"w": np.ones(10, np.float32)}, 0, lr=0.1)


def wait_for_text(capfd, text, deadline_s=TIMEOUT):
    """All stderr captured until `text` appeared in it (or the deadline passed)."""
    seen = ""
    deadline = transport.Deadline(deadline_s, f"log line {text!r}")
    while text not in seen and deadline.remaining() > 0:
        seen += capfd.readouterr().err
        threading.Event().wait(0.02)
    return seen


def test_a_server_key_is_not_let_into_another_server(capfd):
    """Servers talk only to workers: another member's key gets no connection at all (the
    server says so once, by address), so a request sent with it is never answered."""
    with job(1, 2) as connect:
        [(membership, store)] = connect()
        server_key = auth.load_credentials(connect.keys, "server", 1)
        intruder = zmq.Context()
        try:
            sock = intruder.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            auth.ClientCurve(server_key, "server-0").apply(sock)
            sock.connect(store.connections[0].address)
            sock.send_multipart(protocol.encode(Message("pull", 1, "server-1", meta={
                "rank": 0, "clock": 0, "chunks": []})))
            log = wait_for_text(capfd, "server 0 refused a connection from ")
            assert log.count("refused a connection") == 1, log
            # The server is alive and serving its real worker; the intruder got nothing.
            store.declare("w", (4,), np.float32)
            store.init({"w": np.ones(4, np.float32)}, {"name": "sgd", "hyper": {}})
            out = np.zeros(4, np.float32)
            store.pull({"w": out}, 0)
            assert out.tolist() == [1, 1, 1, 1]
            assert sock.poll(0) == 0
            sock.close()
        finally:
            intruder.term()


NO_CURVE = "server 0 refused a connection from {}: it does not speak CURVE"


def test_a_peer_without_curve_is_logged_once_by_address_and_its_watch_ends_with_the_listener(
        tmp_path, capfd):
    """libzmq drops a peer that speaks no CURVE at the handshake, before ZAP: the listener's
    monitor still logs it, once per address however often it comes back. The address is read
    from the accepted fd, which a fast failure may have closed first (an 'unknown address',
    also logged once), so the stranger keeps coming until its address was read once."""
    directory = str(tmp_path / "keys")
    auth.make_key_directory(directory, 1, 1)
    security = auth.ServerCurve(auth.load_credentials(directory, "server", 0), ("worker",),
                                "server 0")
    listener = transport.Listener("127.0.0.1", with_ipc=False, security=security)
    stranger = zmq.Context()
    attempts = 0
    seen = ""
    try:
        deadline = transport.Deadline(TIMEOUT, "the no-CURVE stranger's refusal by address")
        while NO_CURVE.format("127.0.0.1") not in seen:
            deadline.check()
            sock = stranger.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(listener.tcp_address)
            sock.send(b"register")
            attempts += 1
            seen += wait_for_text(capfd, NO_CURVE.format("127.0.0.1"), deadline_s=0.5)
            assert sock.poll(0) == 0
            sock.close()
        # Twice more, each refused before the listener closes: no new line for 127.0.0.1.
        for _ in range(2):
            failures = security.handshake_failures
            sock = stranger.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(listener.tcp_address)
            sock.send(b"register")
            wait_until(lambda: security.handshake_failures > failures, TIMEOUT,
                       "the listener's monitor to see the stranger again")
            sock.close()
        watch = listener._watch
    finally:
        listener.close()
        stranger.term()
    assert not watch.thread.is_alive()
    seen += capfd.readouterr().err
    lines = [line for line in seen.splitlines() if "does not speak CURVE" in line]
    assert lines.count("disttrain: " + NO_CURVE.format("127.0.0.1") + " (zmq: "
                       "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH; logged once per address)") == 1, lines
    unknown = [line for line in lines if "an unknown address" in line]
    assert len(lines) == 1 + len(unknown) and len(unknown) <= 1, (attempts, lines)


@pytest.mark.parametrize("secure", [False, True])
def test_ipc_sockets_live_in_a_private_directory_removed_with_the_listener(tmp_path, secure):
    directory = str(tmp_path / "keys")
    auth.make_key_directory(directory, 1, 1)
    security = auth.ServerCurve(auth.load_credentials(directory, "server", 0), ("worker",),
                                "server 0") if secure else None
    listener = transport.Listener("127.0.0.1", security=security)
    try:
        assert stat.S_IMODE(os.stat(listener.ipc_directory).st_mode) == 0o700
        assert listener.ipc_address == f"ipc://{listener.ipc_directory}/listener.ipc"
    finally:
        listener.close()
    assert not os.path.exists(listener.ipc_directory)
