"""A server restarted without a replica (`--server-replicas 0`): it holds every request until
worker 0 re-inits its chunks with the weights the workers hold, then takes the optimizer
state from the job's newest checkpoint (or starts it afresh) and says what was rolled back."""
import sys

from disttrain.ps import snapshot


def _say(text):
    print(f"disttrain: {text}", file=sys.stderr, flush=True)


class AwaitWeights:
    """Stands in front of a restarted server's ServerState until worker 0's re-init (an
    init with meta `recover: true`, `versions` per chunk and `checkpoint`, see
    KVStore.reinit_server) has arrived; `done` after that."""

    def __init__(self, state):
        self.state = state
        self.held = []      # (route, message) that arrived before the weights
        self.done = False
        _say(f"server {state.rank} restarted without a replica: holding requests until "
             f"worker 0 sends the weights")

    def handle(self, route, message):
        """The replies to send, as ServerState.handle gives them."""
        if not (message.op == "init" and message.meta.get("recover") is True):
            self.held.append((route, message))
            return []
        replies = self.state.handle(route, message)
        if any(reply.op == "error" for _, reply in replies):
            return replies
        versions = self._set_clocks(message)
        self._restore_optimizer_state(message.meta.get("checkpoint"), versions)
        self.done = True
        for held_route, held in self.held:
            replies += self.state.handle(held_route, held)
        self.held = []
        return replies

    def _set_clocks(self, message):
        """Every chunk at the version worker 0's weights have, every worker's pushes too:
        a re-sent push of an older clock is then skipped (ServerState._push)."""
        versions = message.meta.get("versions")
        if not (isinstance(versions, list) and len(versions) == len(message.keys) and
                all(type(v) is int and v >= 0 for v in versions)):
            versions = [0] * len(message.keys)
            _say(f"server {self.state.rank}: the re-init carries no versions; starting at 0")
        for name, chunk, version in zip(message.keys, message.meta["chunks"], versions):
            key = self.state.keys[name, chunk]
            key.version, key.pushes = version, [version] * self.state.num_workers
        return versions

    def _restore_optimizer_state(self, directory, versions):
        state, chunks = self.state, len(self.state.keys)
        current = f"versions {min(versions, default=0)}..{max(versions, default=0)}"
        if directory is None:
            _say(f"server {state.rank}: weights of its {chunks} chunks from worker 0 "
                 f"({current}); the job has no checkpoint, so their optimizer state starts "
                 f"afresh (step counts, moments and momentum reset to zero)")
            return
        try:
            manifest = snapshot.read_manifest(directory)
            snapshot.restore_shard(state, directory, manifest, weights=False)
        except snapshot.SnapshotError as error:
            _say(f"server {state.rank}: cannot read the optimizer state from {directory} "
                 f"({error}); it starts afresh for its {chunks} chunks ({current})")
            return
        _say(f"server {state.rank}: weights of its {chunks} chunks from worker 0 ({current}); "
             f"optimizer state rolled back to checkpoint {directory} (step "
             f"{manifest.get('step')}): the updates of the steps after it are missing from "
             f"the moments and step counts")
