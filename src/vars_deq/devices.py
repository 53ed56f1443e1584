"""Where a command runs: the torch device from a ``--device`` spec, and how many CPU threads.

``select_device`` is the one place a device name is checked, so every entry point words an
unusable device the same way. ``available_cpus`` counts the CPUs this process may actually use:

    n = min(|sched_getaffinity(0)|, ceil(quota / period)),  n >= 1

with the CPU quota of the process's cgroup (v2 ``cpu.max`` = "quota period" or "max period";
v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, -1 meaning none). torch's default thread count
is the machine's core count, which oversubscribes a container or a ``taskset`` limited to fewer.
Importing this module changes nothing; only :func:`set_threads` touches torch's global state.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import torch

__all__ = ["DEVICE_CHOICES", "select_device", "device_label", "available_cpus", "set_threads", "has_cxx_compiler"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")

_SPEC = re.compile(r"cpu|cuda(?::(\d+))?")


def select_device(spec: str) -> torch.device:
    """The device of ``spec``: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".

    Raises:
        ValueError: a malformed spec, or a CUDA device that this machine does not have.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {spec!r}")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
    index = match.group(1)
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise ValueError(f"--device {spec}: this machine has CUDA devices 0..{count - 1}")
    return torch.device(spec)


def device_label(device: torch.device) -> str:
    """The CUDA device's name, or "cpu (n threads)" with torch's current thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n != 1 else ''})"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # absent on this kernel or cgroup version
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max" (v2) or an unreadable value: no quota to respect
        return None
    return q / p if q > 0 and p > 0 else None


def _cgroup_cpus() -> float | None:
    """The cgroup's CPU quota in CPUs (quota / period), or None when there is none."""
    v2 = _read(CGROUP_V2_CPU_MAX)
    if v2 is not None:
        parts = v2.split()
        return _ratio(*parts) if len(parts) == 2 else None
    quota, period = _read(CGROUP_V1_QUOTA), _read(CGROUP_V1_PERIOD)
    return None if quota is None or period is None else _ratio(quota, period)


def available_cpus() -> int:
    """CPUs this process may run on: its affinity capped by its cgroup's quota, at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads``, or to :func:`available_cpus` when None; returns it.

    Raises:
        ValueError: ``threads`` below 1.
    """
    if threads is None:
        threads = available_cpus()
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
    torch.set_num_threads(threads)
    return threads


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler is on the PATH: torch.compile's inductor needs one for CPU code."""
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))
