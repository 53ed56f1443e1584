"""Data loading: embedded digits, ImageFolder, CIFAR-10 folder errors, input adaptation."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from hypothesis import given, settings
from hypothesis import strategies as st

from vars_deq.data import DataError, adapt_images, build_datasets, load_digits_split, model_input_size, random_shift


def test_digits_shapes_range_and_split():
    train, test = load_digits_split()
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    assert xtr.shape[1:] == (1, 8, 8) and xte.shape[1:] == (1, 8, 8)
    assert len(train) + len(test) == 1797
    assert len(test) == 360  # 20% of 1797, rounded up by the stratified splitter
    for x in (xtr, xte):
        assert x.dtype == torch.float32
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # stratified: every class is in both splits in about the same proportion
    ftr = torch.bincount(ytr, minlength=10).float() / len(ytr)
    fte = torch.bincount(yte, minlength=10).float() / len(yte)
    assert torch.all(torch.bincount(yte, minlength=10) > 0)
    assert float((ftr - fte).abs().max()) < 0.01
    # disjoint splits: no test image appears in train (digits has few exact duplicates; compare by set)
    tr_keys = {tuple(v) for v in (xtr.flatten(1) * 16).round().int().tolist()}
    te_keys = [tuple(v) for v in (xte.flatten(1) * 16).round().int().tolist()]
    assert sum(k in tr_keys for k in te_keys) < 5


def test_digits_deterministic():
    a_tr, a_te = load_digits_split()
    b_tr, b_te = load_digits_split()
    assert torch.equal(a_tr.tensors[0], b_tr.tensors[0]) and torch.equal(a_te.tensors[1], b_te.tensors[1])
    c_tr, _ = load_digits_split(seed=1)
    assert not torch.equal(a_tr.tensors[1], c_tr.tensors[1])


def test_build_digits_adapts_to_model_input():
    native = build_datasets("digits")
    assert native.input_size == (1, 8, 8) and native.num_classes == 10
    big = build_datasets("digits", input_size=(3, 16, 16))
    x, y = big.train[0]
    assert x.shape == (3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(x[0], x[1])  # gray repeated over channels
    assert y == native.train[0][1]


def test_adapt_images_rgb_to_gray_luminance():
    x = torch.zeros(1, 3, 4, 4)
    x[:, 1] = 1.0  # pure green
    g = adapt_images(x, (1, 4, 4))
    assert g.shape == (1, 1, 4, 4) and torch.allclose(g, torch.full_like(g, 0.587))


def test_model_input_size_reads_overrides():
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, in_chans=1,
                          embed_dim=16, depth=1, num_heads=1, num_classes=10)
    assert model_input_size(m) == (1, 8, 8)


def _write_folder(root, classes=("a", "b"), per_class=5, size=(6, 5)):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_split_and_resize(tmp_path):
    _write_folder(tmp_path)
    d = build_datasets("imagefolder", tmp_path, input_size=(1, 8, 8))
    assert d.num_classes == 2 and len(d.train) + len(d.test) == 10 and len(d.test) == 2
    x, y = d.test[0]
    assert x.shape == (1, 8, 8) and y in (0, 1) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_imagefolder_train_val_subfolders(tmp_path):
    _write_folder(tmp_path / "train", per_class=3)
    _write_folder(tmp_path / "val", per_class=2)
    d = build_datasets("imagefolder", str(tmp_path))
    assert (len(d.train), len(d.test)) == (6, 4)
    assert d.input_size == (3, 6, 5)  # native size of the first image


@pytest.mark.parametrize("dataset", ["imagefolder", "cifar10"])
def test_missing_data_dir_names_path(tmp_path, dataset):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope"):
        build_datasets(dataset, missing)


def test_data_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        build_datasets("imagefolder", f)


def test_empty_imagefolder_and_empty_cifar_dir(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        build_datasets("imagefolder", tmp_path)
    with pytest.raises(DataError, match="CIFAR-10"):
        build_datasets("cifar10", tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any directory")
def test_unreadable_data_dir(tmp_path):
    _write_folder(tmp_path / "d")
    os.chmod(tmp_path / "d", 0)
    try:
        with pytest.raises(DataError, match="not readable"):
            build_datasets("imagefolder", tmp_path / "d")
    finally:
        os.chmod(tmp_path / "d", 0o755)


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="dataset must be one of"):
        build_datasets("mnist")
    with pytest.raises(ValueError, match="no --data-dir"):
        build_datasets("digits", "/tmp")


def write_fake_cifar10(root, per_batch: int = 4, seed: int = 0):
    """A tiny folder in CIFAR-10's python-pickle layout: 5 training batches and a test batch."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def test_cifar10_python_pickle_layout_is_read_channel_first(tmp_path):
    import pickle

    root = write_fake_cifar10(tmp_path)
    d = build_datasets("cifar10", root)
    assert (len(d.train), len(d.test), d.num_classes, d.input_size) == (20, 4, 10, (3, 32, 32))
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    image, label = d.test[1]
    # the layout stores each image as 1024 red, then 1024 green, then 1024 blue bytes, row-major
    expected = torch.tensor(batch[b"data"][1].reshape(3, 32, 32), dtype=torch.float32) / 255
    assert torch.equal(image, expected) and label == batch[b"labels"][1]


