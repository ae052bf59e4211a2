"""DataParallel's buckets with one worker whose scheduler and server run on threads of the
test process: parameters sent together train exactly like the local optimizer, stay keys of
their own names on the server, a parameter left without gradient is left alone, and sparse
rows are pulled by a forward pre-hook."""
import sys

import numpy as np
import pytest

import disttrain as dt
from disttrain import optim
from disttrain.nn.module import Module
from disttrain.nn.parameter import Parameter
from disttrain.parallel import DataParallel
from tests.ps import train_program


class Net(Module):
    """Two used parameters and, optionally, one that forward never touches."""

    def __init__(self, with_unused=False):
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = Parameter(rng.standard_normal((4, 3)).astype(np.float32))
        self.b = Parameter(np.zeros(3, np.float32))
        if with_unused:
            self.unused = Parameter(np.ones(5, np.float32))

    def forward(self, x):
        return dt.tanh(x @ self.w + self.b)


def train(model, stepper, steps=5):
    """`stepper`: a DataParallel, or a plain optimizer for the local reference."""
    rng = np.random.default_rng(1)
    for _ in range(steps):
        x = dt.tensor(rng.standard_normal((8, 4)).astype(np.float32))
        stepper.zero_grad()
        (model(x) ** 2).mean().backward()
        stepper.step()


@pytest.mark.parametrize("bucket_bytes", [1 << 20, 0])
def test_one_worker_through_the_server_equals_the_local_optimizer(one_worker_job, bucket_bytes):
    model, local = Net(), Net()
    with DataParallel(model, optim.Adam(model.parameters(), lr=0.01),
                      bucket_bytes=bucket_bytes) as parallel:
        buckets = [bucket.names for bucket in parallel._buckets]
        train(model, parallel)
        # The servers' keys are the parameter names, whatever the buckets.
        pulled = np.empty((4, 3), np.float32)
        parallel._store.pull({"w": pulled}, parallel.clock)
        np.testing.assert_array_equal(pulled, model.state_dict()["w"])
    # Backward finishes b before w: reverse registration order, together unless split.
    assert buckets == ([["b", "w"]] if bucket_bytes else [["b"], ["w"]]), buckets
    train(local, optim.Adam(local.parameters(), lr=0.01))
    for name, expected in local.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[name], expected, rtol=1e-6, atol=1e-7,
                                   err_msg=name)


@pytest.mark.parametrize("bucket_bytes", [1 << 20, 0])
def test_an_unused_parameter_is_left_alone(one_worker_job, bucket_bytes):
    model = Net(with_unused=True)
    with DataParallel(model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                      bucket_bytes=bucket_bytes) as parallel:
        train(model, parallel)
    np.testing.assert_array_equal(model.state_dict()["unused"], np.ones(5, np.float32))
    assert not np.array_equal(model.state_dict()["w"], Net().state_dict()["w"])


def test_sparse_rows_come_from_a_forward_pre_hook_and_nothing_is_patched(one_worker_job):
    model = train_program.TinyNet()
    hook_before = sys.excepthook
    tokens, x, y = train_program.dataset(8)
    with DataParallel(model, optim.SGD(model.parameters(), lr=0.1)) as parallel:
        assert len(model.table._forward_pre_hooks) == 1
        # Another worker's update, as the servers see it: the next forward must use it.
        table = parallel._params["table.weight"].data
        stale = table.copy()
        rows = np.unique(tokens[:4])
        parallel._store.push({"table.weight": _rows_gradient(rows, np.ones((len(rows), 4)))},
                             parallel.clock, lr=1.0)
        parallel.clock += 1
        model(tokens[:4], dt.tensor(x[:4]))
        np.testing.assert_allclose(table[rows], stale[rows] - 1, rtol=1e-6)
        np.testing.assert_array_equal(np.delete(table, rows, axis=0),
                                      np.delete(stale, rows, axis=0))
    assert model.table._forward_pre_hooks == []          # close() takes it off again
    assert not {"forward", "state_dict"} & (set(vars(model)) | set(vars(model.table)))
    assert sys.excepthook is hook_before


def _rows_gradient(rows, values):
    return type("Rows", (), {"indices": rows.astype(np.int64),
                             "values": values.astype(np.float32)})()
