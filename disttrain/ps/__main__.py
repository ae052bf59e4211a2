"""`python -m disttrain.ps`: set up this process (settings, signals, priority, allocator)
and run the scheduler or a server, as DISTTRAIN_ROLE says."""
import os
import signal
import sys

from disttrain import backend, config
from disttrain.ps import auth, scheduler, server, transport
from disttrain.ps.membership import Membership


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
    try:
        settings = config.from_env()
        address = settings.required("scheduler")
        if settings.role == "scheduler":
            num_workers, num_servers = (settings.required("num_workers"),
                                        settings.required("num_servers"))
    except config.ConfigError as error:
        raise SystemExit(f"disttrain: {error}") from None
    if settings.role not in ("scheduler", "server"):
        raise SystemExit(f"disttrain: DISTTRAIN_ROLE={settings.role or ''!r}: `python -m "
                         f"disttrain.ps` runs 'scheduler' or 'server' (workers are your "
                         f"training program)")
    install_sigterm_exit()
    try:
        if settings.role == "scheduler":
            credentials = auth.credentials_from_config(settings, "scheduler")
            try:
                return scheduler.Scheduler(address, num_workers, num_servers,
                                           heartbeat_timeout=settings.heartbeat_timeout,
                                           timeout=settings.timeout,
                                           credentials=credentials,
                                           incarnation=settings.incarnation,
                                           restart_timeout=settings.restart_timeout,
                                           max_workers=settings.max_workers).run()
            finally:
                auth.stop_authenticator()   # its ZAP socket would keep term() waiting
                transport.context().term()  # waits for the lingering dead / shutdown notices
        if settings.realtime:   # launch --bind sets it
            use_realtime_priority(settings.rank)
        # Every received frame is a fresh 1 MB buffer: from reused heap pages rather than
        # new zeroed ones it costs no page faults (figure in docs/performance.md).
        backend.keep_freed_memory()
        return server.serve(Membership.from_config("server", settings), host=settings.host,
                            rank=settings.rank, observe=settings.observe,
                            metrics_dir=settings.metrics_dir,
                            replicas=settings.server_replicas,
                            incarnation=settings.incarnation)
    except auth.KeysError as error:   # no keys, unreadable keys, or a libzmq without CURVE
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    sys.exit(main())
