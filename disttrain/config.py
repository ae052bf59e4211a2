"""The one place that reads the environment: every DISTTRAIN_* variable (names as in
DESIGN.md), parsed and checked once into a frozen `Config` that the rest of disttrain is
handed. An empty variable counts as unset."""
import os
from dataclasses import dataclass, fields

ROLES = ("scheduler", "server", "worker")
OBSERVED = ("report", "trace")   # what the launcher may ask its processes to send it


class ConfigError(ValueError):
    """A DISTTRAIN_* variable with a value that cannot be used; the text names both."""


@dataclass(frozen=True)
class Config:
    role: str = None             # DISTTRAIN_ROLE: scheduler | server | worker; unset: no job
    scheduler: str = None        # DISTTRAIN_SCHEDULER: host:port the scheduler binds
    num_workers: int = None      # DISTTRAIN_NUM_WORKERS
    num_servers: int = None      # DISTTRAIN_NUM_SERVERS
    device: str = "cpu"          # DISTTRAIN_DEVICE: cpu | cuda:N
    rank: int = None             # DISTTRAIN_RANK: the launcher's rank; unset: the scheduler picks
    host: str = None             # DISTTRAIN_HOST: the address peers reach this process at
    heartbeat_timeout: float = 10.0   # DISTTRAIN_HEARTBEAT_TIMEOUT, s of silence = dead
    timeout: float = 300.0       # DISTTRAIN_TIMEOUT, s: the deadline of any blocking wait
    realtime: bool = False       # DISTTRAIN_REALTIME=1: servers at real-time priority
    keys: str = None             # DISTTRAIN_KEYS: directory of the job's CURVE keys
    insecure: bool = False       # DISTTRAIN_INSECURE=1 (launch --insecure): no CURVE at all
    metrics_dir: str = None      # DISTTRAIN_METRICS_DIR: where per-step JSON lines go
    observe: frozenset = frozenset()   # DISTTRAIN_OBSERVE: report,trace (set by the launcher)
    progress: bool = True        # DISTTRAIN_PROGRESS=0: no progress bars
    # Recovery (launch --max-restarts N sets the first two): while set, the job waits this
    # long for a dead process's replacement instead of ending; unset, a death ends the job.
    restart_timeout: float = None   # DISTTRAIN_RESTART_TIMEOUT, s
    incarnation: int = 0         # DISTTRAIN_INCARNATION: restarts of this process so far
    server_replicas: int = 0     # DISTTRAIN_SERVER_REPLICAS (launch --server-replicas): 0 | 1
    # Elastic membership (launch -n MIN:MAX sets both): workers may join and leave mid-run;
    # DISTTRAIN_NUM_WORKERS is then the number the job starts with.
    min_workers: int = None      # DISTTRAIN_MIN_WORKERS
    max_workers: int = None      # DISTTRAIN_MAX_WORKERS: ranks 0..MAX-1 exist (keys, book)

    @property
    def recovery(self):
        """True when a dead process is replaced (launch --max-restarts N, N > 0)."""
        return self.restart_timeout is not None

    @property
    def elastic(self):
        """True when workers may join and leave (launch -n MIN:MAX)."""
        return self.max_workers is not None

    def required(self, name):
        """The value of field `name`; unset, the ConfigError its parser gives ''."""
        value = getattr(self, name)
        if value is None:
            _PARSERS[name](name, "")
            raise ConfigError(f"{variable(name)} must be set")
        return value


def variable(name):
    """The environment variable behind Config field `name`."""
    return "DISTTRAIN_" + name.upper()


def _count(name, value):
    if not value.isdigit():
        raise ConfigError(f"{variable(name)}={value!r} must be a non-negative integer")
    return int(value)


def _seconds(name, value):
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{variable(name)}={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ConfigError(f"{variable(name)}={value!r} must be positive")
    return seconds


def _role(name, value):
    if value not in ROLES:
        raise ConfigError(f"{variable(name)}={value!r} must be one of {', '.join(ROLES)}")
    return value


def _address(name, value):
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{variable(name)}={value!r} must be host:port (the scheduler binds "
                          f"it, everyone else connects to it)")
    return value


def _device(name, value):
    kind, colon, index = value.partition(":")
    if not (value == "cpu" or (kind == "cuda" and (not colon or index.isdigit()))):
        raise ConfigError(f"{variable(name)}={value!r} must be cpu or cuda:N")
    return value


def _flag(name, value):
    if value not in ("0", "1"):
        raise ConfigError(f"{variable(name)}={value!r} must be 0 or 1")
    return value == "1"


def _text(name, value):
    return value


def _observed(name, value):
    wanted = frozenset(value.split(","))
    if not wanted <= set(OBSERVED):
        raise ConfigError(f"{variable(name)}={value!r} must be a comma-separated list of "
                          f"{', '.join(OBSERVED)} (python -m launch sets it)")
    return wanted


_PARSERS = {"role": _role, "scheduler": _address, "num_workers": _count,
            "num_servers": _count, "device": _device, "rank": _count, "host": _text,
            "heartbeat_timeout": _seconds, "timeout": _seconds, "realtime": _flag,
            "keys": _text, "insecure": _flag, "metrics_dir": _text, "observe": _observed,
            "progress": _flag, "restart_timeout": _seconds, "incarnation": _count,
            "server_replicas": _count, "min_workers": _count, "max_workers": _count}


def from_env(environ=None):
    """A Config from `environ` (default: os.environ); raises ConfigError naming the first
    variable whose value is bad."""
    environ = os.environ if environ is None else environ
    values = {}
    for field in fields(Config):
        value = environ.get(variable(field.name), "")
        if value != "":
            values[field.name] = _PARSERS[field.name](field.name, value)
    return Config(**values)
