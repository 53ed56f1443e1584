"""Image classification data for training and evaluation: embedded digits, ImageFolder, CIFAR-10.

Every dataset yields ``(image, label)`` with ``image`` a float tensor (C, H, W) in [0, 1]. Images
are *not* mean/std normalized: corruptions and PGD budgets are defined in pixel space, and a model
trained from scratch learns its own input scale in the patch embedding.

- ``digits`` (default): scikit-learn's bundled 8x8 handwritten digits (1797 images, no download),
  scaled from 0..16 to [0, 1], split 80/20 stratified with a fixed seed, shape (1, 8, 8).
- ``imagefolder``: ``torchvision.datasets.ImageFolder`` under ``data_dir``. If ``data_dir`` has
  ``train/`` and ``val/`` (or ``test/``) subfolders those are the splits; otherwise one folder of
  class subfolders is split 80/20 stratified with the same fixed seed.
- ``cifar10``: the python-pickle layout under ``data_dir/cifar-10-batches-py`` (data_batch_1..5
  and test_batch, as extracted from the official archive; nothing is downloaded), read directly.

Images are resized (bilinear, antialiased) to the model's input size and converted to its number
of channels (RGB -> gray by luminance, gray -> RGB by repetition), so any model takes any dataset.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = [
    "DATASETS",
    "DataError",
    "DataSplits",
    "build_datasets",
    "load_digits_split",
    "write_digits_folder",
    "model_input_size",
    "adapt_images",
    "load_images",
    "random_shift",
    "check_shift",
]

DATASETS = ("digits", "imagefolder", "cifar10")
SPLIT_SEED = 0
TEST_FRACTION = 0.2


class DataError(RuntimeError):
    """A dataset that cannot be found or read; the message names the path."""


@dataclass
class DataSplits:
    train: Dataset
    test: Dataset
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W) the images are delivered at


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects.

    The patch embedding reflects ``img_size``/``in_chans`` overrides given to ``timm.create_model``,
    which the pretrained config does not, so it is read first.
    """
    patch_embed = getattr(model, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(proj, nn.Conv2d) and img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        return proj.in_channels, int(h), int(w)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        c, h, w = cfg["input_size"]
        return int(c), int(h), int(w)
    raise ValueError(f"cannot tell the input size of {type(model).__name__}: no patch_embed and no pretrained_cfg")


def adapt_images(x: torch.Tensor, input_size: tuple[int, int, int]) -> torch.Tensor:
    """Resize (N, C, H, W) images in [0, 1] to ``input_size`` and convert the channel count."""
    c, h, w = input_size
    if x.shape[-2:] != (h, w):
        x = nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    if x.shape[1] != c:
        if x.shape[1] == 3 and c == 1:
            x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        else:
            raise ValueError(f"cannot convert {x.shape[1]}-channel images to {c} channels")
    return x.clamp(0.0, 1.0).contiguous()


def check_shift(shift: int, image_size: tuple[int, int], name: str = "shift") -> None:
    """Raises ValueError unless 0 <= shift < the smaller image side (a shift must leave a pixel)."""
    h, w = image_size
    if not 0 <= shift < min(h, w):
        raise ValueError(f"{name} must be in [0, {min(h, w) - 1}] for the {h} x {w} images, got {shift}")


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of ``x`` (B, C, H, W) translated by its own random (dy, dx), both uniform in
    [-max_shift, max_shift], with zeros shifted in: the translation augmentation of small-image
    training (the digits' background is 0, so a shift adds no edge)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    check_shift(max_shift, (h, w), "max_shift")
    offsets = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(x.device)
    padded = nn.functional.pad(x, (max_shift,) * 4)
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def load_images(path: str | os.PathLike, input_size: tuple[int, int, int], limit: int) -> torch.Tensor:
    """Up to ``limit`` images (N, C, H, W) in [0, 1] from an image file or a folder (searched
    recursively, in sorted order; files PIL cannot read are skipped), adapted to ``input_size``.

    Raises:
        ValueError: ``limit`` below 1.
        DataError: a missing path, or one that holds no readable image.
    """
    from PIL import Image

    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    p = Path(path)
    if not p.exists():
        raise DataError(f"image path {str(p)!r} does not exist")
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except OSError:
            continue  # not an image: folders may hold other files
        images.append(adapt_images(torch.from_numpy(arr).permute(2, 0, 1)[None], input_size))
        if len(images) == limit:
            break
    if not images:
        raise DataError(f"image path {str(p)!r} holds no image that PIL can read")
    return torch.cat(images)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    # sorted so that the split, not the splitter's shuffle, defines the order a sampler permutes
    return np.sort(train_idx), np.sort(test_idx)


def load_digits_split(
    seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as (train, test) TensorDatasets of (1, 8, 8) images in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = _stratified_split(digits.target, test_fraction, seed)
    return (
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[test_idx], labels[test_idx]),
    )


def write_digits_folder(root: str | os.PathLike, train_per_class: int, test_per_class: int) -> Path:
    """A class-balanced subset of the digits split as an image folder (root/train/<c>, root/test/<c>).

    The first ``train_per_class`` training and ``test_per_class`` test images of each class, as
    8-bit PNGs; written once (a ``done`` marker) and reused. For smoke runs of whole studies.
    The folder is written beside ``root`` and renamed into place, so a reader (another process
    of a study) sees either no folder or the whole one, never a PNG half written.
    """
    from PIL import Image

    root = Path(root)
    if (root / "done").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for split, ds, per_class in zip(("train", "test"), load_digits_split(), (train_per_class, test_per_class)):
            images, labels = ds.tensors
            for c in range(10):
                (tmp / split / str(c)).mkdir(parents=True, exist_ok=True)
                for k, i in enumerate((labels == c).nonzero().flatten()[:per_class].tolist()):
                    pixels = (images[i, 0] * 255).round().byte().numpy()
                    Image.fromarray(pixels).save(tmp / split / str(c) / f"{k}.png")
        (tmp / "done").touch()
        try:
            os.rename(tmp, root)  # atomic; refused where root exists (another writer got there first)
        except OSError:
            if not (root / "done").exists():
                raise DataError(f"{str(root)!r} exists without its 'done' marker (a partial folder): remove it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class _Adapted(Dataset):
    """Applies :func:`adapt_images` to single samples of another dataset."""

    def __init__(self, base: Dataset, input_size: tuple[int, int, int]):
        self.base, self.input_size = base, input_size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[i]
        return adapt_images(x.unsqueeze(0), self.input_size)[0], int(y)


def _check_dir(path: str | os.PathLike | None, what: str) -> Path:
    if path is None:
        raise DataError(f"{what} needs --data-dir")
    p = Path(path)
    if not p.exists():
        raise DataError(f"data directory {str(p)!r} does not exist")
    if not p.is_dir():
        raise DataError(f"data directory {str(p)!r} is not a directory")
    if not os.access(p, os.R_OK | os.X_OK):
        raise DataError(f"data directory {str(p)!r} is not readable")
    return p


def _image_folder(root: Path):
    from torchvision import datasets, transforms

    try:
        return datasets.ImageFolder(str(root), transform=transforms.ToTensor())
    except (FileNotFoundError, PermissionError, OSError) as e:
        raise DataError(f"cannot read image folder {str(root)!r}: {e}") from e


def _imagefolder_splits(root: Path) -> tuple[Dataset, Dataset, int]:
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train, test = _image_folder(_check_dir(root / "train", "imagefolder")), _image_folder(test_dir)
        if train.classes != test.classes:
            raise DataError(f"{str(root / 'train')!r} and {str(test_dir)!r} have different class folders")
        return train, test, len(train.classes)
    full = _image_folder(root)
    train_idx, test_idx = _stratified_split(np.asarray(full.targets), TEST_FRACTION, SPLIT_SEED)
    return Subset(full, train_idx.tolist()), Subset(full, test_idx.tolist()), len(full.classes)


CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)


class _UInt8Images(Dataset):
    """(N, C, H, W) uint8 images and labels, delivered as float images in [0, 1] one at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float() / 255.0, int(self.labels[i])


def _cifar10_batches(folder: Path, names: tuple[str, ...]) -> _UInt8Images:
    import pickle

    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            target = np.asarray(batch[b"labels"], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise DataError(f"{str(path)!r} is not a CIFAR-10 batch of the python-pickle layout "
                            f"(a dict with b'data' (N, 3072) uint8 and b'labels'): {e}") from e
        if data.shape[0] != target.shape[0]:
            raise DataError(f"{str(path)!r} holds {data.shape[0]} images but {target.shape[0]} labels")
        images.append(torch.from_numpy(data))
        labels.append(torch.from_numpy(target))
    return _UInt8Images(torch.cat(images), torch.cat(labels))


def _cifar10_splits(root: Path) -> tuple[Dataset, Dataset, int]:
    """CIFAR-10 in its python-pickle layout (root/cifar-10-batches-py/data_batch_1..5, test_batch).

    Read directly (no checksum: a subset or a re-packed copy in the same layout works too).
    """
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        raise DataError(f"no readable CIFAR-10 under {str(root)!r}: expected the folder {str(folder)!r} "
                        "(the python-pickle layout; nothing is downloaded)")
    return _cifar10_batches(folder, CIFAR10_TRAIN), _cifar10_batches(folder, CIFAR10_TEST), 10


def build_datasets(
    dataset: str = "digits",
    data_dir: str | os.PathLike | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> DataSplits:
    """The train/test splits of ``dataset`` delivered at ``input_size`` (default: native size).

    Raises:
        ValueError: unknown dataset name, or a data_dir given for digits.
        DataError: a missing, unreadable or malformed data directory (the message names it).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if dataset == "digits":
        if data_dir is not None:
            raise ValueError("dataset 'digits' is embedded and takes no --data-dir (use --dataset imagefolder|cifar10)")
        train, test = load_digits_split()
        native = tuple(train.tensors[0].shape[1:])
        if input_size is None or tuple(input_size) == native:
            return DataSplits(train, test, 10, native)
        # resized per sample: digits at 224x224x3 would take a gigabyte if converted up front
        return DataSplits(_Adapted(train, tuple(input_size)), _Adapted(test, tuple(input_size)), 10, tuple(input_size))
    root = _check_dir(data_dir, dataset)
    train, test, num_classes = _imagefolder_splits(root) if dataset == "imagefolder" else _cifar10_splits(root)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"data directory {str(root)!r} has an empty train or test split")
    first = train[0][0]
    if input_size is None:
        input_size = tuple(first.shape)
    return DataSplits(_Adapted(train, input_size), _Adapted(test, input_size), num_classes, tuple(input_size))
