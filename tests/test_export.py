"""`synthkd export`: each format is written only after it matches PyTorch on a probe batch, and
the file, loaded by its own runtime, gives the model's logits on real images of any batch size."""

from __future__ import annotations

import json

import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from synthkd.cli import main
from synthkd.data import load_dataset
from synthkd.models import Classifier
from synthkd.pipelines.export import ExportSettings, export_model

RUNTIMES = {
    "onnx": lambda path, images: torch.from_numpy(
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()})[0]),
    "torchscript": lambda path, images: torch.jit.load(str(path))(images),
    "exported-program": lambda path, images: torch.export.load(str(path)).module()(images),
}


@pytest.mark.parametrize("format", list(RUNTIMES))
def test_export_matches_pytorch(format, teacher_dir, tmp_path):
    out = tmp_path / ("model.pt2" if format == "exported-program" else f"model.{format}")
    result = CliRunner().invoke(main, ["export", "--model", str(teacher_dir), "--format", format, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "max abs difference from PyTorch on 8 random and 3 constant probe images" in result.stdout
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["format"] == format and record["input_shape"] == [1, 8, 8] and len(record["class_names"]) == 10
    assert 0 <= record["max_abs_diff"] <= 1e-3

    model = Classifier.from_pretrained(teacher_dir).eval()
    images = torch.stack([load_dataset("digits:test[:5]")[i].images for i in range(5)])  # another batch size
    with torch.no_grad():
        assert torch.allclose(RUNTIMES[format](out, images), model(images), atol=1e-4)


def test_an_existing_export_is_replaced_only_with_overwrite(teacher_dir, tmp_path):
    out = tmp_path / "model.pt"
    args = ["export", "--model", str(teacher_dir), "--format", "torchscript", "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    out.write_bytes(b"changed")
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "already exist" in refused.stderr and out.read_bytes() == b"changed"
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0
    assert torch.jit.load(str(out)) is not None


def test_a_failed_parity_check_writes_nothing(teacher, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(Exception, match="differs from PyTorch by up to .* nothing was written"):
        export_model(teacher, out, ExportSettings(format="onnx", tolerance=1e-30))  # float32 rounding is above that
    assert list(tmp_path.iterdir()) == []


def test_the_python_api_exports_with_the_same_check(teacher_dir, tmp_path):
    import synthkd

    record = synthkd.export(str(teacher_dir), tmp_path / "model.pt2", format="exported-program", probe_batch=3)
    assert record["probe_batch"] == 3 and record["max_abs_diff"] <= 1e-3 and (tmp_path / "model.pt2").is_file()
    with pytest.raises(Exception, match="format: expected one of"):
        synthkd.export(str(teacher_dir), tmp_path / "x", format="tflite")
