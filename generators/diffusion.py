"""Diffusion sampling: any diffusers pipeline as a source of synthetic inputs.

The pipeline is loaded by hub id or local directory (``DiffusionPipeline.from_pretrained``), its
scheduler may be swapped by name, and it is driven in one of three ways, read from its
``__call__`` signature: unconditional (``batch_size``, e.g. DDPM/DDIM), class-conditional
(``class_labels``, e.g. DiT; teacher classes map to the pipeline's label ids through a table)
or text-to-image (``prompt``, one prompt per teacher class from a template). Samples are
converted to the teacher's input format (resize, RGB <-> grayscale) by the teacher's own
:class:`~synthkd.models.InputFormat`; the teacher labels them in ``pipelines/generate.py``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthkd.errors import SynthkdError
from synthkd.models import InputFormat, weights_fingerprint
from synthkd.settings import Settings, refusal, setting

from .base import SyntheticImageGenerator
from .registry import GENERATORS, GeneratorEntry

# Short names for the schedulers most pipelines can use; any other diffusers scheduler class
# name (e.g. "LMSDiscreteScheduler") is accepted as well.
SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "dpm-solver-sde": "DPMSolverSDEScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
PIPELINE_INDEX = "model_index.json"
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# How far the pipeline's aspect ratio may differ from the teacher's before resizing distorts.
ASPECT_TOLERANCE = 0.05


def looks_like_path(spec: str) -> bool:
    """A local directory rather than a hub id (``owner/name``): absolute, relative, or deeper."""
    return Path(spec).is_absolute() or spec.startswith((".", "~")) or spec.count("/") != 1 or Path(spec).exists()


def _pipeline_problem(spec: str) -> str | None:
    if looks_like_path(spec) and not Path(spec).expanduser().is_dir():
        return f"no pipeline directory {spec}"
    return None


def load_class_table(text: str | None) -> dict[str, int | str]:
    """``--class-table``: a JSON file, or a JSON object given inline."""
    if not text:
        return {}
    source = Path(text)
    try:
        table = json.loads(source.read_text() if source.is_file() else text)
    except (OSError, json.JSONDecodeError) as error:
        raise SynthkdError(
            f"{text!r} is neither a readable JSON file nor a JSON object ({error}); "
            'give e.g. {"Sneaker": 770, "Bag": 414}'
        ) from error
    if not isinstance(table, dict) or not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in table.values()):
        raise SynthkdError("must be a JSON object mapping teacher classes to label ids or names")
    return {str(key): value for key, value in table.items()}


@dataclass
class DiffusionSettings(Settings):
    """A diffusers pipeline sampled for images (``generate --method diffusion``, ``generate.diffusion``)."""

    pipeline: str | None = setting(None, check=_pipeline_problem,
                                   help="--method diffusion: a diffusers pipeline directory or hub id.")
    steps: int = setting(50, positive=True, help="--method diffusion: denoising steps.")
    scheduler: str | None = setting(None, help="--method diffusion: swap the pipeline's scheduler (ddpm, ddim, "
                                               "dpm-solver, euler, unipc, ... or a diffusers scheduler class name).")
    guidance_scale: float | None = setting(None, help="--method diffusion: classifier-free guidance scale "
                                                      "(default: the pipeline's).")
    prompt_template: str = setting("a photo of a {name}", help="--method diffusion, text-to-image: the prompt of a class.")
    class_table: str | None = setting(None, check=refusal(load_class_table),
                                      help="--method diffusion: JSON (file or inline) mapping teacher classes to the "
                                           "pipeline's label ids (class-conditional) or prompt names (text-to-image).")
    sample_batch_size: int | None = setting(None, positive=True,
                                            help="--method diffusion: images per pipeline call (default: --batch-size).")


PIPELINE_NEEDED = ("is needed by the diffusion method: a diffusers pipeline directory (e.g. from "
                   "`synthkd train-diffusion`) or a hub id owner/name")


def load_pipeline(spec: str):
    """A diffusers pipeline from a local directory or a hub id, with a clear error otherwise."""
    from diffusers import DiffusionPipeline

    path = Path(spec)
    if path.exists():
        if not (path / PIPELINE_INDEX).is_file():
            raise SynthkdError(
                f"{spec} is not a diffusers pipeline: a pipeline directory holds {PIPELINE_INDEX} and one "
                "sub-directory per component (unet/ or transformer/, scheduler/, ...), as written by "
                "save_pretrained; train one with `synthkd train-diffusion --out DIR`"
            )
    elif not _HUB_ID.match(spec):
        raise SynthkdError(f"{spec} does not exist; give a diffusers pipeline directory or a hub id (org/name)")
    try:
        pipeline = DiffusionPipeline.from_pretrained(spec)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as error:
        where = "the directory" if path.exists() else "the hub (no such local directory; is the hub reachable?)"
        raise SynthkdError(f"cannot load the diffusers pipeline {spec} from {where}: {error}") from error
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_fingerprint(pipeline) -> str:
    """The pipeline's identity by content: its class, every component's config and the weights of
    its torch modules. A set records it, so a pipeline retrained at the same path is not taken for
    the one that made the shards already there."""
    from torch import nn

    components = pipeline.components
    header = {"pipeline": type(pipeline).__name__,
              "components": {name: _component_settings(c) for name, c in sorted(components.items())}}
    modules = [(f"{name}.", c) for name, c in sorted(components.items()) if isinstance(c, nn.Module)]
    return weights_fingerprint(header, modules)


def _component_settings(component) -> dict[str, Any] | str:
    """A component's config without where it was loaded from or by which library version."""
    config = getattr(component, "config", None)
    if hasattr(config, "to_dict"):  # transformers configs
        config = config.to_dict()
    if not hasattr(config, "items"):
        return type(component).__name__
    return {k: v for k, v in config.items() if not k.startswith("_") and not k.endswith("_version")}


