"""Data sets and batch loaders.

Every data set is loaded by name into a :class:`DataBundle` (train and test sets, number of classes,
input shape, per-channel normalisation). Images are 0..1 intensities before normalisation; inputs the
models see are ``(x - mean) / std`` per channel, in NCHW float32.

In-memory data sets (``digits``, ``cifar10``, ``cifar100``, ``npz``) are held as tensors and batched by
:class:`TensorBatchLoader`, which augments whole batches at once (no per-sample PIL work: on two CPU
cores that is the difference between data loading and training dominating an epoch). ``imagefolder``
reads files through torchvision's ``ImageFolder`` and a ``torch.utils.data.DataLoader``.

Which samples a rank sees in which order is decided in one function, :func:`epoch_batches`, for both
kinds of loader, so that data-parallel training changes nothing else.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import pickle
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from hwsplit.infra.errors import ConfigError, RunFailed
from hwsplit.network.models import MAX_CLASSES

__all__ = [
    "DataBundle",
    "DataError",
    "TensorBatchLoader",
    "TensorImageDataset",
    "available_datasets",
    "epoch_batches",
    "example_batch",
    "load_dataset",
    "make_eval_loader",
    "make_loaders",
    "preprocessing",
    "shard_size",
    "split_validation",
]

log = logging.getLogger(__name__)

# ImageNet's per-channel statistics (0..1 RGB), used for image folders instead of a pass over the files.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ConfigError):
    """A missing or malformed data directory: one line naming the path and what was expected."""


class BadImageError(RunFailed):
    """An image file that cannot be decoded, found while a run reads it (image folders are read lazily)."""


def _load_image(path: str) -> Any:
    """torchvision's default image loader, with an unreadable file reported as :class:`BadImageError`."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"imagefolder: {path} is not a readable image ({type(err).__name__})") from None


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Batch order: the one place that decides which samples a rank sees in which order
# --------------------------------------------------------------------------------------------------


