"""Elastic jobs (`-n MIN:MAX`, torchrun's form): the launcher watches the hosts (the hostfile
re-read, or `--host-discovery-script`, which prints `host:slots` lines as in Horovod) and
starts workers on new slots, up to MAX, with free ranks; a worker that left gracefully
(SIGTERM, then exit 0) frees its rank; below MIN the job waits --restart-timeout s for
workers, then fails naming the cause. The workers' side is disttrain/elastic.py."""

import subprocess
import time

from launch.hosts import make_host, parse_host_list, read_hostfile

POLL_HOSTS_S = 2.0        # how often the hosts are looked at again
DISCOVERY_TIMEOUT_S = 10.0


def parse_worker_range(text):
    """`-n N` -> (N, N, None); `-n MIN:MAX` -> (MIN, MAX, "elastic"). Raises ValueError."""
    low, colon, high = text.partition(":")
    if not colon:
        if not low.isdigit():
            raise ValueError(f"-n {text!r}: give a number of workers, or MIN:MAX")
        return int(low), int(low), None
    if not (low.isdigit() and high.isdigit()) or not 1 <= int(low) <= int(high):
        raise ValueError(f"-n {text!r}: MIN:MAX needs 1 <= MIN <= MAX, e.g. -n 2:4")
    return int(low), int(high), "elastic"


def discover(script):
    """The hosts a --host-discovery-script prints now: `host:slots` per line (blank lines
    and # comments skipped)."""
    done = subprocess.run([script], capture_output=True, text=True, timeout=DISCOVERY_TIMEOUT_S,
                          check=False)
    if done.returncode != 0:
        raise ValueError(f"launch: --host-discovery-script {script} exited {done.returncode}: "
                         f"{done.stderr.strip()[:200]}")
    lines = [line.split("#", 1)[0].strip() for line in done.stdout.splitlines()]
    entries = [line for line in lines if line]
    return parse_host_list(",".join(entries)) if entries else []


class Elastic:
    """The launcher's elastic loop, called from Job.run: `hosts()` gives the slots now
    ([(Host, slots)]), `start_worker(job, rank, host, local_index)` starts a worker and
    returns its Child (None if it could not start)."""

    def __init__(self, min_workers, max_workers, read_hosts, start_worker, wait_s):
        self.min, self.max = min_workers, max_workers
        self.read_hosts, self.start_worker = read_hosts, start_worker
        self.wait_s = wait_s
        self.next_look = time.monotonic() + POLL_HOSTS_S
        self.short_since = None     # when the workers in the job fell below MIN
        self.announced = set()      # ids of the worker Childs whose exit 0 was looked at
        self.ending = False         # a worker finished its run: the job ends, nobody joins

    def check(self, job):
        if job.stopping or job.stop_at is not None or self.ending:
            return
        workers = [c for c in job.children if c.process.role == "worker"]
        left = job.collector.left if job.collector is not None else set()
        for child in workers:
            if child.returncode == 0 and id(child) not in self.announced:
                self.announced.add(id(child))
                if child.name in left:
                    left.discard(child.name)
                    job._say(f"{child.name} left on host {child.process.host.name}; its rank "
                             f"is free")
                else:
                    self.ending = True   # a worker finished its run: the job is ending
                    return
        running = [c for c in workers if c.returncode is None]
        self._check_minimum(job, len(running))
        if time.monotonic() < self.next_look:
            return
        self.next_look = time.monotonic() + POLL_HOSTS_S
        try:
            slots = self.read_hosts()
        except (OSError, ValueError, subprocess.TimeoutExpired) as error:
            job._say(f"cannot read the hosts ({error}); trying again in {POLL_HOSTS_S:g} s")
            return
        taken = {c.process.rank for c in running}
        for host, capacity in slots:
            on_host = sorted(c.process.local_index for c in running if c.process.host.name == host.name)
            free_indices = [i for i in range(capacity) if i not in on_host]
            for local_index in free_indices:
                free_ranks = [r for r in range(self.max) if r not in taken]
                if not free_ranks:
                    return
                rank = free_ranks[0]
                child = self.start_worker(job, rank, host, local_index)
                if child is None:
                    return
                taken.add(rank)
                running.append(child)
                job._say(f"worker {rank} joined on host {host.name}")

    def _check_minimum(self, job, count):
        if count >= self.min:
            self.short_since = None
            return
        now = time.monotonic()
        if self.short_since is None:
            self.short_since = now
            job._say(f"{count} worker(s) in the job, below the minimum of {self.min}; waiting "
                     f"up to {self.wait_s:g} s for new slots")
        elif now - self.short_since > self.wait_s:
            job._fail(f"{count} worker(s) in the job, below the minimum of {self.min} (-n "
                      f"{self.min}:{self.max}), and no worker came back within {self.wait_s:g} "
                      f"s (--restart-timeout)", 1)


def host_reader(args, local_host_name=None):
    """The function Elastic calls for the slots: [(Host, slots)], from the discovery script,
    else the hostfile re-read, else -H (fixed). Local jobs put every slot on this host."""
    def read():
        if args.host_discovery_script:
            hosts = discover(args.host_discovery_script)
        elif args.hostfile:
            hosts = read_hostfile(args.hostfile)
        elif args.hosts:
            hosts = parse_host_list(args.hosts)
        else:
            return []
        if local_host_name is not None:   # local back end: all slots are here
            total = sum(host.slots for host in hosts)
            return [(make_host(local_host_name, total, "127.0.0.1"), total)]
        return [(host, host.slots) for host in hosts]
    return read
