"""Stage: export a model for use without synthkd (ONNX, TorchScript, a torch.export program),
checked against PyTorch on a probe batch before the file is put in place.

The exported network is the whole :class:`Classifier`: it takes float images in [0,1] of the
model's input shape (N x C x H x W, any N) and returns logits; resizing is fixed at that shape
and the normalisation is built in. A sidecar ``FILE.json`` records the input shape, the class
names and the parity found.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from synthkd.errors import SynthkdError
from synthkd.io import atomic_write, atomic_write_json
from synthkd.models import Classifier
from synthkd.seeds import derive_seed
from synthkd.settings import Settings, setting

TRACE_BATCH = 2  # the example batch the exporters see; the probe batch differs, so batch size stays free


@dataclass
class ExportSettings(Settings):
    """The format, and the parity check every export passes before it is written."""

    format: Literal["onnx", "torchscript", "exported-program"] = setting(
        "onnx", help="onnx (run by onnxruntime; opset of torch's dynamo exporter), torchscript (torch.jit.load), "
                     "exported-program (torch.export.load).")
    probe_batch: int = setting(8, help="Random [0,1] images the export is compared on with PyTorch.", positive=True)
    tolerance: float = setting(1e-3, help="Largest absolute logit difference from PyTorch accepted.", positive=True)


def export_model(model: Classifier, out: str | os.PathLike, settings: ExportSettings, seed: int = 0) -> dict[str, Any]:
    """Write ``model`` to ``out`` in ``settings.format`` once its outputs on a probe batch match
    PyTorch's within ``settings.tolerance``; returns the record also written to ``out``.json."""
    out = Path(out)
    model = model.eval().cpu()
    shape = model.input_format.shape
    example = torch.rand(TRACE_BATCH, *shape, generator=torch.Generator().manual_seed(derive_seed(seed, "export-example")))
    probe = torch.rand(settings.probe_batch, *shape, generator=torch.Generator().manual_seed(derive_seed(seed, "export-probe")))
    with torch.no_grad():
        expected = model(probe)
    write, run = EXPORTERS[settings.format]
    found: dict[str, float] = {}

    def write_checked(tmp: str) -> None:
        with torch.no_grad():
            write(model, example, tmp)
            found["max_abs_diff"] = float((run(tmp, probe) - expected).abs().max())
        if not found["max_abs_diff"] <= settings.tolerance:
            raise SynthkdError(f"the {settings.format} export differs from PyTorch by up to {found['max_abs_diff']:.3g} "
                               f"on the probe batch (tolerance {settings.tolerance:g}); nothing was written")

    atomic_write(out, write_checked)
    record = {"format": settings.format, "file": out.name, "input_shape": list(shape), "input_range": [0.0, 1.0],
              "class_names": list(model.config.class_names), "probe_batch": settings.probe_batch,
              "max_abs_diff": found["max_abs_diff"], "tolerance": settings.tolerance, "seed": seed}
    atomic_write_json(out.with_name(out.name + ".json"), record)
    return record


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines and the tracer's warnings about the fixed input shape (which
    is what the export means) are not the user's business."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _write_onnx(model: Classifier, example: torch.Tensor, path: str) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency)
    except ImportError as error:
        raise SynthkdError(f"ONNX export needs onnx and onnxscript ({error}); pip install 'synthkd[export]'") from error
    batch = torch.export.Dim("batch", min=1)
    with _quiet():
        torch.onnx.export(model, (example,), path, dynamo=True, external_data=False, input_names=["images"],
                          output_names=["logits"], dynamic_shapes={"images": {0: batch}})


def _run_onnx(path: str, probe: torch.Tensor) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError as error:
        raise SynthkdError(f"the ONNX parity check runs onnxruntime ({error}); pip install 'synthkd[export]'") from error
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0])


def _write_torchscript(model: Classifier, example: torch.Tensor, path: str) -> None:
    with _quiet():
        torch.jit.trace(model, example).save(path)


def _run_torchscript(path: str, probe: torch.Tensor) -> torch.Tensor:
    return torch.jit.load(path)(probe)


def _write_exported_program(model: Classifier, example: torch.Tensor, path: str) -> None:
    batch = torch.export.Dim("batch", min=1)
    with _quiet():
        program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}})
    with open(path, "wb") as file:  # a file object: the temporary file's name does not end in .pt2
        torch.export.save(program, file)


def _run_exported_program(path: str, probe: torch.Tensor) -> torch.Tensor:
    with open(path, "rb") as file:
        return torch.export.load(io.BytesIO(file.read())).module()(probe)


EXPORTERS: dict[str, tuple[Callable[[Classifier, torch.Tensor, str], None], Callable[[str, torch.Tensor], torch.Tensor]]] = {
    "onnx": (_write_onnx, _run_onnx),
    "torchscript": (_write_torchscript, _run_torchscript),
    "exported-program": (_write_exported_program, _run_exported_program),
}
