"""Neuron groups found by tracing (hwsplit.network.graph): real families, unsupported patterns, LayerSpecs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import tiny_mobilenet

from hwsplit import build_model, find_neuron_groups, layer_specs


def _by_name(groups):
    return {g.name: g for g in groups}


# -- MobileNetV1 (hwsplit's own family) ----------------------------------------------------------

@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_mobilenet_v1_groups(stem):
    if stem == "cifar":
        model, x = build_model("mobilenet_v1_cifar"), torch.randn(2, 3, 32, 32)
    else:
        model, x = build_model("mobilenet_v1", width_mult=0.25), torch.randn(2, 3, 64, 64)
    n_blocks = len(model.blocks)
    groups = find_neuron_groups(model, x)
    names = [g.name for g in groups]
    # graph order: stem, every pointwise conv, the classifier
    assert names == ["stem.conv"] + [f"blocks.{i}.pw.conv" for i in range(n_blocks)] + ["classifier"]
    g = _by_name(groups)

    stem_g = g["stem.conv"]
    assert stem_g.splittable and stem_g.producer == "stem.conv"
    assert stem_g.width == model.stem.conv.out_channels and stem_g.fan_in == 3 * 3 * 3
    assert [op.kind for op in stem_g.chain] == ["bn", "act", "dwconv", "bn", "act"]
    assert stem_g.depthwise == ["blocks.0.dw.conv"]
    assert stem_g.batchnorms == ["stem.bn", "blocks.0.dw.bn"]
    expected_act = "silu" if stem == "cifar" else "relu"
    assert stem_g.activations == [expected_act, expected_act]
    assert [(c.name, c.columns) for c in stem_g.consumers] == [("blocks.0.pw.conv", 1)]

    for i in range(n_blocks - 1):
        gi = g[f"blocks.{i}.pw.conv"]
        assert gi.splittable, gi.reason
        assert gi.fan_in == model.blocks[i].pw.conv.in_channels
        assert gi.depthwise == [f"blocks.{i + 1}.dw.conv"]
        assert [c.name for c in gi.consumers] == [f"blocks.{i + 1}.pw.conv"]

    last = g[f"blocks.{n_blocks - 1}.pw.conv"]
    assert last.splittable and last.depthwise == []
    assert [op.kind for op in last.chain] == ["bn", "act"]
    # behind adaptive pooling, flatten and dropout: one column per channel
    assert [(c.name, c.columns) for c in last.consumers] == [("classifier", 1)]

    fc = g["classifier"]
    assert not fc.splittable and "output" in fc.reason and fc.consumers == []


def test_mobilenet_v1_stem_strides_show_in_layer_specs():
    cifar = {s.name: s for s in layer_specs(build_model("mobilenet_v1_cifar"), (1, 3, 32, 32))}
    imnet = {s.name: s for s in layer_specs(build_model("mobilenet_v1", width_mult=0.25), (1, 3, 64, 64))}
    assert cifar["stem.conv"].stride == 1 and cifar["blocks.0.dw.conv"].height == 32
    assert imnet["stem.conv"].stride == 2 and imnet["blocks.0.dw.conv"].height == 32


# -- torchvision models --------------------------------------------------------------------------

def test_mobilenet_v2_expansions_split_projections_tied():
    model = torchvision.models.mobilenet_v2(width_mult=0.5)
    g = _by_name(find_neuron_groups(model, torch.randn(2, 3, 32, 32)))
    residual_blocks = []
    for i, block in enumerate(model.features[1:18], start=1):
        if block.use_res_connect:
            residual_blocks.append(i)
        if i >= 2:  # blocks 2..17 have an expansion 1x1 conv: features.i.conv.0.0
            exp = g[f"features.{i}.conv.0.0"]
            assert exp.splittable, exp.reason
            assert exp.depthwise == [f"features.{i}.conv.1.0"]
            assert exp.activations == ["relu6", "relu6"]
            assert [c.name for c in exp.consumers] == [f"features.{i}.conv.2"]
    assert residual_blocks, "width_mult=0.5 still has residual blocks"
    for i in residual_blocks:
        # the projection of a residual block, and the projection of the block before it (the identity)
        for proj in (f"features.{i}.conv.2", f"features.{i - 1}.conv.2" if i > 2 else None):
            if proj is None:
                continue
            assert not g[proj].splittable
            assert "residual add" in g[proj].reason
    # the last projection (160 → 1x1 conv → 1280) feeds no add: splittable, linear bottleneck (BN only)
    last = g["features.17.conv.2"]
    assert last.splittable and [op.kind for op in last.chain] == ["bn"]
    assert [c.name for c in last.consumers] == ["features.18.0"]
    assert not g["classifier.1"].splittable and "output" in g["classifier.1"].reason


def test_resnet18_conv1_split_conv2_downsample_stem_tied():
    model = torchvision.models.resnet18()
    g = _by_name(find_neuron_groups(model, torch.randn(2, 3, 32, 32)))
    for layer in range(1, 5):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            c1 = g[f"{prefix}.conv1"]
            assert c1.splittable, c1.reason
            assert c1.batchnorms == [f"{prefix}.bn1"] and c1.activations == ["relu"]
            assert [c.name for c in c1.consumers] == [f"{prefix}.conv2"]
            assert not g[f"{prefix}.conv2"].splittable
            assert "residual add" in g[f"{prefix}.conv2"].reason
        if layer > 1:
            ds = g[f"layer{layer}.0.downsample.0"]
            assert not ds.splittable and "residual add" in ds.reason
    assert not g["conv1"].splittable and "residual add" in g["conv1"].reason
    assert not g["fc"].splittable and "output" in g["fc"].reason


# -- MLP -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batchnorm", [False, True])
def test_mlp_groups(batchnorm):
    model = build_model("mlp", in_features=12, widths=[7, 5, 4], num_classes=3, batchnorm=batchnorm)
    g = _by_name(find_neuron_groups(model, torch.randn(4, 12)))
    assert list(g) == ["hidden.0.fc", "hidden.1.fc", "hidden.2.fc", "classifier"]
    assert g["hidden.0.fc"].width == 7 and g["hidden.0.fc"].fan_in == 12
    assert [op.kind for op in g["hidden.1.fc"].chain] == (["bn", "act"] if batchnorm else ["act"])
    assert [(c.name, c.columns) for c in g["hidden.1.fc"].consumers] == [("hidden.2.fc", 1)]
    assert [(c.name, c.columns) for c in g["hidden.2.fc"].consumers] == [("classifier", 1)]
    assert not g["classifier"].splittable


# -- unsupported patterns: reported, never a crash ---------------------------------------------------

class _ConvNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm
        self.c2 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.silu(self.c2(F.silu(self.norm(self.c1(x))))), 1).flatten(1))


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 8), nn.LayerNorm([8, 8, 8])], ids=["groupnorm", "layernorm"])
def test_conv_followed_by_group_or_layer_norm_is_not_splittable(norm):
    g = _by_name(find_neuron_groups(_ConvNorm(norm), torch.randn(2, 3, 8, 8)))
    assert not g["c1"].splittable
    assert "unsupported op" in g["c1"].reason and "norm" in g["c1"].reason
    assert g["c2"].splittable  # the rest of the model is still analysed


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = torch.cat([F.silu(self.a(x)), F.silu(self.b(x))], dim=1)
        return self.fc(F.silu(self.c(y)).mean((2, 3)))


def test_concat_is_not_splittable():
    g = _by_name(find_neuron_groups(_Concat(), torch.randn(2, 3, 8, 8)))
    for name in ("a", "b"):
        assert not g[name].splittable and "concat" in g[name].reason
    assert g["c"].splittable and [c.name for c in g["c"].consumers] == ["fc"]


class _UsedTwice(nn.Module):
    """A conv output read by two layers; ``nonlinear`` puts a tanh on one path only."""

    def __init__(self, nonlinear: bool) -> None:
        super().__init__()
        self.nonlinear = nonlinear
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 5, 1)
        self.c = nn.Conv2d(4, 5, 1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        y = self.a(x)
        if self.nonlinear:
            z = torch.cat([self.b(y), self.c(torch.tanh(y))], 1)
        else:
            y = torch.tanh(y)
            z = torch.cat([self.b(y), self.c(y)], 1)
        return self.fc(z.mean((2, 3)))


def test_conv_output_used_twice():
    g = _by_name(find_neuron_groups(_UsedTwice(nonlinear=True), torch.randn(2, 3, 8, 8)))
    # a's raw output goes both to a consumer and into a tanh that is not part of a chain
    assert not g["a"].splittable and "unsupported op" in g["a"].reason and "tanh" in g["a"].reason
    # both readers are consumers: splittable, both get their columns halved
    g = _by_name(find_neuron_groups(_UsedTwice(nonlinear=False), torch.randn(2, 3, 8, 8)))
    assert g["a"].splittable
    assert sorted(c.name for c in g["a"].consumers) == ["b", "c"]
    assert not g["b"].splittable and "concat" in g["b"].reason


class _GroupedConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # grouped, not depthwise
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.g(F.silu(self.bn(self.a(x)))).mean((2, 3)))


def test_grouped_consumer_is_not_splittable():
    groups = find_neuron_groups(_GroupedConsumer(), torch.randn(2, 3, 8, 8))
    g = _by_name(groups)
    assert not g["a"].splittable and "unsupported op" in g["a"].reason and "g" in g["a"].reason
    assert "g" not in g  # a grouped conv is not a producer
    assert not g["fc"].splittable


class _SharedModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.b(F.silu(self.b(F.silu(self.a(x))))).mean((2, 3)))


def test_module_called_twice_is_not_splittable():
    g = _by_name(find_neuron_groups(_SharedModule(), torch.randn(2, 3, 8, 8)))
    assert not g["a"].splittable and "more than once" in g["a"].reason
    assert not g["b"].splittable and "more than once" in g["b"].reason


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return x


def test_untraceable_model_raises_value_error():
    with pytest.raises(ValueError, match=r"model: _DataDependent cannot be traced by torch\.fx"):
        find_neuron_groups(_DataDependent(), torch.randn(1, 3, 8, 8))


class _TokenMLP(nn.Module):
    """A Linear applied to each of T positions, then flattened: features are (t, channel) ordered."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(5 * 3, 2)

    def forward(self, x):  # x: (N, T=5, 4)
        return self.b(torch.flatten(torch.tanh(self.a(x)), 1))


