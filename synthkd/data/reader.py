"""Reading finished sets: the manifest and checksum checks both kinds of set share, the
synthetic image set as a Dataset of typed items, and probes for sets still being made."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from synthkd.errors import SynthkdError
from synthkd.io import inside, read_json, sha256_file

from .batches import SyntheticBatch
from .format import (
    IMAGE_TENSORS, MANIFEST_NAME, RUN_NAME, SYNTHETIC, SetFormat, load_shard, shard_id,
)


def open_manifest(path: Path, kind: SetFormat) -> dict:
    """The manifest of a finished set at ``path``, or an error saying how to make or resume it."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        if (path / RUN_NAME).is_file():
            raise SynthkdError(
                f"{path} is an unfinished {kind.noun} (no {MANIFEST_NAME}): its generation was interrupted; "
                f"rerunning the same `{kind.command}` command resumes it"
            )
        raise SynthkdError(f"{path} is not a {kind.noun} (no {MANIFEST_NAME}); make one with "
                           f"`{kind.command} ... --out DIR` and pass that DIR")
    try:
        manifest = read_json(manifest_path)
    except (OSError, json.JSONDecodeError) as error:
        raise SynthkdError(
            f"{manifest_path} is unreadable ({error}); delete it and rerun the same `{kind.command}` command"
        ) from error
    if not isinstance(manifest, dict) or manifest.get("format") != kind.name:
        raise SynthkdError(f"{manifest_path} is not a synthkd {kind.noun.replace(' ', '-')} manifest; "
                           f"make one with `{kind.command} ... --out DIR`")
    if manifest.get("version") != kind.version:
        raise SynthkdError(
            f"{path} uses {kind.noun} format version {manifest.get('version')}, this synthkd reads "
            f"version {kind.version}; regenerate it with this synthkd's `{kind.command}`"
        )
    return manifest


def read_listed_shard(path: Path, shard: dict, keys: tuple[str, ...], verify: bool, kind: SetFormat) -> dict[str, torch.Tensor]:
    """The tensors of a shard a manifest lists, after checking it exists and (``verify``) its sha256."""
    name = shard["file"]
    file = inside(path, name, MANIFEST_NAME)
    fix = f"delete {file} and rerun the same `{kind.command}` command to regenerate just that shard"
    if not file.is_file():
        raise SynthkdError(f"shard {name} of {path} is missing; rerun the same `{kind.command}` command to regenerate it")
    if verify and sha256_file(file) != shard["sha256"]:
        raise SynthkdError(f"shard {name} of {path} is corrupt (checksum mismatch); {fix}")
    try:
        return load_shard(file, keys)
    except Exception as error:  # safetensors raises several types for a damaged file
        raise SynthkdError(f"shard {name} of {path} is corrupt (cannot load: {error}); {fix}") from error


class SyntheticDataset(Dataset):
    """Reads a finished synthetic set; checks checksums so a corrupt shard is named, not trained on."""

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        """Load every shard eagerly (sets are small) after checking the manifest and checksums."""
        self.path = Path(path)
        self.manifest: dict = open_manifest(self.path, SYNTHETIC)
        shards = [self._read_shard(shard, verify) for shard in self.manifest["shards"]]
        if not shards:
            raise SynthkdError(f"{self.path / MANIFEST_NAME} lists no shards; regenerate the set with `{SYNTHETIC.command}`")
        try:
            self.images = torch.cat([shard["images"] for shard in shards])
        except RuntimeError as error:
            raise SynthkdError(f"shards of {self.path} have different image shapes ({error}); regenerate the set") from error
        self.logits = torch.cat([shard["logits"] for shard in shards])
        self.targets = torch.cat([shard["targets"] for shard in shards])
        self._check_totals()

    def _read_shard(self, shard: dict, verify: bool) -> dict[str, torch.Tensor]:
        name, count = shard["file"], int(shard["count"])
        if shard_id(name) is None:
            raise SynthkdError(f"{self.path / MANIFEST_NAME} lists an invalid shard name {name!r}; regenerate the set")
        tensors = read_listed_shard(self.path, shard, IMAGE_TENSORS, verify, SYNTHETIC)
        images, logits, targets = (tensors[key] for key in IMAGE_TENSORS)
        if (
            images.ndim != 4 or images.shape[0] != count
            or tuple(logits.shape) != (count, self.num_classes) or tuple(targets.shape) != (count,)
            or images.dtype != torch.float32 or logits.dtype != torch.float32 or targets.dtype != torch.int64
        ):
            raise SynthkdError(
                f"shard {name} of {self.path} is corrupt (holds {images.shape[0]} images with shapes "
                f"{tuple(images.shape)}/{tuple(logits.shape)}/{tuple(targets.shape)}, manifest says {count}); "
                f"delete {self.path / name} and rerun the same `{SYNTHETIC.command}` command to regenerate just that shard"
            )
        return tensors

    def _check_totals(self) -> None:
        """The concatenated shards agree with the manifest's size, class counts and image shape."""
        manifest = self.manifest
        if int(self.targets.min()) < 0:
            raise SynthkdError(f"{self.path} holds negative targets; regenerate the set with `{SYNTHETIC.command}`")
        counts = torch.bincount(self.targets, minlength=self.num_classes).tolist()
        expected_shape = manifest.get("image_shape")
        if (
            len(self.targets) != int(manifest["num_images"])
            or counts != list(manifest.get("counts_per_class", counts))
            or (expected_shape is not None and list(self.images.shape[1:]) != list(expected_shape))
        ):
            raise SynthkdError(
                f"{self.path} holds {len(self.targets)} images of shape {tuple(self.images.shape[1:])} with class "
                f"counts {counts}, but its manifest says {manifest['num_images']} of {expected_shape} with "
                f"{manifest.get('counts_per_class')}; regenerate the set with `{SYNTHETIC.command}`"
            )

    @property
    def num_classes(self) -> int:
        """Number of teacher classes (width of ``logits``)."""
        return int(self.manifest["num_classes"])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> SyntheticBatch:
        """(image C x H x W in [0,1], teacher logits, generator target)."""
        return SyntheticBatch(self.images[i], self.logits[i], int(self.targets[i]))


def load_written_shards(path: str | os.PathLike, loaded: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """The shards of a set that is still being made (read between generation rounds, when
    no write is in flight), added to ``loaded`` (name -> tensors) so each file is read once."""
    for shard in sorted(Path(path).glob("shard-*.safetensors")):
        if shard_id(shard.name) is not None and shard.name not in loaded:
            try:
                loaded[shard.name] = load_shard(shard, IMAGE_TENSORS)
            except Exception as error:  # safetensors raises several types for a damaged file
                raise SynthkdError(f"shard {shard} is corrupt ({error}); delete it and rerun to regenerate it") from error
    return loaded


def is_synthetic_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a finished synthetic set, so callers can tell it from a real data set."""
    manifest_path = Path(path) / MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == SYNTHETIC.name
