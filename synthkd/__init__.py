"""synthkd: distill image classifiers without their training data.

The Python API, the stages the command line runs, as functions (each imports what it needs when
called, so ``import synthkd`` stays light)::

    import synthkd

    teacher = synthkd.load_model("teacher/")                     # a model directory, FILE.py:factory, ...
    synthkd.generate(teacher, "synthetic/", num_images=2048)     # settings as in `synthkd generate -h`
    student, metrics = synthkd.distill(teacher, "synthetic/", "student/", student="resnet8", epochs=20,
                                       eval_dataset="digits:test")
    synthkd.evaluate(student, "digits:test")["accuracy"]

Settings are keyword arguments named as the YAML keys of ``synthkd run`` (the option names with
``_``); nested sections are dicts (``fast={"steps_per_batch": 5}``); every problem is reported at
once as a :class:`synthkd.errors.SynthkdError`. ``mixed_precision`` None leaves the precision to
Accelerate (``accelerate launch`` / ``accelerate config``); ``tracker`` sends the curves live to an
Accelerate tracker under ``OUT/trackers``. Progress is logged through the ``synthkd`` logger
(``logging.basicConfig(level=logging.INFO)`` shows it).

The library core lives here; the synthetic-data stage (``generators/``) and the stages wired
together (``pipelines/``) sit beside it in a checkout, reached as ``synthkd.generators`` and
``synthkd.pipelines`` through the links ``synthkd/generators`` and ``synthkd/pipelines`` (and
installed under those names by setuptools' package-dir), so nothing else of the checkout imports
as part of the package.
"""

from __future__ import annotations

import os
import sys
import types
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .detector import Detector
    from .models import Classifier

__version__ = "0.1.0"

__all__ = ["load_model", "generate", "distill", "search", "calibrate", "evaluate", "export"]


