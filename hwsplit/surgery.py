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

from hwsplit.graph import NeuronGroup
from hwsplit.score import SplitScore

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


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=like.requires_grad)


def _split_rows(layer: nn.Module, channels: torch.Tensor, directions: torch.Tensor, step: float) -> None:
    w = layer.weight.detach()
    idx = channels.to(w.device)
    delta = step * directions.to(device=w.device, dtype=w.dtype)[idx]
    kept = w.clone()
    kept[idx] = w[idx] + delta
    layer.weight = _param(torch.cat([kept, w[idx] - delta]), layer.weight)
    if layer.bias is not None:
        layer.bias = _param(torch.cat([layer.bias.detach(), layer.bias.detach()[idx]]), layer.bias)
    if isinstance(layer, nn.Conv2d):
        layer.out_channels += len(channels)
    else:
        layer.out_features += len(channels)


def _duplicate_bn(bn: nn.Module, channels: torch.Tensor) -> None:
    idx = channels.to(bn.running_mean.device)
    for name in ("weight", "bias"):
        p = getattr(bn, name)
        if p is not None:
            setattr(bn, name, _param(torch.cat([p.detach(), p.detach()[idx]]), p))
    for name in ("running_mean", "running_var"):
        b = getattr(bn, name)
        setattr(bn, name, torch.cat([b, b[idx]]))
    bn.num_features += len(channels)


def _duplicate_depthwise(dw: nn.Conv2d, channels: torch.Tensor) -> None:
    idx = channels.to(dw.weight.device)
    dw.weight = _param(torch.cat([dw.weight.detach(), dw.weight.detach()[idx]]), dw.weight)
    if dw.bias is not None:
        dw.bias = _param(torch.cat([dw.bias.detach(), dw.bias.detach()[idx]]), dw.bias)
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
    layer.weight = _param(torch.cat([w, w[:, cols]], dim=1), layer.weight)
    if isinstance(layer, nn.Conv2d):
        layer.in_channels += len(channels)
    else:
        layer.in_features += len(cols)


def resize_groups(model: nn.Module, widths: Mapping[str, int], groups: Mapping[str, NeuronGroup] | list[NeuronGroup],
                  ) -> nn.Module:
    """Grow the groups named in ``widths`` to those widths, in place; returns ``model``.

    Used to rebuild a grown model from its architecture before ``load_state_dict``: each group
    gets ``widths[name] - width`` new channels appended at the end — producer rows (and bias)
    and depthwise channels of zeros, BatchNorm channels with weight 1, bias 0, running mean 0 and
    running variance 1, and zero input columns in every consumer. With zero consumer columns the
    model computes the same function as before. ``groups`` come from
    :func:`hwsplit.graph.find_neuron_groups` on ``model``. ``ValueError`` (naming ``widths[name]``)
    for an unknown or unsplittable group, or a width smaller than the current one.
    """
    by_name = dict(groups) if isinstance(groups, Mapping) else {g.name: g for g in groups}
    edits: list[tuple[NeuronGroup, int]] = []
    for name, width in widths.items():
        group = by_name.get(name)
        if group is None:
            raise ValueError(f"widths[{name!r}]: no neuron group of that name in the model")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"widths[{name!r}]: expected a positive integer, got {width!r}")
        current = model.get_submodule(group.producer).weight.shape[0]
        if width < current:
            raise ValueError(f"widths[{name!r}]: {width} is smaller than the layer's {current} channels "
                             "(layers only grow)")
        if width == current:
            continue
        if not group.splittable:
            raise ValueError(f"widths[{name!r}]: cannot change from {current}: {group.reason}")
        edits.append((group, width - current))
    # Rows first for every group, then consumer columns (a consumer may be another group's producer).
    for group, extra in edits:
        _append_rows(model.get_submodule(group.producer), extra)
        for op in group.chain:
            if op.kind == "bn":
                _append_bn(model.get_submodule(op.target), extra)
            elif op.kind == "dwconv":
                _append_depthwise(model.get_submodule(op.target), extra)
    for group, extra in edits:
        for consumer in group.consumers:
            _append_columns(model.get_submodule(consumer.name), extra, consumer.columns)
        log.debug("resized %s by %d channels", group.name, extra)
    return model


def _append_rows(layer: nn.Module, extra: int) -> None:
    w = layer.weight.detach()
    layer.weight = _param(torch.cat([w, w.new_zeros((extra, *w.shape[1:]))]), layer.weight)
    if layer.bias is not None:
        layer.bias = _param(torch.cat([layer.bias.detach(), layer.bias.detach().new_zeros(extra)]), layer.bias)
    if isinstance(layer, nn.Conv2d):
        layer.out_channels += extra
    else:
        layer.out_features += extra


def _append_bn(bn: nn.Module, extra: int) -> None:
    for name, fill in (("weight", 1.0), ("bias", 0.0)):
        p = getattr(bn, name)
        if p is not None:
            setattr(bn, name, _param(torch.cat([p.detach(), p.detach().new_full((extra,), fill)]), p))
    for name, fill in (("running_mean", 0.0), ("running_var", 1.0)):
        b = getattr(bn, name)
        setattr(bn, name, torch.cat([b, b.new_full((extra,), fill)]))
    bn.num_features += extra


def _append_depthwise(dw: nn.Conv2d, extra: int) -> None:
    w = dw.weight.detach()
    dw.weight = _param(torch.cat([w, w.new_zeros((extra, *w.shape[1:]))]), dw.weight)
    if dw.bias is not None:
        dw.bias = _param(torch.cat([dw.bias.detach(), dw.bias.detach().new_zeros(extra)]), dw.bias)
    dw.in_channels += extra
    dw.out_channels += extra
    dw.groups += extra


def _append_columns(layer: nn.Module, extra: int, columns: int) -> None:
    w = layer.weight.detach()
    # New channels come last, so their input features come last in NCHW flatten order too.
    layer.weight = _param(torch.cat([w, w.new_zeros((w.shape[0], extra * columns, *w.shape[2:]))], dim=1),
                          layer.weight)
    if isinstance(layer, nn.Conv2d):
        layer.in_channels += extra
    else:
        layer.in_features += extra * columns


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