def test_corrupt_cifar10_batch_names_the_file(tmp_path):
    root = write_fake_cifar10(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        build_datasets("cifar10", root)


def _translated(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img (C, H, W) moved down by dy and right by dx, zeros shifted in, by slicing."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 6), c=st.integers(1, 3), h=st.integers(3, 9), w=st.integers(3, 9),
       max_shift=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_random_shift_translates_each_image_within_the_bound(b, c, h, w, max_shift, seed):
    max_shift = min(max_shift, min(h, w) - 1)
    x = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed)) + 0.5  # no zero pixel
    out = random_shift(x, max_shift, torch.Generator().manual_seed(seed))
    assert out.shape == x.shape
    offsets = range(-max_shift, max_shift + 1)
    for i in range(b):
        matches = [(dy, dx) for dy in offsets for dx in offsets if torch.equal(out[i], _translated(x[i], dy, dx))]
        assert len(matches) == 1, (i, matches)
    again = random_shift(x, max_shift, torch.Generator().manual_seed(seed))
    assert torch.equal(out, again)


def test_random_shift_draws_every_offset_and_zero_is_the_identity():
    x = torch.rand(400, 1, 8, 8) + 0.5
    assert random_shift(x, 0) is x
    out = random_shift(x, 1, torch.Generator().manual_seed(0))
    seen = {(dy, dx) for i in range(400) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if torch.equal(out[i], _translated(x[i], dy, dx))}
    assert seen == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


def test_random_shift_refuses_a_shift_as_large_as_the_image():
    with pytest.raises(ValueError, match="max_shift must be in \\[0, 7\\]"):
        random_shift(torch.rand(2, 1, 8, 8), 8)


def test_digits_folder_is_whole_or_absent(tmp_path, monkeypatch):
    """write_digits_folder: every PNG readable and equal to its digit, the folder reused once written;
    a write that fails part-way leaves neither the folder nor its temporary sibling (a reader in
    another process, a study's parallel runs, sees the whole folder or none), and a partial folder
    from elsewhere is refused by name."""
    from vars_deq.data import write_digits_folder

    root = tmp_path / "digits"
    calls = []
    real_save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", failing_save)
        with pytest.raises(OSError, match="disk full"):
            write_digits_folder(root, 2, 1)
    assert not root.exists() and list(tmp_path.iterdir()) == []

    assert write_digits_folder(root, 2, 1) == root
    train, test = load_digits_split()
    for split, ds, per_class in (("train", train, 2), ("test", test, 1)):
        images, labels = ds.tensors
        for c in range(10):
            files = sorted((root / split / str(c)).iterdir())
            assert [f.name for f in files] == [f"{k}.png" for k in range(per_class)]
            first = int((labels == c).nonzero()[0])
            pixels = np.asarray(Image.open(files[0]))
            assert np.array_equal(pixels, (images[first, 0] * 255).round().byte().numpy())
    stamp = (root / "done").stat().st_mtime_ns
    write_digits_folder(root, 2, 1)  # reused, not rewritten
    assert (root / "done").stat().st_mtime_ns == stamp and sorted(p.name for p in tmp_path.iterdir()) == ["digits"]

    partial = tmp_path / "partial"
    (partial / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="partial"):
        write_digits_folder(partial, 2, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "partial"]
