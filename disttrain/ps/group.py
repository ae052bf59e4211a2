"""Packed groups: a bucket's small dense gradients travel in one "packed" frame
(`pack_payloads`, worker side), and a server keeps those chunks back to back as one `Group`,
updated with one optimizer call and answered in one frame (server side). Why they pay: the
"Parameter server" section of docs/performance.md."""
from dataclasses import dataclass, field

import numpy as np

from disttrain.ps import protocol
from disttrain.ps.protocol import Payload, RequestError
from disttrain.ps.snapshot import join_states


# --- worker side: packing a message's payloads ----------------------------------------------
def pack_payloads(entries):
    """The payloads of one message (entries: client.Entry): one per piece, except that
    consecutive chunks sent whole in one small piece each (a bucket of small gradients)
    travel packed in one frame of at most FRAME_BYTES."""
    payloads, run, run_bytes = [], [], 0
    for index, entry in enumerate(entries):
        pieces = entry.pieces
        whole = len(pieces) == 1 and pieces[0][0] == "dense" and entry.nbytes < protocol.FRAME_BYTES
        if run and not (whole and pieces[0][2].dtype == run[0][2].dtype and
                        run_bytes + entry.nbytes <= protocol.FRAME_BYTES):
            payloads += _packed(run)
            run, run_bytes = [], 0
        if whole:
            run.append((index, pieces[0][1], pieces[0][2]))
            run_bytes += entry.nbytes
        else:
            payloads += [Payload(index, kind, start, array) for kind, start, array in pieces]
    return payloads + _packed(run)


def _packed(run):
    """[(key index, start, whole-chunk array)] as one packed payload (a lone one as dense)."""
    if len(run) < 2:
        return [Payload(index, "dense", start, array) for index, start, array in run]
    return [Payload(run[0][0], "packed", 0, np.concatenate([array for _, _, array in run]),
                    [(index, start, array.size) for index, start, array in run])]


# --- server side: chunks stored and updated as one ------------------------------------------
@dataclass(eq=False)
class Group:
    """Small dense chunks that workers push packed in one frame, in that order (a
    DataParallel bucket), stored back to back: one optimizer call updates them all and one
    frame answers their pull. To the rest of the server it is an update target like one
    flat key; each member keeps its name, clocks and a view of its weights, so it can still
    be pulled alone.

    A group forms on the first packed push of chunks never pushed before, and is dissolved
    back into plain keys, state and pending gradients split exactly, the moment any member is
    pushed otherwise (alone, without gradient, or packed with other keys); those keys then
    stay plain."""
    members: tuple                          # the server's KeyChunks, in packed order
    offsets: list                           # each member's first element in `param`
    param: np.ndarray                       # 1-D, all members' weights back to back
    state: dict = field(default_factory=dict)
    version: int = 0
    pending: dict = field(default_factory=dict)   # sync: clock -> server.Accumulator
    spare: list = field(default_factory=list)
    sparse = False
    average = False   # members are parameters: average keys (KeyChunk.average) are never packed


def packed_members(payload, keys, by_key, packed, server_rank):
    """The KeyChunks a packed push payload carries, in frame order, checked to be whole
    dense chunks named by no other payload; their indices are added to `packed`."""
    members = []
    for index, start, size in payload.spans:
        key = keys[index]
        # The payload itself is listed under its first span's key; nothing else may be.
        if index in packed or len(by_key[index]) > (index == payload.key):
            raise RequestError(f"push: key {key.name!r} is in more than one payload")
        if payload.array.dtype != key.dtype:
            raise RequestError(f"push: key {key.name!r} is {key.dtype}, payload is "
                               f"{payload.array.dtype}")
        if key.sparse or start != key.chunk.start or size != key.param.size:
            raise RequestError(f"push: a packed payload carries whole dense chunks, but "
                               f"key {key.name!r} got {size} elements at {start} (server "
                               f"{server_rank} holds {key.chunk.start}..{key.chunk.stop})")
        packed.add(index)
        members.append(key)
    return tuple(members)


def group_of(members, max_bytes):
    """The Group of exactly these chunks in this order: the existing one, a new one if none
    of them was ever pushed (and they fit in max_bytes), or None (they are then updated one
    by one)."""
    group = members[0].group
    if group is not None and group.members == members:
        return group
    for key in members:
        if key.group is not None:
            dissolve(key.group)
    itemsize = members[0].param.itemsize
    if len(members) < 2 or any(any(key.pushes) for key in members) or \
            sum(key.param.size for key in members) * itemsize > max_bytes:
        return None   # (a key never pushed has no pending sum yet)
    state = join_states(members)   # keys restored from a checkpoint bring optimizer state
    if state is None:
        return None
    offsets = np.cumsum([0] + [key.param.size for key in members]).tolist()
    group = Group(members, offsets[:-1], np.concatenate([key.param.reshape(-1)
                                                          for key in members]), state)
    for key, start, stop in zip(members, offsets, offsets[1:]):
        key.param = group.param[start:stop].reshape(key.param.shape)
        key.group = group
    return group


def dissolve(group):
    """Give every member its share of the group's optimizer state and pending sums."""
    for key, start in zip(group.members, group.offsets):
        stop = start + key.param.size
        key.group = None
        key.state = {index: {name: value[start:stop].copy()
                             if isinstance(value, np.ndarray) else value
                             for name, value in state.items()}
                     for index, state in group.state.items()}
        for clock, accumulator in group.pending.items():
            key.pending[clock] = accumulator.share(key, start, stop)


def packed_reply(index, keys, snapshot):
    """A packed payload answering keys[index:] if they start with a whole group in packed
    order (a bucket's pull), with how many keys it answers; else (None, 0)."""
    group = keys[index].group
    if group is None or tuple(keys[index:index + len(group.members)]) != group.members:
        return None, 0
    spans = [(index + i, member.chunk.start, member.param.size)
             for i, member in enumerate(group.members)]
    return Payload(index, "packed", 0, group.param.copy() if snapshot else group.param,
                   spans), len(spans)
