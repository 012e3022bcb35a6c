"""apply_split: function preservation at step 0, the offspring at step > 0, rebuilds, bad plans."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from test_graph import _UsedTwice

from hwsplit import apply_split, architecture, build_model, find_neuron_groups, model_from_architecture
from hwsplit.splitting.estimators import SplitScore


def randomise_bn(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm running statistics and affine parameters (eval mode uses them).

    The statistics are first calibrated on 16 random inputs shaped like ``x`` (so that the eval-mode
    signal neither vanishes nor explodes through a deep net), then every mean, variance, scale and
    shift is perturbed at random. Linear layers with hwsplit's N(0, 0.01) init get O(1) weights.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.weight.std() < 0.05:
                m.weight.normal_(0.0, m.in_features ** -0.5, generator=gen)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    with torch.no_grad():
        model.train()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
        model(torch.randn((16, *x.shape[1:]), generator=gen, dtype=x.dtype))
        for m in bns:
            n = m.num_features
            m.momentum = 0.1
            m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(n, generator=gen))
            m.running_var.mul_(0.8 + 0.4 * torch.rand(n, generator=gen))
            if m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
    model.train(was_training)
    return model


def assert_input_dependent(model: nn.Module, x: torch.Tensor) -> None:
    """Guard against degenerate test models whose output does not depend on the input."""
    with torch.no_grad():
        out = model(x)
    assert (out - out.mean(0)).abs().max() > 1e-2 * out.abs().max().clamp_min(1e-3)


def random_scores(model: nn.Module, x: torch.Tensor, seed: int = 0) -> dict[str, SplitScore]:
    """A SplitScore with random unit eigenvectors for every splittable group (with ``group=`` set)."""
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for g in find_neuron_groups(model, x):
        if not g.splittable:
            continue
        w = model.get_submodule(g.producer).weight
        v = torch.randn(w.shape, generator=gen, dtype=w.dtype)
        v = v / v.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
        scores[g.name] = SplitScore(-torch.rand(w.shape[0], generator=gen, dtype=w.dtype), v, "rayleigh", g)
    return scores


def random_plan(scores: dict[str, SplitScore], seed: int = 0, fraction: float = 0.4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    plan = {}
    for name, s in scores.items():
        n = len(s)
        k = max(1, int(round(fraction * n)))
        plan[name] = torch.randperm(n, generator=gen)[:k]
    return plan


def _widths(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def _mlp(batchnorm: bool) -> nn.Module:
    return build_model("mlp", in_features=20, widths=[16, 12, 8], num_classes=5, batchnorm=batchnorm)


CASES = {
    "mobilenet_v1_cifar": (lambda: build_model("mobilenet_v1_cifar"), (3, 3, 32, 32)),
    "mobilenet_v1_imagenet": (lambda: build_model("mobilenet_v1", width_mult=0.25), (2, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(width_mult=0.5), (2, 3, 32, 32)),
    "mlp": (lambda: _mlp(False), (6, 20)),
    "mlp_bn": (lambda: _mlp(True), (6, 20)),
    "resnet18": (lambda: torchvision.models.resnet18(), (2, 3, 32, 32)),
    "used_twice": (lambda: _UsedTwice(nonlinear=False), (2, 3, 8, 8)),
}


# float32 round-off of the *unsplit* model against float64, relative to its largest logit, is
# 2-5e-6 for the MobileNetV1s and resnet18 and 5-9e-6 for torchvision's mobilenet_v2 (17 inverted
# residual blocks): splitting changes the summation order of every consumer, so the float32
# difference can only be bounded at that noise floor. The float64 test below shows it is round-off.
F32_TOLERANCE = {"mobilenet_v2": 3e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CASES))
def test_step_zero_preserves_the_function(case, dtype):
    build, shape = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = randomise_bn(build(), x).eval().to(dtype)
    x = x.to(dtype)
    assert_input_dependent(model, x)
    scores = random_scores(model, x)
    assert scores, "every case has splittable groups"
    plan = random_plan(scores)
    before_state = copy.deepcopy(model.state_dict())
    before_widths = _widths(model)

    new = apply_split(model, plan, scores, step=0.0).eval()

    # the input model is untouched
    assert _widths(model) == before_widths
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    # every producer grew by the number of its split channels
    for name, channels in plan.items():
        assert new.get_submodule(name).weight.shape[0] == model.get_submodule(name).weight.shape[0] + len(channels)
    with torch.no_grad():
        ref, out = model(x), new(x)
    # logits of unit scale: the error of a float computation is relative to its magnitude
    diff = ((out - ref).abs().max() / ref.abs().max()).item()
    tol = F32_TOLERANCE.get(case, 1e-5) if dtype == torch.float32 else 1e-12
    assert diff <= tol, f"{case}: max abs diff {diff:.3g} (logits scaled to max 1)"


def test_step_positive_offspring_and_copies():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = randomise_bn(build_model("mobilenet_v1_cifar"), x).eval()
    scores = random_scores(model, x)
    name = "blocks.3.pw.conv"  # chain: pw.bn, act, blocks.4.dw (depthwise), bn, act; consumer blocks.4.pw.conv
    channels = torch.tensor([1, 5, 11])
    step = 0.05
    new = apply_split(model, {name: channels}, scores, step=step).eval()
    n = model.get_submodule(name).out_channels
    k = len(channels)
    v = scores[name].eigenvectors

    w_old, w_new = model.get_submodule(name).weight, new.get_submodule(name).weight
    assert w_new.shape[0] == n + k
    for i, j in enumerate(channels.tolist()):
        torch.testing.assert_close(w_new[j], w_old[j] + step * v[j])
        torch.testing.assert_close(w_new[n + i], w_old[j] - step * v[j])
    untouched = [c for c in range(n) if c not in channels.tolist()]
    assert torch.equal(w_new[untouched], w_old[untouched])

    for bn_name in ("blocks.3.pw.bn", "blocks.4.dw.bn"):
        old_bn, new_bn = model.get_submodule(bn_name), new.get_submodule(bn_name)
        assert new_bn.num_features == n + k
        for attr in ("weight", "bias", "running_mean", "running_var"):
            a, b = getattr(old_bn, attr), getattr(new_bn, attr)
            assert torch.equal(b[:n], a) and torch.equal(b[n:], a[channels]), (bn_name, attr)

    old_dw, new_dw = model.blocks[4].dw.conv, new.blocks[4].dw.conv
    assert (new_dw.in_channels, new_dw.out_channels, new_dw.groups) == (n + k, n + k, n + k)
    assert torch.equal(new_dw.weight[:n], old_dw.weight) and torch.equal(new_dw.weight[n:], old_dw.weight[channels])

    old_c, new_c = model.blocks[4].pw.conv.weight, new.blocks[4].pw.conv.weight
    assert new.blocks[4].pw.conv.in_channels == n + k
    assert torch.equal(new_c[:, channels], old_c[:, channels] / 2)
    assert torch.equal(new_c[:, n:], old_c[:, channels] / 2)
    assert torch.equal(new_c[:, untouched], old_c[:, untouched])

    with torch.no_grad():
        assert (new(x) - model(x)).abs().max() > 1e-4  # step > 0 changes the function


def test_step_positive_mlp_rows_bias_and_columns():
    torch.manual_seed(1)
    x = torch.randn(6, 20)
    model = randomise_bn(_mlp(True), x).eval()
    scores = random_scores(model, x)
    name, channels, step = "hidden.1.fc", torch.tensor([0, 7]), 0.1
    new = apply_split(model, {name: channels}, scores, step=step)
    old_fc, new_fc = model.hidden[1].fc, new.hidden[1].fc
    assert new_fc.out_features == 14 and new.hidden[2].fc.in_features == 14
    v = scores[name].eigenvectors[channels]
    torch.testing.assert_close(new_fc.weight[12:], old_fc.weight[channels] - step * v)
    torch.testing.assert_close(new_fc.weight[channels], old_fc.weight[channels] + step * v)
    assert torch.equal(new_fc.bias[12:], old_fc.bias[channels])  # biases are copied, not perturbed
    assert torch.equal(new.hidden[2].fc.weight[:, 12:], model.hidden[2].fc.weight[:, channels] / 2)
    with torch.no_grad():
        assert (new(x) - model(x)).abs().max() > 1e-5


def test_offspring_are_symmetric_in_the_sign_of_v():
    """Offspring ±εv are symmetric: swapping the sign of v gives the same function up to channel order."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    model = randomise_bn(build_model("mobilenet_v1_cifar"), x).eval()
    scores = random_scores(model, x)
    plan = {"stem.conv": torch.tensor([2])}
    flipped = {k: SplitScore(s.eigenvalues, -s.eigenvectors, s.method, s.group) for k, s in scores.items()}
    a = apply_split(model, plan, scores, step=0.1).eval()
    b = apply_split(model, plan, flipped, step=0.1).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mobilenet_v1_cifar", "mlp"])
