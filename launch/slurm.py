"""Slurm back end: inside an allocation, the hosts and their task counts come from
Slurm's environment, and every process is started as a one-task `srun` step."""

import re

from launch.hosts import make_host

# One task on one named node. --overlap lets the scheduler, servers and workers share
# the allocation's CPUs (a step otherwise waits for CPUs that other steps hold);
# --export=ALL passes our environment; srun forwards its stdin to the task, which is
# what lets launch.guard see the launcher go away.
SRUN_TEMPLATE = "srun --nodes=1 --ntasks=1 --nodelist={host} --overlap --export=ALL --quiet"


def split_top_level(text):
    """Splits on commas outside brackets: `a[1,2],b` -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return [part for part in parts if part]


def expand_range_list(ranges, text):
    """`01-03,07` -> ['01', '02', '03', '07'], keeping zero padding."""
    values = []
    for item in ranges.split(","):
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"launch: bad range {item!r} in node list {text!r}")
        if not sep:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"launch: range {item!r} in node list {text!r} runs backwards")
        values += [str(number).zfill(len(low)) for number in range(int(low), int(high) + 1)]
    return values


def expand_nodelist(text):
    """Slurm's compressed host list: `node[01-03,07],gpu-a[1-2]x` -> every host name."""
    hosts = []
    for part in split_top_level(text.strip()):
        names = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", part):
            expanded = expand_range_list(ranges, text) if ranges else [""]
            names = [name + literal + value for name in names for value in expanded]
        if "[" in part and part.count("[") != part.count("]"):
            raise ValueError(f"launch: unbalanced brackets in node list {text!r}")
        hosts += names
    return hosts


def expand_tasks_per_node(text):
    """SLURM_TASKS_PER_NODE: `2(x3),1` -> [2, 2, 2, 1]."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise ValueError(f"launch: bad SLURM_TASKS_PER_NODE entry {item!r} in {text!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def slurm_hosts(environ):
    """The allocation's hosts, with one worker slot per Slurm task."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("launch: --launcher slurm needs SLURM_JOB_NODELIST: "
                         "run it inside sbatch or salloc")
    names = expand_nodelist(nodelist)
    tasks = environ.get("SLURM_TASKS_PER_NODE")
    counts = expand_tasks_per_node(tasks) if tasks else [1] * len(names)
    if len(counts) != len(names):
        raise ValueError(f"launch: SLURM_TASKS_PER_NODE={tasks!r} gives {len(counts)} counts "
                         f"for {len(names)} nodes of {nodelist!r}")
    return [make_host(name, count) for name, count in zip(names, counts)]


def slurm_worker_count(environ, hosts):
    ntasks = environ.get("SLURM_NTASKS")
    return int(ntasks) if ntasks and ntasks.isdigit() else sum(host.slots for host in hosts)
