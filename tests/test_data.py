"""Data sets and loaders: formats, validation, normalisation, batch order and augmentation."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hwsplit.training.bundle import DataBundle, DataError, TensorImageDataset
from hwsplit.training.data import available_datasets, load_dataset
from hwsplit.training.loaders import TensorBatchLoader, epoch_batches, make_loaders

REAL_CIFAR = Path("../shared/data/cifar10")




def _collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _raw(ds: TensorImageDataset) -> torch.Tensor:
    """The dataset's normalised inputs mapped back to 0..1 intensities."""
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    return x * std + mean


# ------------------------------------------------------------------------------------------------ digits


def test_available_datasets():
    assert set(available_datasets()) == {"digits", "cifar10", "cifar100", "npz", "imagefolder"}


def test_digits_bundle_shapes_and_stratification():
    b = load_dataset("digits")
    assert isinstance(b, DataBundle)
    assert b.name == "digits" and b.num_classes == 10 and b.input_shape == (1, 8, 8)
    assert len(b.train) == 1347 and len(b.test) == 450
    x, y = b.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    # Stratified: every class has ~25% of its samples in the test split.
    tr = Counter(b.train.labels.tolist())
    te = Counter(b.test.labels.tolist())
    for c in range(10):
        frac = te[c] / (tr[c] + te[c])
        assert abs(frac - 0.25) < 0.02, (c, frac)
    # Normalisation is computed from the training images: normalised training inputs are standardised.
    xs = torch.stack([b.train[i][0] for i in range(len(b.train))])
    assert abs(xs.mean().item()) < 1e-4 and abs(xs.std(unbiased=False).item() - 1) < 1e-3
    raw = _raw(b.train)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert b.train.augment is False  # flips would change what a digit is


def test_digits_split_depends_on_seed_and_limit():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert not torch.equal(a.train.labels, b.train.labels)
    c = load_dataset("digits", seed=0, limit=100)
    assert len(c.train) == 100 and len(c.test) == 20
    assert torch.equal(c.train.labels, a.train.labels[:100])
    assert len(load_dataset("digits", limit=3).test) == 1


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="name"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", limit=0)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=32)
    b = load_dataset("digits", limit=50)
    with pytest.raises(ValueError, match="batch_size"):
        make_loaders(b, batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        make_loaders(b, batch_size=8, rank=2, world_size=2)


# ------------------------------------------------------------------------------------------------ npz


def _write_npz(root: Path, n_train=40, n_test=12, hw=8, c=3, classes=4, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": {
            "x": rng.integers(0, 256, (n_train, hw, hw, c), dtype=np.uint8),
            "y": np.arange(n_train) % classes,
        },
        "test": {
            "x": rng.integers(0, 256, (n_test, hw, hw, c), dtype=np.uint8),
            "y": np.arange(n_test) % classes,
        },
    }
    for split, arrays in splits.items():
        arrays.update(overrides.get(split, {}))
        arrays = {k: v for k, v in arrays.items() if v is not None}
        np.savez(root / f"{split}.npz", **arrays)
    return splits


