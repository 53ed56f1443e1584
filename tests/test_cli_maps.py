"""`vars-deq maps`: predictions, trained vs untrained, colour bar, no silent overwrite."""

import hashlib

import pytest
import torch

from vars_deq import cli, plots

ARGS = ["--num-images", "4", "--corruptions", "contrast", "--no-progress", "--device", "cpu", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def captured(monkeypatch):
    """The panels maps hands to the figure, recorded, the figure still drawn."""
    calls = []
    draw = plots.plot_attention_maps

    def record(panels, path, title, labels=None):
        calls.append({"panels": panels, "title": title, "labels": labels})
        draw(panels, path, title, labels=labels)

    monkeypatch.setattr(plots, "plot_attention_maps", record)
    return calls


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_maps_trained_and_untrained_side_by_side(tmp_path, captured, capsys):
    out = tmp_path / "maps.png"
    assert cli.main(["maps", *ARGS, "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert f"wrote {out}" in capsys.readouterr().out
    (call,) = captured
    panels, labels = call["panels"], call["labels"]
    assert list(panels) == ["trained: clean", "trained: contrast 3", "untrained: clean", "untrained: contrast 3"]
    for p in panels.values():
        assert p["maps"].shape == (4, 8, 8) and float(p["maps"].min()) >= 0 and float(p["maps"].max()) <= 1
        assert p["predictions"].shape == (4,) and p["predictions"].dtype == torch.long
    assert labels.shape == (4,)
    # the shipped model classifies the first digits; a freshly initialized one of the same
    # architecture does not, and its maps differ: the figure shows what training changed
    trained = int((panels["trained: clean"]["predictions"] == labels).sum())
    untrained = int((panels["untrained: clean"]["predictions"] == labels).sum())
    assert trained >= 3 and trained > untrained
    assert not torch.allclose(panels["trained: clean"]["maps"], panels["untrained: clean"]["maps"])
    assert "untrained model of the same architecture" in call["title"]
    assert f"trained {trained}/4" in call["title"]


def test_maps_refuses_to_overwrite_without_force(tmp_path, captured, capsys):
    out = tmp_path / "maps.png"
    out.write_bytes(b"keep me")
    assert cli.main(["maps", *ARGS, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vars-deq maps: error: --output {str(out)!r} exists; pass --force to overwrite it"]
    assert out.read_bytes() == b"keep me" and captured == []
    assert cli.main(["maps", *ARGS, "--output", str(out), "--force", "--no-compare-untrained", "--layer", "0"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    (call,) = captured
    assert list(call["panels"]) == ["trained: clean", "trained: contrast 3"] and "layer 0" in call["title"]


def test_maps_bad_arguments_write_nothing(tmp_path, capsys):
    out = tmp_path / "maps.png"
    for extra, message in ((["--layer", "7"], "--layer must be in 0..3 for vars_sd_digits, got 7"),
                           (["--num-images", "0"], "--num-images must be >= 1, got 0"),
                           (["--images", str(tmp_path / "none")], "does not exist")):
        assert cli.main(["maps", *ARGS, *extra, "--output", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["maps", *ARGS, "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert not out.exists()


def test_maps_on_image_files(tmp_path, captured):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(20, 16, 3) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "maps.png"
    assert cli.main(["maps", *ARGS, "--images", str(folder), "--output", str(out)]) == 0
    (call,) = captured
    assert call["labels"] is None and call["panels"]["trained: clean"]["images"].shape == (3, 1, 8, 8)
