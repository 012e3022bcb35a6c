"""Model families as data: validation, named configs, stems, rebuilds from architecture dicts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from hwsplit import architecture, build_model, model_from_architecture
from hwsplit.network.models import MLPSpec, MobileNetV1Spec, available_models


def _blocks(model):
    return [(b.pw.conv.out_channels, b.dw.conv.stride[0]) for b in model.blocks]


# -- validation: a ValueError that names the field -------------------------------------------------------

@pytest.mark.parametrize("field, kwargs", [
    ("widths", dict(widths=[8, 16], strides=[1])),
    ("strides", dict(widths=[8, 16], strides=[1, 3])),
    ("widths", dict(widths=[8, 0], strides=[1, 2])),
    ("widths", dict(widths=[8, -4], strides=[1, 2])),
    ("stem_width", dict(stem_width=0)),
    ("stem_stride", dict(stem_stride=4)),
    ("activation", dict(activation="swishy")),
    ("num_classes", dict(num_classes=0)),
    ("dropout", dict(dropout=1.0)),
    ("width_mult", dict(width_mult=0.0)),
    ("resolution", dict(resolution=0)),
    ("config", dict(config="huge")),
])
def test_mobilenet_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"^{field}(\[\d+\])?:"):
        build_model("mobilenet_v1", **kwargs)


def test_bad_widths_name_the_index():
    with pytest.raises(ValueError, match=r"^widths\[1\]: expected a positive integer, got 0"):
        build_model("mobilenet_v1_cifar", widths=[8, 0], strides=[1, 2])
    with pytest.raises(ValueError, match=r"^strides\[0\]: expected 1 or 2, got 3"):
        MobileNetV1Spec(stem_width=8, widths=(8,), strides=(3,))
    with pytest.raises(ValueError, match=r"^widths: 2 widths for 1 strides"):
        MobileNetV1Spec(stem_width=8, widths=(8, 8), strides=(1,))


@pytest.mark.parametrize("field, kwargs", [
    ("in_features", dict(in_features=0)),
    ("widths", dict(widths=[])),
    ("widths", dict(widths=[4, 0])),
    ("activation", dict(activation="nope")),
    ("num_classes", dict(num_classes=-1)),
])
def test_mlp_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"^{field}(\[\d+\])?:"):
        build_model("mlp", **kwargs)


def test_unknown_model_name_and_family():
    with pytest.raises(ValueError, match=r"^model: unknown name 'vgg'; available: .*mobilenet_v1"):
        build_model("vgg")
    assert {"mlp", "mobilenet_v1", "mobilenet_v1_cifar"} <= set(available_models())
    with pytest.raises(ValueError, match=r"^family: unknown model family 'vgg'"):
        model_from_architecture({"family": "vgg"})
    arch = architecture(build_model("mlp"))
    with pytest.raises(ValueError, match="architecture"):
        model_from_architecture({**arch, "depth": 3})
    with pytest.raises(ValueError, match=r"^model: Linear is not an hwsplit model family"):
        architecture(nn.Linear(2, 2))


# -- named configs -----------------------------------------------------------------------------------------

def test_cifar_seed_config_is_the_papers():
    # arXiv:1910.03103 §5: 8, 8, 8/s2, 8, 16/s2, 16, 24/s2, 24 ×5, 32/s2, 32 — the stem, then 13 blocks
    model = build_model("mobilenet_v1_cifar")
    assert model.stem.conv.out_channels == 8
    assert _blocks(model) == [(8, 1), (8, 2), (8, 1), (16, 2), (16, 1), (24, 2)] + [(24, 1)] * 5 + [(32, 2), (32, 1)]
    assert len(model.blocks) == 13
    assert model.stem.conv.stride == (1, 1)
    assert model.classifier.out_features == 10 and model.classifier.in_features == 32
    assert isinstance(model.stem.act, nn.SiLU)
    assert all(isinstance(b.dw.act, nn.SiLU) and isinstance(b.pw.act, nn.SiLU) for b in model.blocks)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_standard_config_is_mobilenet_v1():
    model = build_model("mobilenet_v1")
    assert model.stem.conv.out_channels == 32
    assert _blocks(model) == [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [
        (1024, 2), (1024, 1)]
    assert model.stem.conv.stride == (2, 2)  # 224: ImageNet stem
    assert isinstance(model.stem.act, nn.ReLU)
    assert model.classifier.out_features == 1000


@pytest.mark.parametrize("resolution, stride", [(32, 1), (56, 1), (64, 2), (224, 2)])
def test_stem_stride_follows_the_resolution(resolution, stride):
    model = build_model("mobilenet_v1", width_mult=0.25, resolution=resolution)
    assert model.stem.conv.stride == (stride, stride)
    assert build_model("mobilenet_v1", resolution=resolution, stem_stride=1).stem.conv.stride == (1, 1)


def test_width_mult_scales_every_width():
    half = build_model("mobilenet_v1", width_mult=0.5)
    assert half.stem.conv.out_channels == 16
    assert [w for w, _ in _blocks(half)] == [32, 64, 64, 128, 128, 256] + [256] * 5 + [512, 512]
    assert build_model("mobilenet_v1", width_mult=0.75).stem.conv.out_channels == 24
    seed4 = build_model("mobilenet_v1_cifar", width_mult=4)
    assert seed4.stem.conv.out_channels == 32 and _blocks(seed4)[-1] == (128, 1)
    tiny = build_model("mobilenet_v1_cifar", width_mult=0.01)
    assert min(w for w, _ in _blocks(tiny)) == 1  # never zero channels


def test_explicit_widths_override_the_config():
    k = 4
    seed = [8, 8, 8, 16, 16, 24, 24, 24, 24, 24, 24, 32, 32]
    model = build_model("mobilenet_v1_cifar", stem_width=8 * k, widths=[w * k for w in seed])
    assert model.stem.conv.out_channels == 32
    assert [w for w, _ in _blocks(model)] == [w * k for w in seed]
    assert [s for _, s in _blocks(model)] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]


def test_activation_override():
    model = build_model("mobilenet_v1_cifar", activation="relu6")
    assert isinstance(model.blocks[0].dw.act, nn.ReLU6)
    assert isinstance(build_model("mobilenet_v1", activation="silu").stem.act, nn.SiLU)
    mlp = build_model("mlp", activation="tanh", batchnorm=True)
    assert isinstance(mlp.hidden[0].act, nn.Tanh) and isinstance(mlp.hidden[0].bn, nn.BatchNorm1d)


# -- architecture dicts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options, shape", [
    ("mobilenet_v1_cifar", {}, (2, 3, 32, 32)),
    ("mobilenet_v1", dict(width_mult=0.25, num_classes=7, dropout=0.2), (2, 3, 64, 64)),
    ("mlp", dict(in_features=12, widths=[9, 6], num_classes=4, batchnorm=True, activation="gelu"), (3, 12)),
])
def test_rebuild_from_architecture_gives_the_same_outputs(name, options, shape):
    torch.manual_seed(0)
    model = build_model(name, **options)
    x = torch.randn(shape)
    model.train()
    with torch.no_grad():  # move BN running statistics away from their defaults
        model(x)
    model.eval()
    arch = architecture(model)
    text = json.dumps(arch)  # JSON-serialisable
    assert arch["family"] == ("mlp" if name == "mlp" else "mobilenet_v1")
    torch.manual_seed(123)  # a different init: everything must come from the state dict
    rebuilt = model_from_architecture(json.loads(text), model.state_dict()).eval()
    assert architecture(rebuilt) == arch
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    # without a state dict: same shapes, fresh weights
    fresh = model_from_architecture(arch)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_architecture_contents():
    arch = architecture(build_model("mobilenet_v1_cifar"))
    assert arch == {"family": "mobilenet_v1", "stem_width": 8,
                    "widths": [8, 8, 8, 16, 16, 24, 24, 24, 24, 24, 24, 32, 32],
                    "strides": [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1], "stem_stride": 1, "num_classes": 10,
                    "in_channels": 3, "activation": "silu", "dropout": 0.0}
    assert MLPSpec(in_features=3, widths=(2,)).to_dict()["family"] == "mlp"
