"""BatchNorm running statistics averaged over workers through the servers: after training,
every worker's (so the saved model's) running mean and variance are the mean over workers,
and the server's average rule stores the mean of the pushed values, not an optimizer step."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.buffer_average import KEY
from disttrain.parallel import DataParallel
from tests.ps.inprocess import TIMEOUT, job, run_workers

FEATURES, BATCH, STEPS, MOMENTUM = 3, 8, 4, 0.1


class Net(nn.Module):
    """BatchNorm first: its batch statistics depend on the data alone, so the expected
    running statistics can be worked out with numpy."""

    def __init__(self):
        super().__init__()
        dt.manual_seed(0)
        self.norm = nn.BatchNorm1d(FEATURES, momentum=MOMENTUM)
        self.linear = nn.Linear(FEATURES, 1)

    def forward(self, x):
        return self.linear(self.norm(x))


def batch(rank, step):
    """Each worker's data has its own offset and scale, so rank 0's statistics alone are wrong."""
    rng = np.random.default_rng([rank, step])
    return (rng.standard_normal((BATCH, FEATURES)) * (1 + 2 * rank) + 5 * rank).astype(np.float32)


def expected_statistics(num_workers):
    mean, var = np.zeros(FEATURES), np.ones(FEATURES)
    for step in range(STEPS):
        xs = [batch(rank, step).astype(np.float64) for rank in range(num_workers)]
        mean = (1 - MOMENTUM) * mean + MOMENTUM * np.mean([x.mean(axis=0) for x in xs], axis=0)
        var = (1 - MOMENTUM) * var + MOMENTUM * np.mean([x.var(axis=0, ddof=1) for x in xs], axis=0)
    return mean, var


@pytest.fixture
def worker_env(monkeypatch):
    def set_env(address, num_workers):
        for name, value in dict(DISTTRAIN_ROLE="worker", DISTTRAIN_SCHEDULER=address,
                                DISTTRAIN_NUM_WORKERS=str(num_workers), DISTTRAIN_NUM_SERVERS="1",
                                DISTTRAIN_HOST="127.0.0.1", DISTTRAIN_TIMEOUT=str(TIMEOUT)).items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("DISTTRAIN_RANK", raising=False)
    return set_env


def test_saved_statistics_are_the_mean_over_workers(worker_env, tmp_path):
    with job(2, 1) as connect:   # connect() unused: DataParallel registers by itself
        worker_env(connect.address, 2)
        saved = {}

        def worker(_):
            model = Net()
            with DataParallel(model, optim.SGD(model.parameters(), lr=0.1)) as parallel:
                for step in range(STEPS):
                    parallel.zero_grad()
                    (model(dt.tensor(batch(parallel.rank, step))) ** 2).mean().backward()
                    parallel.step()
            dt.save(model.state_dict(), str(tmp_path / f"rank{parallel.rank}.safetensors"))
            saved[parallel.rank] = dt.load(str(tmp_path / f"rank{parallel.rank}.safetensors"))

        run_workers(2, worker)
    mean, var = expected_statistics(2)
    for rank in (0, 1):
        np.testing.assert_allclose(saved[rank]["norm.running_mean"], mean, rtol=1e-5, err_msg=rank)
        np.testing.assert_allclose(saved[rank]["norm.running_var"], var, rtol=1e-5, err_msg=rank)
    # Rank 0's own statistics would be far from these: the check above is not vacuous.
    assert np.abs(expected_statistics(1)[0] - mean).max() > 1


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_average_key_stores_the_mean_of_the_pushed_values(mode):
    with job(2, 1) as connect:
        stores = [store for _, store in connect()]
        for store in stores:
            store.declare(KEY, (4,), np.float32, average=True)
        # Adam would move a value by about lr per step whatever the pushed "gradient".
        stores[0].init({KEY: np.zeros(4, np.float32)}, {"name": "adam", "hyper": {"lr": 0.1}},
                       mode=mode)
        pushed = [np.array([1, 2, 3, 4], np.float32), np.array([3, 2, 1, 0], np.float32)]
        run_workers(2, lambda rank: stores[rank].push({KEY: pushed[rank]}, 0, lr=0.0))
        out = np.empty(4, np.float32)
        stores[0].pull({KEY: out}, 1)
        if mode == "sync":
            np.testing.assert_array_equal(out, [2, 2, 2, 2])
        else:   # each push moved the value half way; the order of the two is free
            first_then_second = [(p / 2 + q) / 2 for p, q in (pushed, pushed[::-1])]
            assert any(np.allclose(out, value) for value in first_then_second), out