def load_model(spec: str | os.PathLike, weights: str | os.PathLike | None = None,
               input_shape: Sequence[int] | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> "Classifier":
    """A classifier from a model spec (``synthkd distill -h`` lists the forms): a model directory,
    a model source (``"torchvision:resnet18?weights=DEFAULT"``, ``timm:``, ``hf:``, ``hub:``), or
    ``FILE.py:factory`` / ``module:factory`` with its ``weights`` and input format."""
    from .models import load_model as load

    return load(spec, weights, input_shape, mean, std)


def generate(teacher: "Classifier | str", out: str | os.PathLike, *, seed: int = 0, competitor: "Classifier | str | None" = None,
             mixed_precision: str | None = None, tracker: str | None = None, **settings: Any) -> dict[str, Any]:
    """Make a synthetic set from ``teacher`` alone into ``out`` (resumed if it is there); returns
    its manifest. ``settings``: those of ``synthkd generate`` (``method="fast"``, ``num_images``,
    ``iterations``, ...); ``competitor``: a student the inputs should make disagree with the teacher."""
    from .pipelines.generate import GenerateSettings, generate_set

    teacher, competitor = _model(teacher), _model(competitor)
    section = _settings(GenerateSettings, settings)
    with _accelerated("generate", out, mixed_precision, tracker, {**section.relevant(), "seed": seed}) as accelerator:
        if competitor is not None:
            competitor = competitor.to(accelerator.device)
        return generate_set(section, teacher, out, seed, accelerator, competitor)


def distill(teacher: "Classifier | str", data: str | os.PathLike, out: str | os.PathLike, *, student: str = "resnet20",
            width: float = 0.5, seed: int = 0, eval_dataset: str | None = None, inputs: str = "images",
            mixed_precision: str | None = None, tracker: str | None = None, **settings: Any) -> tuple["Classifier", dict[str, Any]]:
    """Distill ``student`` (a zoo architecture at ``width``, or a model to start from) from
    ``teacher`` on the synthetic set ``data`` and save it to ``out``; returns the student and its
    metrics (with ``eval_dataset``, the teacher's and student's accuracy on it). ``settings``: those
    of ``synthkd distill`` (``epochs``, ``mode="neighbourhood"``, ``temperature``, ...)."""
    from .pipelines.distill import DistillSettings, StudentSettings, distill as run_distill

    teacher = _model(teacher)
    section, chosen = _settings(DistillSettings, settings), _settings(StudentSettings, {"arch": student, "width": width})
    config = {"distill": section.to_dict(), "student": chosen.to_dict(), "data": str(data), "seed": seed}
    with _accelerated("distill", out, mixed_precision, tracker, config) as accelerator:
        return run_distill(teacher, chosen, data, out, section, seed, eval_dataset, accelerator, inputs)


def search(teacher: "Classifier | str", data: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0,
           eval_dataset: str | None = None, mixed_precision: str | None = None, tracker: str | None = None,
           **settings: Any) -> tuple["Classifier", dict[str, Any]]:
    """Student Search: the student with the least error under a budget (``budget="params=0.3"``,
    and the other settings of ``synthkd search``), saved to ``out``; returns it and the report."""
    from .pipelines.search import SearchSettings, search as run_search

    teacher = _model(teacher)
    section = _settings(SearchSettings, settings)
    with _accelerated("search", out, mixed_precision, tracker, {**section.to_dict(), "data": str(data), "seed": seed}) as accelerator:
        return run_search(teacher, data, out, section, seed, eval_dataset, accelerator)


def calibrate(model: "Classifier | str", data: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0,
              batchnorm_layers: Sequence[str] | None = None, mixed_precision: str | None = None,
              **settings: Any) -> "Detector":
    """A failure detector for ``model``: a density of its features on ``data`` (a synthetic set,
    image folder or dataset spec) with calibrated p-values, written to ``out``. ``settings``: those
    of ``synthkd calibrate`` (``density``, ``alpha``, ...)."""
    from .accelerator import make_accelerator
    from .detector.settings import CalibrationSettings
    from .pipelines.calibrate import calibrate as run_calibrate

    model = _model(model)
    return run_calibrate(model, data, out, _settings(CalibrationSettings, settings), seed=seed,
                         batchnorm_layers=batchnorm_layers, accelerator=make_accelerator(mixed_precision))


def evaluate(model: "Classifier | str", dataset: Any, *, batch_size: int = 512,
             mixed_precision: str | None = None) -> dict[str, Any]:
    """Accuracy of ``model`` on ``dataset`` (a dataset spec such as ``digits:test``, or a Dataset
    of labelled batches): ``{"accuracy", "num_images", "per_class"}``."""
    from .accelerator import make_accelerator
    from .data import load_dataset
    from .evaluation import evaluate as run_evaluate

    data = load_dataset(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    return run_evaluate(_model(model), data, make_accelerator(mixed_precision), batch_size)


def export(model: "Classifier | str", out: str | os.PathLike, *, format: str = "onnx", seed: int = 0,
           **settings: Any) -> dict[str, Any]:
    """Write ``model`` to ``out`` as ``format`` (onnx, torchscript, exported-program) once it
    matches PyTorch on a probe batch; returns the record of ``out``.json (``max_abs_diff``, input
    shape, class names). ``settings``: those of ``synthkd export`` (``probe_batch``, ``tolerance``)."""
    from .pipelines.export import ExportSettings, export_model

    model_dir = model if isinstance(model, (str, os.PathLike)) and os.path.isdir(model) else None
    return export_model(_model(model), out, _settings(ExportSettings, {"format": format, **settings}), seed, model_dir)


def _model(model: Any) -> Any:
    """A model given as a spec is loaded; a Classifier (or None) passes through."""
    return load_model(model) if isinstance(model, (str, os.PathLike)) else model


def _settings(cls: type, values: dict[str, Any]) -> Any:
    """``cls`` from keyword arguments, checked as a YAML section is: every problem in one error."""
    from .errors import SynthkdError

    errors: list[str] = []
    built = cls.from_mapping(values, "", errors)
    if errors:
        raise SynthkdError("; ".join(errors))
    return built


def _accelerated(command: str, out: str | os.PathLike, mixed_precision: str | None, tracker: str | None,
                 config: dict[str, Any]):
    from .accelerator import AcceleratorSettings, accelerated

    return accelerated(AcceleratorSettings(mixed_precision, tracker), command, out, config)


class _Package(types.ModuleType):
    """Keeps ``synthkd.search`` the function above: importing the subpackage ``synthkd.search``
    binds it as an attribute of its parent, which would hide the function (the subpackage stays
    importable: ``from synthkd.search import ...``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
