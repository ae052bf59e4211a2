"""Fixtures shared by the parameter-server tests."""
import pytest

from tests.ps.inprocess import TIMEOUT, job


@pytest.fixture
def one_worker_job(monkeypatch):
    """Scheduler and one server on threads; the test process is the only worker, with the
    job's keys in its environment as a launched worker has them."""
    with job(1, 1) as connect:
        for name, value in dict(DISTTRAIN_ROLE="worker", DISTTRAIN_SCHEDULER=connect.address,
                                DISTTRAIN_NUM_WORKERS="1", DISTTRAIN_NUM_SERVERS="1",
                                DISTTRAIN_HOST="127.0.0.1", DISTTRAIN_TIMEOUT=str(TIMEOUT),
                                DISTTRAIN_KEYS=connect.keys).items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("DISTTRAIN_RANK", raising=False)
        yield
