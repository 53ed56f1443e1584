"""Device selection and the CPU count: one wording for a bad device, the cgroup quota respected."""

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vars_deq import devices


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """Point the cgroup paths at files of a fake cgroup tree (absent until written)."""
    v2 = tmp_path / "cpu.max"
    quota, period = tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us"
    monkeypatch.setattr(devices, "CGROUP_V2_CPU_MAX", v2)
    monkeypatch.setattr(devices, "CGROUP_V1_QUOTA", quota)
    monkeypatch.setattr(devices, "CGROUP_V1_PERIOD", period)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    return {"v2": v2, "quota": quota, "period": period}


def test_select_device_names():
    assert devices.select_device("cpu") == torch.device("cpu")
    assert devices.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:", "cuda:-1", "CPU", "cpu:0", "", None, 3):
        with pytest.raises(ValueError, match=r"^--device must be one of auto, cpu, cuda, cuda:N, got"):
            devices.select_device(bad)


def test_select_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.select_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ValueError) as e:
            devices.select_device(spec)
        assert str(e.value) == f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)"


def test_select_device_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.select_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"^--device cuda:2: this machine has CUDA devices 0\.\.1$"):
        devices.select_device("cuda:2")


def test_available_cpus_cgroup_v2(cgroup):
    assert devices.available_cpus() == 8  # no cgroup files: the affinity
    cgroup["v2"].write_text("max 100000\n")
    assert devices.available_cpus() == 8
    cgroup["v2"].write_text("200000 100000\n")
    assert devices.available_cpus() == 2
    cgroup["v2"].write_text("150000 100000\n")  # 1.5 CPUs of time: two threads can use it
    assert devices.available_cpus() == 2
    cgroup["v2"].write_text("5000 100000\n")
    assert devices.available_cpus() == 1
    cgroup["v2"].write_text("1600000 100000\n")  # a quota above the affinity does not add CPUs
    assert devices.available_cpus() == 8
    cgroup["v2"].write_text("garbage\n")
    assert devices.available_cpus() == 8


def test_available_cpus_cgroup_v1(cgroup):
    cgroup["quota"].write_text("-1\n")
    cgroup["period"].write_text("100000\n")
    assert devices.available_cpus() == 8
    cgroup["quota"].write_text("300000\n")
    assert devices.available_cpus() == 3
    cgroup["v2"].write_text("100000 100000\n")  # v2 is read first where both exist
    assert devices.available_cpus() == 1


def test_available_cpus_affinity(cgroup, monkeypatch):
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {3})
    assert devices.available_cpus() == 1


@given(affinity=st.integers(1, 256), quota=st.integers(-1, 10**7), period=st.integers(0, 10**6))
def test_available_cpus_is_the_capped_affinity(tmp_path_factory, affinity, quota, period):
    d = tmp_path_factory.mktemp("cg")
    (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (d / "cpu.cfs_period_us").write_text(f"{period}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(devices, "CGROUP_V2_CPU_MAX", d / "absent")
        mp.setattr(devices, "CGROUP_V1_QUOTA", d / "cpu.cfs_quota_us")
        mp.setattr(devices, "CGROUP_V1_PERIOD", d / "cpu.cfs_period_us")
        mp.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
        n = devices.available_cpus()
    limit = math.ceil(quota / period) if quota > 0 and period > 0 else affinity
    assert n == max(1, min(affinity, limit))


def test_set_threads_validates_and_defaults(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(devices, "available_cpus", lambda: 1)
        assert devices.set_threads(None) == 1 and torch.get_num_threads() == 1
        for bad in (0, -2, True, 1.5, "2"):
            with pytest.raises(ValueError, match=r"^--threads must be an integer >= 1, got"):
                devices.set_threads(bad)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_importing_the_library_and_cli_changes_no_thread_setting():
    code = ("import torch; n = torch.get_num_threads(); import vars_deq, vars_deq.devices, vars_deq.cli; "
            "vars_deq.cli.build_parser(); print(n, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1]
