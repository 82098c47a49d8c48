"""Features of a classifier at a module path, taken with a forward hook (torchdistill style),
extracted in batches through Accelerate and cached on disk.

A feature layer names a module of the classifier's network (``model.net``); the feature is the
module's *input* (for the default, the last ``nn.Linear``: the penultimate representation), with
spatial dimensions averaged away when the input is a feature map. Optionally, BatchNorm layers
named by module path also give each input's *deviation* from the statistics the network stored
while it trained (see :func:`batchnorm_deviation`). The cache key joins the model's fingerprint,
the data's fingerprint and the layers, so a changed model or data set is never served stale
features.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import SynthkdError
from ..io import atomic_write
from ..models import Classifier

CACHE_ENV = "SYNTHKD_FEATURE_CACHE"


@dataclass
class Features:
    """Features, logits, labels (-1 where unknown) and BatchNorm deviations (N x layers; N x 0
    when none were asked for) of a set of inputs, row-aligned."""

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    deviations: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.deviations is None:
            self.deviations = self.features.new_zeros(len(self.features), 0)

    def __len__(self) -> int:
        return len(self.features)

    def select(self, index: torch.Tensor | slice) -> "Features":
        return Features(self.features[index], self.logits[index], self.labels[index], self.deviations[index])

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)


def default_layer(model: Classifier) -> str:
    """The module path of the last ``nn.Linear`` of the network: its input is the penultimate feature."""
    linear = [name for name, module in model.net.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise SynthkdError(
            f"{model.config.arch} has no nn.Linear layer to take features from; name a module with --layer "
            f"(one of: {', '.join(n for n, _ in model.net.named_modules() if n)})"
        )
    return linear[-1]


def resolve_layer(model: Classifier, layer: str | None) -> str:
    layer = layer or default_layer(model)
    modules = dict(model.net.named_modules())
    if layer not in modules or not layer:
        raise SynthkdError(
            f"the model has no module {layer!r} to take features from; use one of: "
            f"{', '.join(n for n in modules if n)}"
        )
    return layer


def batchnorm_layers(model: Classifier) -> list[str]:
    """Module paths of the network's BatchNorm layers that keep running statistics, in module order."""
    return [name for name, module in model.net.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]


def default_batchnorm_layers(model: Classifier) -> list[str]:
    """The middle half of the BatchNorm layers. The first ones barely react to failures and the
    last ones are where the failing inputs of some kinds (e.g. FGSM) look *more* typical; chosen on
    adversarial versions of training images (benchmarks/detector_fashion_mnist.py)."""
    layers = batchnorm_layers(model)
    quarter = len(layers) // 4
    return layers[quarter: len(layers) - quarter] or layers


def resolve_batchnorm_layers(model: Classifier, layers: Sequence[str] | None) -> list[str]:
    known = batchnorm_layers(model)
    if not known:
        raise SynthkdError(
            f"{model.config.arch} has no BatchNorm layer with running statistics; the BatchNorm term of the "
            "detector needs one (calibrate with --batchnorm-weight 0)"
        )
    layers = list(layers) if layers else default_batchnorm_layers(model)
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise SynthkdError(f"{unknown[0]!r} is not a BatchNorm layer with running statistics; use some of: {', '.join(known)}")
    return layers


def batchnorm_deviation(module: nn.Module, value: torch.Tensor) -> torch.Tensor:
    """Per input: the squared distance of its per-channel means from the layer's running means, in
    units of the running variances, averaged over channels. The running statistics were fitted on
    the network's own training data, so this is a (diagonal Gaussian) log-density of that data's
    channel means up to sign and constants, which no synthetic set is needed for."""
    means = value.float().mean(dim=tuple(range(2, value.ndim))) if value.ndim > 2 else value.float()
    return ((means - module.running_mean) ** 2 / (module.running_var + module.eps)).mean(1)


class FeatureHook:
    """Records the input of one module of the network on every forward pass."""

    def __init__(self, model: Classifier, layer: str):
        self.layer = layer
        self.value: torch.Tensor | None = None
        module = dict(model.net.named_modules())[layer]
        self.handle = module.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple) -> None:
        value = args[0]
        self.value = value.mean(dim=tuple(range(2, value.ndim))) if value.ndim > 2 else value

    def pop(self) -> torch.Tensor:
        if self.value is None:
            raise SynthkdError(f"module {self.layer!r} was not called in the forward pass; choose another --layer")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self) -> "FeatureHook":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class DeviationHooks:
    """Records :func:`batchnorm_deviation` at each named BatchNorm layer on every forward pass."""

    def __init__(self, model: Classifier, layers: Sequence[str]):
        modules = dict(model.net.named_modules())
        self.values: dict[str, torch.Tensor] = {}
        self.layers = list(layers)
        self.handles = [modules[name].register_forward_pre_hook(
            lambda module, args, name=name: self.values.__setitem__(name, batchnorm_deviation(module, args[0])))
            for name in self.layers]

    def pop(self, num_inputs: int, device: torch.device) -> torch.Tensor:
        """N x layers (N x 0 without layers)."""
        if not self.layers:
            return torch.zeros(num_inputs, 0, device=device)
        missing = [name for name in self.layers if name not in self.values]
        if missing:
            raise SynthkdError(f"BatchNorm layer {missing[0]!r} was not called in the forward pass")
        return torch.stack([self.values.pop(name) for name in self.layers], 1)

    def __enter__(self) -> "DeviationHooks":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def check_images(model: Classifier, images: torch.Tensor) -> None:
    """A batch the classifier can take: N x C x H x W with C convertible to the model's channels."""
    channels, accepted = model.input_format.channels, model.input_format.convertible_channels
    if images.ndim != 4:
        raise SynthkdError(
            f"inputs must be a batch of images N x C x H x W, got a tensor of shape {tuple(images.shape)}"
        )
    if images.shape[1] not in accepted:
        raise SynthkdError(
            f"inputs have {images.shape[1]} channels but the model takes {channels}; give "
            f"{' or '.join(map(str, accepted))}-channel images"
        )