def test_linear_on_positions_then_flatten_is_not_mislabelled():
    """Flattening (N, T, C) puts channel j at columns j, C+j, 2C+j, ... — not the contiguous block
    j·T … (j+1)·T−1 that Consumer.columns means (NCHW order). Either refuse or get it right; splitting
    must never silently change the function."""
    from hwsplit import apply_split
    from hwsplit.splitting.estimators import SplitScore

    torch.manual_seed(0)
    model = _TokenMLP().eval()
    x = torch.randn(2, 5, 4)
    g = _by_name(find_neuron_groups(model, x))["a"]
    if g.splittable:
        scores = {"a": SplitScore(torch.zeros(3), torch.randn(3, 4), group=g)}
        new = apply_split(model, {"a": torch.tensor([0])}, scores, step=0.0)
        with torch.no_grad():
            assert (new(x) - model(x)).abs().max() <= 1e-6
    else:
        assert "reshape" in g.reason


# -- modes, LayerSpecs -------------------------------------------------------------------------------

def test_find_neuron_groups_restores_modes():
    model = tiny_mobilenet().train()
    model.blocks[0].eval()
    find_neuron_groups(model, torch.randn(2, 3, 12, 12))
    assert model.training and model.stem.training and model.blocks[1].training
    assert not model.blocks[0].training and not model.blocks[0].pw.bn.training
    model.eval()
    find_neuron_groups(model, torch.randn(2, 3, 12, 12))
    assert not any(m.training for m in model.modules())


