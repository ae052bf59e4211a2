"""How a key is cut into chunks and which server holds each: the one rule that workers
(to address requests) and servers (to check them) both follow."""
import zlib
from dataclasses import dataclass

import numpy as np

# Keys smaller than this live whole on one server: splitting a bias costs a message per
# server and buys no bandwidth.
MIN_SPLIT_BYTES = 64 * 1024

# Big keys are cut into chunks of at most this size, dealt round-robin to the servers; the
# client sends each chunk as its own message, so a server updates and answers one chunk
# while the next is still on the wire (pipelining; figure in docs/performance.md).
MAX_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class Chunk:
    index: int         # position in the key's layout; (key name, index) names it on the wire
    server: int
    row_start: int
    row_stop: int
    row_size: int      # elements per row (product of shape[1:])

    @property
    def start(self):   # flat element offsets of the chunk within the key
        return self.row_start * self.row_size

    @property
    def stop(self):
        return self.row_stop * self.row_size


def chunk_layout(name, shape, dtype, num_servers):
    """Contiguous row ranges of a key: a big key in chunks of at most MAX_CHUNK_BYTES (and at
    least one per server) dealt round-robin to all servers; a small one whole. The first
    chunk goes to the server the name hashes to, so many small keys spread out."""
    shape = tuple(int(n) for n in shape)
    rows = shape[0] if shape else 1
    row_size = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    nbytes = rows * row_size * np.dtype(dtype).itemsize
    first = zlib.crc32(name.encode()) % num_servers
    if nbytes < MIN_SPLIT_BYTES or rows < 2:
        return [Chunk(0, first, 0, rows, row_size)]
    pieces = max(num_servers, -(-nbytes // MAX_CHUNK_BYTES))
    pieces = min(pieces, rows)
    bounds = [rows * i // pieces for i in range(pieces + 1)]
    return [Chunk(i, (first + i) % num_servers, bounds[i], bounds[i + 1], row_size)
            for i in range(pieces)]
