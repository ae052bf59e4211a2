"""What a server does so that a worker can be replaced mid-run (issue 13): it applies each
(worker, clock, key) push once, counts the contributions it applied, keeps the weights of
the previous clock (sync mode with recovery on) and answers the ops `recover` and `stats`.
ps/server.py calls in here; the state it reads lives on its KeyChunks and Groups."""
import json
import sys
import time
from collections import deque

from disttrain.ps import elastic
from disttrain.ps.protocol import Message, RequestError


def key_label(key):
    """A chunk's name in replies and logs: "NAME#INDEX", as checkpoint shards write it."""
    return f"{key.name}#{key.chunk.index}"


# --- dedupe ---------------------------------------------------------------------------------
def replayed(keys, rank, clock):
    """The ids of the chunks whose push of `clock` by worker `rank` was already received
    (a retry, or a replacement redoing the clock its predecessor died in): they are skipped,
    neither applied nor counted again. A clock ahead of what a chunk expects is refused."""
    if type(clock) is not int:
        raise RequestError(f"push: clock {clock!r} must be an int")
    seen = set()
    for key in keys:
        expected = key.pushes[rank]
        if clock != expected:
            if clock > expected:
                raise RequestError(f"push: worker {rank} sent clock {clock} for key "
                                   f"{key.name!r}, expected clock {expected}")
            seen.add(id(key))
    return seen


def fresh_units(units, seen):
    """The (target, gradient) pairs of a push that are not replays. A target's members are
    pushed together, so they are all replays or none; anything else is refused."""
    if not seen:   # the usual push: nothing to filter
        return units
    kept = []
    for target, gradient in units:
        replays = [id(key) in seen for key in target.members]
        if all(replays):
            continue
        if any(replays):
            raise RequestError(f"push: a packed push repeats the clock of only some of "
                               f"{[key.name for key in target.members]}")
        kept.append((target, gradient))
    return kept


# --- the previous weights -------------------------------------------------------------------
def keep_previous(target):
    """Before an update of `target`: keep its weights, so that a pull can still be answered
    with the version before it (what a replacement worker must redo its clock from)."""
    copy = target.param.copy().reshape(-1)
    offset = 0
    for key in target.members:
        key.previous = copy[offset:offset + key.param.size].reshape(key.param.shape)
        offset += key.param.size


def check_exact(state, keys, clock):
    """Refuse an exact pull (meta "exact": true) that could not be answered exactly once
    the keys reach version `clock`: one whose weights of that version are gone."""
    if not state.keep_previous:
        raise RequestError(f"exact pull on server {state.rank}: only a sync job whose init "
                           f"said recovery: true keeps the weights of the previous clock")
    for key in keys:
        if key.version > clock + 1 or (key.version == clock + 1 and key.previous is None):
            raise RequestError(f"exact pull of clock {clock}: key {key_label(key)} is at "
                               f"version {key.version}; only the current and the previous "
                               f"version are kept")


def exact_weights(key, clock):
    """The weights of version `clock` for an exact pull checked by check_exact, once the
    key is at version >= clock: the current ones, or those kept from one version before."""
    return key.previous if key.version == clock + 1 else key.param


# --- a replacement's first requests ----------------------------------------------------
class Newcomers:
    """Requests over ipc from a process of this host that the address book does not name yet:
    a replacement's first request can overtake the scheduler's book notice naming its pid.
    With recovery on they are held (in order) until the notice came, at most `patience` s
    (the heartbeat timeout), then handled as any other request (refused, if still unknown)."""

    def __init__(self, patience):
        self.patience = patience or 0   # 0: recovery off, nothing is held
        self.held = deque()             # (deadline, identity, message), in arrival order

    def hold(self, identity, message):
        if not self.patience or not message.peer.startswith("process "):
            return False
        self.held.append((time.monotonic() + self.patience, identity, message))
        return True

    def next(self, security):
        """The first held request whose sender is known now (its peer set to that member),
        or whose time is up; else None."""
        if not self.held:
            return None
        deadline, identity, message = self.held[0]
        pid = int(message.peer.split()[1])
        known = security is not None and pid in security.local_peers
        if not known and time.monotonic() < deadline:
            return None
        self.held.popleft()
        if known:
            message.peer = security.local_peers[pid]
        return identity, message


# --- ops ------------------------------------------------------------------------------------
def recover_reply(state, message, rank):
    """`recover` from worker `rank`: per chunk [pushes of that worker, version], and "clock",
    the first clock that worker has not pushed to every chunk here (None: no chunk here)."""
    keys = {key_label(key): [key.pushes[rank], key.version] for key in state.keys.values()}
    clock = min((pushes for pushes, _ in keys.values()), default=None)
    return Message("reply", message.id, state.sender, meta={"keys": keys, "clock": clock})


def stats(state):
    """{chunk label: [contributions applied, version]} of every chunk on this server."""
    return {key_label(key): [key.applied, key.version] for key in state.keys.values()}


def stats_reply(state, message):
    return Message("reply", message.id, state.sender, meta={"stats": stats(state)})


def say_counts(state, stream=None):
    """The line a server prints at exit: every chunk's applied contributions and version,
    and in sync mode whether each is exactly workers x version (no push lost or doubled)."""
    if not state.keys:
        return
    counts = stats(state)
    text = f"disttrain: server {state.rank} contributions {json.dumps(counts)}"
    if state.config is not None and state.config["mode"] == "sync":
        wrong = {label: pair for label, pair in counts.items()
                 if pair[0] != elastic.contributions_expected(state, pair[1])}
        workers = state.num_workers if state.roster is None else "the present"
        text += (f"; NOT workers x clocks for {json.dumps(wrong)}" if wrong else
                 f"; every chunk applied {workers} workers x its clocks")
    print(text, file=stream or sys.stderr, flush=True)
