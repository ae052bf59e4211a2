"""``save`` / ``load`` of nested training state as a true safetensors file: arrays are tensors named
by their dotted path ("model.fc.weight"); other values and the nesting go in ``__metadata__`` as JSON."""
import concurrent.futures
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from disttrain import backend

DTYPE_CODES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
               np.dtype(np.int8): "I8", np.dtype(np.int16): "I16", np.dtype(np.int32): "I32",
               np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16",
               np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64", np.dtype(np.bool_): "BOOL"}
CODE_DTYPES = {code: dtype.newbyteorder("<") for dtype, code in DTYPE_CODES.items()}
STRUCTURE_KEY = "disttrain.structure"  # the nested layout, so load() can rebuild dict/list nesting
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
HASH_BLOCK_BYTES = 1 << 20


class CheckpointError(ValueError):
    """A file that is not a readable safetensors checkpoint (truncated, corrupt, unknown dtype)."""


def save(state, path):
    """Write ``state`` (nested dicts / lists of arrays, Tensors and plain values) to ``path``.

    The write is atomic: a temporary file in the same folder is renamed over ``path`` only once
    complete, so a crash mid-save never leaves a half-written checkpoint behind.
    """
    save_with_digest(state, path)


def save_with_digest(state, path):
    """``save``, returning ``(size in bytes, sha256 hex digest)`` of the file it wrote; the
    digest is computed from the bytes as they are written (no second pass over the file)."""
    path = Path(path)
    tensors, metadata = {}, {}
    metadata[STRUCTURE_KEY] = json.dumps(_flatten(state, "", tensors, metadata))
    header, order, offset = {"__metadata__": metadata}, sorted(tensors, key=_write_order(tensors)), 0
    for name in order:
        array = tensors[name]
        header[name] = {"dtype": DTYPE_CODES[array.dtype.newbyteorder("=")], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # keeps every tensor 8-byte aligned in the file
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest = BackgroundDigest()
    try:
        with open(temporary, "wb") as f:
            for block in _blocks([struct.pack("<Q", len(header_bytes)), header_bytes] +
                                 [tensors[name].reshape(-1).view(np.uint8) for name in order]):
                f.write(block)
                digest.update(block)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        digest.close()
        if temporary.exists():
            temporary.unlink()
    return 8 + len(header_bytes) + offset, digest.hexdigest()


class BackgroundDigest:
    """sha256 computed on a thread of its own, block by block in order, while the caller
    writes or reads the next block (both release the GIL): hashing then costs little more
    than the I/O instead of adding to it (figure in docs/performance.md, "Checkpoints")."""

    def __init__(self):
        self._digest = hashlib.sha256()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "disttrain-sha256")
        self._last = None

    def update(self, block):
        # One worker thread runs the updates in submission order; the caller keeps `block`
        # unchanged until hexdigest() (it is a view of data written or read once).
        self._last = self._pool.submit(self._digest.update, block)

    def hexdigest(self):
        self.close()
        return self._digest.hexdigest()

    def close(self):
        """Wait for the updates submitted so far and end the thread."""
        self._pool.shutdown(wait=True)


def _blocks(buffers, size=HASH_BLOCK_BYTES):
    """Each buffer cut into pieces of at most `size` bytes: writing and hashing a block while
    it is still in cache reads memory once instead of twice."""
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        for start in range(0, len(view), size):
            yield view[start:start + size]


def _write_order(tensors):
    """Widest dtype first, then by name: every offset stays a multiple of its tensor's itemsize."""
    return lambda name: (-tensors[name].dtype.itemsize, name)


def _flatten(value, name, tensors, metadata):
    """Collect arrays into ``tensors`` and plain values into ``metadata``; return the structure.

    The structure mirrors ``value``: ``{"dict": [[key, child], ...]}`` (keys keep int or str
    type), ``{"list": [child, ...]}``, and a leaf is ``{"tensor": name}`` or ``{"value": name}``.
    """
    if isinstance(value, dict):
        items = []
        for key, child in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"save: key {key!r} at {name or 'the top level'!r} must be str or int")
            items.append([key, _flatten(child, f"{name}.{key}" if name else str(key), tensors, metadata)])
        return {"dict": items}
    if isinstance(value, (list, tuple)):
        return {"list": [_flatten(child, f"{name}.{i}" if name else str(i), tensors, metadata)
                         for i, child in enumerate(value)]}
    if name in tensors or name in metadata:
        raise ValueError(f"save: two entries are both named {name!r} once flattened (dots in keys?)")
    if hasattr(value, "data") and hasattr(value, "requires_grad"):  # a Tensor: save its array
        value = value.data
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        metadata[name] = json.dumps(value)
        return {"value": name}
    array = backend.to_numpy(value)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        array = array.copy(order="C")
    if array.dtype.newbyteorder("=") not in DTYPE_CODES:
        raise TypeError(f"save: {name!r} has dtype {array.dtype}, which safetensors cannot hold here "
                        f"(supported: {', '.join(str(d) for d in DTYPE_CODES)})")
    tensors[name] = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"tensor": name}


