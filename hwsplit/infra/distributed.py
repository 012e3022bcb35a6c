"""The one place where ranks of a data-parallel run talk to each other (docs/design.md §5, "Several processes").

With one process (no ``torch.distributed`` process group) every function here is an identity or a
no-op, so single-process runs are unchanged. Under ``torchrun`` the run layer
(:mod:`hwsplit.infra.parallel`) initialises the group; the splitting core calls these reductions at the
places where it forms sums and means over samples, so that W ranks, each over its shard, compute
the expectation over the whole data set, as one process would.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import nn


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of processes of the run (1 without a process group)."""
    return torch.distributed.get_world_size() if _distributed() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if _distributed() else 0


def is_main() -> bool:
    """True on rank 0, the one process that writes run directories, logs progress and measures devices."""
    return rank() == 0


def local_rank() -> int:
    """This process's rank on its machine (torchrun's ``LOCAL_RANK``; 0 without one)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if _distributed() else 0


def local_device(device: str | torch.device) -> torch.device:
    """The device this rank computes on: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one process per GPU)
    under a process group; anything else is returned as given."""
    device = torch.device(device)
    if device.type == "cuda" and _distributed() and world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def _scalar_device() -> torch.device:
    """Where small reductions run: the CPU (gloo) unless the group has NCCL only (CUDA tensors only)."""
    backend = str(torch.distributed.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here (nothing with one process)."""
    if _distributed():
        torch.distributed.barrier()


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (``tensor`` itself with a single process).

    Callers pass per-rank partial sums whose per-batch weights already divide by the global
    number of samples (:func:`global_sample_count`), so the reduced value is the global expectation.
    """
    if not _distributed():
        return tensor
    out = tensor.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def weighted_mean_across_ranks(tensors: torch.Tensor | dict[str, torch.Tensor], weight: float
                               ) -> torch.Tensor | dict[str, torch.Tensor]:
    """Σ_r w_r·t_r / Σ_r w_r over ranks, with this rank's ``tensors`` t_r and ``weight`` w_r (its samples).

    ``tensors`` is one tensor or a dict of them (same dtype and device), reduced in one collective.
    A per-batch mean on each rank, weighted by the rank's batch size, is the mean over the union
    of the ranks' batches: the Rayleigh-quotient step of W ranks with batches of B samples is the
    step of one process with batches of W·B (docs/design.md §2, fast scoring).
    """
    if not _distributed():
        return tensors
    items = tensors if isinstance(tensors, dict) else {"": tensors}
    first = next(iter(items.values()))
    packed = torch.cat([(t * weight).flatten() for t in items.values()]
                       + [torch.tensor([float(weight)], dtype=first.dtype, device=first.device)])
    packed = sum_across_ranks(packed)
    means, offset = {}, 0
    for name, t in items.items():
        means[name] = (packed[offset:offset + t.numel()] / packed[-1]).reshape(t.shape)
        offset += t.numel()
    return means if isinstance(tensors, dict) else means[""]


def reduce_sum(*values: torch.Tensor | float) -> list[float]:
    """Sums of scalar ``values`` over all ranks, as Python floats (the values themselves with one process).

    Used for cross-batch metric sums (loss, correct predictions, sample counts); reduced in float64.
    """
    if not values:
        return []
    if not _distributed():
        return [float(v.item()) if isinstance(v, torch.Tensor) else float(v) for v in values]
    device = _scalar_device()
    flat = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().reshape(()).to(device) for v in values])
    return [float(v) for v in sum_across_ranks(flat).tolist()]


def all_ranks_true(flag: bool | torch.Tensor) -> bool:
    """True when ``flag`` holds on every rank (a collective: every rank must call it at the same point)."""
    value = bool(flag.item()) if isinstance(flag, torch.Tensor) else bool(flag)
    if not _distributed():
        return value
    return reduce_sum(0.0 if value else 1.0)[0] == 0.0


def global_sample_count(samples: int, batches: int | None = None) -> int:
    """Samples of all ranks together (``samples`` with one process).

    ``batches`` (this rank's batches per pass) must then be the same on every rank: loops that
    reduce once per batch would otherwise wait forever for a rank that has run out.
    """
    if not _distributed():
        return int(samples)
    w, r = world_size(), rank()
    table = torch.zeros(2 * w, dtype=torch.float64, device=_scalar_device())
    table[r] = float(samples)
    table[w + r] = float(-1 if batches is None else batches)
    table = sum_across_ranks(table).tolist()
    counts = [int(b) for b in table[w:]]
    if batches is not None and len(set(counts)) > 1:
        raise ValueError(f"loader: the ranks have different numbers of batches per pass ({counts}); a loader "
                         "sharded with padding (hwsplit.training.loaders.make_loaders' training loader) keeps them in "
                         "lockstep")
    return int(sum(table[:w]))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself with one process); picklable objects only."""
    if not _distributed():
        return obj
    box = [obj if rank() == src else None]
    device = _scalar_device() if _scalar_device().type == "cuda" else None
    torch.distributed.broadcast_object_list(box, src=src, device=device)
    return box[0]


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` (``model`` itself with one process).

    Wrapping copies rank 0's parameters and buffers to every rank, then every backward averages
    the gradients. Buffers are not re-broadcast at each forward (``forward_sync_buffers=False``):
    every rank normalises with its own batch's statistics in training, and
    :func:`average_buffers` averages the running statistics afterwards (the documented BatchNorm
    choice, README "Several processes"). Wrap again after every split: DDP's buckets are built
    for one set of parameters.
    """
    if not _distributed() or world_size() == 1:
        return model
    device = next(model.parameters()).device
    ids = {"device_ids": [device.index]} if device.type == "cuda" else {}
    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.14 names it forward_sync_buffers (buffers are still copied from rank 0 at wrapping)
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else "broadcast_buffers")
    return ddp(model, **{sync: False}, **ids)


def average_buffers(model: nn.Module) -> None:
    """Replace every floating-point buffer (BatchNorm running mean and variance) by its mean over ranks.

    Integer buffers (``num_batches_tracked``) are the same on every rank (same number of steps).
    """
    if not _distributed() or world_size() == 1:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in buffers])
    flat = sum_across_ranks(flat) / world_size()
    offset = 0
    with torch.no_grad():
        for b in buffers:
            n = b.numel()
            b.copy_(flat[offset:offset + n].reshape(b.shape).to(b.dtype))
            offset += n


__all__ = ["all_ranks_true", "average_buffers", "barrier", "broadcast_object", "data_parallel",
           "global_sample_count", "is_main", "local_device", "local_rank", "rank", "reduce_sum",
           "sum_across_ranks", "weighted_mean_across_ranks", "world_size"]
