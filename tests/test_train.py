"""Training and evaluation: learning, determinism, configuration, metrics and failure modes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from hwsplit.infra.distributed import reduce_sum
from hwsplit.training.bundle import TensorImageDataset
from hwsplit.training.data import load_dataset
from hwsplit.training.loaders import TensorBatchLoader, make_loaders
from hwsplit.training.train import (
    TrainConfig,
    evaluate,
    make_optimizer,
    make_scheduler,
    seed_everything,
    train,
)


def _digits_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.SiLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(32, 10),
    )




@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_tiny_model_learns_digits(digits):
    seed_everything(0)
    model = _digits_model()
    train_loader, test_loader = make_loaders(digits, batch_size=32, seed=0)
    calls = []

    def progress(iterable, desc, total):
        calls.append((desc, total))
        return iterable

    result = train(model, train_loader, config=TrainConfig(epochs=3, lr=0.1), progress=progress)
    assert set(result) == {"loss", "top1", "epochs", "seconds", "resumed_epochs"}
    assert len(result["epochs"]) == 3 and result["seconds"] > 0
    assert result["epochs"][-1]["loss"] < result["epochs"][0]["loss"]
    assert calls == [(f"train {e}", len(train_loader)) for e in range(3)]
    assert result["epochs"][-1]["samples"] == len(digits.train)
    metrics = evaluate(model, test_loader)
    assert metrics["top1"] > 0.8, metrics
    assert metrics["samples"] == len(digits.test)
    assert metrics["top5"] >= metrics["top1"]
    assert 0 < metrics["loss"] < math.log(10)


def _train_once(ds, seed: int) -> dict[str, torch.Tensor]:
    seed_everything(seed)
    model = _digits_model()
    loader = TensorBatchLoader(ds, 64, shuffle=True, seed=seed)
    train(model, loader, config=TrainConfig(epochs=2, lr=0.05, label_smoothing=0.1))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_deterministic_on_cpu(digits):
    # Augmentation on, so the crop/flip stream is covered too; dropout draws from the seeded global RNG.
    ds = TensorImageDataset(
        digits.train.images[:400],
        digits.train.labels[:400],
        mean=digits.mean,
        std=digits.std,
        augment=True,
        pad=1,
    )
    a, b = _train_once(ds, 0), _train_once(ds, 0)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = _train_once(ds, 1)
    assert not torch.equal(a["0.weight"], c["0.weight"])


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("epochs", 2.5),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("schedule", "linear"),
        ("step_size", 0),
        ("gamma", 0.0),
        ("gamma", 1.5),
        ("label_smoothing", 1.0),
        ("amp", "yes"),
        ("channels_last", 1.5),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_config_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="nesterov"):
        TrainConfig(momentum=0.0)
    TrainConfig(momentum=0.0, nesterov=False)


def test_amp_needs_cuda():
    model = nn.Linear(4, 2)
    loader = [(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(ValueError, match="amp"):
        train(model, loader, config=TrainConfig(epochs=1, amp=True))
    with pytest.raises(ValueError, match="amp"):
        evaluate(model, loader, amp=True)


def test_weight_decay_skips_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    opt = make_optimizer(model, TrainConfig(weight_decay=1e-3))
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_decay[1e-3] == {id(model[0].weight), id(model[3].weight)}
    assert by_decay[0.0] == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[3].bias)}
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def _lrs(schedule: str, epochs=4, steps=5, **kw) -> list[float]:
    model = nn.Linear(2, 2)
    config = TrainConfig(epochs=epochs, lr=1.0, schedule=schedule, **kw)
    opt = make_optimizer(model, config)
    sched = make_scheduler(opt, config, steps)
    out = []
    for _ in range(epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_are_per_step():
    cos = _lrs("cosine")
    assert cos[0] == 1.0 and all(a > b for a, b in itertools.pairwise(cos)) and cos[-1] < 0.01
    step = _lrs("step", step_size=2, gamma=0.5)
    assert step[:10] == [1.0] * 10 and step[10:] == [0.5] * 10
    assert _lrs("constant") == [1.0] * 20


def test_evaluate_metrics_and_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Dropout(0.5))
    x = torch.randn(30, 3, 2, 2)
    y = torch.arange(30) % 3
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    model.train()
    m = evaluate(model, loader)
    assert model.training
    assert m["top5"] == 1.0  # k = min(5, 3 classes): every label is in the top 3
    assert 0 <= m["top1"] <= m["top5"] and m["samples"] == 30
    with torch.no_grad():
        model.eval()
        logits = model(x)
    assert m["top1"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert m["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    m2 = evaluate(model, loader)
    assert not model.training and m2 == m  # eval mode kept; dropout off, so deterministic


def test_top5_at_least_top1_many_classes():
    torch.manual_seed(1)
    model = nn.Linear(8, 20)
    loader = [(torch.randn(64, 8), torch.randint(0, 20, (64,)))]
    m = evaluate(model, loader)
    assert m["top5"] >= m["top1"] and m["top5"] > 0


def test_train_restores_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    loader = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    model.eval()
    train(model, loader, config=TrainConfig(epochs=1))
    assert not model.training


def test_nonfinite_loss_raises():
    model = nn.Linear(4, 2)
    good = (torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))
    bad = (torch.full((4, 4), float("nan")), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(FloatingPointError, match=r"epoch 0, batch 1"):
        train(model, [good, bad], config=TrainConfig(epochs=1))


def test_reduce_sum_single_process():
    out = reduce_sum(torch.tensor(2.5), 3, torch.tensor(4, dtype=torch.int64))
    assert out == [2.5, 3.0, 4.0] and all(isinstance(v, float) for v in out)
    assert reduce_sum() == []


def test_custom_loss_fn_and_label_smoothing(digits):
    seed_everything(0)
    model = _digits_model()
    loader, _ = make_loaders(load_dataset("digits", limit=128), batch_size=32)
    seen = []

    def loss_fn(logits, y):
        seen.append(logits.shape)
        return nn.functional.cross_entropy(logits, y)

    train(model, loader, config=TrainConfig(epochs=1), loss_fn=loss_fn)
    assert seen and seen[0] == (32, 10)


def _state_copy(state):
    return {k: v.clone() for k, v in state.items()}


def test_training_resumed_from_an_epoch_state_equals_an_uninterrupted_one(digits):
    """``on_epoch`` hands out the state after each epoch; ``resume`` continues from it to the same weights."""
    config = TrainConfig(epochs=3, lr=0.1)
    seed_everything(0)
    model = _digits_model()
    init = _state_copy(model.state_dict())
    loader, _ = make_loaders(digits, batch_size=64, seed=0)
    saved = {}

    def keep(stats, state):
        if stats["epoch"] == 0:
            saved.update(state())

    full = train(model, loader, config=config, on_epoch=keep)
    assert saved["epochs_done"] == 1
    again = _digits_model()
    again.load_state_dict(init)  # any weights: the state replaces them
    loader2, _ = make_loaders(digits, batch_size=64, seed=0)
    loader2.set_epoch(1)  # the loader continues where the state left off
    resumed = train(again, loader2, config=config, resume=saved)
    assert resumed["resumed_epochs"] == 1 and len(resumed["epochs"]) == 3
    assert resumed["epochs"][0] == full["epochs"][0]  # the first epoch's stats come from the state
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_resume_state_that_does_not_fit_is_a_value_error(digits):
    config = TrainConfig(epochs=2, lr=0.1)
    loader, _ = make_loaders(digits, batch_size=64, seed=0)
    with pytest.raises(ValueError, match="epochs_done"):
        train(_digits_model(), loader, config=config, resume={"epochs_done": 5})
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    state = {"epochs_done": 1, "model": other.state_dict()}
    with pytest.raises(ValueError, match="do not fit"):
        train(_digits_model(), loader, config=config, resume=state)


def test_cpu_training_uses_channels_last_for_conv_nets_and_restores_the_format(digits):
    """Channels-last is the CPU default for networks with Conv2d (faster there, BENCHMARKS.md issue 25); the
    weights come back in the contiguous format, and the accuracy matches a channels-first training."""
    loader, test_loader = make_loaders(digits, batch_size=64, seed=0)
    results = {}
    for flag in (None, False):
        seed_everything(0)
        model = _digits_model()
        seen = []
        conv = [m for m in model if isinstance(m, nn.Conv2d)][-1]  # 16 -> 32 channels: the formats differ
        conv.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(not m.weight.is_contiguous()))
        train(model, loader, config=TrainConfig(epochs=4, lr=0.1, channels_last=flag))
        assert all(p.is_contiguous() for p in model.parameters())
        assert seen and all(seen) == (flag is None)
        results[flag] = evaluate(model, test_loader)["top1"]
    # same seed, same data order: only the kernels' summation order differs
    assert abs(results[None] - results[False]) <= 0.03, results