def epoch_batches(
    n: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> list[torch.Tensor]:
    """Index batches (int64 tensors) of one epoch for one rank, over a data set of ``n`` samples.

    Shuffled order is a permutation drawn from a ``torch.Generator`` seeded with ``seed + epoch``, the
    same on every rank; rank ``r`` takes every ``world_size``-th index from ``r``. When shuffling
    (training), the permutation is padded by wrapping around so every rank has the same number of
    batches (data-parallel steps must stay in lockstep), and a trailing batch of a single sample is
    merged into the previous one (BatchNorm cannot train on one sample). Without shuffling
    (evaluation), shards are not padded, so each sample is counted exactly once over all ranks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: must satisfy 0 <= rank < world_size={world_size}, got {rank}")
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)
        per_rank = math.ceil(n / world_size) if n else 0
        total = per_rank * world_size
        if total > n:
            order = torch.cat([order, order[: total - n]])
    else:
        order = torch.arange(n)
    mine = order[rank::world_size]
    batches = list(torch.split(mine, batch_size))
    if shuffle and len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def shard_size(n: int, *, shuffle: bool, rank: int, world_size: int) -> int:
    """Samples one rank sees per epoch under :func:`epoch_batches` (padded shards when shuffling)."""
    if shuffle:
        return math.ceil(n / world_size) if n else 0
    return len(range(rank, n, world_size))


def _num_batches(n: int, batch_size: int, *, shuffle: bool, rank: int, world_size: int) -> int:
    """``len(epoch_batches(...))`` without drawing the permutation."""
    mine = shard_size(n, shuffle=shuffle, rank=rank, world_size=world_size)
    count = math.ceil(mine / batch_size)
    if shuffle and count > 1 and mine % batch_size == 1:
        count -= 1
    return count


class TensorBatchLoader:
    """Batches of a :class:`TensorImageDataset`: yields ``(x float32 normalised NCHW, y int64)``.

    Args:
        dataset: the in-memory data set.
        batch_size: samples per batch (per rank).
        shuffle: reshuffle every epoch (training) or keep the data set's order (evaluation).
        augment: random crop + flip per batch; ``None`` follows ``dataset.augment``.
        seed: epoch ``e`` is shuffled with seed ``seed + e`` and augmented from a generator derived
            from ``(seed, e, rank)``: the same seed gives the same batches.
        rank, world_size: this process's shard under data parallelism (see :func:`epoch_batches`).
        device: move the data set there once (e.g. ``"cuda"`` to crop and flip on the GPU); ``None``
            keeps it where it is.

    Every ``iter(loader)`` is a new epoch (``epoch`` counts them); :meth:`set_epoch` sets the next one,
    e.g. when resuming.
    """

    def __init__(
        self,
        dataset: TensorImageDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank: must satisfy 0 <= rank < world_size={world_size}, got {rank}")
        self.dataset = dataset if device is None else dataset.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = dataset.augment if augment is None else augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.dataset_size = len(dataset)
        self.shard_size = shard_size(self.dataset_size, shuffle=shuffle, rank=rank, world_size=world_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (its shuffle and augmentation)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return _num_batches(
            self.dataset_size,
            self.batch_size,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        batches = epoch_batches(
            self.dataset_size,
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
        )
        gen = None
        if self.augment:
            # Distinct streams per (seed, epoch, rank); the shuffle uses seed + epoch on its own generator.
            gen = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + epoch * 7919 + self.rank * 104_729 + 1) % (2**63)
            )
        for index in batches:
            yield self.dataset.batch(index, generator=gen)


class _EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """``epoch_batches`` as a DataLoader batch sampler (for file-backed data sets)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, rank: int, world_size: int):
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shard_size = shard_size(n, shuffle=shuffle, rank=rank, world_size=world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return _num_batches(
            self.n, self.batch_size, shuffle=self.shuffle, rank=self.rank, world_size=self.world_size
        )

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        self.epoch += 1
        for index in epoch_batches(
            self.n,
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
        ):
            yield index.tolist()


# --------------------------------------------------------------------------------------------------
# Statistics and helpers
# --------------------------------------------------------------------------------------------------


def _channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be >= 1 training samples, got {limit}")


def _test_limit(limit: int | None) -> int | None:
    return None if limit is None else max(1, limit // 5)


def _in_memory_bundle(
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
    mean, std = _channel_stats(train_x)
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


def _check_image_size(name: str, image_size: int | None, native: int) -> None:
    if image_size is not None and image_size != native:
        raise ValueError(
            f"image_size: {name} images are {native}x{native} pixels and are not resized; got {image_size}"
        )


# --------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------


def _load_digits(
    *,
    data_dir: Path | None,
    download: bool,
    seed: int,
    augment: bool,
    limit: int | None,
    test_limit: int | None,
    image_size: int | None,
) -> DataBundle:
    """scikit-learn's 8x8 digits (embedded, no download), stratified 75/25 split by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_image_size("digits", image_size, 8)
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # values 0..16 -> 0..1
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    # Flips and shifted crops change what a digit is: never augmented.
    return _in_memory_bundle(
        "digits",
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
        num_classes=10,
        augment=False,
        limit=limit,
        test_limit=test_limit,
        class_names=[str(i) for i in range(10)],
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batch files: plain containers and numpy arrays only, never arbitrary code."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


_UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    OSError,
)


def _read_pickle(path: Path, name: str, expected: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{name}: {path} is missing (expected {expected})") from None
    except _UNPICKLE_ERRORS as exc:  # any unpickling failure is a malformed file
        raise DataError(f"{name}: {path} is not readable as {expected} ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name}: {path} is not {expected} (got {type(obj).__name__})")
    return obj


def _get(entry: dict, key: str) -> Any:
    # Batches pickled by Python 2 have str keys; ones written from Python 3 often have bytes keys.
    if key in entry:
        return entry[key]
    return entry.get(key.encode())


@dataclass(frozen=True)
class _CifarFormat:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    meta_key: str
    label_key: str
    num_classes: int
    tv_class: str


_CIFAR10 = _CifarFormat(
    "cifar10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "batches.meta",
    "label_names",
    "labels",
    10,
    "CIFAR10",
)
_CIFAR100 = _CifarFormat(
    "cifar100",
    "cifar-100-python",
    ("train",),
    ("test",),
    "meta",
    "fine_label_names",
    "fine_labels",
    100,
    "CIFAR100",
)


def _read_cifar_split(fmt: _CifarFormat, root: Path, files: tuple[str, ...], limit: int | None):
    expected = f"a pickled dict with 'data' (N, 3072) uint8 and '{fmt.label_key}'"
    xs, ys, have = [], [], 0
    for fname in files:
        if limit is not None and have >= limit:
            break  # enough samples: skip reading the remaining batch files
        path = root / fname
        entry = _read_pickle(path, fmt.name, expected)
        data, labels = _get(entry, "data"), _get(entry, fmt.label_key)
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3072
        ):
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{fmt.name}: {path} is not {expected} (data is {got})")
        if labels is None:
            raise DataError(f"{fmt.name}: {path} is not {expected} (no '{fmt.label_key}')")
        labels = np.asarray(labels)
        if (
            labels.ndim != 1
            or labels.shape[0] != data.shape[0]
            or not np.issubdtype(labels.dtype, np.integer)
        ):
            raise DataError(
                f"{fmt.name}: {path} has {labels.shape} {labels.dtype} labels for "
                f"{data.shape[0]} images (expected one integer label per image)"
            )
        xs.append(data.reshape(-1, 3, 32, 32))  # stored channel-major: already CHW
        ys.append(labels.astype(np.int64))
        have += data.shape[0]
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys))
    return x, y


def _load_cifar(
    fmt: _CifarFormat,
    *,
    data_dir: Path | None,
    download: bool,
    seed: int,
    augment: bool,
    limit: int | None,
    test_limit: int | None,
    image_size: int | None,
) -> DataBundle:
    """CIFAR-10/100 in the python-pickled batch format torchvision uses (no md5 check: user copies)."""
    _check_image_size(fmt.name, image_size, 32)
    if data_dir is None:
        raise DataError(f"{fmt.name}: no data directory given (expected one holding {fmt.folder}/)")
    root = data_dir / fmt.folder
    if download:
        import torchvision

        try:
            # torchvision fetches, checks md5 and extracts; we then read the files ourselves.
            getattr(torchvision.datasets, fmt.tv_class)(str(data_dir), train=True, download=True)
        except (OSError, RuntimeError, ValueError) as exc:  # network, md5 or archive errors
            raise DataError(f"{fmt.name}: download into {data_dir} failed ({exc})") from None
    if not root.is_dir():
        raise DataError(
            f"{fmt.name}: {data_dir} has no {fmt.folder}/ "
            "(pass --download to fetch it, or --dataset npz for an npz directory)"
        )
    tr_x, tr_y = _read_cifar_split(fmt, root, fmt.train_files, limit)
    te_x, te_y = _read_cifar_split(fmt, root, fmt.test_files, test_limit)
    class_names = None
    meta_path = root / fmt.meta_file
    if meta_path.exists():
        names = _get(_read_pickle(meta_path, fmt.name, f"a pickled dict with '{fmt.meta_key}'"), fmt.meta_key)
        if names is not None:
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    num_classes = len(class_names) if class_names else fmt.num_classes
    _check_labels(fmt.name, root, tr_y, te_y, num_classes)
    return _in_memory_bundle(
        fmt.name,
        tr_x,
        tr_y,
        te_x,
        te_y,
        num_classes=num_classes,
        augment=augment,
        limit=limit,
        test_limit=test_limit,
        class_names=class_names,
    )


def _label_space(path: Path, train_y: np.ndarray, test_y: np.ndarray) -> int:
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


def _check_labels(
    name: str, path: Path, train_y: torch.Tensor, test_y: torch.Tensor, num_classes: int
) -> None:
    for split, y in (("train", train_y), ("test", test_y)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(f"{name}: {path} has {split} labels outside 0..{num_classes - 1}")


def _read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    expected = "'x' uint8 (N, H, W, C) and 'y' integer labels (N,)"
    if not path.is_file():
        raise DataError(f"npz: {path} is missing (expected {split}.npz with {expected})")
    try:
        with np.load(path, allow_pickle=False) as f:  # data, never code
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(
                    f"npz: {path} has no {' or '.join(repr(k) for k in missing)} (expected {expected})"
                )
            x, y = f["x"], f["y"]
            names = None
            if "label_names" in f.files:
                try:
                    names = [str(n) for n in f["label_names"].tolist()]
                except ValueError:  # an object array would need pickle: ignore the names
                    names = None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
            raise DataError(f"npz: {path} holds object arrays (pickled Python objects); hwsplit reads only "
                            f"numeric arrays (expected {expected})") from None
        raise DataError(f"npz: {path} is not a readable npz archive ({type(exc).__name__})") from None
    if x.dtype != np.uint8:
        raise DataError(f"npz: {path} has 'x' of dtype {x.dtype} (expected uint8 0..255)")
    if x.ndim == 3:  # grayscale (N, H, W)
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"npz: {path} has 'x' of shape {x.shape} (expected (N, H, W, C) or (N, H, W))")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"npz: {path} has 'y' of shape {y.shape} dtype {y.dtype} (expected integer (N,))")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"npz: {path} has {x.shape[0]} images but {y.shape[0]} labels (expected equal)")
    return x, y, names


def _load_npz(
    *,
    data_dir: Path | None,
    download: bool,
    seed: int,
    augment: bool,
    limit: int | None,
    test_limit: int | None,
    image_size: int | None,
) -> DataBundle:
    """A directory with train.npz and test.npz: 'x' uint8 (N, H, W, C), 'y' integer labels (N,)."""
    if data_dir is None:
        raise DataError("npz: no data directory given (expected one holding train.npz and test.npz)")
    if not data_dir.is_dir():
        raise DataError(f"npz: {data_dir} is not a directory (expected one holding train.npz and test.npz)")
    tr_x, tr_y, names = _read_npz(data_dir / "train.npz", "train")
    te_x, te_y, _ = _read_npz(data_dir / "test.npz", "test")
    if tr_x.shape[1:] != te_x.shape[1:]:
        raise DataError(
            f"npz: {data_dir} has train images {tr_x.shape[1:]} but test images "
            f"{te_x.shape[1:]} (expected the same (H, W, C))"
        )
    if tr_x.shape[0] == 0 or te_x.shape[0] == 0:
        raise DataError(f"npz: {data_dir} has an empty train or test split (expected samples in both)")
    _check_image_size("npz", image_size, int(tr_x.shape[1]))
    num_classes = len(names) if names else _label_space(data_dir, tr_y, te_y)
    if limit is not None:  # slice before the NHWC -> NCHW copy
        tr_x, tr_y = tr_x[:limit], tr_y[:limit]
    if test_limit is not None:
        te_x, te_y = te_x[:test_limit], te_y[:test_limit]
    tr = torch.from_numpy(np.ascontiguousarray(tr_x.transpose(0, 3, 1, 2)))
    te = torch.from_numpy(np.ascontiguousarray(te_x.transpose(0, 3, 1, 2)))
    tr_yt = torch.from_numpy(tr_y.astype(np.int64))
    te_yt = torch.from_numpy(te_y.astype(np.int64))
    _check_labels("npz", data_dir, tr_yt, te_yt, num_classes)
    return _in_memory_bundle(
        "npz", tr, tr_yt, te, te_yt, num_classes=num_classes, augment=augment, limit=None, test_limit=None,
        class_names=names
    )


def _load_imagefolder(
    *,
    data_dir: Path | None,
    download: bool,
    seed: int,
    augment: bool,
    limit: int | None,
    test_limit: int | None,
    image_size: int | None,
) -> DataBundle:
    """ImageNet-style ``train/<class>/*`` and ``val/<class>/*`` read by torchvision's ImageFolder.

    Training: random-resized crop to ``image_size`` (default 224) and horizontal flip when ``augment``,
    else the evaluation transform. Evaluation: resize the short side to ``image_size / 0.875``, center
    crop ``image_size``. Normalised with ImageNet's mean/std (images are read as RGB), not statistics
    of the folder, so that loading does not need a pass over the files.
    """
    from torchvision import datasets, transforms

    if data_dir is None:
        raise DataError("imagefolder: no data directory given (expected one holding train/ and val/)")
    size = 224 if image_size is None else image_size
    if size < 1:
        raise ValueError(f"image_size: must be >= 1 pixel, got {size}")
    for sub in ("train", "val"):
        if not (data_dir / sub).is_dir():
            raise DataError(
                f"imagefolder: {data_dir} has no {sub}/ "
                "(expected train/<class>/*.jpg|png and val/<class>/*.jpg|png)"
            )
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_tf = transforms.Compose(
        [
            transforms.Resize(round(size / 0.875)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    train_tf = (
        transforms.Compose(
            [
                transforms.RandomResizedCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
        if augment
        else eval_tf
    )
    sets = {}
    for sub, tf in (("train", train_tf), ("val", eval_tf)):
        try:
            sets[sub] = datasets.ImageFolder(str(data_dir / sub), transform=tf, loader=_load_image)
        except (FileNotFoundError, OSError) as exc:
            raise DataError(
                f"imagefolder: {data_dir / sub} holds no images in class folders ({exc})"
            ) from None
    train, val = sets["train"], sets["val"]
    if val.classes != train.classes:
        raise DataError(
            f"imagefolder: {data_dir / 'val'} has classes {val.classes[:5]}... but train/ has "
            f"{train.classes[:5]}... (expected the same class folders)"
        )
    num_classes = len(train.classes)
    train_set: Dataset = train
    test_set: Dataset = val
    if limit is not None:
        train_set = torch.utils.data.Subset(train, range(min(limit, len(train))))
    if test_limit is not None:
        test_set = torch.utils.data.Subset(val, range(min(test_limit, len(val))))
    log.info(
        "imagefolder: %d train, %d val images, %d classes, input 3x%dx%d",
        len(train_set),
        len(test_set),
        num_classes,
        size,
        size,
    )
    return DataBundle(
        name="imagefolder",
        train=train_set,
        test=test_set,
        num_classes=num_classes,
        input_shape=(3, size, size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        class_names=list(train.classes),
    )


_Loader = Callable[..., DataBundle]


def _registry() -> dict[str, _Loader]:
    return {
        "digits": _load_digits,
        "cifar10": lambda **kw: _load_cifar(_CIFAR10, **kw),
        "cifar100": lambda **kw: _load_cifar(_CIFAR100, **kw),
        "npz": _load_npz,
        "imagefolder": _load_imagefolder,
    }


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_registry())


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
    augment: bool = True,
    limit: int | None = None,
    image_size: int | None = None,
    test_limit: int | str | None = "auto",
) -> DataBundle:
    """Load data set ``name`` (see :func:`available_datasets`).

    Args:
        name: ``digits`` (scikit-learn, embedded), ``cifar10``/``cifar100`` (pickled batches under
            ``data_dir``), ``npz`` (``data_dir/train.npz``, ``data_dir/test.npz``) or ``imagefolder``
            (``data_dir/train/<class>/``, ``data_dir/val/<class>/``).
        data_dir: directory holding the data (not used by ``digits``).
        download: let torchvision fetch CIFAR into ``data_dir`` (other sets ignore it).
        seed: seed of the ``digits`` train/test split (the others have fixed splits).
        augment: random crop + horizontal flip of training batches (cifar, npz, imagefolder; never digits).
        limit: keep the first ``limit`` training samples.
        test_limit: keep the first ``test_limit`` test samples; ``"auto"`` (default): ``max(1, limit // 5)``
            when ``limit`` is given, else all; ``None``: all of them.
        image_size: crop size in pixels for ``imagefolder`` (default 224); other sets are not resized
            and only accept their native size.

    Raises:
        DataError: the directory is missing or malformed.
        ValueError: an argument is out of range (the message names it).
    """
    registry = _registry()
    if name not in registry:
        raise ValueError(f"name: unknown dataset {name!r} (available: {', '.join(sorted(registry))})")
    _check_limit(limit)
    if test_limit == "auto":
        test_limit = _test_limit(limit)
    elif test_limit is not None and (isinstance(test_limit, bool) or not isinstance(test_limit, int) or test_limit < 1):
        raise ValueError(f"test_limit: expected 'auto', None or an integer >= 1, got {test_limit!r}")
    path = None if data_dir is None else Path(data_dir).expanduser()
    return registry[name](
        data_dir=path, download=download, seed=seed, augment=augment, limit=limit, test_limit=test_limit,
        image_size=image_size,
    )


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


def make_eval_loader(dataset: Dataset, *, batch_size: int, seed: int = 0,
                     device: str | torch.device | None = None) -> Iterable:
    """An evaluation loader (in order, never augmented) over ``dataset``, like :func:`make_loaders`' test one."""
    if isinstance(dataset, TensorImageDataset):
        return TensorBatchLoader(dataset, batch_size, shuffle=False, augment=False, seed=seed, device=device)
    sampler = _EpochBatchSampler(len(dataset), batch_size, shuffle=False, seed=seed, rank=0,  # type: ignore[arg-type]
                                 world_size=1)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler)


def make_loaders(
    bundle: DataBundle,
    *,
    batch_size: int,
    seed: int = 0,
    num_workers: int = 0,
    eval_batch_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
) -> tuple[Iterable, Iterable]:
    """Training (shuffled, augmented as the bundle says) and test (in order, never augmented) loaders.

    Both yield ``(x float32 normalised NCHW, y int64)``. In-memory bundles get
    :class:`TensorBatchLoader` (``num_workers`` unused; ``device`` moves the tensors there once so
    augmentation runs on it); image folders get ``torch.utils.data.DataLoader`` with ``num_workers``
    processes and the same batch order (``device`` unused). ``eval_batch_size`` defaults to
    ``batch_size``. ``rank``/``world_size`` select this process's shard (see :func:`epoch_batches`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    eval_bs = batch_size if eval_batch_size is None else eval_batch_size
    if eval_bs < 1:
        raise ValueError(f"eval_batch_size: must be >= 1, got {eval_bs}")
    if num_workers < 0:
        raise ValueError(f"num_workers: must be >= 0, got {num_workers}")
    if isinstance(bundle.train, TensorImageDataset) and isinstance(bundle.test, TensorImageDataset):
        train = TensorBatchLoader(
            bundle.train, batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size, device=device
        )
        test = TensorBatchLoader(
            bundle.test,
            eval_bs,
            shuffle=False,
            augment=False,
            seed=seed,
            rank=rank,
            world_size=world_size,
            device=device,
        )
        return train, test

    def loader(ds: Dataset, bs: int, shuffle: bool) -> torch.utils.data.DataLoader:
        sampler = _EpochBatchSampler(
            len(ds),
            bs,
            shuffle=shuffle,
            seed=seed,
            rank=rank,  # type: ignore[arg-type]
            world_size=world_size,
        )
        return torch.utils.data.DataLoader(
            ds,
            batch_sampler=sampler,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(seed),  # seeds the workers' augmentation RNGs
        )

    return loader(bundle.train, batch_size, True), loader(bundle.test, eval_bs, False)


def example_batch(bundle: DataBundle, n: int = 2) -> torch.Tensor:
    """``n`` normalised test inputs, shape (n, C, H, W) float32 (for tracing); test samples repeat if few."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    test = bundle.test
    size = len(test)  # type: ignore[arg-type]
    index = torch.arange(n) % size
    if isinstance(test, TensorImageDataset):
        return test.batch(index)[0].cpu()
    return torch.stack([test[int(i)][0] for i in index])
