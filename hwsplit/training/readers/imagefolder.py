"""Reader of image folders (``train/<class>/``, ``val/<class>/``), read lazily through torchvision's
``ImageFolder``; an undecodable file stops a run with :class:`~hwsplit.training.bundle.BadImageError`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from hwsplit.training.bundle import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageError,
    DataBundle,
    DataError,
)

log = logging.getLogger(__name__)


def _load_image(path: str) -> Any:
    """torchvision's default image loader, with an unreadable file reported as :class:`BadImageError`."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"imagefolder: {path} is not a readable image ({type(err).__name__})") from None


def load_imagefolder(
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


__all__ = ["load_imagefolder"]
