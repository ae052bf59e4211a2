"""The hosts a job runs on: parsed from `-H host:slots,...` or an MPI-style hostfile."""

import re
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    name: str     # what the remote command template gets as {host}
    slots: int    # how many workers it takes; 0 means it runs only scheduler/servers
    address: str  # what other hosts connect to; DISTTRAIN_HOST of its processes


LOCALHOST = Host("localhost", 0, "127.0.0.1")

# host[:slots][@address]; the address is for hosts whose name does not resolve,
# e.g. network namespaces, where {host} is the namespace name.
_HOST_ENTRY = re.compile(r"^(?P<name>[^:@\s]+)(?::(?P<slots>\d+))?(?:@(?P<address>[^:@\s]+))?$")


def parse_host_list(text):
    """`a:2,b:4@10.0.0.2` -> [Host('a', 2, ...), Host('b', 4, '10.0.0.2')]."""
    hosts = []
    for entry in text.split(","):
        match = _HOST_ENTRY.match(entry.strip())
        if match is None:
            raise ValueError(f"launch: bad host entry {entry!r} in -H {text!r}; "
                             "expected host[:slots][@address]")
        slots = 1 if match["slots"] is None else int(match["slots"])
        hosts.append(make_host(match["name"], slots, match["address"]))
    return check_unique(hosts)


def read_hostfile(path):
    """Lines `host slots=N [addr=ADDRESS]`; `#` starts a comment; slots default to 1."""
    hosts = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            options = {}
            for word in words[1:]:
                key, sep, value = word.partition("=")
                if not sep or key not in ("slots", "addr") or not value:
                    raise ValueError(f"launch: {path}:{number}: unknown option {word!r}; "
                                     "expected slots=N or addr=ADDRESS")
                options[key] = value
            slots = options.get("slots", "1")
            if not slots.isdigit():
                raise ValueError(f"launch: {path}:{number}: slots={slots!r} is not a count")
            hosts.append(make_host(words[0], int(slots), options.get("addr")))
    if not hosts:
        raise ValueError(f"launch: hostfile {path} names no host")
    return check_unique(hosts)


def make_host(name, slots, address=None):
    return Host(name, slots, address or resolve(name))


def resolve(name):
    """The IPv4 address of `name` as this machine sees it, or the name itself
    when it does not resolve here (the remote host may still know it)."""
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def check_unique(hosts):
    names = [host.name for host in hosts]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"launch: host {repeated[0]!r} is listed twice")
    return hosts
