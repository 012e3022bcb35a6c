"""Apply a split plan to a model: every chosen neuron becomes two offspring (function-preserving).

Neuron j of a group with producer P, chain (BatchNorm, depthwise conv) and consumers C becomes
two offspring (Wu et al. 2019, §3.1; Wang et al. 2019, eq. 2): incoming weights w_j + ε·v_j (in
place) and w_j − ε·v_j (appended as a new channel at the end), BatchNorm and depthwise channels
copied, and each consumer's input column(s) of j halved and duplicated. At ε = 0 the new model
computes the same function. The coupling comes from the groups the scores were computed on
(``SplitScore.group``); surgery never walks the model itself.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

import torch
from torch import nn

from hwsplit.network.graph import NeuronGroup
from hwsplit.network.resize import parameter_like
from hwsplit.splitting.estimators import SplitScore

log = logging.getLogger(__name__)


def apply_split(model: nn.Module, plan: Mapping[str, torch.Tensor], scores: Mapping[str, SplitScore], *,
                step: float = 1e-2, groups: Mapping[str, NeuronGroup] | None = None) -> nn.Module:
    """A new model in which every channel of ``plan[name]`` (a LongTensor of indices) is split.

    ``scores[name].eigenvectors`` (unit norm per channel) give the directions; ``step`` is ε in the
    producer's weight units. ``groups`` overrides the coupling stored in the scores. The input
    model is not modified; the returned model is a deep copy with widened modules of the same
    types. Raises ``ValueError`` naming the group for a plan that does not fit the model.
    """
    if not step >= 0:
        raise ValueError(f"step: expected a non-negative number, got {step!r}")
    new = copy.deepcopy(model)
    edits: list[tuple[NeuronGroup, torch.Tensor, torch.Tensor]] = []
    for name, channels in plan.items():
        channels = torch.as_tensor(channels, dtype=torch.long).flatten().cpu()
        if channels.numel() == 0:
            continue
        if name not in scores:
            raise ValueError(f"plan: group {name!r} has no score")
        group = (groups or {}).get(name) or scores[name].group
        if group is None:
            raise ValueError(f"scores: {name!r} carries no neuron group; pass groups=")
        if not group.splittable:
            raise ValueError(f"plan: group {name!r} is not splittable ({group.reason})")
        producer = new.get_submodule(group.producer)
        width = producer.weight.shape[0]
        if channels.unique().numel() != channels.numel():
            raise ValueError(f"plan: group {name!r} lists a channel twice")
        if channels.min() < 0 or channels.max() >= width:
            raise ValueError(f"plan: group {name!r} has channels outside 0..{width - 1}")
        directions = scores[name].eigenvectors
        if directions.shape != producer.weight.shape:
            raise ValueError(f"scores: {name!r} eigenvectors have shape {tuple(directions.shape)}, "
                             f"the producer's weight {tuple(producer.weight.shape)}")
        edits.append((group, channels, directions))

    # Rows first, for every group, while every producer still has its old fan-in (the
    # eigenvectors' shape); then the consumer columns, which may belong to another group's producer.
    for group, channels, directions in edits:
        _split_rows(new.get_submodule(group.producer), channels, directions, step)
        for op in group.chain:
            if op.kind == "bn":
                _duplicate_bn(new.get_submodule(op.target), channels)
            elif op.kind == "dwconv":
                _duplicate_depthwise(new.get_submodule(op.target), channels)
    for group, channels, _ in edits:
        for consumer in group.consumers:
            _halve_columns(new.get_submodule(consumer.name), channels, consumer.columns)
        log.debug("split %d channels of %s", channels.numel(), group.name)
    return new


def _split_rows(layer: nn.Module, channels: torch.Tensor, directions: torch.Tensor, step: float) -> None:
    w = layer.weight.detach()
    idx = channels.to(w.device)
    delta = step * directions.to(device=w.device, dtype=w.dtype)[idx]
    kept = w.clone()
    kept[idx] = w[idx] + delta
    layer.weight = parameter_like(torch.cat([kept, w[idx] - delta]), layer.weight)
    if layer.bias is not None:
        layer.bias = parameter_like(torch.cat([layer.bias.detach(), layer.bias.detach()[idx]]), layer.bias)
    if isinstance(layer, nn.Conv2d):
        layer.out_channels += len(channels)
    else:
        layer.out_features += len(channels)


def _duplicate_bn(bn: nn.Module, channels: torch.Tensor) -> None:
    idx = channels.to(bn.running_mean.device)
    for name in ("weight", "bias"):
        p = getattr(bn, name)
        if p is not None:
            setattr(bn, name, parameter_like(torch.cat([p.detach(), p.detach()[idx]]), p))
    for name in ("running_mean", "running_var"):
        b = getattr(bn, name)
        setattr(bn, name, torch.cat([b, b[idx]]))
    bn.num_features += len(channels)


def _duplicate_depthwise(dw: nn.Conv2d, channels: torch.Tensor) -> None:
    idx = channels.to(dw.weight.device)
    dw.weight = parameter_like(torch.cat([dw.weight.detach(), dw.weight.detach()[idx]]), dw.weight)
    if dw.bias is not None:
        dw.bias = parameter_like(torch.cat([dw.bias.detach(), dw.bias.detach()[idx]]), dw.bias)
    k = len(channels)
    dw.in_channels += k
    dw.out_channels += k
    dw.groups += k


def _halve_columns(layer: nn.Module, channels: torch.Tensor, columns: int) -> None:
    w = layer.weight.detach()
    idx = channels.to(w.device)
    # Input features of channel j: j·columns … (j+1)·columns − 1 (NCHW flatten order).
    cols = (idx[:, None] * columns + torch.arange(columns, device=w.device)[None, :]).flatten()
    w = w.clone()
    w[:, cols] *= 0.5
    layer.weight = parameter_like(torch.cat([w, w[:, cols]], dim=1), layer.weight)
    if isinstance(layer, nn.Conv2d):
        layer.in_channels += len(channels)
    else:
        layer.in_features += len(cols)


def split_sources(model: nn.Module, plan: Mapping[str, torch.Tensor], scores: Mapping[str, SplitScore], *,
                  groups: Mapping[str, NeuronGroup] | None = None) -> dict[str, tuple[torch.Tensor | None, ...]]:
    """Where every entry of the model :func:`apply_split` makes comes from in ``model``.

    For each parameter or buffer whose shape the split changes, one index tensor per dimension
    (``None`` where that dimension is unchanged): entry ``i`` of the new tensor along that dimension
    holds (up to the ±εv step and the consumer's halving) entry ``index[i]`` of the old one. Old
    channels keep their positions; offspring are appended and point to their parent. Names are
    ``model.state_dict()``'s. Mirrors :func:`apply_split` step for step (rows of every group first,
    then consumer columns); ``tests/test_grower.py`` checks the two agree.
    """
    sizes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    out: dict[str, list[torch.Tensor | None]] = {}

    def extend(name: str, dim: int, channels: torch.Tensor) -> None:
        index = out.setdefault(name, [None] * len(sizes[name]))
        current = index[dim] if index[dim] is not None else torch.arange(sizes[name][dim])
        index[dim] = torch.cat([current, current[channels]])

    edits = []
    for name, channels in plan.items():
        channels = torch.as_tensor(channels, dtype=torch.long).flatten().cpu()
        if channels.numel() == 0:
            continue
        group = (groups or {}).get(name) or scores[name].group
        edits.append((group, channels))
    for group, channels in edits:
        targets = [group.producer] + [op.target for op in group.chain if op.kind in ("bn", "dwconv")]
        for target in targets:
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                if f"{target}.{suffix}" in sizes and sizes[f"{target}.{suffix}"]:
                    extend(f"{target}.{suffix}", 0, channels)
    for group, channels in edits:
        for consumer in group.consumers:
            cols = (channels[:, None] * consumer.columns + torch.arange(consumer.columns)[None, :]).flatten()
            extend(f"{consumer.name}.weight", 1, cols)
    return {name: tuple(index) for name, index in out.items()}
