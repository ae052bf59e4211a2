"""A server's shard of a distributed checkpoint: its chunks' weights and every optimizer state
written to one safetensors file, and chunks of any key layout rebuilt from such files (resharding)."""
import json
import os
from pathlib import Path

import numpy as np

from disttrain import checkpoint
from disttrain.ps import protocol

# The server updates dense chunks slice by slice, each slice with its own state dict (see
# server.UPDATE_SLICE_BYTES, which is this value); a restored chunk is cut the same way.
SLICE_BYTES = protocol.FRAME_BYTES


class SnapshotError(ValueError):
    """A checkpoint that cannot be written or restored here; the text names the file or key."""


def shard_file(rank):
    return f"server-{rank}.safetensors"


# --- writing ------------------------------------------------------------------------
def chunk_state(key):
    """(step, {state name: chunk-shaped array}) of one KeyChunk, whatever holds it now: a
    Group (state over the group's packed weights), per-slice dicts (dense keys) or one dict
    with a per-row step array (sparse keys, see rules.apply_rows). step is an int, a per-row
    int64 array, or None for a key never updated."""
    shape = key.param.shape
    if key.group is not None:
        group = key.group
        start = group.offsets[group.members.index(key)]
        slices = [{name: value[start:start + key.param.size] if isinstance(value, np.ndarray)
                   else value for name, value in state.items()}
                  for _, state in sorted(group.state.items())]
    elif key.sparse:
        if not key.state:
            return None, {}
        step = key.state.get("step")
        arrays = {name: np.asarray(value).reshape(shape) for name, value in key.state.items()
                  if name != "step"}
        return step, arrays
    else:
        slices = [state for _, state in sorted(key.state.items())]
    slices = [state for state in slices if state]
    if not slices:
        return None, {}
    steps = {state.get("step") for state in slices}
    if len(steps) != 1:
        raise SnapshotError(f"key {key.name!r} chunk {key.chunk.index}: its slices were updated "
                            f"different numbers of times ({sorted(steps)})")
    names = [name for name in slices[0] if name != "step"]
    arrays = {name: np.concatenate([np.asarray(state[name]).reshape(-1) for state in slices])
              .reshape(shape) for name in names}
    return steps.pop(), arrays


def write_shard(server, directory, step):
    """Write every chunk this server holds to DIRECTORY/server-RANK.safetensors; returns
    the manifest entry {file, size, sha256} plus the clocks each key has seen."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SnapshotError(f"checkpoint: {directory} is not a directory on server {server.rank}")
    chunks, clocks = {}, {}
    for (name, index), key in server.keys.items():
        step_count, arrays = chunk_state(key)
        chunks.setdefault(name, {})[index] = {"param": key.param, "step": step_count,
                                               "state": arrays}
        clocks[f"{name}#{index}"] = {"version": key.version, "pushes": list(key.pushes)}
    state = {"rank": server.rank, "servers": server.num_servers, "step": step,
             "config": server.config, "chunks": chunks, "clocks": clocks}
    path = directory / shard_file(server.rank)
    try:
        size, digest = checkpoint.save_with_digest(state, path)
    except OSError as error:
        raise SnapshotError(f"checkpoint: server {server.rank} cannot write {path}: {error}") from None
    return {"file": path.name, "size": size, "sha256": digest, "role": "server",
            "rank": server.rank}


# --- restoring ----------------------------------------------------------------------
def restore_shard(server, directory, manifest, weights=True):
    """Overwrite every chunk this server holds with its rows from the checkpoint in
    DIRECTORY (any number of servers wrote it: each chunk is re-cut from the old chunks its
    rows overlap). Every file read is checked against the manifest's size and sha256.
    weights=False restores the optimizer state only (a server restarted without a replica
    has newer weights from the workers)."""
    directory = Path(directory)
    layout = manifest.get("layout") or {}
    files = {entry["file"]: entry for entry in manifest.get("files", [])}
    loaded = {}

    def shard(rank):
        if rank not in loaded:
            name = shard_file(rank)
            if name not in files:
                raise SnapshotError(f"restore: the manifest in {directory} lists no {name}")
            try:
                loaded[rank] = checkpoint.load_verified(directory / name, files[name]["size"],
                                                        files[name]["sha256"])
            except (OSError, checkpoint.CheckpointError) as error:
                raise SnapshotError(f"restore: {error}") from None
        return loaded[rank]

    restored = {}
    for (name, index), key in server.keys.items():
        spec = layout.get(name)
        if spec is None or tuple(spec["shape"]) != key.shape or spec["dtype"] != key.dtype.name:
            raise SnapshotError(f"restore: key {name!r} {key.shape} {key.dtype} is not in the "
                                f"checkpoint in {directory} with that shape and dtype "
                                f"(it has {spec and (spec['shape'], spec['dtype'])})")
        restored[name, index] = _rebuild_chunk(key, spec["chunks"], shard)
    # Only once every chunk was read: a failed restore leaves the server as it was.
    for (name, index), (step_count, arrays, param) in restored.items():
        key = server.keys[name, index]
        install_chunk(key, step_count, arrays, param if weights else key.param)


def _rebuild_chunk(key, old_chunks, shard):
    """(step, {name: array}, param) of `key`'s rows, gathered from the old chunks. A chunk
    that was written as it is now comes back as views of the file's buffer (no copy)."""
    start, stop = key.chunk.row_start, key.chunk.row_stop
    pieces = [(index, server, old_start, old_stop)
              for index, server, old_start, old_stop in old_chunks
              if max(start, old_start) < min(stop, old_stop) or
              start == stop == old_start == old_stop]
    saved = [_saved_chunk(key, shard, index, server) for index, server, _, _ in pieces]
    if len(pieces) == 1 and pieces[0][2:] == [start, stop]:
        only = saved[0]
        return only["step"], {name: np.asarray(value).reshape(key.param.shape)
                              for name, value in only["state"].items()}, \
            np.asarray(only["param"]).reshape(key.param.shape)
    param = np.empty_like(key.param)
    arrays, steps, covered = {}, [], 0
    for (_, _, old_start, old_stop), chunk in zip(pieces, saved):
        low, high = max(start, old_start), min(stop, old_stop)
        source = slice(low - old_start, high - old_start)
        target = slice(low - start, high - start)
        param[target] = np.asarray(chunk["param"]).reshape(-1, key.chunk.row_size)[source]
        covered += high - low
        step_count = chunk["step"]
        steps.append(np.asarray(step_count)[source] if isinstance(step_count, np.ndarray)
                     else step_count)
        for name, value in chunk["state"].items():
            if name not in arrays:
                arrays[name] = np.zeros_like(param)
            arrays[name][target] = np.asarray(value).reshape(-1, key.chunk.row_size)[source]
    if covered != stop - start:
        raise SnapshotError(f"restore: the checkpoint covers {covered} of the {stop - start} "
                            f"rows of key {key.name!r} chunk {key.chunk.index}")
    return _join_steps(key, steps), arrays, param


