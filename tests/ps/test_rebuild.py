"""A server restarted without a replica (ps/rebuild.py): requests wait for worker 0's
weights, the chunks take the workers' clocks, and the optimizer state comes from the
newest checkpoint, the weights not."""
import numpy as np

from disttrain.ps import protocol, rebuild, snapshot
from disttrain.ps.protocol import Message, Payload
from disttrain.ps.server import ServerState
from tests.ps import test_snapshot


def reinit(state, weights, version, checkpoint, optimizer):
    """Worker 0's re-init of every chunk `state` holds in the 2-server layout."""
    names, chunks, specs, payloads = [], [], [], []
    for name, layout in test_snapshot.layout(state.num_servers).items():
        shape, sparse = test_snapshot.KEYS[name]
        for chunk in layout:
            if chunk.server != state.rank:
                continue
            flat = weights[name].reshape(-1)[chunk.start:chunk.stop]
            payloads += [Payload(len(names), "dense", chunk.start + offset, piece)
                         for offset, piece in protocol.split_frames(flat)]
            names.append(name)
            chunks.append(chunk.index)
            specs.append({"shape": list(shape), "dtype": "float32", "sparse": sparse})
    return Message("init", 50, "worker-0", names, payloads, {
        "optimizer": optimizer, "mode": "sync", "staleness": 0, "specs": specs,
        "chunks": chunks, "recover": True, "versions": [version] * len(names),
        "checkpoint": checkpoint})


def test_requests_wait_for_the_weights_then_optimizer_state_comes_from_the_checkpoint(tmp_path):
    optimizer = test_snapshot.OPTIMIZERS[0]   # Adam: moments and step counts
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32)
               for name, (shape, _) in test_snapshot.KEYS.items()}
    servers = test_snapshot.start(2, 2, optimizer, weights)
    rng = np.random.default_rng(1)
    test_snapshot.train(servers, 2, 2, rng)
    test_snapshot.write_checkpoint(servers, tmp_path)      # after clock 1
    checkpointed = test_snapshot.whole(servers)
    test_snapshot.train(servers, 2, 3, rng, first_clock=2)  # server 1 dies after clock 4
    current = {name: param.reshape(test_snapshot.KEYS[name][0])
               for name, (param, _, _) in test_snapshot.whole(servers).items()}

    restarted = ServerState(1, 2, 2)
    waiting = rebuild.AwaitWeights(restarted)
    key_on_1 = next(key for key in servers[1].keys.values() if not key.sparse)
    pull = Message("pull", 60, "worker-1", [key_on_1.name], [],
                   {"clock": 5, "rank": 1, "chunks": [key_on_1.chunk.index]})
    assert waiting.handle("w1", pull) == [] and not waiting.done    # held, not refused
    replies = waiting.handle("w0", reinit(restarted, current, 5, str(tmp_path), optimizer))
    assert waiting.done
    assert [(route, reply.op, reply.id) for route, reply in replies] == \
        [("w0", "reply", 50), ("w1", "reply", 60)]
    for (name, index), key in restarted.keys.items():
        assert (key.version, key.pushes) == (5, [5, 5])
        np.testing.assert_array_equal(key.param, servers[1].keys[name, index].param)
    # The optimizer state is the checkpoint's, cut to this server's chunks.
    for name, layout in test_snapshot.layout(2).items():
        full_param, states, steps = checkpointed[name]
        for chunk in layout:
            if chunk.server != 1:
                continue
            key = restarted.keys[name, chunk.index]
            step, arrays = snapshot.chunk_state(key)
            rows = slice(chunk.row_start, chunk.row_stop)
            for state_name, array in states.items():
                np.testing.assert_array_equal(arrays[state_name],
                                              array.reshape(-1, chunk.row_size)[rows])
            if isinstance(step, np.ndarray):
                np.testing.assert_array_equal(step, np.asarray(steps)[rows])
            else:
                assert step == 2


def test_without_a_checkpoint_the_optimizer_state_starts_afresh_and_says_so(capsys):
    optimizer = test_snapshot.OPTIMIZERS[0]
    weights = {name: np.ones(shape, np.float32) for name, (shape, _) in test_snapshot.KEYS.items()}
    restarted = ServerState(0, 2, 2)
    waiting = rebuild.AwaitWeights(restarted)
    [(_, reply)] = waiting.handle("w0", reinit(restarted, weights, 3, None, optimizer))
    assert reply.op == "reply", reply.meta
    assert all(key.state == {} and key.version == 3 for key in restarted.keys.values())
    assert "optimizer state starts afresh" in capsys.readouterr().err
