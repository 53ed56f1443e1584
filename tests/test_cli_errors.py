"""Errors of the command line: one line naming the argument or path and what is wrong, nothing written."""

import io
import subprocess
import sys
import zipfile

import pytest
import torch

from vars_deq import cli, devices
from vars_deq.train import load_checkpoint
from vars_deq.train.checkpoint import default_checkpoint


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _error_line(capsys, command):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"vars-deq {command}: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix):]


def test_device_cuda_without_cuda_is_worded_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argvs = {
        "train": ["train", "--device", "cuda", "--output", str(tmp_path / "run"), "--threads", "1"],
        "evaluate": ["evaluate", "--checkpoint", str(default_checkpoint()), "--device", "cuda", "--threads", "1"],
        "compare": ["compare", "--device", "cuda", "--output", str(tmp_path / "cmp"), "--threads", "1"],
        "maps": ["maps", "--device", "cuda", "--output", str(tmp_path / "maps.png"), "--threads", "1"],
    }
    messages = set()
    for command, argv in argvs.items():
        assert cli.main(argv) == 2
        messages.add(_error_line(capsys, command))
    assert messages == {"--device cuda: CUDA is not available on this machine (use --device cpu or auto)"}
    assert list(tmp_path.iterdir()) == []


def _bad_checkpoints(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    zipped = buf.getvalue()
    files = {
        "empty": (b"", "the file is empty"),
        "text": (b"this is not a checkpoint\n" * 4, "not a torch.save archive"),
        "garbage": (b"garbage", "not a torch.save archive"),
        "truncated": (zipped[: len(zipped) // 2], "a damaged torch.save archive"),
    }
    out = {}
    for name, (data, why) in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = (tmp_path / name, why)
    (tmp_path / "folder").mkdir()
    out["folder"] = (tmp_path / "folder", "is a directory, not a checkpoint file")
    return out


def test_unusable_checkpoints_say_what_is_wrong(tmp_path, capsys):
    for name, (path, why) in _bad_checkpoints(tmp_path).items():
        for command in ("maps", "evaluate", "compare"):
            out = tmp_path / f"out_{command}"
            argv = [command, "--checkpoint", str(path), "--threads", "1", "--device", "cpu"]
            argv += [] if command == "evaluate" else ["--output", str(out)]
            assert cli.main(argv) == 2, (name, command)
            msg = _error_line(capsys, command)
            assert str(path) in msg and why in msg, (name, msg)
            if name != "folder":
                assert "not a readable vars_deq checkpoint" in msg and "corrupt or unreadable" in msg
            assert "weights_only" not in msg and "arbitrary code" not in msg and "file an issue" not in msg
            assert not out.exists()


def test_a_foreign_zip_is_not_a_vars_deq_checkpoint(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(Exception, match="not a vars-deq training checkpoint"):
        load_checkpoint(path)
    not_zip = tmp_path / "plain.zip"
    with zipfile.ZipFile(not_zip, "w") as z:
        z.writestr("a.txt", "hello")
    with pytest.raises(Exception, match="not a readable vars_deq checkpoint") as e:
        load_checkpoint(not_zip)
    assert "weights_only" not in str(e.value)


def test_corrupt_checkpoint_end_to_end_prints_one_line(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    done = subprocess.run([sys.executable, "-m", "vars_deq.cli", "maps", "--checkpoint", str(bad), "--output",
                           str(tmp_path / "m.png"), "--threads", "1"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"vars-deq maps: error: checkpoint {str(bad)!r} is not a readable vars_deq checkpoint "
        "(corrupt or unreadable: not a torch.save archive)"]


def test_unknown_solver_lists_the_names_only(capsys):
    for argv in (["evaluate", "--checkpoint", "x", "--solver", "magic"], ["compare", "--solvers", "ista", "magic"],
                 ["train", "--solver", "magic"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "invalid choice: 'magic'" in err and "'anderson'" in err and "Solver instance" not in err


def test_threads_default_and_validation(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(devices, "available_cpus", lambda: 1)
    torch.set_num_threads(2)
    # the threads are set before anything else, so even a failing run has set them
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "none.pth")]) == 2
    assert torch.get_num_threads() == 1
    assert "does not exist" in _error_line(capsys, "evaluate")
    for command, extra in (("maps", ["--output", str(tmp_path / "m.png")]), ("evaluate", ["--checkpoint", "x"]),
                           ("compare", ["--output", str(tmp_path / "c")]), ("train", ["--output", str(tmp_path / "t")])):
        assert cli.main([command, "--threads", "0", *extra]) == 2
        assert _error_line(capsys, command) == "--threads must be an integer >= 1, got 0"
    assert list(tmp_path.iterdir()) == []


def test_bad_device_spec(tmp_path, capsys):
    assert cli.main(["maps", "--device", "gpu", "--output", str(tmp_path / "m.png"), "--threads", "1"]) == 2
    assert _error_line(capsys, "maps") == "--device must be one of auto, cpu, cuda, cuda:N, got 'gpu'"


def test_train_processes_of_one_machine_share_its_cpus(monkeypatch, tmp_path, capsys):
    # torchrun starts LOCAL_WORLD_SIZE processes here: each takes its share of the CPUs
    monkeypatch.setattr(devices, "available_cpus", lambda: 5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for local_world, expected in (("1", 5), ("2", 2), ("8", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
        assert cli.main(["train", "--device", "cuda", "--output", str(tmp_path / "run")]) == 2
        assert torch.get_num_threads() == expected
        assert "CUDA is not available" in _error_line(capsys, "train")
