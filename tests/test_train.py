"""Training: outputs, learning, exact resume after a crash, faults, VARS options, DDP."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import vars_deq as vd
from vars_deq.data import DataError
from vars_deq.devices import has_cxx_compiler
from vars_deq.train import (
    CheckpointError,
    TrainConfig,
    TrainingDiverged,
    load_checkpoint,
    model_from_checkpoint,
    resolve_config,
    train,
)
from vars_deq.train.trainer import FAULT_EXIT_ENV

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)
VIT = "vit_tiny_patch16_224"


# ---------------------------------------------------------------- test-only models


class _PerformerVARSAttention(nn.Module):
    """Minimal VARS-D attention: q, v projections, output D(q) z*(v) (test-only)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, **_):
        super().__init__()
        self.h, self.d = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.recon = vd.SparseReconstruction(vd.PerformerDictionary(self.d, num_heads=num_heads), lam=0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        v = self.v(x).view(b, n, self.h, self.d).transpose(1, 2)
        return self.proj(self.recon(v, source=q).transpose(1, 2).reshape(b, n, c))


def _own(kwargs):
    # timm.create_model passes its pretrained-config plumbing to every entry point
    return {k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and k != "cache_dir"}


@register_model
def tinyvars_testonly(pretrained=False, **kwargs):
    return VisionTransformer(attn_layer=_PerformerVARSAttention, **{**TINY, **_own(kwargs)})


class _NaNAfter(VisionTransformer):
    """A tiny ViT whose training forward number ``NAN_AT_FORWARD`` returns NaN logits."""

    NAN_AT_FORWARD = 0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls == self.NAN_AT_FORWARD:
                out = out * float("nan")
        return out


@register_model
def tinynan_testonly(pretrained=False, **kwargs):
    return _NaNAfter(**{**TINY, **_own(kwargs)})


# ---------------------------------------------------------------- helpers




def _config(out, **kw):
    base = dict(model=VIT, model_kwargs=dict(TINY), output=str(out), epochs=2, batch_size=64, lr=3e-3,
                warmup_epochs=0, weight_decay=0.0, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run_group(cmd, env, timeout=300):
    """Run in a new session and, on a timeout, kill the whole group (torchrun's workers too)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted 2-epoch run (46 optimizer steps), checkpointing every 5 steps."""
    out = tmp_path_factory.mktemp("baseline")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(_config(out, checkpoint_every=5))
    finally:
        torch.set_num_threads(n)
    return out, summary


# ---------------------------------------------------------------- tests


def test_run_writes_outputs_and_learns(baseline):
    out, summary = baseline
    metrics = _lines(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["global_step"] for m in metrics] == [23, 46]  # ceil(1437 / 64) steps per epoch
    assert metrics[-1]["test_acc"] > 0.3  # chance is 0.1
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert metrics[0]["solver_steps"] is None  # no VARS layers in this model
    assert metrics[0]["solver_residual_per_layer"] is None
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (2, 0, 46)
    assert ckpt["model_name"] == VIT and ckpt["model_kwargs"] == TINY
    for key in ("optimizer", "scheduler", "rng", "history", "config", "data_seed"):
        assert ckpt[key] is not None
    assert summary["global_step"] == 46 and summary["param_sha256_per_rank"][0]
    assert json.loads((out / "summary.json").read_text())["global_step"] == 46
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_same_seed_same_weights(baseline, tmp_path):
    _, summary = baseline
    again = train(_config(tmp_path, checkpoint_every=0))
    assert again["param_sha256_per_rank"] == summary["param_sha256_per_rank"]
    other = train(_config(tmp_path / "s1", epochs=1, seed=1))
    first = _lines(baseline[0] / "metrics.jsonl")[0]
    assert other["final"]["train_loss"] != first["train_loss"]


def test_resume_after_kill_mid_epoch_matches_uninterrupted(baseline, tmp_path):
    base_out, base_summary = baseline
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vars_deq.cli", "train", "--model", VIT, "--model-kwargs",
           *[f"{k}={v}" for k, v in TINY.items()], "--epochs", "2", "--batch-size", "64", "--lr", "3e-3",
           "--warmup-epochs", "0", "--weight-decay", "0", "--device", "cpu", "--checkpoint-every", "5",
           "--output", str(out), "--no-progress", "--threads", "1"]
    env = {**os.environ, FAULT_EXIT_ENV: "33", "OMP_NUM_THREADS": "1"}
    proc = _run_group(cmd, env)
    assert proc.returncode == 86, proc.stderr  # died abruptly after step 33 (epoch 2, batch 10)
    ckpt = load_checkpoint(out / "checkpoint.pth")
    # the last checkpoint is mid-epoch 2 at step 30; steps 31-33 are lost and must be redone
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 7, 30)
    assert [m["epoch"] for m in _lines(out / "metrics.jsonl")] == [1]

    summary = train(resolve_config({"resume": "auto", "output": str(out), "progress": False}))
    assert summary["global_step"] == base_summary["global_step"] == 46
    final = load_checkpoint(out / "checkpoint.pth")
    reference = load_checkpoint(base_out / "checkpoint.pth")
    assert final["global_step"] == reference["global_step"]
    for k, v in reference["model"].items():
        torch.testing.assert_close(final["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    # the epoch sums survived the crash too: the resumed run logs the same training curve
    ours, theirs = _lines(out / "metrics.jsonl"), _lines(base_out / "metrics.jsonl")
    assert [m["epoch"] for m in ours] == [1, 2]
    for a, b in zip(ours, theirs):
        for key in ("global_step", "train_loss", "train_acc", "test_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_resume_takes_settings_from_checkpoint(baseline, tmp_path):
    out, _ = baseline
    src = str(out / "checkpoint.pth")
    cfg = resolve_config({"resume": src, "progress": False})
    assert cfg.output == str(out) and cfg.model == VIT and cfg.epochs == 2 and cfg.lr == 3e-3
    # per-process settings may change, run-defining ones may not (they would be silently ignored:
    # the optimizer and scheduler state carry the learning rate and the schedule)
    cfg = resolve_config({"resume": src, "workers": 1, "checkpoint_every": 3, "output": str(tmp_path)})
    assert (cfg.workers, cfg.checkpoint_every, cfg.output) == (1, 3, str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot change epochs=5 \(checkpoint: 2\)"):
        resolve_config({"resume": src, "epochs": 5})
    assert resolve_config({"resume": src, "lr": 3e-3}).lr == 3e-3  # the same value is fine
    with pytest.raises(CheckpointError, match="not 'tinyvars_testonly'"):
        resolve_config({"resume": src, "model": "tinyvars_testonly"})


def test_corrupt_checkpoint_clear_error_nothing_overwritten(baseline, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"PK\x03\x04 not really a zip" * 10)
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    before = {p.name: _sha(p) for p in out.iterdir()}
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        train(_config(out, resume="auto"))
    # a truncated real checkpoint is corrupt as well
    good = (baseline[0] / "checkpoint.pth").read_bytes()
    (out / "checkpoint.pth").write_bytes(good[: len(good) // 2])
    before["checkpoint.pth"] = _sha(out / "checkpoint.pth")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        train(_config(out, resume="auto"))
    assert {p.name: _sha(p) for p in out.iterdir()} == before


def test_checkpoint_from_another_model(baseline, tmp_path):
    src = baseline[0] / "checkpoint.pth"
    digest = _sha(src)
    other = dict(TINY, embed_dim=48)
    with pytest.raises(CheckpointError, match="from model 'vit_tiny_patch16_224'.*embed_dim.*32"):
        train(_config(tmp_path, model_kwargs=other, resume=str(src)))
    with pytest.raises(CheckpointError, match="not 'tinyvars_testonly'"):
        train(_config(tmp_path, model="tinyvars_testonly", model_kwargs={}, resume=str(src)))
    # weights that do not fit the architecture the checkpoint names
    ckpt = load_checkpoint(src)
    ckpt["model_kwargs"] = other
    bad = tmp_path / "bad.pth"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="does not fit model"):
        model_from_checkpoint(bad)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a vars-deq training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pth")
    assert _sha(src) == digest
    assert not (tmp_path / "checkpoint.pth").exists()


def test_existing_run_needs_resume(baseline):
    out = baseline[0]
    digest = _sha(out / "checkpoint.pth")
    with pytest.raises(CheckpointError, match="already exists: pass --resume"):
        train(_config(out))
    assert _sha(out / "checkpoint.pth") == digest


def test_nan_loss_stops_naming_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(_NaNAfter, "NAN_AT_FORWARD", 29)
    with pytest.raises(TrainingDiverged, match=r"at optimizer step 29 \(epoch 2, batch 6\).*kept unchanged"):
        train(_config(tmp_path, model="tinynan_testonly", model_kwargs={}, checkpoint_every=5))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["global_step"] == 25  # the last checkpoint before the NaN
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [m["epoch"] for m in _lines(tmp_path / "metrics.jsonl")] == [1]


def test_missing_data_dir_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="nope"):
        train(_config(out, dataset="imagefolder", data_dir=str(tmp_path / "nope")))
    assert not out.exists()


def test_bad_options():
    for kw, msg in [(dict(amp="fp8"), "amp must be one of"), (dict(sched="plateau"), "sched must be one of"),
                    (dict(epochs=0), "epochs must be >= 1"), (dict(lr=-1.0), "lr must be"),
                    (dict(layer_options={"alpha": 1}), "unknown VARS layer option"),
                    (dict(shift=-1), "shift must be >= 0")]:
        with pytest.raises(ValueError, match=msg):
            _config("unused", **kw).validate()
    with pytest.raises(ValueError, match="fp16' needs CUDA"):
        train(_config("unused", amp="fp16"))
    with pytest.raises(ValueError, match="unknown model 'no_such_model'"):
        train(_config("unused", model="no_such_model"))
    with pytest.raises(ValueError, match=r"shift must be in \[0, 7\] for the 8 x 8 images, got 8"):
        train(_config("unused", shift=8))


def test_shift_augmentation_changes_the_run_and_repeats_with_the_seed(baseline, tmp_path):
    shifted = train(_config(tmp_path / "a", epochs=1, shift=1))
    again = train(_config(tmp_path / "b", epochs=1, shift=1))
    assert shifted["param_sha256_per_rank"] == again["param_sha256_per_rank"]
    first = _lines(baseline[0] / "metrics.jsonl")[0]
    assert shifted["final"]["train_loss"] != first["train_loss"]
    assert shifted["final"]["test_acc"] > 0.2  # chance is 0.1: shifted digits still teach


def test_layer_options_need_vars_layers(tmp_path):
    with pytest.raises(ValueError, match="has no VARS .* --backward, --max-steps"):
        train(_config(tmp_path, layer_options={"backward": "implicit", "max_steps": 3}))
    assert not tmp_path.joinpath("checkpoint.pth").exists()


@pytest.mark.filterwarnings("ignore::vars_deq.ConvergenceWarning")
def test_vars_model_implicit_bf16(tmp_path):
    cfg = _config(tmp_path, model="tinyvars_testonly", model_kwargs={}, epochs=1, amp="bf16", batch_size=256,
                  layer_options={"backward": "implicit", "solver": "fista", "max_steps": 3})
    summary = train(cfg)
    final = summary["final"]
    assert summary["global_step"] == 6
    assert final["solver_steps"] == pytest.approx(3.0)  # fixed 3 steps (tol unset)
    # 3 FISTA steps are not an equilibrium: the implicit backward warned at every step, counted
    # once per step in the metrics instead of flooding the log
    assert final["unconverged_warning_steps"] == 6 and final["solver_converged"] < 1.0
    assert torch.isfinite(torch.tensor([final["train_loss"], final["test_loss"]])).all()
    model, ckpt = model_from_checkpoint(tmp_path / "checkpoint.pth", {"max_steps": 7})
    assert ckpt["config"]["layer_options"] == {"backward": "implicit", "solver": "fista", "max_steps": 3}
    layers = [m for m in model.modules() if isinstance(m, vd.SparseReconstruction)]
    assert layers and all(m.backward.name == "implicit" and m.solver == "fista" and m.max_steps == 7 for m in layers)
    # per layer: steps, the per-step largest residual (averaged over the epoch), converged fraction
    assert final["solver_steps_per_layer"] == pytest.approx([3.0] * len(layers))
    assert len(final["solver_residual_per_layer"]) == len(layers)
    assert all(r > 1e-3 for r in final["solver_residual_per_layer"])  # 3 steps from a random start
    assert sum(final["solver_converged_per_layer"]) / len(layers) == pytest.approx(final["solver_converged"])


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vars_deq.cli", "train", "--model", VIT, "--model-kwargs", *[f"{k}={v}" for k, v in TINY.items()],
           "--epochs", "1", "--batch-size", "128", "--lr", "3e-3", "--warmup-epochs", "0", "--device", "cpu",
           "--output", str(out), "--no-progress", "--checkpoint-every", "4"]
    proc = _run_group(cmd, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    hashes = summary["param_sha256_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    # each rank takes ceil(1437 / 2) = 719 samples: ceil(719 / 128) = 6 steps
    assert summary["global_step"] == 6
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert len(_lines(out / "metrics.jsonl")) == 1
    assert proc.stdout.count("optimizer steps") == 1  # only rank 0 reports


NO_CXX = not has_cxx_compiler()


@pytest.mark.skipif(NO_CXX, reason="inductor needs a C++ compiler for CPU code")
@pytest.mark.slow
def test_compiled_training_follows_eager_and_records_the_vars_statistics(tmp_path, torch_single_thread):
    """--compile: the same steps as eager to float32 rounding, the layers' statistics still reach
    the metrics, and the checkpoint is a plain model's."""
    from vars_deq.data import write_digits_folder

    small = write_digits_folder(tmp_path / "digits", 8, 4)  # 80 training images: 2 steps
    kw = dict(model="vars_sd_digits", model_kwargs={"depth": 1}, epochs=1, lr=1e-3, dataset="imagefolder",
              data_dir=str(small))
    eager = train(_config(tmp_path / "eager", **kw))
    compiled = train(_config(tmp_path / "compiled", compile=True, **kw))
    e, c = eager["final"], compiled["final"]
    assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-3)
    assert c["solver_steps"] == e["solver_steps"] == 5
    ckpt = load_checkpoint(tmp_path / "compiled" / "checkpoint.pth")
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
