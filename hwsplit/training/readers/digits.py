"""Reader of scikit-learn's digits (8×8 grey images, embedded): the main job's data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hwsplit.training.bundle import (
    DataBundle,
    check_image_size,
    in_memory_bundle,
)


def load_digits(
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

    check_image_size("digits", image_size, 8)
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # values 0..16 -> 0..1
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    # Flips and shifted crops change what a digit is: never augmented.
    return in_memory_bundle(
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


__all__ = ["load_digits"]
