"""Stage: export a model for use without synthkd (ONNX, TorchScript, a torch.export program),
checked against PyTorch on a probe batch before the file is put in place.

The exported network is the :class:`Classifier` for images of its own input shape: it takes float
images in [0,1] of that shape (N x C x H x W, any N) and returns logits, with the normalisation
built in (no resizing: the input has the model's shape). A sidecar ``FILE.json`` records the
input shape, the class names and the parity found.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from synthkd.errors import SynthkdError, one_line
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
    probe_batch: int = setting(8, help="Random [0,1] images the export is compared on with PyTorch (besides all-black, "
                                       "mid-grey and all-white ones, the extremes of the input range).", positive=True)
    tolerance: float = setting(1e-3, help="Largest absolute logit difference from PyTorch accepted.", positive=True)
    overwrite: bool = setting(False, help="Replace an existing FILE and FILE.json; without it an existing one is refused.")


CONSTANT_PROBES = (0.0, 0.5, 1.0)  # images of one value, after the random ones: a forward that branches on the data meets them


def export_model(model: Classifier, out: str | os.PathLike, settings: ExportSettings, seed: int = 0,
                 model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``model`` to ``out`` in ``settings.format`` once its outputs on a probe batch (random
    images and constant ones) match PyTorch's within ``settings.tolerance``; returns the record
    also written to ``out``.json. ``out`` is never inside ``model_dir`` (the directory the model
    was loaded from), and an existing ``out`` is replaced only with ``settings.overwrite``."""
    out = Path(out)
    record_path = out.with_name(out.name + ".json")
    if model_dir is not None and Path(model_dir).resolve() in out.resolve().parents:
        raise SynthkdError(f"--out {out} is inside the model directory {model_dir}; write the export elsewhere")
    if out.is_dir():
        raise SynthkdError(f"--out {out} is a directory; give the name of the file to write")
    existing = [str(path) for path in (out, record_path) if path.exists() or path.is_symlink()]
    if existing and not settings.overwrite:
        raise SynthkdError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; give another "
                           "--out, or pass --overwrite to replace the export")
    model = model.eval().cpu()
    shape = model.input_format.shape
    example = torch.rand(TRACE_BATCH, *shape, generator=torch.Generator().manual_seed(derive_seed(seed, "export-example")))
    probe = torch.cat([
        torch.rand(settings.probe_batch, *shape, generator=torch.Generator().manual_seed(derive_seed(seed, "export-probe"))),
        torch.tensor(CONSTANT_PROBES).view(-1, 1, 1, 1).expand(-1, *shape)])
    exported = FixedShape(model)
    with torch.no_grad():
        expected = exported(probe)
    write, run = EXPORTERS[settings.format]
    found: dict[str, float] = {}

    def write_checked(tmp: str) -> None:
        with torch.no_grad():
            try:
                write(exported, example, tmp)
            except (RuntimeError, ValueError, TypeError) as error:  # e.g. a forward that branches on the data
                raise SynthkdError(f"the {settings.format} exporter cannot export this model ({type(error).__name__}: "
                                   f"{one_line(error)}); nothing was written") from error
            found["max_abs_diff"] = float((run(tmp, probe) - expected).abs().max())
        if not found["max_abs_diff"] <= settings.tolerance:
            raise SynthkdError(f"the {settings.format} export differs from PyTorch by up to {found['max_abs_diff']:.3g} "
                               f"on the probe batch (tolerance {settings.tolerance:g}); nothing was written")

    atomic_write(out, write_checked)
    record = {"format": settings.format, "file": out.name, "input_shape": list(shape), "input_range": [0.0, 1.0],
              "class_names": list(model.config.class_names), "probe_batch": settings.probe_batch,
              "max_abs_diff": found["max_abs_diff"], "tolerance": settings.tolerance, "seed": seed}
    atomic_write_json(record_path, record)
    return record


class FixedShape(nn.Module):
    """What is exported: the classifier for images of its own input shape, normalisation and
    network (resizing and channel conversion do nothing there, and their shape tests would trace
    as branches on the data)."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.net(self.model.input_format.normalize(images))


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines, log lines and warnings are not the user's business; a
    warning of the TorchScript tracer is (the trace may hold one branch of the forward only), and
    refuses the export."""
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("always")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
    traced = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if traced:
        raise SynthkdError(f"tracing this model for TorchScript warns that the trace may be wrong ({one_line(traced[0].message)}); "
                           "a trace keeps one path through a forward that depends on the data; nothing was written")


def _write_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
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


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> None:
    with _quiet():
        torch.jit.trace(model, example).save(path)


def _run_torchscript(path: str, probe: torch.Tensor) -> torch.Tensor:
    return torch.jit.load(path)(probe)


def _write_exported_program(model: nn.Module, example: torch.Tensor, path: str) -> None:
    batch = torch.export.Dim("batch", min=1)
    with _quiet():
        program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}})
    with open(path, "wb") as file:  # a file object: the temporary file's name does not end in .pt2
        torch.export.save(program, file)


def _run_exported_program(path: str, probe: torch.Tensor) -> torch.Tensor:
    with open(path, "rb") as file:
        return torch.export.load(io.BytesIO(file.read())).module()(probe)


EXPORTERS: dict[str, tuple[Callable[[nn.Module, torch.Tensor, str], None], Callable[[str, torch.Tensor], torch.Tensor]]] = {
    "onnx": (_write_onnx, _run_onnx),
    "torchscript": (_write_torchscript, _run_torchscript),
    "exported-program": (_write_exported_program, _run_exported_program),
}
