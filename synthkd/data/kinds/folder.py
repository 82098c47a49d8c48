"""``folder:PATH``: image files, one sub-folder per class, or a flat folder of unlabelled images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...errors import SynthkdError
from ..datasets import ImageDataset, register_dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def folder_root(args: list[str]) -> Path:
    root = Path(":".join(args))
    if not root.is_dir():
        raise SynthkdError(f"image folder {root} does not exist (expected folder:/path with one sub-folder per class)")
    return root


def _entries(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, label) pairs; label -1 for a flat folder of unlabelled images."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    entries = [(f, label) for label, c in enumerate(classes) for f in sorted((root / c).iterdir())
               if f.suffix.lower() in IMAGE_SUFFIXES]
    if not entries:  # e.g. inputs to check with `synthkd detect`
        classes = []
        entries = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not entries:
        raise SynthkdError(f"no images found under {root}; expected {root}/CLASS_NAME/image.png or {root}/image.png")
    return classes, entries


@register_dataset("folder", usage="folder:PATH", check=folder_root,
                  description="image files in PATH/CLASS/ (or PATH/ unlabelled), resized to the first one's size")
def folder(args: list[str]) -> ImageDataset:
    from PIL import Image

    root = folder_root(args)
    classes, entries = _entries(root)
    # Open one file at a time: holding every image open runs out of file descriptors.
    modes, size = [], None
    for f, _ in entries:
        with Image.open(f) as im:
            modes.append(im.mode)
            size = size or im.size  # every image is resized to the first one's size
    mode = "L" if all(m in ("L", "1", "I;16") for m in modes) else "RGB"
    arrays = []
    for f, _ in entries:
        with Image.open(f) as im:
            arrays.append(np.asarray(im.convert(mode).resize(size, Image.BILINEAR)))
    images = torch.from_numpy(np.stack(arrays))
    images = images.unsqueeze(1) if mode == "L" else images.permute(0, 3, 1, 2)
    return ImageDataset(images.contiguous(), torch.tensor([l for _, l in entries]), classes, f"folder:{root}")
