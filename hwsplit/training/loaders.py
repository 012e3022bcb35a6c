"""Batch loaders, and the one place that decides which samples a rank sees in which order.

:class:`TensorBatchLoader` batches in-memory data sets; image folders go through a
``torch.utils.data.DataLoader`` with :class:`_EpochBatchSampler`. Both take their order from
:func:`epoch_batches`, so that data-parallel training changes nothing else (docs/design.md §5).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import Dataset

from hwsplit.training.bundle import DataBundle, TensorImageDataset


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


__all__ = ["TensorBatchLoader", "epoch_batches", "make_eval_loader", "make_loaders", "shard_size"]
