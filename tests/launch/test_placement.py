"""Where each process runs and the contract environment it gets."""

import pytest

from launch.hosts import Host
from launch.placement import assign_environment, parse_env_assignments, place

HOSTS = [Host("a", 0, "10.0.0.1"), Host("b", 2, "10.0.0.2"), Host("c", 2, "10.0.0.3")]


def placed(num_workers=3, num_servers=2, device="cpu", extra_env=None, inherited=None):
    processes = place(HOSTS, num_workers, num_servers, ["python", "train.py"], ["python", "-m", "ps"])
    return assign_environment(processes, "10.0.0.1:9000", device, extra_env or {}, inherited or {})


def test_scheduler_and_servers_go_to_the_first_host_and_workers_fill_slots_in_order():
    processes = placed()
    assert [(p.name, p.host.name) for p in processes] == [
        ("scheduler", "a"), ("server 0", "a"), ("server 1", "a"),
        ("worker 0", "b"), ("worker 1", "b"), ("worker 2", "c")]
    assert [p.local_index for p in processes if p.role == "worker"] == [0, 1, 0]
    assert processes[-1].command == ["python", "train.py"]
    assert processes[0].command == ["python", "-m", "ps"]


def test_more_workers_than_slots_is_refused_with_the_counts():
    with pytest.raises(ValueError, match="5 workers do not fit in the 4 slots of a:0,b:2,c:2"):
        placed(num_workers=5)


def test_every_process_gets_the_contract_environment():
    processes = placed()
    for process in processes:
        env = process.env
        assert env["DISTTRAIN_ROLE"] == process.role
        assert env["DISTTRAIN_SCHEDULER"] == "10.0.0.1:9000"
        assert (env["DISTTRAIN_NUM_WORKERS"], env["DISTTRAIN_NUM_SERVERS"]) == ("3", "2")
        assert env["DISTTRAIN_HOST"] == process.host.address
        assert env["DISTTRAIN_DEVICE"] == "cpu"
        assert env.get("DISTTRAIN_RANK") == (None if process.rank is None else str(process.rank))
    assert "OMP_NUM_THREADS" not in processes[1].env  # servers keep their BLAS threads
    assert processes[3].env["OMP_NUM_THREADS"] == "1"


def test_gpu_workers_get_the_gpu_of_their_index_on_their_host():
    devices = [p.env["DISTTRAIN_DEVICE"] for p in placed(num_workers=4, device="gpu")]
    assert devices == ["cpu", "cpu", "cpu", "cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_user_values_win_over_the_blas_thread_default():
    worker = placed(extra_env={"MKL_NUM_THREADS": "8"}, inherited={"OMP_NUM_THREADS": "2"})[-1]
    assert "OMP_NUM_THREADS" not in worker.env  # inherited from the user's environment
    assert worker.env["OPENBLAS_NUM_THREADS"] == "1"
    assert worker.env["MKL_NUM_THREADS"] == "8"


def test_env_assignments_keep_equals_signs_in_values_and_name_bad_ones():
    assert parse_env_assignments(["A=1", "B_2=x=y", "C="]) == {"A": "1", "B_2": "x=y", "C": ""}
    for bad in ("NOVALUE", "=1", "1A=2", "A-B=1"):
        with pytest.raises(ValueError, match=f"--env '{bad}' is not NAME=VALUE"):
            parse_env_assignments([bad])