def _saved_chunk(key, shard, index, server):
    try:
        return shard(server)["chunks"][key.name][index]
    except (KeyError, TypeError):
        raise SnapshotError(f"restore: {shard_file(server)} has no chunk {index} of key "
                            f"{key.name!r}") from None


def _join_steps(key, steps):
    if all(step is None for step in steps):
        return None
    if key.sparse:
        return np.concatenate([np.asarray(s, dtype=np.int64).reshape(-1) if s is not None
                               else np.zeros(0, np.int64) for s in steps]) \
            if any(isinstance(s, np.ndarray) for s in steps) else steps[0]
    if len(set(steps)) != 1:
        raise SnapshotError(f"restore: key {key.name!r} has parts updated different numbers "
                            f"of times ({steps}); was it written by a sparse key?")
    return steps[0]


def install_chunk(key, step_count, arrays, param):
    """Put restored values where the server's update code expects them."""
    if key.group is None and param.flags.writeable and param.flags.c_contiguous:
        key.param = param   # the file's buffer becomes the server's array: no copy
    else:
        key.param[...] = param
    key.pending.clear()
    if step_count is None:
        key.state = {}
    elif key.sparse:
        key.state = {"step": step_count, **arrays}
    else:
        flat = {name: value.reshape(-1) for name, value in arrays.items()}
        per_slice = max(1, SLICE_BYTES // key.param.itemsize)
        key.state = {start // per_slice: {"step": step_count,
                                           **{name: value[start:start + per_slice]
                                              for name, value in flat.items()}}
                     for start in range(0, key.param.size, per_slice)}


def join_states(members):
    """The state of a new server Group made of `members` (restored keys may carry state
    when they are first pushed packed), or None when their states cannot be joined."""
    states = [chunk_state(key) for key in members]
    if all(step is None for step, _ in states):
        return {}
    steps = {step for step, _ in states}
    names = {tuple(sorted(arrays)) for _, arrays in states}
    if len(steps) != 1 or len(names) != 1 or any(isinstance(s, np.ndarray) for s in steps):
        return None
    step = steps.pop()
    return {0: {"step": step, **{name: np.concatenate([arrays[name].reshape(-1)
                                                        for _, arrays in states])
                                 for name in names.pop()}}}


def fsync_directory(directory):
    """Make a rename inside `directory` durable (its entry, not just the file's bytes)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


MANIFEST = "manifest.json"


def read_manifest(directory):
    """The manifest of a checkpoint directory, as a dict; SnapshotError naming the file."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SnapshotError(f"{path}: cannot read the manifest ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise SnapshotError(f"{path}: not a checkpoint manifest (no 'files' list)")
    return manifest
