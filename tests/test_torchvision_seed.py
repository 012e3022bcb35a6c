"""Seeds from torchvision: torchvision's own MobileNetV2 grows its expansion layers and stays a MobileNetV2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from cli import main
from hwsplit import apply_split, architecture, build_model, find_neuron_groups, model_from_architecture
from hwsplit.network.checkpoint import load_checkpoint, load_model
from hwsplit.network.resize import resize_groups
from hwsplit.splitting.estimators import SplitScore
from hwsplit.training.data import load_dataset
from hwsplit.training.loaders import make_loaders

TV = "torchvision:mobilenet_v2"


def _random_split(model: torch.nn.Module, names: list[str], per_group: int = 3, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    groups = {g.name: g for g in find_neuron_groups(model, torch.zeros(1, 3, 32, 32))}
    scores = {}
    for n in names:
        w = model.get_submodule(n).weight
        scores[n] = SplitScore(-torch.rand(w.shape[0], generator=gen),
                               torch.nn.functional.normalize(torch.randn(w.shape, generator=gen).flatten(1), dim=1)
                               .reshape(w.shape), group=groups[n])
    plan = {n: torch.arange(per_group) for n in names}
    return apply_split(model, plan, scores, step=0.05)


def test_architecture_rebuilds_a_grown_torchvision_model():
    torch.manual_seed(0)
    model = build_model(TV, width_mult=0.25, num_classes=4)
    grown = _random_split(model, ["features.4.conv.0.0", "features.2.conv.0.0", "features.18.0"]).eval()
    assert isinstance(grown, torchvision.models.MobileNetV2)
    arch = architecture(grown)
    assert arch["family"] == TV and arch["width_mult"] == 0.25 and arch["num_classes"] == 4
    base = architecture(model)["widths"]
    assert {k for k in arch["widths"] if arch["widths"][k] != base[k]} == {"features.4.conv.0.0",
                                                                           "features.2.conv.0.0", "features.18.0"}
    rebuilt = model_from_architecture(json.loads(json.dumps(arch)), grown.state_dict()).eval()
    assert isinstance(rebuilt, torchvision.models.MobileNetV2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), grown(x), rtol=0, atol=0)


def test_resize_groups_appends_placeholder_channels_without_changing_the_function():
    torch.manual_seed(0)
    model = build_model(TV, width_mult=0.25, num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    groups = find_neuron_groups(model, x[:1])
    resize_groups(model, {"features.3.conv.0.0": 60, "features.18.0": 1290}, groups)
    assert model.features[3].conv[0][0].out_channels == 60 and model.features[3].conv[1][0].groups == 60
    assert model.classifier[1].in_features == 1290
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    with pytest.raises(ValueError, match=r"^widths\['features.3.conv.2'\]: cannot change .*residual add"):
        resize_groups(model, {"features.3.conv.2": 99}, groups)
    with pytest.raises(ValueError, match=r"^widths\['features.3.conv.0.0'\]: 10 is smaller"):
        resize_groups(model, {"features.3.conv.0.0": 10}, find_neuron_groups(model, x[:1]))
    with pytest.raises(ValueError, match=r"^widths\['nope'\]"):
        resize_groups(model, {"nope": 3}, groups)


def test_bad_architectures_and_options_are_value_errors():
    arch = architecture(build_model(TV, width_mult=0.25, num_classes=4))
    with pytest.raises(ValueError, match=r"^widths\['features.2.conv.2'\]: cannot change"):
        model_from_architecture({**arch, "widths": {**arch["widths"], "features.2.conv.2": 64}})
    with pytest.raises(ValueError, match=r"^widths\['features.99'\]: no dense convolution"):
        model_from_architecture({**arch, "widths": {"features.99": 3}})
    with pytest.raises(ValueError, match=r"^widths: expected"):
        model_from_architecture({**arch, "widths": [8, 16]})
    with pytest.raises(ValueError, match="^state_dict: does not fit"):
        model_from_architecture(arch, build_model(TV, width_mult=0.5, num_classes=4).state_dict())
    with pytest.raises(ValueError, match="does not take the option 'activation'"):
        build_model(TV, activation="silu")
    with pytest.raises(ValueError, match="^model: a torchvision MobileNetV2 must be built with build_model"):
        architecture(torchvision.models.mobilenet_v2(num_classes=3))


def test_one_channel_images_get_a_one_channel_stem():
    bundle = load_dataset("digits", limit=50)
    from hwsplit.run.config import GrowConfig
    from hwsplit.run.session import build_seed

    model = build_seed(GrowConfig(model=TV, model_options={"width_mult": 0.25}), bundle)
    assert isinstance(model, torchvision.models.MobileNetV2) and model.features[0][0].in_channels == 1
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert architecture(model)["in_channels"] == 1


@pytest.fixture(scope="module")
def rgb32(tmp_path_factory) -> Path:
    """A tiny 32×32 RGB npz data set whose classes differ in colour."""
    root = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 60)):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
        for c in range(4):
            x[y == c, :, :, c % 3] += 120
        np.savez(root / f"{split}.npz", x=x, y=y)
    return root


def test_grow_a_torchvision_mobilenet_v2(tmp_path, rgb32):
    out = tmp_path / "tv"
    result = CliRunner().invoke(main, ["grow", "--model", TV, "--width-mult", "0.25", "--dataset", "npz",
                                       "--data-dir", str(rgb32), "--stages", "1", "--epochs", "1",
                                       "--batch-size", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1] and records[1]["neurons_split"] > 0
    grown = load_model(out / "stage-1.pt")
    assert isinstance(grown, torchvision.models.MobileNetV2)
    assert architecture(grown) == records[1]["architecture"]
    split = records[1]["split"]
    assert split and all(not k.endswith(".conv.2") for k in split)  # projections are tied by residual adds
    assert any(".conv.0.0" in k for k in split)  # expansion layers grew
    widths0, widths1 = records[0]["architecture"]["widths"], records[1]["architecture"]["widths"]
    for name, n in split.items():
        assert widths1[name] == widths0[name] + n
    # the checkpoint rebuilds the trained model: same outputs, and the accuracy recorded for it
    payload = load_checkpoint(out / "stage-1.pt")
    again = model_from_architecture(payload["architecture"], payload["state_dict"]).eval()
    bundle = load_dataset("npz", data_dir=str(rgb32))
    _, test = make_loaders(bundle, batch_size=64)
    correct = 0
    with torch.no_grad():
        for x, y in test:
            torch.testing.assert_close(grown(x), again(x), rtol=0, atol=0)
            correct += int((grown(x).argmax(1) == y).sum())
    assert correct / len(bundle.test) == pytest.approx(records[1]["test_top1"])
