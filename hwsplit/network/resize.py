"""Widen neuron groups with zero channels, in place: rebuild a grown network from its architecture.

:func:`resize_groups` appends new channels at the end of each named group (producer rows, BatchNorm
and depthwise channels, zero consumer columns), so the model computes the same function; checkpoints
are loaded into a network widened this way. Moved out of ``hwsplit.splitting.surgery`` so that
building a model (``hwsplit.network.models``) needs nothing of the splitting layer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from hwsplit.network.graph import NeuronGroup

log = logging.getLogger(__name__)

__all__ = ["parameter_like", "resize_groups"]


def parameter_like(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    """A new parameter holding a copy of ``t``, with ``like``'s ``requires_grad``."""
    return nn.Parameter(t.detach().clone(), requires_grad=like.requires_grad)


def resize_groups(model: nn.Module, widths: Mapping[str, int], groups: Mapping[str, NeuronGroup] | list[NeuronGroup],
                  ) -> nn.Module:
    """Grow the groups named in ``widths`` to those widths, in place; returns ``model``.

    Used to rebuild a grown model from its architecture before ``load_state_dict``: each group
    gets ``widths[name] - width`` new channels appended at the end — producer rows (and bias)
    and depthwise channels of zeros, BatchNorm channels with weight 1, bias 0, running mean 0 and
    running variance 1, and zero input columns in every consumer. With zero consumer columns the
    model computes the same function as before. ``groups`` come from
    :func:`hwsplit.network.graph.find_neuron_groups` on ``model``. ``ValueError`` (naming ``widths[name]``)
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
    layer.weight = parameter_like(torch.cat([w, w.new_zeros((extra, *w.shape[1:]))]), layer.weight)
    if layer.bias is not None:
        layer.bias = parameter_like(torch.cat([layer.bias.detach(), layer.bias.detach().new_zeros(extra)]), layer.bias)
    if isinstance(layer, nn.Conv2d):
        layer.out_channels += extra
    else:
        layer.out_features += extra


def _append_bn(bn: nn.Module, extra: int) -> None:
    for name, fill in (("weight", 1.0), ("bias", 0.0)):
        p = getattr(bn, name)
        if p is not None:
            setattr(bn, name, parameter_like(torch.cat([p.detach(), p.detach().new_full((extra,), fill)]), p))
    for name, fill in (("running_mean", 0.0), ("running_var", 1.0)):
        b = getattr(bn, name)
        setattr(bn, name, torch.cat([b, b.new_full((extra,), fill)]))
    bn.num_features += extra


def _append_depthwise(dw: nn.Conv2d, extra: int) -> None:
    w = dw.weight.detach()
    dw.weight = parameter_like(torch.cat([w, w.new_zeros((extra, *w.shape[1:]))]), dw.weight)
    if dw.bias is not None:
        dw.bias = parameter_like(torch.cat([dw.bias.detach(), dw.bias.detach().new_zeros(extra)]), dw.bias)
    dw.in_channels += extra
    dw.out_channels += extra
    dw.groups += extra


def _append_columns(layer: nn.Module, extra: int, columns: int) -> None:
    w = layer.weight.detach()
    # New channels come last, so their input features come last in NCHW flatten order too.
    layer.weight = parameter_like(torch.cat([w, w.new_zeros((w.shape[0], extra * columns, *w.shape[2:]))], dim=1),
                          layer.weight)
    if isinstance(layer, nn.Conv2d):
        layer.in_channels += extra
    else:
        layer.in_features += extra * columns
