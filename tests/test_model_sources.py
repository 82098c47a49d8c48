"""Model sources (torchvision:, timm:, hf:, hub:) on small, randomly initialised local models: what
each source says about its input and classes, saved models that load again, weights from a file
or from the source itself, one-line errors, and generate -> distill -> evaluate through the CLI.
Nothing here touches the network."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from synthkd.cli import main
from synthkd.errors import SynthkdError
from synthkd.models import Classifier, is_library_source, load_model, model_source_problem, trusting_code

from conftest import subprocess_env

PROBE = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def same_outputs(model: Classifier, again: Classifier) -> bool:
    with torch.no_grad():
        return torch.allclose(model.eval()(PROBE), again.eval()(PROBE), atol=1e-5)


def round_trip(model: Classifier, directory: Path, trust: bool = False) -> Classifier:
    model.save_pretrained(directory)
    with trusting_code(trust):
        again = Classifier.from_pretrained(directory)
    assert again.config.to_dict() == model.config.to_dict()
    assert same_outputs(model, again)
    return again


def save_state(net: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny transformers ResNet classifier of 10 labels with an image processor config, saved locally."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    directory = tmp_path_factory.mktemp("hf") / "tiny-resnet"
    labels = {i: f"class-{i}" for i in range(10)}
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10,
                          id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    ResNetForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    """A local torch.hub repository whose entry builds a small CNN and, with pretrained=True,
    loads the weights shipped in the repository (weights from the source itself)."""
    directory = tmp_path_factory.mktemp("hub") / "repo"
    directory.mkdir()
    (directory / "hubconf.py").write_text(textwrap.dedent('''
        dependencies = ["torch"]
        from pathlib import Path
        import torch
        from torch import nn

        def tiny(num_classes=10, width=8, pretrained=False):
            net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(width, num_classes))
            if pretrained:
                from safetensors.torch import load_file
                net.load_state_dict(load_file(str(Path(__file__).with_name("tiny.safetensors"))))
            return net
    '''))
    torch.manual_seed(1)
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_under_test", directory / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    save_state(module.tiny(), directory / "tiny.safetensors")
    return directory


def test_torchvision_builds_with_arguments_and_round_trips(tmp_path):
    model = load_model("torchvision:resnet18?num_classes=10", input_shape=(3, 16, 16), mean=(0.5,), std=(0.25,))
    assert model.config.arch == "torchvision:resnet18" and model.config.arch_kwargs == {"num_classes": 10}
    assert model.num_classes == 10 and model.input_format.shape == (3, 16, 16)
    round_trip(model, tmp_path / "m")
    # Weights from a file: the same network again, with the given weights.
    weights = save_state(model.net, tmp_path / "w.safetensors")
    again = load_model("torchvision:resnet18?num_classes=10", weights, input_shape=(3, 16, 16), mean=(0.5,), std=(0.25,))
    assert same_outputs(model, again)
    # A model without weights meta does not know its input size.
    with pytest.raises(SynthkdError, match="--input-shape"):
        load_model("torchvision:resnet18?num_classes=10")


def test_torchvision_weights_meta_gives_classes_and_input(tmp_path, monkeypatch):
    """weights=DEFAULT: classes, crop size and normalisation come from the weights' meta. The
    weights file is put in torch.hub's cache first (random weights under the real file name), as a
    machine without network would have it."""
    from torchvision.models import SqueezeNet1_1_Weights, squeezenet1_1

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    net = squeezenet1_1(num_classes=1000)
    torch.save(net.state_dict(), cache / SqueezeNet1_1_Weights.DEFAULT.url.rsplit("/", 1)[1])
    model = load_model("torchvision:squeezenet1_1?weights=DEFAULT")
    assert model.input_format.shape == (3, 224, 224)
    assert model.input_format.mean == pytest.approx((0.485, 0.456, 0.406))
    assert model.config.class_names[0] == "tench" and model.num_classes == 1000
    assert model.config.arch_kwargs == {"num_classes": 1000}  # the weights are not fetched again on load
    assert torch.equal(model.net.classifier[1].weight, net.classifier[1].weight)
    # --input-shape and --mean override what the source says.
    smaller = load_model("torchvision:squeezenet1_1?weights=DEFAULT", input_shape=(3, 64, 64), mean=(0.5,))
    assert smaller.input_format.shape == (3, 64, 64) and smaller.input_format.mean == (0.5,)
    assert smaller.input_format.std == pytest.approx((0.229, 0.224, 0.225))


def test_timm_reads_pretrained_cfg_and_loads_weights_from_the_source(tmp_path):
    model = load_model("timm:test_resnet")
    assert model.input_format.shape == (3, 160, 160) and model.input_format.mean == (0.5, 0.5, 0.5)
    assert model.num_classes == 1000 and model.config.class_names[1].startswith("goldfish")
    small = load_model("timm:test_resnet?num_classes=10", input_shape=(3, 16, 16))
    assert small.config.arch_kwargs == {"num_classes": 10} and small.config.class_names == [str(i) for i in range(10)]
    round_trip(small, tmp_path / "m")
    # pretrained=true with a local file: timm loads the weights itself.
    weights = save_state(small.net, tmp_path / "timm.safetensors")
    pretrained = load_model(f"timm:test_resnet?num_classes=10&pretrained=true&pretrained_cfg_overlay={{file: {weights}, num_classes: 10}}",
                            input_shape=(3, 16, 16))
    assert same_outputs(small, pretrained)
    assert pretrained.config.arch_kwargs == {"num_classes": 10}  # saved without the file it came from
    round_trip(pretrained, tmp_path / "again")


def test_hf_unwraps_logits_and_reads_labels_and_processor(hf_dir, tmp_path):
    model = load_model(f"hf:{hf_dir}")
    assert model.config.class_names == [f"class-{i}" for i in range(10)]
    assert model.input_format.shape == (3, 16, 16)
    assert model.input_format.mean == pytest.approx((0.4, 0.5, 0.6)) and model.input_format.std == pytest.approx((0.2, 0.25, 0.3))
    assert model.eval()(PROBE).shape == (3, 10)
    # The saved model carries the HF config: it loads without the source directory.
    moved = tmp_path / "moved"
    hf_dir.rename(moved)
    try:
        round_trip(model, tmp_path / "m")
    finally:
        moved.rename(hf_dir)


def test_hub_runs_a_local_entry_with_arguments(hub_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(hub_dir.parent)
    model = load_model("hub:repo:tiny?num_classes=4&width=6", input_shape=(3, 16, 16))
    assert model.config.arch == f"hub:{hub_dir}:tiny"  # absolute: loads from any directory
    assert model.config.arch_kwargs == {"num_classes": 4, "width": 6} and model.num_classes == 4
    with pytest.raises(SynthkdError, match="--trust-code"):  # a hub repository is code: a model directory naming it is refused
        round_trip(model, tmp_path / "m")
    round_trip(model, tmp_path / "m", trust=True)
    pretrained = load_model(f"hub:{hub_dir}:tiny?pretrained=true", input_shape=(3, 16, 16))
    from safetensors.torch import load_file

    shipped = load_file(str(hub_dir / "tiny.safetensors"))
    assert all(torch.equal(v, shipped[k]) for k, v in pretrained.net.state_dict().items())


def test_only_hub_runs_foreign_code():
    assert is_library_source("torchvision:resnet18") and is_library_source("timm:resnet18") and is_library_source("hf:x")
    assert not is_library_source("hub:/repo:entry") and not is_library_source("resnet20")
    assert not is_library_source("my_models.py:factory")


@pytest.mark.parametrize("spec, message", [
    ("torchvision:resnet1?num_classes=10", "unknown torchvision model 'resnet1'; did you mean resnet18"),
    ("torchvision:resnet18?weights=IMAGENET9K", "has no weights 'IMAGENET9K'; use DEFAULT or one of IMAGENET1K_V1"),
    ("torchvision:resnet18?num_class=10", "unexpected keyword argument 'num_class'"),
    ("timm:resnet_nope", "unknown timm model 'resnet_nope'"),
    ("hub:/no/such/repo:tiny", "no local repository with a hubconf.py"),
    ("hub:tiny", "write hub:DIR:ENTRY"),
    ("hf:/no/such/dir", "there is no directory /no/such/dir"),
    ("torchvision:resnet18?num_classes", "write torchvision:resnet18?KEY=VALUE"),
    ("hf:someone/model?trust_remote_code=true", "runs only with --trust-code"),
])
def test_a_bad_spec_is_one_error(spec, message):
    with pytest.raises(SynthkdError, match=None) as error:
        load_model(spec, input_shape=(3, 16, 16))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_spec_checks_do_not_import_the_library(hub_dir):
    assert model_source_problem("timm:anything?num_classes=3") is None
    assert model_source_problem(f"hub:{hub_dir}:tiny") is None
    assert "hubconf.py" in model_source_problem("hub:/nowhere:tiny")


def test_a_missing_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what Python does for a package that is not installed
    with pytest.raises(SynthkdError, match=r"timm: models need timm .*pip install 'synthkd\[vision\]'"):
        load_model("timm:test_resnet")


def test_an_hf_id_without_network_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "synthkd", "evaluate", "--model", "hf:someone/some-vit", "--dataset", "digits:test[:8]"],
        cwd=tmp_path, env=subprocess_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot build hf:someone/some-vit"), result.stderr
    assert "huggingface-cli download someone/some-vit --local-dir DIR" in lines[0]


def cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, f"{args}\n{result.output}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_generate_distill_evaluate_with_every_source(tmp_path, hf_dir, hub_dir):
    """Each source as the teacher, another as the student: generate -> distill -> evaluate, then
    the student directory loads again as the same model."""
    tv_weights = save_state(load_model("torchvision:resnet18?num_classes=10", input_shape=(3, 16, 16)).net,
                            tmp_path / "tv.safetensors")
    timm_weights = save_state(load_model("timm:test_resnet?num_classes=10", input_shape=(3, 16, 16)).net,
                              tmp_path / "timm.safetensors")
    teachers = [  # (spec, weights file, input shape)
        ("torchvision:resnet18?num_classes=10", tv_weights, "3,16,16"),
        (f"timm:test_resnet?num_classes=10&pretrained=true&pretrained_cfg_overlay={{file: {timm_weights}, num_classes: 10}}", None, "3,16,16"),
        (f"hf:{hf_dir}", None, None),
        (f"hub:{hub_dir}:tiny?pretrained=true", None, "3,16,16"),
    ]
    students = [f"hub:{hub_dir}:tiny", f"hf:{hf_dir}", "torchvision:resnet18", "timm:test_resnet"]
    for index, ((spec, weights, shape), student) in enumerate(zip(teachers, students)):
        work = tmp_path / str(index)

        def teacher(flag: str, weights_flag: str) -> list:
            return [flag, spec] + ([weights_flag, weights] if weights else []) + (["--input-shape", shape] if shape else [])

        cli("generate", *teacher("--teacher", "--teacher-weights"), "--num-images", 8, "--batch-size", 8, "--iterations", 2,
            "--out", work / "set")
        cli("distill", *teacher("--teacher", "--teacher-weights"), "--student", student, "--data", work / "set",
            "--epochs", 1, "--batch-size", 8, "--out", work / "student")
        for model in (teacher("--model", "--weights"), ["--model", work / "student", "--trust-code"]):  # hub: is code
            report = json.loads(cli("evaluate", *model, "--dataset", "digits:test[:16]", "--json"))
            assert report["num_images"] == 16 and 0 <= report["accuracy"] <= 1
        config = json.loads((work / "student" / "config.json").read_text())
        assert config["arch"].split(":")[0] == student.split(":")[0]
        with trusting_code():
            again = Classifier.from_pretrained(work / "student")
        assert len(again.config.class_names) == 10 and again.eval()(PROBE).shape == (3, 10)


def test_a_run_config_names_sources_for_teacher_and_student(tmp_path, hub_dir):
    import yaml

    from synthkd.pipelines.config import load_config

    def config(teacher: str, student: str) -> Path:
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({
            "out": str(tmp_path / "run"), "teacher": {"model": teacher, "input_shape": [3, 16, 16]},
            "student": {"arch": student}, "generate": {"num_images": 8, "batch_size": 8, "iterations": 2},
            "distill": {"epochs": 1, "batch_size": 8}, "eval_dataset": "digits:test[:16]"}))
        return path

    loaded = load_config(config(f"hub:{hub_dir}:tiny?pretrained=true", "timm:test_resnet"))
    assert loaded.teacher.model.startswith("hub:") and loaded.student.arch == "timm:test_resnet"
    with pytest.raises(SynthkdError) as error:
        load_config(config("hub:/nowhere:tiny", "torchvision:resnet18?num_classes"))
    assert "teacher.model" in str(error.value) and "hubconf.py" in str(error.value)
    assert "student.arch" in str(error.value) and "KEY=VALUE" in str(error.value)


@pytest.mark.slow
def test_synthkd_run_with_a_hub_teacher_and_a_timm_student(tmp_path, hub_dir, accelerator):
    import yaml

    from synthkd.pipelines.config import load_config
    from synthkd.pipelines.run import run_pipeline

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "out": str(tmp_path / "run"), "teacher": {"model": f"hub:{hub_dir}:tiny?pretrained=true", "input_shape": [3, 16, 16]},
        "student": {"arch": "timm:test_resnet"}, "generate": {"num_images": 8, "batch_size": 8, "iterations": 2},
        "distill": {"epochs": 1, "batch_size": 8}, "eval_dataset": "digits:test[:16]"}))
    summary = run_pipeline(load_config(path), accelerator, quiet=True)
    student = Classifier.from_pretrained(tmp_path / "run" / "student")
    assert student.config.arch == "timm:test_resnet" and student.config.arch_kwargs == {"num_classes": 10}
    assert summary is not None