def test_npz_valid(tmp_path):
    arrays = _write_npz(tmp_path, classes=4)
    b = load_dataset("npz", data_dir=tmp_path)
    assert b.num_classes == 4 and b.input_shape == (3, 8, 8)
    assert len(b.train) == 40 and len(b.test) == 12
    x = arrays["train"]["x"].astype(np.float64) / 255
    np.testing.assert_allclose(b.mean, x.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(b.std, x.std(axis=(0, 1, 2)), atol=1e-6)
    # Pixels survive the NHWC -> NCHW conversion and normalisation.
    np.testing.assert_allclose(
        _raw(b.test).numpy(), arrays["test"]["x"].transpose(0, 3, 1, 2) / 255, atol=1e-5
    )
    assert b.train.augment and not b.test.augment
    assert not load_dataset("npz", data_dir=tmp_path, augment=False).train.augment
    lim = load_dataset("npz", data_dir=tmp_path, limit=10)
    assert len(lim.train) == 10 and len(lim.test) == 2


def test_npz_label_names_and_grayscale(tmp_path):
    names = np.array(["a", "b", "c", "d", "e", "f"])
    _write_npz(tmp_path, c=1, classes=2, train={"label_names": names})
    b = load_dataset("npz", data_dir=tmp_path)
    assert b.num_classes == 6 and b.class_names == list(names)
    g = tmp_path / "gray"
    _write_npz(g, train={"x": np.zeros((40, 8, 8), np.uint8) + 7}, test={"x": np.zeros((12, 8, 8), np.uint8)})
    b = load_dataset("npz", data_dir=g)
    assert b.input_shape == (1, 8, 8) and b.std == (1.0,)  # constant channel: left unscaled


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"test": {"x": None}}, "'x'"),
        ({"train": {"y": None}}, "'y'"),
        ({"train": {"x": np.zeros((40, 8, 8, 3), np.float32)}}, "uint8"),
        ({"train": {"x": np.zeros((40, 192), np.uint8)}}, "(N, H, W, C)"),
        ({"train": {"y": np.zeros(39, np.int64)}}, "labels"),
        ({"train": {"y": np.zeros(40, np.float32)}}, "integer"),
        ({"test": {"x": np.zeros((12, 9, 9, 3), np.uint8)}}, "same"),
        ({"test": {"y": np.full(12, 7)}}, "labels outside"),
    ],
)
def test_npz_malformed(tmp_path, overrides, fragment):
    _write_npz(tmp_path, **overrides)
    with pytest.raises(DataError) as info:
        load_dataset("npz", data_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and fragment in msg
    assert "\n" not in msg


def test_npz_missing_files(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("npz", data_dir=tmp_path / "nope")
    with pytest.raises(DataError, match="no data directory"):
        load_dataset("npz")
    _write_npz(tmp_path)
    (tmp_path / "test.npz").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("npz", data_dir=tmp_path)
    assert str(tmp_path / "test.npz") in str(info.value)
    (tmp_path / "test.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="npz"):
        load_dataset("npz", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ cifar


def _write_cifar10(root: Path, per_batch=6, str_keys=False):
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def key(k):
        return k if str_keys else k.encode()

    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({key("data"): data, key("labels"): labels, key("batch_label"): name}, f, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({key("label_names"): [n.encode() for n in names]}, f)
    return batches, names


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar10_pickled_batches(tmp_path, str_keys):
    batches, names = _write_cifar10(tmp_path, str_keys=str_keys)
    b = load_dataset("cifar10", data_dir=tmp_path)
    assert b.num_classes == 10 and b.input_shape == (3, 32, 32) and b.class_names == names
    assert len(b.train) == 30 and len(b.test) == 6
    train_data = np.concatenate([batches[f"data_batch_{j}"][0] for j in range(1, 6)])
    train_labels = [label for j in range(1, 6) for label in batches[f"data_batch_{j}"][1]]
    assert b.train.labels.tolist() == train_labels
    # Rows are channel-major (R plane, G plane, B plane), as in the CIFAR format.
    np.testing.assert_allclose(_raw(b.train).reshape(30, 3072).numpy(), train_data / 255, atol=1e-5)
    assert b.train.augment
    lim = load_dataset("cifar10", data_dir=tmp_path, limit=7)
    assert len(lim.train) == 7 and len(lim.test) == 1


def test_cifar100_format(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 20), ("test", 5)):
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "fine_labels": list(range(n)),
                    "coarse_labels": [0] * n,
                },
                f,
            )
    b = load_dataset("cifar100", data_dir=tmp_path)
    assert b.num_classes == 100 and len(b.train) == 20 and len(b.test) == 5 and b.class_names is None


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = str(info.value)
    assert msg == (
        f"cifar10: {tmp_path} has no cifar-10-batches-py/ "
        "(pass --download to fetch it, or --dataset npz for an npz directory)"
    )
    _write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(folder / "data_batch_3") in str(info.value) and "3072" in str(info.value)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        load_dataset("cifar10", data_dir=tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("pickle executed code",))


def test_cifar_reader_refuses_code(tmp_path):
    _write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_dataset("cifar10", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ imagefolder


def _write_folder(root: Path, splits=("train", "val"), classes=("cat", "dog"), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(3)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_imagefolder(tmp_path):
    _write_folder(tmp_path)
    b = load_dataset("imagefolder", data_dir=tmp_path, image_size=16)
    assert b.num_classes == 2 and b.class_names == ["cat", "dog"] and b.input_shape == (3, 16, 16)
    assert len(b.train) == 6 and len(b.test) == 6
    train, test = make_loaders(b, batch_size=4, seed=0)
    assert isinstance(train, torch.utils.data.DataLoader)
    assert len(train) == 2 and len(test) == 2
    xs = [x for x, _ in test]
    assert xs[0].shape == (4, 3, 16, 16) and xs[1].shape == (2, 3, 16, 16)
    ys = [y for _, y in train]
    assert sorted(torch.cat(ys).tolist()) == [0, 0, 0, 1, 1, 1]
    assert b.test[0][0].shape == (3, 16, 16)
    # Same seed, same order of training samples.
    train2, _ = make_loaders(b, batch_size=4, seed=0)
    assert [y.tolist() for _, y in train2] == [y.tolist() for y in ys]
    assert load_dataset("imagefolder", data_dir=tmp_path, limit=5).input_shape == (3, 224, 224)
    assert len(load_dataset("imagefolder", data_dir=tmp_path, limit=5).test) == 1


def test_imagefolder_missing_parts(tmp_path):
    _write_folder(tmp_path, splits=("train",))
    with pytest.raises(DataError) as info:
        load_dataset("imagefolder", data_dir=tmp_path)
    assert str(tmp_path) in str(info.value) and "val/" in str(info.value)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="val"):
        load_dataset("imagefolder", data_dir=tmp_path)
    _write_folder(tmp_path / "other", classes=("cat",))
    (tmp_path / "other" / "train" / "dog").mkdir()
    (tmp_path / "other" / "train" / "dog" / "x.png").write_bytes(
        (tmp_path / "other/train/cat/1.png").read_bytes()
    )
    with pytest.raises(DataError, match="same class folders"):
        load_dataset("imagefolder", data_dir=tmp_path / "other")


# ------------------------------------------------------------------------------------------------ loaders


def _tiny_set(n=50, hw=8, augment=True, pad=1):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, hw, hw), dtype=torch.uint8, generator=g)
    return TensorImageDataset(
        images, torch.arange(n) % 5, mean=(0.5,) * 3, std=(0.25,) * 3, augment=augment, pad=pad
    )


def test_loader_determinism_and_epochs():
    ds = _tiny_set()
    a = TensorBatchLoader(ds, 16, shuffle=True, seed=3)
    b = TensorBatchLoader(ds, 16, shuffle=True, seed=3)
    assert len(a) == 4 and a.dataset_size == 50
    ea0, eb0 = _collect(a), _collect(b)
    assert len(ea0) == 4 and [x.shape[0] for x, _ in ea0] == [16, 16, 16, 2]
    for (xa, ya), (xb, yb) in zip(ea0, eb0):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    ea1 = _collect(a)  # the next epoch reshuffles
    assert not torch.equal(torch.cat([y for _, y in ea0]), torch.cat([y for _, y in ea1]))
    a.set_epoch(0)
    assert all(torch.equal(x, x0) for (x, _), (x0, _) in zip(_collect(a), ea0))
    c = TensorBatchLoader(ds, 16, shuffle=True, seed=4)
    assert not torch.equal(torch.cat([y for _, y in _collect(c)]), torch.cat([y for _, y in ea0]))
    # Every sample exactly once per epoch.
    assert sorted(torch.cat([y for _, y in ea0]).tolist()) == sorted(ds.labels.tolist())


def test_loader_eval_order_and_dtypes():
    ds = _tiny_set(augment=True)
    loader = TensorBatchLoader(ds, 20, shuffle=False, augment=False)
    batches = _collect(loader)
    assert [x.shape[0] for x, _ in batches] == [20, 20, 10]
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, ds.labels)
    expected = (ds.images.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, expected)


