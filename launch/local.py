"""Local back end: every process on this machine, started directly."""

import os
import socket

from launch.hosts import Host
from launch.lifecycle import LaunchCommand

LOCAL_ADDRESS = "127.0.0.1"


def local_host(num_workers):
    return Host("localhost", num_workers, LOCAL_ADDRESS)


def local_command(process, bind):
    cpu = None
    if bind and process.role == "worker":
        cpu = core_for(process.local_index, os.sched_getaffinity(0))
    return LaunchCommand(process.command, {**os.environ, **process.env}, cpu=cpu)


def core_for(local_index, allowed_cores):
    """Worker k of a host gets the k-th core it may use (wrapping around)."""
    cores = sorted(allowed_cores)
    return cores[local_index % len(cores)]


def free_port(address=LOCAL_ADDRESS):
    """A TCP port nobody listens on right now (the scheduler binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def cpu_count():
    return len(os.sched_getaffinity(0))


def gpu_count():
    """GPUs the NVIDIA driver shows, narrowed by CUDA_VISIBLE_DEVICES when set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([device for device in visible.split(",") if device.strip()])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