def test_grown_model_architecture_and_rebuild(family):
    torch.manual_seed(0)
    if family == "mlp":
        model, x = _mlp(True), torch.randn(6, 20)
    else:
        model, x = build_model("mobilenet_v1_cifar"), torch.randn(2, 3, 32, 32)
    model = randomise_bn(model, x).eval()
    old_arch = architecture(model)
    scores = random_scores(model, x)
    plan = random_plan(scores, fraction=0.25)
    new = apply_split(model, plan, scores, step=0.01).eval()
    arch = architecture(new)
    json.dumps(arch)
    if family == "mlp":
        for i, w in enumerate(old_arch["widths"]):
            assert arch["widths"][i] == w + len(plan[f"hidden.{i}.fc"])
    else:
        assert arch["stem_width"] == old_arch["stem_width"] + len(plan["stem.conv"])
        for i, w in enumerate(old_arch["widths"]):
            assert arch["widths"][i] == w + len(plan[f"blocks.{i}.pw.conv"])
        assert arch["strides"] == old_arch["strides"]
    assert architecture(model) == old_arch
    rebuilt = model_from_architecture(json.loads(json.dumps(arch)), new.state_dict()).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), new(x))


def test_backward_and_training_step_on_the_new_model():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    model = randomise_bn(build_model("mobilenet_v1_cifar"), x).eval()
    scores = random_scores(model, x)
    new = apply_split(model, random_plan(scores), scores, step=0.01).train()
    opt = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9)
    before = {n: p.detach().clone() for n, p in new.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(new(x), y)
        loss.backward()
        for n, p in new.named_parameters():
            assert p.grad is not None and p.grad.shape == p.shape, n
        opt.step()
    assert torch.isfinite(loss)
    assert all(p.is_leaf and p.requires_grad for p in new.parameters())
    assert not torch.equal(before["stem.conv.weight"], new.stem.conv.weight)
    # BN running statistics of grown layers update in training mode
    assert new.stem.bn.running_mean.shape == (new.stem.conv.out_channels,)


class _NoBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.tanh(self.a(x)), 1))


