"""The one place that decides which array module (numpy, or CuPy on ``cuda:N``) holds data."""
import ctypes

import numpy as np

try:  # CuPy is optional: only GPU workers have it.
    import cupy as _cupy
except ImportError:  # pragma: no cover - depends on the machine
    _cupy = None


def array_module(x):
    """numpy or cupy, whichever owns the array ``x``."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy
    return np


def device_of(x):
    """'cpu' or 'cuda:N' for an array."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return f"cuda:{x.device.id}"
    return "cpu"


def to_numpy(x):
    """A numpy array with x's values (copies off the GPU; no copy for numpy input)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def to_device(x, device):
    """Move an array to 'cpu' or 'cuda:N'."""
    if device == "cpu":
        return to_numpy(x)
    if not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda:N'")
    if _cupy is None:
        raise RuntimeError(f"device {device!r} needs CuPy, which is not installed")
    index = int(device.partition(":")[2] or 0)
    with _cupy.cuda.Device(index):
        return _cupy.asarray(x)


def keep_freed_memory():
    """Serve big arrays from the heap and never hand freed heap back to the OS (glibc only).

    numpy allocates a fresh array per op result; with glibc's defaults every array over the
    mmap threshold comes from fresh pages whose first touch page-faults, measured at ~40% of a
    LeNet-5 step (scripts/bench_engine.py --default-malloc). The price: a process keeps its
    peak memory. Returns whether the setting took.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_threshold, trim_threshold = -3, -1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD in malloc.h
    return bool(libc.mallopt(mmap_threshold, 1 << 30)) and bool(libc.mallopt(trim_threshold, 1 << 30))
