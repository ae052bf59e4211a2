"""Chain replication (ps/replica.py): a shard's state survives the replicate / fetch_replica
round trip exactly, replies wait for the replica's acknowledgement, and a worker re-sends
what a restarted server never answered."""
import numpy as np
import pytest

from disttrain.ps import auth, client, protocol, replica, transport
from disttrain.ps.protocol import Message
from disttrain.ps.server import ServerState
from tests.ps import test_group, test_snapshot
from tests.ps.inprocess import job
from disttrain.ps.layout import chunk_layout
from tests.ps.test_server import init_message, make_server, pull, push
from tests.waiting import wait_until


def wire(message):
    """The message as the receiver gets it: encoded to frames and decoded again."""
    decoded = protocol.decode(protocol.encode(message))
    decoded.peer = message.peer
    return decoded


def fetched_back(state, holder_rank=1):
    """A fresh ServerState of `state`'s rank rebuilt as a restarted server is: every chunk
    replicated to a Holder, then fetched back from it."""
    holder = replica.Holder(holder_rank, state.num_servers)
    names, payloads, meta = replica.encode(
        [replica.chunk_record(key) for key in state.keys.values()], copy=True)
    meta.update(config=state.config, full=True)
    ack = holder.handle(wire(Message("replicate", 7, state.sender, names, payloads, meta)))
    assert (ack.op, ack.id) == ("reply", 7), ack.meta
    reply = holder.handle(wire(Message("fetch_replica", 8, state.sender)))
    assert reply.op == "reply", reply.meta
    restarted = ServerState(state.rank, state.num_workers, state.num_servers)
    replica.install(restarted, wire(reply))
    return restarted


@pytest.mark.parametrize("optimizer", test_snapshot.OPTIMIZERS, ids=lambda o: o["name"])
def test_a_shard_fetched_back_from_its_replica_continues_exactly(optimizer):
    # Dense chunks of a big key, a small key and a lazily updated sparse table (per-row
    # steps and moments), on two servers; server 0 dies after 3 clocks.
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32)
               for name, (shape, _) in test_snapshot.KEYS.items()}
    unbroken = test_snapshot.start(2, 2, optimizer, weights)
    broken = test_snapshot.start(2, 2, optimizer, weights)
    test_snapshot.train(unbroken, 2, 5, np.random.default_rng(1))
    rng = np.random.default_rng(1)
    test_snapshot.train(broken, 2, 3, rng)
    broken[0] = fetched_back(broken[0])
    assert {k: (c.version, c.pushes) for k, c in broken[0].keys.items()} == \
        {k: (3, [3, 3]) for k in broken[0].keys}
    test_snapshot.train(broken, 2, 2, rng, first_clock=3)
    got, expected = test_snapshot.whole(broken), test_snapshot.whole(unbroken)
    for name, (param, states, steps) in expected.items():
        np.testing.assert_array_equal(got[name][0], param, err_msg=name)
        assert sorted(got[name][1]) == sorted(states) and states
        for state_name, array in states.items():
            np.testing.assert_array_equal(got[name][1][state_name], array, err_msg=state_name)
        np.testing.assert_array_equal(np.asarray(got[name][2]), np.asarray(steps), err_msg=name)


def test_a_packed_group_with_adam_state_is_fetched_back_and_continues_exactly():
    script = [(clock, rank, None, True) for clock in range(2) for rank in range(2)]
    state, _ = test_group.replay(script, 2, test_group.ADAM)
    reference, _ = test_group.replay(script, 2, test_group.ADAM)   # the same, never broken
    assert state.keys["a", 0].group is not None
    restarted = fetched_back(state, holder_rank=0)   # one server: it keeps its own replica
    for clock in (2, 3):
        for rank in range(2):
            grads = test_group.gradients(rank, clock)
            for server in (restarted, reference):
                [(_, reply)] = server.handle("w", test_group.keyed_push(rank, clock, grads, True))
                assert reply.op == "reply", reply.meta
    test_group.assert_same_weights(restarted, reference)
    for name in test_group.SHAPES:
        assert restarted.keys[name, 0].version == reference.keys[name, 0].version == 4


def test_a_replica_is_refused_from_any_key_but_the_predecessor_servers():
    holder = replica.Holder(0, 3)   # keeps server 2's replica
    for peer in ("server-1", "worker-2"):
        message = Message("fetch_replica", 3, peer, peer=peer)
        reply = holder.handle(message)
        assert reply.op == "error" and "keeps the replica of server-2 only" in reply.meta["error"]
    assert holder.handle(Message("fetch_replica", 4, "server-2", peer="server-2")).op == "reply"


