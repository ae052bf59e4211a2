"""How keys are cut into chunks: the layout both workers and servers follow."""
import numpy as np
import pytest

from disttrain.ps.layout import MAX_CHUNK_BYTES, MIN_SPLIT_BYTES, chunk_layout


@pytest.mark.parametrize("shape", [(1000, 37), (5,), (), (3, 100000), (7, 2, 3), (1 << 18,),
                                   (5 << 20,), (2000, 1000)])
@pytest.mark.parametrize("servers", [1, 2, 3])
def test_chunks_tile_every_key_contiguously_across_all_servers(shape, servers):
    chunks = chunk_layout("k", shape, np.float32, servers)
    rows = shape[0] if shape else 1
    assert chunks[0].row_start == 0 and chunks[-1].row_stop == rows
    assert all(a.row_stop == b.row_start for a, b in zip(chunks, chunks[1:]))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    nbytes = int(np.prod(shape)) * 4
    if nbytes < MIN_SPLIT_BYTES:
        assert len(chunks) == 1
        return
    assert len({c.server for c in chunks}) == min(servers, rows)   # every server gets some
    row_bytes = nbytes // rows
    assert all((c.row_stop - c.row_start - 1) * row_bytes < MAX_CHUNK_BYTES for c in chunks)