def scheduler_class(name: str):
    """The diffusers scheduler class for a short name or a class name."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS.get(name, name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise SynthkdError(
            f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or a diffusers scheduler class name"
        )
    return cls


def sampling_autocast(device: torch.device):
    """Half precision on CUDA (bfloat16 where supported), full precision elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def as_image_tensor(images: Any) -> torch.Tensor:
    """A pipeline's ``output_type="np"`` images (N, H, W, C) as a float (N, C, H, W) tensor."""
    if isinstance(images, torch.Tensor):
        return images.float()
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) if isinstance(images, list) else images
    if array.dtype == np.uint8 or array.max() > 1.5:  # PIL-style 0-255
        array = array.astype(np.float32) / 255.0
    if array.ndim == 3:
        array = array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2)


class DiffusionGenerator(SyntheticImageGenerator):
    """Samples a diffusers pipeline, aimed at the given targets when it is conditional."""

    method = "diffusion"
    collective = False  # sampling never communicates, so ranks need not keep in step

    def __init__(self, config: DiffusionSettings, input_format: InputFormat, class_names: list[str],
                 device: torch.device | str = "cpu", batch_size: int = 64):
        config.check()
        if config.pipeline is None:
            raise SynthkdError(f"pipeline {PIPELINE_NEEDED}")
        self.settings = config
        self.class_table = load_class_table(config.class_table)
        self.sample_batch_size = config.sample_batch_size or batch_size
        self.format = input_format
        self.device = torch.device(device)
        scheduler = scheduler_class(config.scheduler) if config.scheduler else None
        self.pipeline = load_pipeline(config.pipeline)
        self.fingerprint = pipeline_fingerprint(self.pipeline)  # before a --scheduler swap, which the settings record
        if scheduler is not None:
            self.pipeline.scheduler = scheduler.from_config(self.pipeline.scheduler.config)
        self.pipeline.to(self.device)
        self.parameters = set(inspect.signature(self.pipeline.__call__).parameters)
        self.conditioning = self._conditioning()
        self.aims_at_targets = self.conditioning != "unconditional"
        if config.guidance_scale is not None and "guidance_scale" not in self.parameters:
            raise SynthkdError(
                f"the {type(self.pipeline).__name__} at {config.pipeline} takes no guidance scale; drop --guidance-scale"
            )
        self.conditions = self._conditions(list(class_names))
        self.output_shape = self._check_output_shape()

    def config(self) -> dict[str, Any]:
        resolved = {"class_table": self.class_table, "sample_batch_size": self.sample_batch_size}
        return {**asdict(self.settings), **resolved, "conditioning": self.conditioning, "pipeline_output_shape": list(self.output_shape),
                "pipeline_fingerprint": self.fingerprint}

    def generate(self, targets: torch.Tensor, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # for pipelines whose scheduler draws from the global RNG
        batches = [self.sample(chunk.tolist(), generator) for chunk in targets.split(self.sample_batch_size)]
        return torch.cat(batches) if batches else torch.zeros(0, *self.format.shape)

    def sample(self, targets: list[int], generator: torch.Generator, steps: int | None = None) -> torch.Tensor:
        """One pipeline call: images in the teacher's input format, in [0,1], on the CPU."""
        return self.format.adapt(self._draw(targets, generator, steps)).clamp(0, 1)

    # ------------------------------------------------------------------ internals
    def _draw(self, targets: list[int], generator: torch.Generator, steps: int | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "num_inference_steps": steps or self.settings.steps, "generator": generator, "output_type": "np",
        }
        if self.conditioning == "unconditional":
            kwargs["batch_size"] = len(targets)
        else:
            key = "class_labels" if self.conditioning == "class" else "prompt"
            kwargs[key] = [self.conditions[t] for t in targets]
        if self.settings.guidance_scale is not None:
            kwargs["guidance_scale"] = self.settings.guidance_scale
        with sampling_autocast(self.device):
            images = self.pipeline(**kwargs).images
        return as_image_tensor(images).cpu()

    def _conditioning(self) -> str:
        if "prompt" in self.parameters:
            return "text"
        if "class_labels" in self.parameters:
            return "class"
        if "batch_size" in self.parameters:
            return "unconditional"
        raise SynthkdError(
            f"the {type(self.pipeline).__name__} at {self.settings.pipeline} takes none of prompt, class_labels or "
            "batch_size, so synthkd cannot tell how to sample it"
        )

    def _conditions(self, class_names: list[str]) -> list[Any]:
        """Per teacher class: the pipeline label id (class), the prompt (text), or None."""
        table = self.class_table
        if self.conditioning == "unconditional":
            if table:
                raise SynthkdError(f"{self.settings.pipeline} is unconditional, so a class table has no use; drop --class-table")
            return [None] * len(class_names)
        known = set(class_names) | {str(i) for i in range(len(class_names))}
        unknown = sorted(set(table) - known)
        if unknown:
            raise SynthkdError(
                f"the class table names {', '.join(unknown)}, which are not teacher classes ({', '.join(class_names)})"
            )
        chosen = {i: table[key] for i, name in enumerate(class_names) for key in (str(i), name) if key in table}
        if self.conditioning == "class":
            return self._label_ids(class_names, chosen)
        return self._prompts(class_names, chosen)

    def _label_ids(self, class_names: list[str], chosen: dict[int, int | str]) -> list[int]:
        labels = getattr(self.pipeline, "labels", None) or {}  # DiT: its label names -> ids
        ids: dict[int, int] = {}
        for i, name in enumerate(class_names):
            value = chosen.get(i, name if not chosen else None)
            if isinstance(value, int):
                ids[i] = value
            elif isinstance(value, str) and value in labels:
                ids[i] = int(labels[value])
        missing = [name for i, name in enumerate(class_names) if i not in ids]
        if missing:
            raise SynthkdError(
                f"the class table misses teacher classes {', '.join(missing)} (or maps them to names the pipeline "
                f"does not know); give --class-table with a label id of {self.settings.pipeline} for each, "
                f'e.g. {{"{missing[0]}": 0}}'
            )
        return [ids[i] for i in range(len(class_names))]

    def _prompts(self, class_names: list[str], chosen: dict[int, int | str]) -> list[str]:
        names = {i: str(chosen.get(i, name)) for i, name in enumerate(class_names)}
        unnamed = [str(i) for i, name in names.items() if name == str(i)]
        if unnamed:
            raise SynthkdError(
                f"the text-to-image pipeline needs a class name for each teacher class, but classes "
                f"{', '.join(unnamed)} have none; give --class-table with a name for each, e.g. "
                f'{{"{unnamed[0]}": "sneaker"}}'
            )
        try:
            return [self.settings.prompt_template.format(name=names[i]) for i in range(len(class_names))]
        except (KeyError, IndexError, ValueError) as error:
            raise SynthkdError(
                f"--prompt-template {self.settings.prompt_template!r} is not a template with one {{name}} field ({error})"
            ) from error

    def _check_output_shape(self) -> tuple[int, int, int]:
        """One image with one step: its size must map to the teacher's input without distortion."""
        channels, height, width = self._draw([0], torch.Generator().manual_seed(0), steps=1).shape[1:]
        fmt = self.format
        where = f"{self.settings.pipeline} makes {channels}x{height}x{width} images"
        if channels not in (1, 3, fmt.channels):
            raise SynthkdError(f"{where}; only 1- or 3-channel images convert to the teacher's {fmt.channels} channels")
        if abs((height / width) / (fmt.height / fmt.width) - 1) > ASPECT_TOLERANCE:
            raise SynthkdError(
                f"{where} but the teacher takes {fmt.height}x{fmt.width}: resizing would distort them; "
                "use a pipeline with the teacher's aspect ratio"
            )
        return channels, height, width


def _pipeline_files(section: DiffusionSettings) -> list[str]:
    pipeline = section.pipeline
    return [pipeline] if pipeline and Path(pipeline).is_dir() else []


GENERATORS.add("diffusion", GeneratorEntry(
    build=lambda settings, teacher, competitor, seed: DiffusionGenerator(
        settings.section(), teacher.input_format, list(teacher.config.class_names), next(teacher.parameters()).device,
        settings.batch_size),
    summary="sample a diffusers pipeline (--pipeline)",
    settings=DiffusionSettings,
    required={"pipeline": PIPELINE_NEEDED},
    files=_pipeline_files,
))
