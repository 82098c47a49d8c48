"""A classifier is a network plus the input format it expects, saved as a directory.

Every stage hands images in [0, 1] to :class:`Classifier`; it resizes, converts channels and
normalises them to what the network was trained on, so a model trained on 8x8 digits and one
trained on 28x28 Fashion-MNIST take the same batches. On disk: ``model.safetensors`` (the
network's state dict) and ``config.json`` (architecture, its arguments, input format, classes).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..errors import SynthkdError, one_line, unpickling_problem
from ..io import atomic_write, atomic_write_json, read_json, read_safetensors
from .registry import create_model, is_registered, list_models
from .sources import TRUSTED_ARCHS, fetch_request, is_library_source, is_source_spec, open_source, source_usages

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class InputFormat:
    """What the network eats: channels, height, width and the normalisation of [0,1] pixels."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise SynthkdError(
                    f"{name} has {len(values)} values but the input has {self.channels} channels; "
                    f"give one value or one per channel"
                )
        if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in self.shape):
            raise SynthkdError(f"the input shape must be three positive integers C, H, W, got {list(self.shape)}")
        if any(s <= 0 for s in self.std):
            raise SynthkdError(f"std must be positive, got {self.std}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def convertible_channels(self) -> list[int]:
        """Channel counts :meth:`adapt` takes: this format's, grey (expanded) and RGB to grey."""
        return sorted({self.channels, 1} | ({3} if self.channels == 1 else set()))

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and convert channels of [0,1] images to this format (no-op when they match)."""
        channels = images.shape[1]
        if channels != self.channels:
            if channels not in self.convertible_channels:
                raise SynthkdError(
                    f"cannot convert {channels}-channel images to the model's {self.channels} channels"
                )
            if channels == 1:
                images = images.expand(-1, self.channels, -1, -1)
            else:
                weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                images = (images * weights).sum(1, keepdim=True)
        if images.shape[-2:] != (self.height, self.width):
            images = F.interpolate(
                images, size=(self.height, self.width), mode="bilinear", align_corners=False,
                antialias=images.shape[-1] > self.width,
            )
        return images

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        return (images - mean) / std


@dataclass
class ModelConfig:
    """Everything needed to rebuild a classifier without the code that trained it."""

    arch: str
    input: InputFormat
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    # 1x1 convolutions after cut modules, left by merging neighbourhoods of a narrower student.
    cut_adapters: dict[str, int] = field(default_factory=dict)
    # A student born from a teacher by pruning: the teacher's fingerprint and, per pruned module,
    # the teacher's indices of the output channels it kept (its interfaces in neighbourhood mode).
    born_from: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "input_shape": list(self.input.shape),
            "mean": list(self.input.mean),
            "std": list(self.input.std),
            "class_names": list(self.class_names),
        }
        if self.cut_adapters:
            data["cut_adapters"] = dict(self.cut_adapters)
        if self.born_from:
            data["born_from"] = self.born_from
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {"arch", "arch_kwargs", "input_shape", "mean", "std", "class_names", "cut_adapters", "born_from"}
        unknown = set(data) - known
        if unknown or "arch" not in data or "input_shape" not in data:
            raise SynthkdError(
                f"bad model config: unknown keys {sorted(unknown)}" if unknown
                else "bad model config: 'arch' and 'input_shape' are required"
            )
        channels, height, width = data["input_shape"]
        return cls(
            arch=data["arch"],
            arch_kwargs=dict(data.get("arch_kwargs", {})),
            input=InputFormat(channels, height, width, data.get("mean", (0.0,)), data.get("std", (1.0,))),
            class_names=list(data.get("class_names", [])),
            cut_adapters={str(k): int(v) for k, v in data.get("cut_adapters", {}).items()},
            born_from=dict(data.get("born_from", {})),
        )


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """Resolve ``path/to/file.py:factory`` or ``package.module:factory`` to a callable."""
    if ":" not in spec:
        raise SynthkdError(
            f"{spec!r} is neither a zoo architecture ({', '.join(list_models())}), "
            f"a model source ({source_usages()}) nor FILE.py:factory / module:factory"
        )
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise SynthkdError(f"model file {target} does not exist; check the path in {spec!r}")
        module_name = "synthkd_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise SynthkdError(f"cannot import module {target!r} for {spec!r}: {error}") from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SynthkdError(f"{target} has no callable {name!r} (from {spec!r})")
    return factory


# The model directory being loaded without the user's trust: code its config names is refused,
# except the architectures trusted (sources.TRUSTED_ARCHS: True, every one, is what --trust-code says).
_UNTRUSTED_DIRECTORY: ContextVar[Path | None] = ContextVar("synthkd_untrusted_directory", default=None)


def arch_needs_trust(arch: str) -> bool:
    """Whether building ``arch`` runs code the user has to opt into when a model directory (a data
    file someone may have handed over) names it: everything but a zoo name and a library source
    (torchvision:, timm:, hf: build from installed libraries; hub: runs a repository's hubconf.py)."""
    return not is_registered(arch) and not is_library_source(arch)


@contextmanager
def trusting_code(trusted: bool = True, archs: Iterable[str] = ()) -> Iterator[None]:
    """Within: model directories may name code (FILE.py:factory, module:factory) that their loading
    imports and calls: any (``trusted``, what ``--trust-code`` says for directories the user wrote),
    or the architectures in ``archs`` (ones the user named, e.g. in a run config)."""
    before = TRUSTED_ARCHS.get()
    token = TRUSTED_ARCHS.set(True if trusted or before is True else before | frozenset(archs))
    try:
        yield
    finally:
        TRUSTED_ARCHS.reset(token)


@contextmanager
def _loading_directory(directory: Path) -> Iterator[None]:
    token = _UNTRUSTED_DIRECTORY.set(directory)
    try:
        yield
    finally:
        _UNTRUSTED_DIRECTORY.reset(token)


def build_network(arch: str, arch_kwargs: dict[str, Any]) -> nn.Module:
    """The network ``arch`` names; refused where a model directory loaded without trust names code
    (nested architectures, such as a chain's sources, pass through here too)."""
    directory, trusted = _UNTRUSTED_DIRECTORY.get(), TRUSTED_ARCHS.get()
    if directory is not None and arch_needs_trust(arch) and trusted is not True and arch not in trusted:
        raise SynthkdError(
            f"{directory / CONFIG_NAME} names code (arch {arch!r}); loading a model directory never runs code: "
            f"pass --trust-code if you wrote it, or name the factory yourself as the model, with "
            f"{directory / WEIGHTS_NAME} as its weights and --input-shape"
        )
    request = fetch_request(arch, arch_kwargs) if directory is not None else None
    if request:
        raise SynthkdError(
            f"{directory / CONFIG_NAME} asks {arch} for its weights ({request}); loading a model directory never "
            f"downloads, its weights are {directory / WEIGHTS_NAME}: remove that from the config"
        )
    if is_registered(arch):
        return create_model(arch, **arch_kwargs)
    if is_source_spec(arch):
        return open_source(arch, arch_kwargs).net
    net = import_factory(arch)(**arch_kwargs)
    if not isinstance(net, nn.Module):
        raise SynthkdError(f"{arch} returned a {type(net).__name__}, not a torch.nn.Module; a factory returns the network")
    return net


class Classifier(nn.Module):
    """A network that takes [0,1] images in any size/channels and returns logits."""

    def __init__(self, net: nn.Module, config: ModelConfig):
        super().__init__()
        self.net = net
        self.config = config

    @property
    def input_format(self) -> InputFormat:
        return self.config.input

    @property
    def num_classes(self) -> int:
        return len(self.config.class_names)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmt = self.config.input
        return self.net(fmt.normalize(fmt.adapt(images)))

    @classmethod
    def from_config(cls, config: ModelConfig) -> "Classifier":
        net = build_network(config.arch, config.arch_kwargs)
        if config.cut_adapters:
            from .neighbourhoods import attach_cut_adapters

            attach_cut_adapters(net, config.cut_adapters)
        return cls(net, config)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``model.safetensors`` and ``config.json`` atomically into ``directory``."""
        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in unwrap(self.net).state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp))
        atomic_write_json(directory / CONFIG_NAME, self.config.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Classifier":
        """Rebuild a saved model. A config naming code (not a zoo architecture) is refused unless
        the caller trusts it: ``with trusting_code(): Classifier.from_pretrained(d)``."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise SynthkdError(
                f"{directory} is not a model directory (needs {WEIGHTS_NAME} and {CONFIG_NAME}); "
                "train one with `synthkd train-teacher` or pass FILE.py:factory with --teacher-weights"
            )
        try:
            config = ModelConfig.from_dict(read_json(directory / CONFIG_NAME))
        except (json.JSONDecodeError, TypeError, ValueError) as error:
            raise SynthkdError(f"{directory / CONFIG_NAME} is not a valid model config: {error}") from error
        try:
            with _loading_directory(directory):
                _check_size(directory, config)
                model = cls.from_config(config)
        except (TypeError, ValueError, KeyError) as error:
            raise SynthkdError(f"{directory / CONFIG_NAME}: cannot build {config.arch!r} with arch_kwargs "
                               f"{json.dumps(config.arch_kwargs, default=str)} ({one_line(error)})") from error
        load_weights(model.net, directory / WEIGHTS_NAME)
        return model

    def fingerprint(self) -> str:
        """A hash of config and weights: synthetic data records which teacher made it."""
        return weights_fingerprint(self.config.to_dict(), [("", self.net)])


def _check_size(directory: Path, config: ModelConfig) -> None:
    """Refuse a config whose network has more values than its weights file has bytes (a
    hand-edited ``"width": 2000`` asks for tens of GB), sized on the meta device, allocating nothing."""
    with torch.device("meta"):
        shapes = Classifier.from_config(config)
    values = sum(tensor.numel() for tensor in shapes.net.state_dict().values())
    stored = (directory / WEIGHTS_NAME).stat().st_size
    if values > stored:
        raise SynthkdError(
            f"{directory / CONFIG_NAME} describes a network of {values:,} values but {directory / WEIGHTS_NAME} holds "
            f"{stored:,} bytes: the config does not belong to these weights; restore the config.json saved with them"
        )


def weights_fingerprint(header: Any, modules: Iterable[tuple[str, nn.Module]]) -> str:
    """16 hex digits of sha256 over a JSON header and every tensor of the modules' state dicts, by
    prefixed name: weights identified by content, not by the path they were loaded from."""
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    for prefix, module in modules:
        for name, tensor in sorted(unwrap(module).state_dict().items()):
            digest.update(f"{prefix}{name}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP/compile wrappers."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return getattr(module, "_orig_mod", module)


def load_weights(net: nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors, or a plain state dict with ``weights_only=True`` (never arbitrary pickles)."""
    path = Path(path)
    if not path.is_file():
        raise SynthkdError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        state = read_safetensors(path, "save the weights again")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise SynthkdError(
                f"cannot load {path} as a state dict with weights_only=True ({unpickling_problem(error)}); "
                "save it as safetensors or as model.state_dict()"
            ) from error
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise SynthkdError(f"weights in {path} do not fit the architecture ({one_line(error)}); "
                           "give the weights saved with this architecture and arch_kwargs") from error