def test_augmentation_is_a_crop_and_flip():
    ds = _tiny_set(n=64, hw=8, pad=1)
    plain = TensorBatchLoader(ds, 64, shuffle=False, augment=False)
    aug = TensorBatchLoader(ds, 64, shuffle=False, augment=True, seed=0)
    ((x0, y0),) = _collect(plain)
    ((x1, y1),) = _collect(aug)
    assert x1.shape == x0.shape and torch.equal(y0, y1)
    assert not torch.equal(x0, x1)
    # Each augmented image is one of the (2 pad + 1)^2 crops of the zero-padded image, maybe flipped.
    raw = ds.images.float()
    out = (x1 * 0.25 + 0.5) * 255
    padded = torch.nn.functional.pad(raw, (1, 1, 1, 1))
    flipped_seen = shifted_seen = False
    for i in range(64):
        found = False
        for oy in range(3):
            for ox in range(3):
                crop = padded[i, :, oy : oy + 8, ox : ox + 8]
                for flip in (False, True):
                    cand = crop.flip(-1) if flip else crop
                    if torch.allclose(out[i], cand, atol=1e-3):
                        found = True
                        flipped_seen |= flip
                        shifted_seen |= (oy, ox) != (1, 1)
        assert found, i
    assert flipped_seen and shifted_seen