def test_a_push_of_a_clock_already_applied_is_skipped_and_answered():
    state = make_server("sync")
    ones = np.ones(6, np.float32)
    state.handle("w0", push(0, 0, "w", ones))
    state.handle("w1", push(1, 0, "w", 3 * ones))
    before = state.keys["w", 0].param.copy()
    [(_, reply)] = state.handle("w0", push(0, 0, "w", 100 * ones))   # re-sent after a restart
    assert reply.op == "reply", reply.meta
    np.testing.assert_array_equal(state.keys["w", 0].param, before)
    assert state.keys["w", 0].pushes == [1, 1] and state.keys["w", 0].version == 1


class FakeMembership:
    """What Replication and KVStore read of a Membership: no keys (insecure), the book."""
    credentials = None
    timeout = 30

    def __init__(self, book=None):
        self.book, self.book_version, self.dead = book, 0, None

    def check(self):
        pass


def test_replies_leave_only_after_the_replica_acknowledged_in_order():
    primary = transport.Listener("127.0.0.1", with_ipc=False)
    successor = transport.Listener("127.0.0.1", with_ipc=False)
    state = ServerState(0, 2, 2)
    book = {"server": [{"tcp": primary.tcp_address, "pid": 1},
                       {"tcp": successor.tcp_address, "pid": 2}]}
    replication = replica.Replication(state, primary, FakeMembership(book), book,
                                      protocol.DEFAULT_MAX_MESSAGE_BYTES)
    sent = []
    primary.send = lambda route, reply: sent.append((route, reply.op, reply.id))
    holder = replica.Holder(1, 2)
    try:
        value = np.arange(6, dtype=np.float32)
        init = init_message("w", value, chunk_layout("w", value.shape, value.dtype, 1)[0])
        assert replication.after(state.handle("w0", init)) == []    # init: held too
        ones = np.ones(6, np.float32)
        assert replication.after(state.handle("w0", push(0, 0, "w", ones, request_id=11))) == []
        replies = state.handle("w1", push(1, 0, "w", ones, request_id=12))
        assert [reply.id for _, reply in replies] == [11, 12]       # clock 0 applied
        assert replication.after(replies) == []                     # ... and replicated first
        assert replication.after(state.handle("w0", pull(0, 1, "w", request_id=13))) == []
        assert sent == [] and replication.sent == 2
        acks, versions = [], []
        for _ in range(2):
            identity, message = successor.receive(10_000)
            acks.append((identity, holder.handle(message)))
            versions.append(holder.records["w", 0][0]["version"])
        assert versions == [0, 1]
        successor.send(*acks[0])          # the init's replica: only the init reply leaves
        wait_until(lambda: replication.receive(50) or sent, 10)
        assert sent == [("w0", "reply", 1)]
        successor.send(*acks[1])
        wait_until(lambda: replication.receive(50) or len(sent) == 4, 10)
        assert sent[1:] == [("w0", "reply", 11), ("w1", "reply", 12), ("w0", "reply", 13)]
        meta, parts = holder.records["w", 0]
        assert (meta["version"], meta["pushes"]) == (1, [1, 1])
        np.testing.assert_array_equal(parts["param"], value - 0.5)
        # Nothing changed: a reply leaves at once.
        assert len(replication.after(state.handle("w0", pull(0, 1, "w", request_id=14)))) == 1
    finally:
        replication.close()
        successor.close()
        del primary.send
        primary.close()


def test_a_worker_resends_what_a_restarted_server_never_answered_to_its_new_address():
    old, new = (transport.Listener("127.0.0.1", with_ipc=False) for _ in range(2))
    membership = FakeMembership()
    store = client.KVStore({"server": [{"tcp": old.tcp_address, "ipc": "", "pid": 1}],
                            "worker": [{}]}, 0, membership, timeout=30)
    try:
        store.declare("w", (6,), np.float32)
        out = np.zeros(6, np.float32)
        answered = store.pull_async({"w": out}, 0)
        identity, message = old.receive(10_000)
        old.send(identity, Message("reply", message.id, "server-0", message.keys, [
            protocol.Payload(0, "dense", 0, np.full(6, 2, np.float32))], {"versions": [0]}))
        answered.wait()
        grad = np.ones(6, np.float32)
        pending = store.pushpull_async({"w": grad}, {"w": out}, 0, lr=0.1)
        _, lost = old.receive(10_000)     # the server dies without answering
        old.close()
        membership.book = {"server": [{"tcp": new.tcp_address, "ipc": "", "pid": 2}]}
        membership.book_version = 1
        assert not pending.done()
        identity, resent = new.receive(10_000)
        assert (resent.op, resent.id, resent.meta["clock"]) == ("pushpull", lost.id, 0)
        np.testing.assert_array_equal(resent.payloads[0].array, grad)
        new.send(identity, Message("reply", resent.id, "server-0", resent.keys, [
            protocol.Payload(0, "dense", 0, np.full(6, 3, np.float32))], {"versions": [1]}))
        pending.wait()
        np.testing.assert_array_equal(out, np.full(6, 3, np.float32))
        assert new.receive(200) is None and store.unanswered == {}   # the pull was not re-sent
    finally:
        store.close()
        new.close()