def test_find_neuron_groups_does_not_touch_bn_statistics():
    model = tiny_mobilenet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_neuron_groups(model, torch.randn(4, 3, 12, 12) * 5 + 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layer_specs_of_cifar_mobilenet():
    model = build_model("mobilenet_v1_cifar").train()
    specs = layer_specs(model, (4, 3, 32, 32))
    assert model.training  # mode restored
    assert len(specs) == 1 + 2 * len(model.blocks) + 1
    by = {s.name: s for s in specs}
    stem = by["stem.conv"]
    assert (stem.kind, stem.in_channels, stem.out_channels, stem.kernel, stem.stride, stem.groups) == \
        ("conv", 3, 8, 3, 1, 1)
    assert (stem.height, stem.width, stem.batch, stem.padding, stem.bias) == (32, 32, 4, 1, False)
    dw = by["blocks.1.dw.conv"]  # stride 2
    assert (dw.kind, dw.in_channels, dw.out_channels, dw.groups, dw.stride, dw.height) == ("dwconv", 8, 8, 8, 2, 32)
    assert dw.out_height == 16
    pw = by["blocks.1.pw.conv"]
    assert (pw.kind, pw.in_channels, pw.out_channels, pw.kernel, pw.height, pw.batch) == ("pwconv", 8, 8, 1, 16, 4)
    assert by["blocks.3.pw.conv"].out_channels == 16
    fc = by["classifier"]
    assert (fc.kind, fc.in_channels, fc.out_channels, fc.batch, fc.bias) == ("linear", 32, 10, 4, True)
    assert (fc.height, fc.width, fc.kernel) == (1, 1, 1)
    # graph order: stem, then dw/pw of every block, then the classifier
    assert [s.name for s in specs[:3]] == ["stem.conv", "blocks.0.dw.conv", "blocks.0.pw.conv"]
    assert specs[-1].name == "classifier"


def test_layer_specs_of_mlp_and_torchvision():
    specs = layer_specs(build_model("mlp", in_features=12, widths=[7, 5], num_classes=3), (3, 12))
    assert [(s.kind, s.in_channels, s.out_channels, s.batch, s.name) for s in specs] == [
        ("linear", 12, 7, 3, "hidden.0.fc"), ("linear", 7, 5, 3, "hidden.1.fc"), ("linear", 5, 3, 3, "classifier")]
    v2 = {s.name: s for s in layer_specs(torchvision.models.mobilenet_v2(width_mult=0.5), (1, 3, 32, 32))}
    assert v2["features.0.0"].kind == "conv" and v2["features.0.0"].stride == 2
    assert v2["features.2.conv.0.0"].kind == "pwconv"
    assert v2["features.2.conv.1.0"].kind == "dwconv"
    assert v2["classifier.1"].kind == "linear"


def test_layer_specs_module_called_twice_and_non_square():
    specs = layer_specs(_SharedModule(), (1, 3, 8, 8))
    assert [s.name for s in specs] == ["a", "b", "b", "fc"]

    class NonSquare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.odd = nn.Conv2d(3, 4, (1, 3))

        def forward(self, x):
            return self.odd(x)

    with pytest.raises(ValueError, match="odd"):
        layer_specs(NonSquare(), (1, 3, 8, 8))