def load(path):
    """Read a checkpoint written by ``save`` (or any safetensors file: then a flat dict of arrays).

    Arrays come back as writable numpy arrays sharing one buffer read from the file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        data = _buffer(os.fstat(f.fileno()).st_size)
        f.readinto(data)
    return _parse(data, path)


def _buffer(size):
    """A writable byte buffer of `size` bytes, not zero-filled (bytearray(size) writes every
    byte once more before the read does)."""
    return memoryview(np.empty(size, dtype=np.uint8))


def load_verified(path, size, sha256):
    """``load``, but first check the file against the ``size`` and ``sha256`` a manifest
    recorded for it: a truncated or changed file raises CheckpointError naming it."""
    path = Path(path)
    with open(path, "rb") as f:
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise CheckpointError(f"{path} is {actual} bytes, but the manifest says {size} "
                                  f"(truncated or overwritten)")
        data = _buffer(size)
        view, digest, done = data, BackgroundDigest(), 0
        try:
            while done < size:
                count = f.readinto(view[done:done + HASH_BLOCK_BYTES])
                if not count:
                    raise CheckpointError(f"{path} ended after {done} of {size} bytes while "
                                          f"reading")
                digest.update(view[done:done + count])
                done += count
        finally:
            digest.close()
    actual = digest.hexdigest()
    if actual != sha256:
        raise CheckpointError(f"{path} has sha256 {actual}, but the manifest says "
                              f"{sha256} (corrupted)")
    return _parse(data, path)


def _parse(data, path):
    if len(data) < 8:
        raise CheckpointError(f"load: {path} is {len(data)} bytes, too short for a safetensors header")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise CheckpointError(f"load: {path} declares a {header_size}-byte header but has only "
                              f"{len(data) - 8} bytes after the length (truncated or not safetensors)")
    try:
        header = json.loads(bytes(data[8:8 + header_size]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"load: {path} has a corrupt header: {error}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"load: {path} header is a {type(header).__name__}, not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors = _read_tensors(header, memoryview(data)[8 + header_size:], path)
    if STRUCTURE_KEY not in metadata:  # written by another tool: a flat dict, in name order
        return dict(sorted(tensors.items()))
    try:
        return _rebuild(json.loads(metadata[STRUCTURE_KEY]), tensors, metadata)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"load: {path} has an inconsistent {STRUCTURE_KEY!r} entry: {error!r}") from None


def _read_tensors(header, buffer, path):
    """Check every entry against the byte buffer, then view each as a numpy array (no copy)."""
    tensors, end = {}, 0
    for name, entry in header.items():
        try:
            dtype, shape = CODE_DTYPES[entry["dtype"]], tuple(int(n) for n in entry["shape"])
            begin, stop = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"load: {path}: tensor {name!r} has an unreadable entry {entry!r} "
                                  f"(dtypes understood: {', '.join(CODE_DTYPES)})") from None
        expected = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= stop or stop - begin != expected:
            raise CheckpointError(f"load: {path}: tensor {name!r} of {entry['dtype']} {list(shape)} needs "
                                  f"{expected} bytes but has offsets [{begin}, {stop}]")
        if stop > len(buffer):
            raise CheckpointError(f"load: {path} is truncated: tensor {name!r} ends at byte {stop} of the "
                                  f"data section, which has only {len(buffer)} bytes")
        tensors[name] = np.frombuffer(buffer[begin:stop], dtype=dtype).reshape(shape)
        end = max(end, stop)
    if end != len(buffer):
        raise CheckpointError(f"load: {path}: the data section has {len(buffer)} bytes but tensors use {end}")
    return tensors


def _rebuild(structure, tensors, metadata):
    """Invert ``_flatten``: nested dicts and lists with arrays and plain values at the leaves."""
    if "dict" in structure:
        return {key: _rebuild(child, tensors, metadata) for key, child in structure["dict"]}
    if "list" in structure:
        return [_rebuild(child, tensors, metadata) for child in structure["list"]]
    if "tensor" in structure:
        return tensors[structure["tensor"]]
    return json.loads(metadata[structure["value"]])

