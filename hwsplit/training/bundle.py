"""Data sets in memory: the bundle a reader returns, its batches with augmentation, its validation split and
the preprocessing its networks expect.

Every data set is loaded by name (:func:`hwsplit.training.data.load_dataset`) into a :class:`DataBundle`
(train and test sets, number of classes, input shape, per-channel normalisation). Images are 0..1
intensities before normalisation; inputs the models see are ``(x - mean) / std`` per channel, in NCHW
float32. In-memory data sets are held as tensors (:class:`TensorImageDataset`) whose batches are augmented
whole (random crop and flip as one gather: no per-sample PIL work, on two CPU cores the difference between
data loading and training dominating an epoch).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hwsplit.infra.errors import ConfigError, RunFailed
from hwsplit.network.models import MAX_CLASSES

log = logging.getLogger(__name__)


# ImageNet's per-channel statistics (0..1 RGB), used for image folders instead of a pass over the files.
IMAGENET_MEAN = (0.485, 0.456, 0.406)

IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ConfigError):
    """A missing or malformed data directory: one line naming the path and what was expected."""


class BadImageError(RunFailed):
    """An image file that cannot be decoded, found while a run reads it (image folders are read lazily)."""


@dataclass
class DataBundle:
    """A loaded data set.

    Attributes:
        name: registry name (``available_datasets()``).
        train, test: torch Datasets; items are ``(x, label)`` with ``x`` normalised float32 (C, H, W).
        num_classes: number of classes (labels are ``0 .. num_classes - 1``).
        input_shape: ``(C, H, W)`` of one input, in channels and pixels.
        mean, std: per-channel mean and standard deviation of the training images in [0, 1]
            intensity units, used for normalisation.
        class_names: class names where the data set has them, else ``None``.
        val: the validation set carved from the training images by :func:`split_validation`, else
            ``None`` (never augmented; disjoint from ``train``).
        val_index: indices of ``val`` in the training set before the split (``train_index`` the rest).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] | None = field(default=None)
    val: Dataset | None = field(default=None)
    val_index: torch.Tensor | None = field(default=None)
    train_index: torch.Tensor | None = field(default=None)


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor, with their labels and normalisation.

    Args:
        images: (N, C, H, W) tensor, ``uint8`` (0..255) or floating point (0..1 intensities).
        labels: (N,) integer class labels.
        mean, std: per-channel statistics in 0..1 intensity units.
        augment: whether a training loader should apply random crop + horizontal flip.
        pad: zero padding in pixels around each image before the random crop (same size as the input).

    ``dataset[i]`` gives one normalised, un-augmented sample; loaders use :meth:`batch`, which augments
    a whole batch in a few tensor operations.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
        pad: int = 4,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels: expected shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean/std: expected {images.shape[1]} channels, got {len(mean)}/{len(std)}")
        if pad < 0:
            raise ValueError(f"pad: must be >= 0 pixels, got {pad}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self.pad = pad
        scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        std_t = torch.tensor(self.std, dtype=torch.float32)
        # One multiply-add per pixel: x * (scale / std) - mean / std.
        self._mul = (scale / std_t).view(1, -1, 1, 1).to(images.device)
        self._add = (
            (-torch.tensor(self.mean, dtype=torch.float32) / std_t).view(1, -1, 1, 1).to(images.device)
        )

    @property
    def device(self) -> torch.device:
        """Where the images live."""
        return self.images.device

    def to(self, device: str | torch.device) -> TensorImageDataset:
        """A copy whose tensors live on ``device`` (the same object if already there)."""
        device = torch.device(device)
        if device == self.images.device:
            return self
        return TensorImageDataset(
            self.images.to(device),
            self.labels.to(device),
            mean=self.mean,
            std=self.std,
            augment=self.augment,
            pad=self.pad,
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch(torch.tensor([index]))
        return x[0], int(y[0])

    def batch(
        self, index: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``index`` as ``(x float32 normalised (B, C, H, W), y int64 (B,))``.

        With a ``generator`` the batch is augmented (random crop with ``pad`` pixels of zero padding,
        then a horizontal flip with probability 1/2), the random numbers drawn on the CPU from
        ``generator`` so results do not depend on where the images live.
        """
        index = index.to(self.images.device)
        x = self.images.index_select(0, index)
        y = self.labels.index_select(0, index)
        if generator is not None:
            x = _random_crop_flip(x, self.pad, generator)
        return x.float().mul_(self._mul).add_(self._add), y


def _random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the input's size from ``x`` padded by ``pad`` zeros, then a random h-flip."""
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    hp, wp = h + 2 * pad, w + 2 * pad
    padded = x.new_zeros(b, c, hp, wp)
    padded[:, :, pad : pad + h, pad : pad + w] = x
    # Crop and flip as one gather of flat pixel indices: several times faster than advanced indexing.
    cols = offsets[1, :, None] + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = offsets[0, :, None] + torch.arange(h)  # (B, H)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).to(x.device)
    return padded.view(b, c, hp * wp).gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of (N, C, H, W) images, in 0..1 intensity units."""
    scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    c = images.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):  # chunks: float64 copies of 50k images would be ~1 GB
        x = images[start : start + chunk].to(torch.float64) * scale
        s1 += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s1 / count
    var = (s2 / count - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    # A constant channel would divide by zero; leave it unscaled instead.
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def in_memory_bundle(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int,
    augment: bool,
    limit: int | None,
    test_limit: int | None,
    class_names: list[str] | None = None,
) -> DataBundle:
    if limit is not None:
        train_x, train_y = train_x[:limit], train_y[:limit]
    if test_limit is not None:
        test_x, test_y = test_x[:test_limit], test_y[:test_limit]
    mean, std = channel_stats(train_x)
    h = int(train_x.shape[2])
    pad = max(1, round(h / 8))  # 4 pixels for 32x32, as in the usual CIFAR recipe
    train = TensorImageDataset(train_x, train_y, mean=mean, std=std, augment=augment, pad=pad)
    test = TensorImageDataset(test_x, test_y, mean=mean, std=std, augment=False, pad=pad)
    c, hh, ww = (int(s) for s in train_x.shape[1:])
    log.info(
        "%s: %d train, %d test samples, %d classes, input %dx%dx%d",
        name,
        len(train),
        len(test),
        num_classes,
        c,
        hh,
        ww,
    )
    return DataBundle(
        name=name,
        train=train,
        test=test,
        num_classes=num_classes,
        input_shape=(c, hh, ww),
        mean=mean,
        std=std,
        class_names=class_names,
    )


def check_image_size(name: str, image_size: int | None, native: int) -> None:
    if image_size is not None and image_size != native:
        raise ValueError(
            f"image_size: {name} images are {native}x{native} pixels and are not resized; got {image_size}"
        )


def label_space(path: Path, train_y: np.ndarray, test_y: np.ndarray) -> int:
    """Number of classes implied by integer labels 0..K-1; ``DataError`` when the labels cannot be that.

    A label far beyond the labels that occur (one 50000 among ten classes) would silently build a
    network with that many outputs: refused, naming the file.
    """
    both = np.concatenate([train_y.astype(np.int64), test_y.astype(np.int64)])
    lo, hi = int(both.min()), int(train_y.max())  # test labels beyond training's are refused later
    if lo < 0:
        raise DataError(f"npz: {path} has a negative label ({lo}); labels must be 0..K-1")
    distinct = int(np.unique(both).size)
    if hi + 1 > MAX_CLASSES or hi + 1 > max(2 * distinct, distinct + 16):
        raise DataError(f"npz: {path} has label {hi} but only {distinct} distinct labels; labels must be "
                        f"0..K-1 for K classes (at most {MAX_CLASSES:,})")
    return hi + 1


def check_labels(
    name: str, path: Path, train_y: torch.Tensor, test_y: torch.Tensor, num_classes: int
) -> None:
    for split, y in (("train", train_y), ("test", test_y)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(f"{name}: {path} has {split} labels outside 0..{num_classes - 1}")


def split_validation(bundle: DataBundle, fraction: float, *, seed: int) -> DataBundle:
    """``bundle`` with a validation set carved from its training images (docs/design.md §5).

    A seeded random permutation of the training indices (``torch.Generator`` seeded with ``seed``)
    puts its first ``round(fraction * N)`` images (at least 1, at most N - 1) into ``val`` and the
    rest into ``train``, so the two never overlap and the same seed gives the same split. The
    normalisation statistics stay those of all training images (a label-free statistic). ``val``
    is never augmented. ``fraction`` is in (0, 1).
    """
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {fraction!r}")
    n = len(bundle.train)  # type: ignore[arg-type]
    if n < 2:
        raise ValueError(f"val_fraction: {n} training image(s) cannot be split into training and validation")
    n_val = min(max(1, round(fraction * n)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    val_index, train_index = order[:n_val].sort().values, order[n_val:].sort().values
    train = bundle.train
    if isinstance(train, TensorImageDataset):
        def part(index: torch.Tensor, augment: bool) -> TensorImageDataset:
            i = index.to(train.images.device)
            return TensorImageDataset(train.images.index_select(0, i), train.labels.index_select(0, i),
                                      mean=train.mean, std=train.std, augment=augment, pad=train.pad)

        new_train, val = part(train_index, train.augment), part(val_index, False)
    else:  # image folders: subsets (the validation subset shares the training transform's crop)
        new_train = torch.utils.data.Subset(train, train_index.tolist())
        val = torch.utils.data.Subset(train, val_index.tolist())
    log.info("%s: %d training images kept, %d carved out for validation (seed %d)", bundle.name,
             len(train_index), len(val_index), seed)
    return dataclasses.replace(bundle, train=new_train, val=val, val_index=val_index, train_index=train_index)


#: What the pixels of each data set are before hwsplit's normalisation (``preprocessing()["source"]``).
_SOURCES = {
    "digits": "scikit-learn digits: 8x8 grey images, pixel values 0..16 divided by 16",
    "cifar10": "CIFAR-10 RGB images as stored in its batches (uint8, transposed to NCHW)",
    "cifar100": "CIFAR-100 RGB images as stored in its batches (uint8, transposed to NCHW)",
    "npz": "the npz file's x (uint8 N x H x W x C) transposed to NCHW, channels in the file's order",
    "imagefolder": "RGB images resized (short side size / 0.875), centre-cropped to size x size, scaled to 0..1",
}


def preprocessing(bundle: DataBundle) -> dict[str, Any]:
    """How a network trained on ``bundle`` expects its input: what a checkpoint, config.json and an
    ONNX file record so that the network can be used without reading this module.

    ``layout`` is ``"NCHW"``; ``input_shape`` ``[C, H, W]``; ``dtype`` and ``value_range`` describe the
    images as the data set stores them (``"uint8"`` 0..255, or ``"float32"`` 0..1 intensities); the
    network's input is ``(x * scale - mean[c]) / std[c]`` with ``scale`` 1/255 for uint8 and 1 for floats
    and ``mean``/``std`` per channel in 0..1 intensity units (:class:`TensorImageDataset`).
    """
    train = bundle.train
    while isinstance(train, torch.utils.data.Subset):
        train = train.dataset
    uint8 = isinstance(train, TensorImageDataset) and train.images.dtype == torch.uint8
    return {
        "layout": "NCHW",
        "input_shape": [int(d) for d in bundle.input_shape],
        "dtype": "uint8" if uint8 else "float32",
        "value_range": [0, 255] if uint8 else [0.0, 1.0],
        "scale": 1.0 / 255.0 if uint8 else 1.0,
        "mean": [float(m) for m in bundle.mean],
        "std": [float(s) for s in bundle.std],
        "normalize": "(x * scale - mean[c]) / std[c]",
        "dataset": bundle.name,
        "source": _SOURCES.get(bundle.name, bundle.name),
    }


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "BadImageError", "DataBundle", "DataError", "TensorImageDataset",
           "channel_stats", "check_image_size", "check_labels", "in_memory_bundle", "label_space",
           "preprocessing", "split_validation"]
