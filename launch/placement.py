"""Which process runs where, and the contract environment each one gets."""

from dataclasses import dataclass, field

from launch.hosts import Host

# One BLAS thread per worker: with one worker per core, more threads only fight
# over the same cores. A user who exported one of these keeps their value.
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class Process:
    role: str          # scheduler | server | worker
    rank: int | None   # None for the scheduler, which is unique
    host: Host
    local_index: int   # position among the workers on its host: picks the GPU / core
    command: list
    env: dict = field(default_factory=dict)

    @property
    def name(self):
        return self.role if self.rank is None else f"{self.role} {self.rank}"


def place(hosts, num_workers, num_servers, worker_command, ps_command):
    """Scheduler and servers on the first host; workers fill the hosts' slots in order."""
    free_slots = sum(host.slots for host in hosts)
    if num_workers > free_slots:
        listing = ",".join(f"{host.name}:{host.slots}" for host in hosts)
        raise ValueError(f"launch: {num_workers} workers do not fit in the "
                         f"{free_slots} slots of {listing}")
    processes = [Process("scheduler", None, hosts[0], 0, list(ps_command))]
    processes += [Process("server", rank, hosts[0], 0, list(ps_command))
                  for rank in range(num_servers)]
    rank = 0
    for host in hosts:
        for local_index in range(host.slots):
            if rank == num_workers:
                return processes
            processes.append(Process("worker", rank, host, local_index, list(worker_command)))
            rank += 1
    return processes


def assign_environment(processes, scheduler_address, device, extra_env, inherited_env):
    """Fills each process's `env` with the variables of the contract, then --env values."""
    num_workers = sum(process.role == "worker" for process in processes)
    num_servers = sum(process.role == "server" for process in processes)
    for process in processes:
        env = {
            "DISTTRAIN_ROLE": process.role,
            "DISTTRAIN_SCHEDULER": scheduler_address,
            "DISTTRAIN_NUM_WORKERS": str(num_workers),
            "DISTTRAIN_NUM_SERVERS": str(num_servers),
            "DISTTRAIN_DEVICE": "cpu",
            "DISTTRAIN_HOST": process.host.address,
            "PYTHONUNBUFFERED": "1",  # so prefixed lines arrive as they are printed
        }
        if process.rank is not None:
            env["DISTTRAIN_RANK"] = str(process.rank)
        if process.role == "worker":
            if device == "gpu":
                env["DISTTRAIN_DEVICE"] = f"cuda:{process.local_index}"
            for name in BLAS_THREAD_VARIABLES:
                if name not in inherited_env:
                    env[name] = "1"
        env.update(extra_env)
        process.env = env
    return processes


def parse_env_assignments(assignments):
    """`["A=1", "B=x=y"]` -> {"A": "1", "B": "x=y"}, naming the first bad one."""
    env = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise ValueError(f"launch: --env {assignment!r} is not NAME=VALUE")
        env[name] = value
    return env
