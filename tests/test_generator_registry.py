"""A generation method registered from this file alone (noise images with one setting) runs
through `synthkd generate` and `synthkd run`, both in-process (the registration lives in this
process), and leaves the registry as it found it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from synthkd.cli import main
from synthkd.data.reader import SyntheticDataset
from synthkd.generators.base import SyntheticImageGenerator
from synthkd.generators.registry import GENERATORS, GeneratorEntry
from synthkd.settings import Settings, setting


@dataclass
class GreyNoiseSettings(Settings):
    brightness: float = setting(0.5, help="Mean grey level of the images.", at_least=0, at_most=1)


class GreyNoise(SyntheticImageGenerator):
    """Grey images with a little uniform noise: the teacher's input shape is all it needs."""

    method = "toy"
    collective = False

    def __init__(self, shape: tuple[int, int, int], settings: GreyNoiseSettings):
        self.shape, self.settings = shape, settings

    def config(self) -> dict:
        return self.settings.to_dict()

    def generate(self, targets: torch.Tensor, seed: int) -> torch.Tensor:
        noise = torch.rand(len(targets), *self.shape, generator=torch.Generator().manual_seed(seed))
        return (self.settings.brightness + 0.1 * (noise - 0.5)).clamp(0, 1)


@pytest.fixture
def toy():
    GENERATORS.add("toy", GeneratorEntry(
        build=lambda settings, teacher, competitor, seed: GreyNoise(teacher.input_format.shape, settings.section()),
        summary="grey noise", settings=GreyNoiseSettings))
    yield
    GENERATORS.unregister("toy")
    assert "toy" not in GENERATORS


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_registered_method_runs_through_generate(toy, teacher_dir, tmp_path):
    out = tmp_path / "set"
    common = ["generate", "--teacher", teacher_dir, "--method", "toy", "--num-images", 8, "--batch-size", 4]
    result = invoke(*common, "--method-option", "brightness=0.2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "wrote 8 images in 2 shards" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "toy" and manifest["config"]["brightness"] == 0.2
    images = SyntheticDataset(out).images
    assert len(images) == 8 and abs(float(images.mean()) - 0.2) < 0.05
    # Its settings are checked like a built-in method's, and named as the user typed them.
    for option, problem in (("brightness=2", "must be at most 1"), ("brighness=0.1", "did you mean brightness?")):
        result = invoke(*common, "--method-option", option, "--out", tmp_path / "bad")
        assert result.exit_code == 2 and "--method-option" in result.output and problem in result.output, result.output
    assert not (tmp_path / "bad").exists()


def test_a_registered_method_runs_through_run(toy, teacher_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = {
        "out": str(run_dir),
        "teacher": {"model": str(teacher_dir)},
        "student": {"arch": "resnet8", "width": 0.25},
        "generate": {"method": "toy", "num_images": 8, "batch_size": 4, "toy": {"brightness": 0.3}},
        "distill": {"epochs": 1, "batch_size": 4, "eval_every_epoch": False},
        "report": {"samples_per_class": 1},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = invoke("run", path, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_dir / "synthetic" / "manifest.json").read_text())
    assert manifest["method"] == "toy" and manifest["config"]["brightness"] == 0.3
    record = json.loads((run_dir / "stages" / "generate.json").read_text())
    assert record["status"] == "done" and record["config"]["toy"] == {"brightness": 0.3}
    assert (run_dir / "student" / "model.safetensors").is_file()
    # The recorded config loads again (its generate.toy section included): a rerun skips every stage.
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["generate"]["toy"] == {"brightness": 0.3}
    before = {p: p.stat().st_mtime_ns for p in Path(run_dir / "stages").glob("*.json")}
    assert invoke("run", path, "--quiet").exit_code == 0
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in before.items())
    # The method's own settings are part of the generate stage's fingerprint.
    result = invoke("run", path, "--dry-run", "generate.toy.brightness=0.4")
    assert result.exit_code == 0 and "toy.brightness: 0.3 -> 0.4" in result.output, result.output


def test_an_unknown_method_is_refused_with_the_registered_ones(tmp_path):
    result = invoke("generate", "--teacher", tmp_path, "--method", "nope", "--out", tmp_path / "set")
    assert result.exit_code == 2
    assert 'error: --method expected one of inversion, ' in result.output and '"nope"' in result.output, result.output