def test_cifar_style_padding_is_4_for_32px(tmp_path):
    _write_npz(tmp_path, hw=32)
    assert load_dataset("npz", data_dir=tmp_path).train.pad == 4


def test_epoch_batches_shards():
    n, bs = 23, 4
    shards = [epoch_batches(n, bs, shuffle=True, seed=1, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # lockstep
    seen = torch.cat([torch.cat(s) for s in shards])
    assert len(seen) == 24 and set(seen.tolist()) == set(range(n))
    evals = [torch.cat(epoch_batches(n, bs, shuffle=False, rank=r, world_size=3)) for r in range(3)]
    assert sorted(torch.cat(evals).tolist()) == list(range(n))  # each sample exactly once
    # A trailing single sample joins the previous batch when training.
    assert [len(b) for b in epoch_batches(9, 4, shuffle=True)] == [4, 5]
    assert [len(b) for b in epoch_batches(9, 4, shuffle=False)] == [4, 4, 1]
    ds = _tiny_set(n=9)
    assert len(TensorBatchLoader(ds, 4, shuffle=True)) == len(
        _collect(TensorBatchLoader(ds, 4, shuffle=True))
    )


def test_make_loaders_in_memory(tmp_path):
    _write_npz(tmp_path, n_train=40, n_test=12)
    b = load_dataset("npz", data_dir=tmp_path)
    train, test = make_loaders(b, batch_size=16, eval_batch_size=5, seed=2)
    assert isinstance(train, TensorBatchLoader) and train.shuffle and train.augment
    assert not test.augment and len(test) == 3 and test.dataset_size == 12
    r0, _ = make_loaders(b, batch_size=8, rank=0, world_size=2)
    r1, _ = make_loaders(b, batch_size=8, rank=1, world_size=2)
    assert len(r0) == len(r1) == 3


@pytest.mark.skipif(not (REAL_CIFAR / "train.npz").exists(), reason="real CIFAR-10 npz not present")
def test_real_cifar10_npz_limited():
    b = load_dataset("npz", data_dir=REAL_CIFAR, limit=500)
    assert b.num_classes == 10 and b.input_shape == (3, 32, 32)
    assert len(b.train) == 500 and len(b.test) == 100
    assert b.class_names is not None and b.class_names[0] == "airplane"
    train, _ = make_loaders(b, batch_size=128)
    x, y = next(iter(train))
    assert x.shape == (128, 3, 32, 32) and y.max() < 10


def test_test_limit_is_independent_of_the_training_limit():
    full = load_dataset("digits")
    assert len(load_dataset("digits", limit=100).test) == 20  # "auto": limit // 5
    assert len(load_dataset("digits", limit=100, test_limit=None).test) == len(full.test)
    assert len(load_dataset("digits", limit=100, test_limit=33).test) == 33
    with pytest.raises(ValueError, match="test_limit"):
        load_dataset("digits", test_limit=0)