def test_linear_consumer_behind_flatten_gets_hw_columns_halved():
    torch.manual_seed(0)
    model = _NoBias().eval()
    x = torch.randn(2, 3, 8, 8)
    scores = random_scores(model, x)
    assert [(c.name, c.columns) for c in scores["a"].group.consumers] == [("fc", 64)]
    new = apply_split(model, {"a": torch.tensor([1, 3])}, scores, step=0.0)
    assert new.fc.in_features == 6 * 64
    with torch.no_grad():
        assert (new(x) - model(x)).abs().max() <= 1e-5


def test_bad_plans_name_the_group():
    torch.manual_seed(0)
    model = build_model("mobilenet_v1_cifar").eval()
    x = torch.randn(2, 3, 32, 32)
    scores = random_scores(model, x)
    name = "blocks.0.pw.conv"  # 8 channels
    with pytest.raises(ValueError, match=r"blocks\.0\.pw\.conv.*outside 0\.\.7"):
        apply_split(model, {name: torch.tensor([8])}, scores)
    with pytest.raises(ValueError, match=r"blocks\.0\.pw\.conv.*outside"):
        apply_split(model, {name: torch.tensor([-1])}, scores)
    with pytest.raises(ValueError, match=r"blocks\.0\.pw\.conv.*twice"):
        apply_split(model, {name: torch.tensor([2, 2])}, scores)
    # a group that is not splittable (the classifier: model output)
    fc_group = {g.name: g for g in find_neuron_groups(model, x)}["classifier"]
    bad = dict(scores, classifier=SplitScore(torch.zeros(10), torch.zeros(10, 32), group=fc_group))
    with pytest.raises(ValueError, match=r"classifier.*not splittable.*output"):
        apply_split(model, {"classifier": torch.tensor([0])}, bad)
    # eigenvectors that do not match the producer's weight
    wrong = dict(scores)
    s = scores[name]
    wrong[name] = SplitScore(s.eigenvalues, s.eigenvectors[:, :4], s.method, s.group)
    with pytest.raises(ValueError, match=r"blocks\.0\.pw\.conv.*eigenvectors have shape"):
        apply_split(model, {name: torch.tensor([0])}, wrong)
    # no score, no group, negative step
    with pytest.raises(ValueError, match=r"'nope' has no score"):
        apply_split(model, {"nope": torch.tensor([0])}, scores)
    groupless = dict(scores)
    groupless[name] = SplitScore(s.eigenvalues, s.eigenvectors)
    with pytest.raises(ValueError, match=r"blocks\.0\.pw\.conv.*no neuron group"):
        apply_split(model, {name: torch.tensor([0])}, groupless)
    with pytest.raises(ValueError, match="step"):
        apply_split(model, {name: torch.tensor([0])}, scores, step=-1.0)
    # an empty plan is a copy
    same = apply_split(model, {name: torch.tensor([], dtype=torch.long)}, scores)
    assert same is not model and _widths(same) == _widths(model)
