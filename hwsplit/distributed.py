"""The one place where sums across data-parallel ranks happen.

Today hwsplit runs in one process and these are identities; under torch.distributed (torchrun,
DDP) they all-reduce, so that adding ranks changes this module, not the maths that calls it.
"""

from __future__ import annotations

import torch


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _distributed() else 1


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (``tensor`` itself with a single process).

    Callers pass per-rank partial sums whose per-batch weights already divide by the global
    number of samples, so the reduced value is the global expectation.
    """
    if not _distributed():
        return tensor
    out = tensor.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def reduce_sum(*values: torch.Tensor | float) -> list[float]:
    """Sums of scalar ``values`` over all ranks, as Python floats (the values themselves with one process).

    Used for cross-batch metric sums (loss, correct predictions, sample counts); reduced in float64.
    """
    if not values:
        return []
    if not _distributed():
        return [float(v.item()) if isinstance(v, torch.Tensor) else float(v) for v in values]
    # NCCL reduces CUDA tensors only
    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    flat = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().reshape(()).to(device) for v in values])
    return [float(v) for v in sum_across_ranks(flat).tolist()]