def test_a_replaced_incarnation_cannot_overwrite_its_replacements_replica():
    holder = replica.Holder(1, 2)
    state = make_server("sync")
    names, payloads, meta = replica.encode(
        [replica.chunk_record(key) for key in state.keys.values()], copy=True)
    for incarnation, expected in ((1, "reply"), (0, "error"), (1, "reply")):
        reply = holder.handle(wire(Message("replicate", 5, "server-0", names, payloads,
                                           dict(meta, incarnation=incarnation))))
        assert reply.op == expected, reply.meta
    assert "which incarnation 1 replaced" in holder.handle(wire(Message(
        "replicate", 6, "server-0", names, payloads, dict(meta, incarnation=0)))).meta["error"]


def test_with_replicas_a_server_key_gets_in_for_the_replica_ops_of_its_successor_only():
    """Through real CURVE sockets: server 0 of three keeps server 2's replica. Server 2's key
    may fetch it, but not pull like a worker; server 1's key may not fetch it."""
    with job(1, 3, replicas=1) as connect:
        [(_, store)] = connect()
        store.declare("w", (4,), np.float32)
        store.init({"w": np.ones(4, np.float32)}, {"name": "sgd", "hyper": {}})
        out = np.zeros(4, np.float32)
        store.pull({"w": out}, 0)    # answered once the init's replica was acknowledged
        assert out.tolist() == [1, 1, 1, 1]

        def ask(server_rank, op):
            credentials = auth.load_credentials(connect.keys, "server", server_rank)
            connection = transport.Connection(
                store.connections[0].address, transport.new_identity("intruder"),
                security=auth.ClientCurve(credentials, "server-0"))
            try:
                return connection.request(Message(op, 1, f"server-{server_rank}", meta={
                    "rank": 0, "clock": 0, "chunks": []}), transport.Deadline(30, op))
            finally:
                connection.close()
        assert ask(2, "fetch_replica").op == "reply"
        refused = ask(2, "pull")
        assert refused.op == "error" and "only workers talk to servers" in refused.meta["error"]
        refused = ask(1, "fetch_replica")
        assert refused.op == "error" and "keeps the replica of server-2 only" in \
            refused.meta["error"]


def test_without_replicas_worker_0_re_inits_a_restarted_server_before_re_sending():
    old, new = (transport.Listener("127.0.0.1", with_ipc=False) for _ in range(2))
    membership = FakeMembership()
    store = client.KVStore({"server": [{"tcp": old.tcp_address, "ipc": "", "pid": 1}],
                            "worker": [{}]}, 0, membership, timeout=30)
    weights = {"a": np.full(6, 7, np.float32), "b": np.full(3, 8, np.float32)}
    seen = []

    def reinit(server, clocks):
        seen.append(clocks)
        versions = {(name, 0): clocks.get((name, 0), 4) for name in weights}
        store.reinit_server(server, weights, versions, {"name": "sgd", "hyper": {}}, "sync", 0)
    store.on_server_restarted = reinit
    try:
        for name, array in weights.items():
            store.declare(name, array.shape, array.dtype)
        # Key a's reply of clock 3 never came; key b's did (the worker is at clock 4).
        pending = store.pushpull_async({"a": np.ones(6, np.float32)},
                                       {"a": np.zeros(6, np.float32)}, 3, lr=0.1)
        old.receive(10_000)
        old.close()
        membership.book = {"server": [{"tcp": new.tcp_address, "ipc": "", "pid": 2}]}
        membership.book_version = 1
        assert not pending.done()
        assert seen == [{("a", 0): 3}]
        _, init = new.receive(10_000)
        _, resent = new.receive(10_000)
        assert (init.op, init.meta["recover"], resent.op) == ("init", True, "pushpull")
        assert dict(zip(init.keys, init.meta["versions"])) == {"a": 3, "b": 4}
        np.testing.assert_array_equal(init.payloads[0].array, np.full(6, 7, np.float32))
    finally:
        store.close()
        new.close()
