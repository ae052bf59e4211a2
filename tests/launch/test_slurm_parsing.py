"""Slurm's compressed node lists and task counts, read without Slurm installed."""

import pytest

from launch.slurm import expand_nodelist, expand_tasks_per_node, slurm_hosts, slurm_worker_count


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("n[001-002]x", ["n001x", "n002x"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
])
def test_nodelist_expands_like_scontrol_show_hostnames(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text, message", [
    ("node[03-01]", "runs backwards"),
    ("node[a-b]", "bad range 'a-b'"),
    ("node[01", "unbalanced brackets"),
])
def test_bad_nodelist_is_named_in_the_error(text, message):
    with pytest.raises(ValueError, match=message):
        expand_nodelist(text)


def test_tasks_per_node_expands_repeat_counts():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]


def test_bad_tasks_per_node_is_refused():
    with pytest.raises(ValueError, match="bad SLURM_TASKS_PER_NODE entry '2x3'"):
        expand_tasks_per_node("2x3")


def test_allocation_hosts_get_one_slot_per_task():
    environ = {"SLURM_JOB_NODELIST": "node[1-3]", "SLURM_TASKS_PER_NODE": "2(x2),1", "SLURM_NTASKS": "5"}
    hosts = slurm_hosts(environ)
    assert [(host.name, host.slots) for host in hosts] == [("node1", 2), ("node2", 2), ("node3", 1)]
    assert slurm_worker_count(environ, hosts) == 5


def test_task_counts_that_do_not_match_the_nodes_are_refused():
    with pytest.raises(ValueError, match="gives 1 counts for 3 nodes"):
        slurm_hosts({"SLURM_JOB_NODELIST": "node[1-3]", "SLURM_TASKS_PER_NODE": "2"})


def test_outside_an_allocation_the_error_says_how_to_get_one():
    with pytest.raises(ValueError, match="inside sbatch or salloc"):
        slurm_hosts({})
