"""The vars-deq command line: train and evaluate end to end, errors and exit codes."""

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch

from vars_deq import cli
from vars_deq.cli import evaluate as cli_evaluate
from vars_deq.cli import train as cli_train
from vars_deq.train import load_checkpoint, parse_model_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)
MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs", *[f"{k}={v}" for k, v in TINY.items()]]




@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(["train", *MODEL, "--epochs", "2", "--batch-size", "64", "--lr", "3e-3", "--warmup-epochs", "0",
                         "--output", str(out), "--no-progress", "--device", "cpu"])
    finally:
        torch.set_num_threads(n)
    assert code == 0
    return out


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_subcommands_registered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "evaluate"} <= set(sub.choices)
    assert cli_train in cli.COMMANDS and cli_evaluate in cli.COMMANDS
    assert parser.parse_args(["train"]).run is cli_train.run
    assert parser.parse_args(["evaluate", "--checkpoint", "x"]).run is cli_evaluate.run


def test_train_defaults_and_layer_options_parse():
    args = cli.build_parser().parse_args(["train", "--backward", "implicit", "--max-steps", "20", "--tol", "1e-4"])
    given = cli_train.train_options(args)
    # only what the user gave: the model's own solver and lam stay
    assert given == {"layer_options": {"backward": "implicit", "max_steps": 20, "tol": 1e-4}}
    from vars_deq.train import resolve_config

    cfg = resolve_config(given)
    assert cfg.model == "vars_sd_digits" and cfg.dataset == "digits" and cfg.layer_options["backward"] == "implicit"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--backward", "magic"])


def test_parse_model_kwargs():
    assert parse_model_kwargs(["depth=2", "qkv_bias=False", "act_layer=gelu", "img_size=(8, 8)", "x=None"]) == {
        "depth": 2, "qkv_bias": False, "act_layer": "gelu", "img_size": (8, 8), "x": None}
    with pytest.raises(ValueError, match="key=value"):
        parse_model_kwargs(["depth"])


def test_train_and_evaluate_end_to_end(run_dir, tmp_path, capsys):
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[-1]["test_acc"] > 0.3
    assert (run_dir / "curves.png").stat().st_size > 5000
    out_json = tmp_path / "eval.json"
    capsys.readouterr()
    code = cli.main(["evaluate", "--checkpoint", str(run_dir / "checkpoint.pth"), "--corruptions", "contrast",
                     "gaussian_blur", "--severities", "1", "5", "--pgd-eps", "0.1", "--pgd-steps", "3",
                     "--limit", "120", "--output", str(out_json), "--no-progress", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "clean accuracy" in printed and "PGD eps=0.1 x3" in printed and "contrast" in printed
    r = json.loads(out_json.read_text())
    assert r["model"] == "vit_tiny_patch16_224" and r["dataset"] == "digits" and r["num_examples"] == 120
    # the training run's last test accuracy is the clean accuracy on the same split (first 120 of 360 here)
    assert r["clean_acc"] > 0.3
    assert r["pgd"]["acc"] <= r["clean_acc"]
    assert set(r["corruptions"]) == {"contrast", "gaussian_blur"} and set(r["families"]) == {"blur", "digital"}
    assert r["corruptions"]["contrast"]["severity"]["5"] <= r["clean_acc"]


def test_evaluate_errors(run_dir, tmp_path, capsys):
    ckpt = run_dir / "checkpoint.pth"
    code = cli.main(["evaluate", "--checkpoint", str(ckpt), "--model", "vars_sd_digits", "--no-pgd"])
    assert code == 2 and "is from model 'vit_tiny_patch16_224', not 'vars_sd_digits'" in capsys.readouterr().err
    code = cli.main(["evaluate", "--checkpoint", str(ckpt), "--backward", "implicit", "--no-pgd"])
    assert code == 2 and "has no VARS" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    code = cli.main(["evaluate", "--checkpoint", str(bad)])
    assert code == 2 and "corrupt or unreadable" in capsys.readouterr().err
    code = cli.main(["evaluate", "--checkpoint", str(tmp_path / "none.pth")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = cli.main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "nodata"), "--no-pgd"])
    assert code == 2 and "nodata" in capsys.readouterr().err


def test_train_errors_write_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["train", *MODEL, "--data-dir", str(tmp_path / "missing"), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "missing" in err and "does not exist" in err
    assert not out.exists()
    # resume a run with another model: refused, nothing touched
    before = {p.name: _sha(p) for p in run_dir.iterdir()}
    code = cli.main(["train", "--model", "vit_tiny_patch16_224", "--model-kwargs", "embed_dim=16",
                     "--resume", "--output", str(run_dir)])
    assert code == 2 and "is from model" in capsys.readouterr().err
    code = cli.main(["train", "--resume", "--output", str(run_dir), "--lr", "0.5"])
    assert code == 2 and "cannot change lr=0.5" in capsys.readouterr().err
    assert {p.name: _sha(p) for p in run_dir.iterdir()} == before


def test_resume_of_finished_run_is_a_no_op(run_dir, capsys):
    before = load_checkpoint(run_dir / "checkpoint.pth")["global_step"]
    assert cli.main(["train", "--resume", "--output", str(run_dir), "--no-progress"]) == 0
    assert "46 optimizer steps" in capsys.readouterr().out
    assert load_checkpoint(run_dir / "checkpoint.pth")["global_step"] == before == 46


def test_nan_loss_exit_code_and_message(tmp_path, capsys):
    out = tmp_path / "nan"
    code = cli.main(["train", *MODEL, "--opt", "sgd", "--lr", "1e30", "--sched", "none", "--epochs", "1",
                     "--checkpoint-every", "1", "--output", str(out), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    # SGD at lr 1e30: the first step blows the weights up, the second forward is NaN
    assert "training diverged: the loss is non-finite at optimizer step 2 (epoch 1, batch 2)" in err
    assert "is kept unchanged" in err
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "summary.json").exists()
