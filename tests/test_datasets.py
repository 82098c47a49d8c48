"""Real datasets by spec string: parsing, digits, Fashion-MNIST IDX, CIFAR-10 batches, folders, noise."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from synthkd.data import (
    DATASETS, ImageDataset, LabelledBatch, check_dataset, dataset_kinds, load_dataset, register_dataset,
)
from synthkd.data.datasets import _parse
from synthkd.data.kinds.cifar10 import CIFAR10_CLASSES
from synthkd.data.kinds.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_ENV
from synthkd.data.kinds.noise import NoiseDataset
from synthkd.errors import SynthkdError

from conftest import write_fashion_mnist, write_idx

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------- spec parsing
@pytest.mark.parametrize(
    "spec, kind, args, index",
    [
        ("digits:train", "digits", ["train"], None),
        ("digits:test[:10]", "digits", ["test"], slice(None, 10)),
        ("fashion-mnist:/data/fm:train[5:]", "fashion-mnist", ["/data/fm", "train"], slice(5, None)),
        ("cifar10:/a/b:test[-3:]", "cifar10", ["/a/b", "test"], slice(-3, None)),
        ("folder:/x/y[2:4]", "folder", ["/x/y"], slice(2, 4)),
        ("noise:uniform", "noise", ["uniform"], None),
        ("noise", "noise", [], None),
    ],
)
def test_parse(spec, kind, args, index):
    parsed = _parse(spec)
    assert (parsed.kind, parsed.args, parsed.index) == (kind, args, index)


def test_slice_suffix():
    full = load_dataset("digits:train")
    head = load_dataset("digits:train[:10]")
    assert isinstance(head, ImageDataset) and len(head) == 10
    assert torch.equal(head.images, full.images[:10]) and torch.equal(head.labels, full.labels[:10])
    tail = load_dataset("digits:train[-3:]")
    assert torch.equal(tail.images, full.images[-3:])
    middle = load_dataset("digits:train[5:8]")
    assert torch.equal(middle.labels, full.labels[5:8])
    noise = load_dataset("noise:uniform[:7]")
    assert len(noise) == 7


@pytest.mark.parametrize(
    "spec, words",
    [
        ("mnist:train", ["unknown dataset", "'mnist'"]),
        ("digits", ["digits needs a split"]),
        ("digits:validation", ["digits needs a split"]),
        ("cifar10:train", ["cifar10 needs a path"]),
        ("noise:pink", ["unknown noise kind"]),
    ],
)
def test_bad_specs(spec, words):
    with pytest.raises(SynthkdError) as info:
        load_dataset(spec)
    for word in words:
        assert word in str(info.value)


# ---------------------------------------------------------------------------- digits
def test_digits_split_is_a_disjoint_stratified_partition():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits:train"), load_dataset("digits:test")
    digits = load_digits()
    assert len(train) + len(test) == len(digits.target) == 1797
    assert train.image_shape == test.image_shape == (1, 8, 8)
    assert train.class_names == [str(i) for i in range(10)] and train.num_classes == 10
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255

    # Together the splits are exactly the whole set (as a multiset of image+label rows): no
    # image is in both and none is lost.
    def rows(images, labels):
        return sorted(bytes(image.flatten().tolist()) + bytes([label]) for image, label in zip(images, labels))

    all_images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8))
    assert rows(torch.cat([train.images[:, 0], test.images[:, 0]]), torch.cat([train.labels, test.labels]).tolist()) == rows(
        all_images, digits.target.tolist()
    )
    # Stratified: a quarter of each class is test.
    per_class_all = np.bincount(digits.target, minlength=10)
    per_class_test = torch.bincount(test.labels, minlength=10).numpy()
    assert np.all(np.abs(per_class_test - per_class_all / 4) <= 1)
    assert len(test) == per_class_test.sum() == 445

    image, label = train[0]
    assert image.dtype == torch.float32 and image.shape == (1, 8, 8)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert isinstance(label, int) and label == int(train.labels[0])


def test_channel_stats():
    data = load_dataset("digits:train[:100]")
    mean, std = data.channel_stats()
    pixels = data.images.float().numpy() / 255
    assert mean == pytest.approx([pixels.mean()], rel=1e-5)
    assert std == pytest.approx([pixels.std(ddof=1)], rel=1e-4)


# ---------------------------------------------------------------------------- Fashion-MNIST
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_from_idx(tmp_path, gz):
    images, labels = write_fashion_mnist(tmp_path, "train", n=23, gz=gz, seed=1)
    test_images, test_labels = write_fashion_mnist(tmp_path, "test", n=11, gz=gz, seed=2)
    train = load_dataset(f"fashion-mnist:{tmp_path}:train")
    assert len(train) == 23 and train.image_shape == (1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), images)
    assert train.labels.tolist() == labels.tolist()
    assert train.class_names == FASHION_MNIST_CLASSES and train.name == "fashion-mnist:train"
    test = load_dataset(f"fashion-mnist:{tmp_path}:test[:5]")
    assert np.array_equal(test.images[:, 0].numpy(), test_images[:5])
    image, label = test[2]
    assert torch.allclose(image[0], torch.from_numpy(test_images[2]).float() / 255)
    assert label == int(test_labels[2])


def test_fashion_mnist_default_path_from_environment(tmp_path, monkeypatch):
    images, _ = write_fashion_mnist(tmp_path / "fm", "test", n=4)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "fm"))
    data = load_dataset("fashion-mnist:test")
    assert np.array_equal(data.images[:, 0].numpy(), images)


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    with pytest.raises(SynthkdError) as info:
        load_dataset(f"fashion-mnist:{tmp_path / 'nowhere'}:train")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "nowhere") in message
    # Only the images present: the labels file is named.
    write_idx(tmp_path / "half" / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(SynthkdError, match="t10k-labels-idx1-ubyte"):
        load_dataset(f"fashion-mnist:{tmp_path / 'half'}:test")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "also-nowhere"))
    with pytest.raises(SynthkdError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist:test")


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_truncated_or_not_idx(tmp_path, gz):
    write_fashion_mnist(tmp_path, "train", n=10, gz=gz)
    suffix = ".gz" if gz else ""
    images_file = tmp_path / f"train-images-idx3-ubyte{suffix}"
    raw = gzip.decompress(images_file.read_bytes()) if gz else images_file.read_bytes()

    def write_idx_bytes(data: bytes) -> None:
        images_file.write_bytes(gzip.compress(data) if gz else data)

    write_idx_bytes(raw[:-100])
    with pytest.raises(SynthkdError, match="truncated"):
        load_dataset(f"fashion-mnist:{tmp_path}:train")
    write_idx_bytes(b"\x00\x00\x0d\x03" + raw[4:])  # float IDX, not unsigned bytes
    with pytest.raises(SynthkdError, match="magic"):
        load_dataset(f"fashion-mnist:{tmp_path}:train")
    write_idx_bytes(b"\x00\x00")
    with pytest.raises(SynthkdError, match="not an IDX file"):
        load_dataset(f"fashion-mnist:{tmp_path}:train")


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    test = load_dataset(f"fashion-mnist:{REAL_FASHION_MNIST}:test")
    assert len(test) == 10000 and test.image_shape == (1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert 0.2 < test.channel_stats()[0][0] < 0.4  # mean pixel of Fashion-MNIST is ~0.29


# ---------------------------------------------------------------------------- CIFAR-10
def _write_cifar(root: Path, per_batch: int = 2, protocol: int = pickle.DEFAULT_PROTOCOL) -> dict[str, dict]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {}
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {
            b"batch_label": f"batch {index}".encode(),
            b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            b"labels": [int(x) for x in rng.integers(0, 10, size=per_batch)],
            b"filenames": [f"img{index}_{i}.png".encode() for i in range(per_batch)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        batches[name] = batch
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_batches(tmp_path, protocol):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    train = load_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-py'}:train")
    test = load_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-py'}:test")
    assert len(train) == 10 and len(test) == 2
    assert train.image_shape == (3, 32, 32) and train.class_names == CIFAR10_CLASSES
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    assert np.array_equal(train.images.numpy().reshape(10, 3072), expected)
    # Row layout of a CIFAR batch: 1024 red, then green, then blue values.
    assert np.array_equal(test.images[1, 2].numpy(), batches["test_batch"][b"data"][1, 2048:].reshape(32, 32))
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])


def test_cifar10_missing_batches(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(SynthkdError, match="missing data_batch_3"):
        load_dataset(f"cifar10:{tmp_path}:train")
    assert len(load_dataset(f"cifar10:{tmp_path}:test")) == 2


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_malicious_pickle_is_refused(tmp_path):
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Exploit(marker)}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    # The exploit is real: plain pickle would run it.
    pickle.loads(pickle.dumps(_Exploit(marker)))
    assert marker.exists()
    marker.unlink()

    with pytest.raises(SynthkdError) as info:
        load_dataset(f"cifar10:{tmp_path}:test")
    assert "test_batch" in str(info.value) and "system" in str(info.value)
    assert not marker.exists()

    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(SynthkdError, match="not a CIFAR-10 python batch"):
        load_dataset(f"cifar10:{tmp_path}:test")


# ---------------------------------------------------------------------------- folders
def test_folder_of_grayscale_pngs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for cls, count in (("cat", 2), ("ant", 3)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            array = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
            Image.fromarray(array, mode="L").save(tmp_path / cls / f"{i}.png")
            written[(cls, i)] = array
    (tmp_path / "ant" / "notes.txt").write_text("not an image")

    data = load_dataset(f"folder:{tmp_path}")
    assert data.class_names == ["ant", "cat"]  # sorted folder names
    assert len(data) == 5 and data.image_shape == (1, 6, 5)
    assert [data[i].targets for i in range(len(data))] == [0, 0, 0, 1, 1]
    assert np.array_equal((data[0].images[0] * 255).round().byte().numpy(), written[("ant", 0)])
    assert np.array_equal((data[4].images[0] * 255).round().byte().numpy(), written[("cat", 1)])
    assert len(load_dataset(f"folder:{tmp_path}[1:3]")) == 2


def test_folder_of_colour_images(tmp_path):
    from PIL import Image

    colours = {"blue": (0, 0, 255), "red": (255, 0, 0)}
    for cls, rgb in colours.items():
        (tmp_path / cls).mkdir()
        Image.new("RGB", (4, 4), rgb).save(tmp_path / cls / "a.png")
    Image.new("L", (4, 4), 128).save(tmp_path / "red" / "b.png")  # mixed modes become RGB
    data = load_dataset(f"folder:{tmp_path}")
    assert data.image_shape == (3, 4, 4) and len(data) == 3
    assert [(data[i].images[:, 0, 0] * 255).round().int().tolist() for i in range(3)] == [[0, 0, 255], [255, 0, 0], [128, 128, 128]]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count open files")
def test_folder_larger_than_the_open_file_limit(tmp_path):
    resource = pytest.importorskip("resource")
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(60):
            Image.new("L", (3, 3), i).save(tmp_path / cls / f"{i:03d}.png")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = len(os.listdir("/proc/self/fd")) + 40  # fewer free descriptors than images
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        data = load_dataset(f"folder:{tmp_path}")
        # Read on access: every item opens (and closes) its own file.
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert len(data) == 120
        assert [round(data[i].images[0, 0, 0].item() * 255) for i in range(120)] == list(range(60)) * 2


def test_folder_reads_lazily_resizes_each_image_and_refuses_huge_or_fake_ones(tmp_path, monkeypatch):
    from PIL import Image

    for i in range(3):
        Image.new("L", (6, 4), 10 * i).save(tmp_path / f"small-{i}.png")
    Image.new("L", (600, 400), 200).save(tmp_path / "big.png")  # not the common size: resized, not followed
    data = load_dataset(f"folder:{tmp_path}")
    assert data.image_shape == (1, 4, 6) and len(data) == 4 and data.class_names == []
    assert tuple(data[0].images.shape) == (1, 4, 6) and data[0].targets == -1
    assert load_dataset(f"folder:{tmp_path}:8x8")[0].images.shape == (1, 8, 8)  # a requested size
    monkeypatch.setenv("SYNTHKD_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(SynthkdError, match=r"big.png has 600x400 pixels, over the limit of 1000"):
        load_dataset(f"folder:{tmp_path}")
    monkeypatch.delenv("SYNTHKD_MAX_IMAGE_PIXELS")
    (tmp_path / "x.png").write_text("a text file")
    with pytest.raises(SynthkdError, match=r"x.png is not an image PIL can read"):
        load_dataset(f"folder:{tmp_path}")


def test_folder_errors(tmp_path):
    with pytest.raises(SynthkdError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty-class").mkdir()
    with pytest.raises(SynthkdError, match="no images found"):
        load_dataset(f"folder:{tmp_path}")


# ---------------------------------------------------------------------------- noise
@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_noise(kind):
    data = load_dataset(f"noise:{kind}")
    assert isinstance(data, NoiseDataset) and len(data) == 1000
    image, label = data[3]
    assert image.shape == (1, 28, 28) and label == -1
    assert float(data.images.min()) >= 0 and float(data.images.max()) <= 1
    assert torch.equal(NoiseDataset(kind, size=5).images, NoiseDataset(kind, size=5).images)
    assert abs(float(data.images.mean()) - 0.5) < 0.02


# ---------------------------------------------------------------------------- the registry of kinds
def test_every_kind_is_listed_with_its_usage():
    kinds = dataset_kinds()
    assert {"fashion-mnist", "digits", "cifar10", "folder", "noise"} <= set(kinds)
    with pytest.raises(SynthkdError) as info:
        load_dataset("mnist:train")
    assert all(kind.usage in str(info.value) for kind in kinds.values())


def test_items_and_batches_are_typed():
    data = load_dataset("digits:test[:6]|hflip")
    item = data[0]
    assert isinstance(item, LabelledBatch) and item.targets == int(load_dataset("digits:test").labels[0])
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert isinstance(batch, LabelledBatch) and batch.images.shape == (4, 1, 8, 8) and batch.targets.shape == (4,)


def test_a_kind_registered_from_a_test_loads_through_the_cli(teacher_dir):
    """A new kind is one registered function: `synthkd evaluate --dataset toy:...` reads it."""
    from click.testing import CliRunner

    from synthkd.cli import main

    seen = []

    def check(args):
        if not args or not args[0].isdigit():
            raise SynthkdError("toy needs a size: toy:N")

    @register_dataset("toy", usage="toy:N", description="N digits from the test split", check=check)
    def toy(args):
        seen.append(args)
        return load_dataset(f"digits:test[:{int(args[0])}]")

    try:
        check_dataset("toy:12")
        with pytest.raises(SynthkdError, match="toy:N"):
            check_dataset("toy:many")
        assert "toy" in dataset_kinds()
        result = CliRunner().invoke(main, ["evaluate", "--model", str(teacher_dir), "--dataset", "toy:12", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output.strip().splitlines()[-1])
        assert report["dataset"] == "toy:12" and report["num_images"] == 12 and seen == [["12"]]
    finally:
        DATASETS.unregister("toy")
    with pytest.raises(SynthkdError, match="unknown dataset 'toy'"):
        load_dataset("toy:12")


@pytest.mark.parametrize("spec", ["noise:pink", "noise:uniform:many", "digits:validation", "cifar10:train", "mnist:x"])
def test_check_refuses_what_load_refuses(spec):
    with pytest.raises(SynthkdError):
        check_dataset(spec)
    with pytest.raises(SynthkdError):
        load_dataset(spec)