def check_finite(features: torch.Tensor, what: str = "features") -> torch.Tensor:
    if features.ndim != 2:
        raise SynthkdError(f"{what} must be a matrix N x D, got shape {tuple(features.shape)}")
    bad = ~torch.isfinite(features).all(1)
    if bad.any():
        raise SynthkdError(
            f"{int(bad.sum())} of {len(features)} rows of {what} hold NaN or inf (first at row "
            f"{int(bad.nonzero()[0])}); check the inputs (NaN pixels?) and the model's weights"
        )
    return features


@torch.no_grad()
def features_of_batch(model: Classifier, images: torch.Tensor, layer: str, batchnorm: Sequence[str] = ()) -> Features:
    """Features, logits and BatchNorm deviations of one batch of [0,1] images (labels unknown), on
    the model's device."""
    check_images(model, images)
    with FeatureHook(model, layer) as hook, DeviationHooks(model, batchnorm) as deviation_hooks:
        logits = model(images).float()
        features = hook.pop().float().flatten(1)
        deviations = deviation_hooks.pop(len(images), logits.device)
    labels = torch.full((len(images),), -1, device=logits.device)
    return Features(check_finite(features), logits, labels, check_finite(deviations, "BatchNorm deviations"))


def _batch_images_labels(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and class ids of a typed batch (real or synthetic)."""
    images, labels = batch.images, batch.targets
    return images, torch.as_tensor(labels).long()


@torch.no_grad()
def extract(model: Classifier, dataset: Dataset, accelerator: Accelerator, layer: str, batch_size: int = 512,
            batchnorm: Sequence[str] = ()) -> Features:
    """Features, logits, labels and BatchNorm deviations of a whole data set, in batches, gathered
    from every process."""
    loader = accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, shuffle=False))
    model = model.to(accelerator.device).eval()
    parts: list[tuple[torch.Tensor, ...]] = []
    for batch in loader:
        images, labels = _batch_images_labels(batch)
        with accelerator.autocast():
            batch_features = features_of_batch(model, images.to(accelerator.device), layer, batchnorm)
        gathered = accelerator.gather_for_metrics((batch_features.features.float(), batch_features.logits.float(),
                                                   labels.to(accelerator.device), batch_features.deviations.float()))
        parts.append(tuple(t.cpu() for t in gathered))
    if not parts:
        raise SynthkdError("the data set is empty; nothing to take features from")
    return Features(*(torch.cat(column) for column in zip(*parts)))


def dataset_fingerprint(dataset: Dataset) -> str | None:
    """A content hash of the images of a data set, or None when it cannot be hashed cheaply."""
    digest = hashlib.sha256()
    if isinstance(dataset, Subset):
        inner = dataset_fingerprint(dataset.dataset)
        if inner is None:
            return None
        digest.update(inner.encode())
        digest.update(torch.as_tensor(list(dataset.indices)).numpy().tobytes())
    elif hasattr(dataset, "transforms") and hasattr(dataset, "dataset"):  # TransformedDataset
        inner = dataset_fingerprint(dataset.dataset)
        if inner is None:
            return None
        digest.update(f"{inner}|{'|'.join(dataset.transforms)}".encode())
    elif isinstance(getattr(dataset, "images", None), torch.Tensor):
        images = dataset.images.contiguous()
        digest.update(f"{tuple(images.shape)}{images.dtype}".encode())
        digest.update(images.numpy().tobytes())
    else:
        return None
    return digest.hexdigest()[:16]


def features_cache_dir(default: str | os.PathLike) -> Path:
    """``$SYNTHKD_FEATURE_CACHE`` if set (shared across runs), else ``default``."""
    return Path(os.environ.get(CACHE_ENV) or default)


def cached_extract(
    model: Classifier,
    dataset: Dataset | Callable[[], Dataset],
    accelerator: Accelerator,
    layer: str,
    cache_dir: str | os.PathLike | None,
    data_key: str | None = None,
    batch_size: int = 512,
    batchnorm: Sequence[str] = (),
) -> Features:
    """:func:`extract`, read from ``cache_dir`` when the same model, data and layer were seen before.
    ``dataset`` may be a function that makes the data (called only on a cache miss, e.g. an
    adversarial attack); then ``data_key`` must name it."""
    if not isinstance(dataset, Dataset):
        if data_key is None:
            raise ValueError("a dataset given as a function needs a data_key")
        make_dataset = dataset
    else:
        data_key = data_key or dataset_fingerprint(dataset)
        make_dataset = lambda: dataset  # noqa: E731
    if cache_dir is None or data_key is None:
        return extract(model, make_dataset(), accelerator, layer, batch_size, batchnorm)
    layers = layer + "".join(f"|bn:{name}" for name in batchnorm)
    key = hashlib.sha256(f"{model.fingerprint()}|{data_key}|{layers}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"features-{key}.safetensors"
    if path.is_file():
        try:
            return Features(**load_file(str(path)))
        except Exception:  # a damaged cache file is recomputed, never trusted
            pass
    features = extract(model, make_dataset(), accelerator, layer, batch_size, batchnorm)
    if accelerator.is_main_process:
        tensors = {"features": features.features.contiguous(), "logits": features.logits.contiguous(),
                   "labels": features.labels.contiguous(), "deviations": features.deviations.contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp))
    accelerator.wait_for_everyone()
    return features
