"""Dataset sources of other libraries on small files written here: torchvision datasets by name
(torchvision:FashionMNIST:ROOT:SPLIT), Hugging Face `datasets` image folders and parquet files,
read on access, through train-teacher and evaluate with loader workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from synthkd.cli import main
from synthkd.data import check_dataset, load_dataset
from synthkd.data.loading import LoaderSettings, loader_options, use_loader_settings
from synthkd.errors import SynthkdError

from conftest import write_fashion_mnist


@pytest.fixture(scope="module")
def torchvision_root(tmp_path_factory):
    """ROOT/FashionMNIST/raw/ with unpacked IDX files: the layout torchvision's download leaves."""
    root = tmp_path_factory.mktemp("torchvision")
    raw = root / "FashionMNIST" / "raw"
    train = write_fashion_mnist(raw, "train", n=30, gz=False, seed=1)
    test = write_fashion_mnist(raw, "test", n=12, gz=False, seed=2)
    return root, train, test


def test_torchvision_dataset_by_name_reads_the_files(torchvision_root):
    root, (images, labels), _ = torchvision_root
    data = load_dataset(f"torchvision:FashionMNIST:{root}:train")
    assert len(data) == 30 and data.image_shape == (1, 28, 28) and data.class_names[0] == "T-shirt/top"
    item = data[7]
    assert torch.equal(item.images, torch.from_numpy(images[7]).float().div(255).unsqueeze(0)) and item.targets == labels[7]
    # The same files through synthkd's own IDX reader: the same items.
    own = load_dataset(f"fashion-mnist:{root / 'FashionMNIST' / 'raw'}:train")
    assert all(torch.equal(own[i].images, data[i].images) and own[i].targets == data[i].targets for i in range(30))
    assert len(load_dataset(f"torchvision:FashionMNIST:{root}:test[2:5]")) == 3


@pytest.mark.parametrize("spec, message", [
    ("torchvision:FashionMNIST:{root}:validation", "has the splits train and test, not 'validation'"),
    ("torchvision:FashionMnist:{root}:train", "torchvision has no dataset 'FashionMnist'"),
    ("torchvision:FashionMNIST:{root}/nowhere:train", "is no directory"),
    ("torchvision:MNIST:{root}:train", "cannot read"),  # no MNIST files there; nothing is downloaded
    ("torchvision:CIFAR10:{root}:train", "pickle.load, which runs any code"),
    ("torchvision:FashionMNIST", "torchvision:NAME:ROOT:SPLIT"),
])
def test_torchvision_dataset_errors(torchvision_root, spec, message):
    with pytest.raises(SynthkdError, match=None) as error:
        load_dataset(spec.format(root=torchvision_root[0]))
    assert message in str(error.value)


@pytest.fixture(scope="module")
def image_classes(tmp_path_factory):
    """DIR/train/CLASS/*.png of two classes: 4 RGB images of 6x8 (and one of another size)."""
    root = tmp_path_factory.mktemp("hf") / "images"
    rng = np.random.default_rng(0)
    arrays = {}
    for label, name in enumerate(["cat", "dog"]):
        (root / "train" / name).mkdir(parents=True)
        for i in range(2):
            array = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / "train" / name / f"{i}.png")
            arrays[(name, i)] = array
    Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)).save(root / "train" / "dog" / "9.png")
    return root, arrays


def test_hf_imagefolder_and_parquet(image_classes, tmp_path):
    import datasets

    root, arrays = image_classes
    data = load_dataset(f"hf:imagefolder:{root}:train")
    assert len(data) == 5 and data.class_names == ["cat", "dog"] and data.image_shape == (3, 6, 8)
    found = {(int(data[i].targets), tuple(data[i].images.flatten()[:5].tolist())) for i in range(5)}
    for (name, i), array in arrays.items():
        pixels = torch.from_numpy(array).permute(2, 0, 1).float().div(255)
        assert (["cat", "dog"].index(name), tuple(pixels.flatten()[:5].tolist())) in found
    assert {tuple(data[i].images.shape) for i in range(5)} == {(3, 6, 8)}  # the larger one is resized

    # A parquet file of the same rows, and one without labels (unlabelled inputs).
    table = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.remove_columns("label").to_parquet(str(tmp_path / "unlabelled" / "part-0.parquet"))
    rows = load_dataset(f"hf:parquet:{tmp_path / 'rows.parquet'}:train")
    assert rows.class_names == ["cat", "dog"] and all(torch.equal(rows[i].images, data[i].images) for i in range(5))
    unlabelled = load_dataset(f"hf:parquet:{tmp_path / 'unlabelled'}:train[:2]")  # a directory of parquet files
    assert len(unlabelled) == 2 and unlabelled.class_names == [] and unlabelled[0].targets == -1


@pytest.mark.parametrize("spec, message", [
    ("hf:imagefolder:/no/such/dir:train", "needs a directory"),
    ("hf:parquet:/no/such/file.parquet:train", "no file or directory matches"),
    ("hf:csv:/x:train", "hf:imagefolder:DIR:SPLIT or hf:parquet:PATH:SPLIT"),
])
def test_hf_dataset_errors_before_reading(spec, message):
    with pytest.raises(SynthkdError, match=None) as error:
        check_dataset(spec)
    assert message in str(error.value)


def test_an_hf_split_that_is_not_there(image_classes):
    with pytest.raises(SynthkdError, match="cannot load split 'test'"):
        load_dataset(f"hf:imagefolder:{image_classes[0]}:test")


def test_loader_workers_are_a_checked_setting():
    try:
        use_loader_settings(LoaderSettings(num_workers=2))
        assert loader_options() == {"num_workers": 2}
        with pytest.raises(SynthkdError, match="must be at least 0"):
            use_loader_settings(LoaderSettings(num_workers=-1))
    finally:
        use_loader_settings(LoaderSettings())


@pytest.mark.slow
def test_train_teacher_and_evaluate_on_library_datasets_with_workers(torchvision_root, image_classes, tmp_path):
    """A teacher trained on an HF image folder with two loader workers, evaluated on its parquet
    export; one trained on torchvision's FashionMNIST; the model directories hold no training state."""
    root, _ = image_classes
    runner = CliRunner()
    try:
        for dataset, evaluated in [(f"hf:imagefolder:{root}:train", f"hf:imagefolder:{root}:train"),
                                   (f"torchvision:FashionMNIST:{torchvision_root[0]}:train",
                                    f"torchvision:FashionMNIST:{torchvision_root[0]}:test")]:
            out = tmp_path / dataset.split(":")[1]
            result = runner.invoke(main, ["train-teacher", "--dataset", dataset, "--arch", "resnet8", "--width", "0.25",
                                          "--epochs", "1", "--batch-size", "4", "--num-workers", "2", "--out", str(out)])
            assert result.exit_code == 0, result.output
            assert sorted(p.name for p in out.iterdir()) == [".synthkd.lock", "config.json", "metrics.json", "model.safetensors", "training.json"]
            report = runner.invoke(main, ["evaluate", "--model", str(out), "--dataset", evaluated, "--num-workers", "2", "--json"])
            assert report.exit_code == 0, report.output
            assert json.loads(report.stdout)["num_images"] == len(load_dataset(evaluated))
    finally:
        use_loader_settings(LoaderSettings())
