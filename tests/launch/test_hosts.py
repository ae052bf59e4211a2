"""Host lists from -H and hostfiles."""

import pytest

from launch.hosts import Host, parse_host_list, read_hostfile


def test_host_list_reads_slots_and_addresses_and_defaults_slots_to_one():
    hosts = parse_host_list("ns0:0@10.77.0.1,ns1:4@10.77.0.2,ns2@10.77.0.3")
    assert hosts == [Host("ns0", 0, "10.77.0.1"), Host("ns1", 4, "10.77.0.2"), Host("ns2", 1, "10.77.0.3")]


def test_host_list_resolves_names_it_knows_and_keeps_the_others():
    hosts = parse_host_list("localhost:2,no-such-host.invalid:1")
    assert hosts[0].address == "127.0.0.1"
    assert hosts[1].address == "no-such-host.invalid"


@pytest.mark.parametrize("text", ["a:x", "a:2:3", "a b", ":2", "a:2,"])
def test_bad_host_entry_is_named_in_the_error(text):
    with pytest.raises(ValueError, match="bad host entry"):
        parse_host_list(text)


def test_a_host_listed_twice_is_refused():
    with pytest.raises(ValueError, match="'a' is listed twice"):
        parse_host_list("a:1,b:1,a:2")


def test_hostfile_reads_slots_addresses_and_skips_comments(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# cluster\nnode1 slots=4\n\nnode2 slots=2 addr=10.0.0.2  # gpu box\nnode3\n")
    assert read_hostfile(path) == [Host("node1", 4, "node1"), Host("node2", 2, "10.0.0.2"),
                                   Host("node3", 1, "node3")]


@pytest.mark.parametrize("line, message", [
    ("node1 cpus=4", "unknown option 'cpus=4'"),
    ("node1 slots=four", "slots='four' is not a count"),
    ("node1 slots", "unknown option 'slots'"),
])
def test_hostfile_errors_name_the_line_and_the_value(tmp_path, line, message):
    path = tmp_path / "hosts"
    path.write_text("node0 slots=1\n" + line + "\n")
    with pytest.raises(ValueError, match=f"hosts:2: {message}"):
        read_hostfile(path)


def test_hostfile_with_no_host_is_refused(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="names no host"):
        read_hostfile(path)
