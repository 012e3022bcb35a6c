"""Grow torchvision's MobileNetV2 inside a plain PyTorch training loop (hwsplit.Grower).

    python examples/grow_your_own_loop.py --data path/to/images       # an ImageFolder: train/ and val/ class folders
    python examples/grow_your_own_loop.py --npz data/cifar10  # train.npz / test.npz (x uint8 NxHxWxC, y)

The loop below is an ordinary one — your data, your augmentation, your optimizer and schedule. Between
rounds of training, ``grower.step(model, loader)`` scores every neuron on the training loader, prices
it in MACs, picks the neurons whose splitting lowers the loss most within half the network's MACs,
and returns a wider model computing the same function; ``grower.carry_optimizer`` moves the optimizer
(and its momentum) over to it. ``--logdir`` writes what each step did to TensorBoard.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets, transforms

from hwsplit import Grower
from hwsplit.run.tblog import write_step


def make_loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, int]:
    """Training and validation loaders, and the number of classes."""
    if args.npz:
        def tensors(name: str) -> TensorDataset:
            data = np.load(Path(args.npz) / name)
            x = torch.from_numpy(data["x"][: args.limit]).permute(0, 3, 1, 2).float().div(255)
            x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
            return TensorDataset(x, torch.from_numpy(data["y"][: args.limit]).long())

        train, val = tensors("train.npz"), tensors("test.npz")
        classes = int(train.tensors[1].max()) + 1
    else:
        normalize = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        size = args.image_size
        train = datasets.ImageFolder(Path(args.data) / "train", transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.5, 1.0)), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), normalize]))
        val = datasets.ImageFolder(Path(args.data) / "val", transforms.Compose([
            transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(), normalize]))
        classes = len(train.classes)
    return (DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=False),
            DataLoader(val, batch_size=args.batch_size), classes)


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> float:
    model.train()
    total, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total, n = total + loss.item() * len(y), n + len(y)
    return total / n


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    hits = sum(int((model(x.to(device)).argmax(1) == y.to(device)).sum()) for x, y in loader)
    return hits / len(loader.dataset)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="ImageFolder root holding train/ and val/")
    source.add_argument("--npz", help="directory holding train.npz and test.npz")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images of each npz split")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width-mult", type=float, default=0.35)
    parser.add_argument("--rounds", type=int, default=3, help="growth steps")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs before each growth step")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--logdir", default=None, help="TensorBoard directory for the growth steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_loader, val_loader, classes = make_loaders(args)
    model = torchvision.models.mobilenet_v2(width_mult=args.width_mult, num_classes=classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    example = next(iter(train_loader))[0][:1]

    grower = Grower(model, example, cost="flops", growth_ratio=0.5, seed=args.seed)
    writer = None
    if args.logdir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.logdir)
    for round_ in range(args.rounds + 1):
        for epoch in range(args.epochs):
            loss = train_one_epoch(model, train_loader, optimizer, device)
            print(f"round {round_} epoch {epoch}: train loss {loss:.4f}")
        print(f"round {round_}: val top-1 {accuracy(model, val_loader, device):.4f}")
        if round_ == args.rounds:
            break
        old, model = model, grower.step(model, train_loader)
        if grower.stopped and model is old:
            print(f"stopped: {grower.stop_reason}")
            break
        grower.carry_optimizer(optimizer, old, model)
        record = grower.records[-1]
        print(f"grew: {record['neurons_split']} neurons split, {record['cost_before'] / 1e6:.3g}M -> "
              f"{record['cost_after'] / 1e6:.3g}M MACs")
        if writer is not None:
            write_step(writer, record, grower.last_step.scores, round_ + 1)  # widths, λ histograms
    if writer is not None:
        writer.close()
    return grower.records


if __name__ == "__main__":
    main()
