"""`python -m disttrain.ps`: set up this process (signals, priority, rank) and run the
scheduler or a server, as DISTTRAIN_ROLE says."""
import os
import signal
import sys

from disttrain import backend
from disttrain.ps import scheduler, server, transport
from disttrain.ps.membership import Membership


def _env_int(name):
    value = os.environ.get(name, "")
    if not value.isdigit():
        raise SystemExit(f"disttrain: {name}={value!r} must be a non-negative integer")
    return int(value)


def _env_rank():
    value = os.environ.get("DISTTRAIN_RANK")
    return int(value) if value not in (None, "") else None


def use_realtime_priority(rank=None):
    """Run this process at real-time priority (SCHED_FIFO 1) where the OS permits (root or
    CAP_SYS_NICE); True if it does. Call it before any thread or zmq context exists: zmq's
    I/O threads inherit it.

    Why: with every worker pinned to its own core (launch --bind), a server thread woken by
    a push can be queued behind a computing worker until the next scheduler tick (figure in
    docs/performance.md). A real-time server preempts the worker at once and runs for the
    fraction of a millisecond its answer takes; it blocks on its socket the rest of the time."""
    who = "server" if rank is None else f"server {rank}"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return True
    except (AttributeError, OSError) as error:   # no such call here, or not permitted
        print(f"disttrain: {who} keeps normal priority (SCHED_FIFO refused: {error}); "
              f"pinned workers may then wait for it up to a scheduler tick", file=sys.stderr,
              flush=True)
        return False


def install_sigterm_exit():
    """The launcher stops servers and the scheduler with SIGTERM once workers are done."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))


def main():
    role = os.environ.get("DISTTRAIN_ROLE", "")
    address = os.environ.get("DISTTRAIN_SCHEDULER", "")
    try:
        transport.split_host_port(address)
    except ValueError:
        raise SystemExit(f"disttrain: DISTTRAIN_SCHEDULER={address!r} must be host:port "
                         f"(the scheduler binds it, everyone else connects to it)") from None
    install_sigterm_exit()
    if role == "scheduler":
        try:
            return scheduler.Scheduler(
                os.environ["DISTTRAIN_SCHEDULER"], _env_int("DISTTRAIN_NUM_WORKERS"),
                _env_int("DISTTRAIN_NUM_SERVERS"),
                heartbeat_timeout=transport.env_seconds("DISTTRAIN_HEARTBEAT_TIMEOUT", 10),
                timeout=transport.default_timeout()).run()
        finally:
            transport.context().term()  # waits for the lingering dead / shutdown notices
    if role == "server":
        rank = _env_rank()
        if os.environ.get("DISTTRAIN_REALTIME") == "1":   # launch --bind sets it
            use_realtime_priority(rank)
        # Every received frame is a fresh 1 MB buffer: from reused heap pages rather than
        # new zeroed ones it costs no page faults (figure in docs/performance.md).
        backend.keep_freed_memory()
        return server.serve(Membership.from_env("server"), rank=rank)
    raise SystemExit(f"disttrain: DISTTRAIN_ROLE={role!r}: `python -m disttrain.ps` runs "
                     f"'scheduler' or 'server' (workers are your training program)")


if __name__ == "__main__":
    sys.exit(main())
