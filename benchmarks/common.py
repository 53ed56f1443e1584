"""Small helpers shared by the benchmarks: device choice, synchronized timing, peak memory,
per-configuration subprocesses and result files under ``benchmarks/results/<device>/``."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch.cuda.is_available() is False")
    return dev


def device_slug(device: torch.device) -> str:
    """``cpu`` or the CUDA device name, lower-case with runs of other characters as ``-``."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n != 1 else ''})"


def results_dir(device: torch.device) -> Path:
    path = RESULTS / device_slug(device)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), seconds), with the device synchronized on both sides so queued kernels count."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_rss_mib() -> float:
    """ru_maxrss of this process (Linux reports KiB).

    On Linux a child inherits its parent's high-water mark through fork/exec, so in a worker this
    is at least the driver's peak; :func:`rss_status` has the process's own figures.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def rss_status() -> dict[str, float] | None:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process image in MiB (Linux)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return None
    return {k: int(v.split()[0]) / 2**10 for k, v in fields.items()}


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, /proc/self/clear_refs); False if unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def run_forked(fn: Callable[[Any], dict[str, Any]], arg: Any) -> dict[str, Any]:
    """``fn(arg)`` in a forked child process; returns its (JSON-able) dict.

    A fresh process per configuration makes its peak memory attributable to that configuration;
    forking from a driver that has imported torch but computed nothing avoids paying the imports
    again for every configuration. The child's peak is VmHWM after :func:`reset_peak_rss` (its
    ru_maxrss starts at the driver's resident size).
    """
    if not hasattr(os, "fork"):
        raise RuntimeError("per-configuration memory measurement needs os.fork (POSIX)")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            payload = {"result": fn(arg)}
        except BaseException:
            payload = {"error": traceback.format_exc()}
        with os.fdopen(write_fd, "w") as f:
            json.dump(payload, f)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"worker for {arg} died (wait status {status})")
    payload = json.loads(data)
    if "error" in payload:
        raise RuntimeError(f"worker for {arg} failed:\n{payload['error']}")
    return payload["result"]


def fixed_mmap_threshold(nbytes: int) -> bool:
    """glibc: serve every allocation of at least ``nbytes`` by mmap and unmap it on free (this also
    turns off the dynamic threshold), so RSS follows live large blocks, not heap fragmentation.
    False where glibc's mallopt is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "device": device_label(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
    }


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
