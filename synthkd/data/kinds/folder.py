"""``folder:PATH[:HxW]``: image files, one sub-folder per class, or a flat folder of unlabelled images.

Images are read when an item is asked for, one at a time, and each is resized to ``HxW`` (default:
the size most of the images have), so one huge file neither sets every image's size nor fills the
memory. Only the headers are read up front: a file over :data:`MAX_IMAGE_PIXELS` pixels, or one
with an image extension that is no image, is named before any work starts.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ...errors import SynthkdError
from ..datasets import register_dataset
from ..pil import PILDataset, decoding

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Largest image (width x height) a folder may hold, like PIL's Image.MAX_IMAGE_PIXELS;
# $SYNTHKD_MAX_IMAGE_PIXELS overrides it.
MAX_IMAGE_PIXELS = 50_000_000
_SIZE = re.compile(r"(\d+)x(\d+)")


def max_image_pixels() -> int:
    value = os.environ.get("SYNTHKD_MAX_IMAGE_PIXELS")
    if value is None:
        return MAX_IMAGE_PIXELS
    if not value.isdigit() or int(value) <= 0:
        raise SynthkdError(f"SYNTHKD_MAX_IMAGE_PIXELS must be a positive whole number, got {value!r}")
    return int(value)


def folder_args(args: list[str]) -> tuple[Path, tuple[int, int] | None]:
    """(folder, requested height x width or None) of ``folder:PATH[:HxW]``."""
    size = None
    if len(args) > 1 and (match := _SIZE.fullmatch(args[-1])):
        size = (int(match.group(1)), int(match.group(2)))
        args = args[:-1]
        if min(size) <= 0:
            raise SynthkdError(f"folder: the image size must be positive, got {size[0]}x{size[1]}")
    root = Path(":".join(args))
    if not root.is_dir():
        raise SynthkdError(f"image folder {root} does not exist (expected folder:/path with one sub-folder per class)")
    return root, size


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


def _header(path: Path, limit: int) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) of an image file, from its header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with decoding(path), Image.open(path) as image:
            mode, size = image.mode, image.size
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise SynthkdError(f"{path} is not an image PIL can read ({type(error).__name__}); remove it or "
                           "give it its real extension") from error
    if size[0] * size[1] > limit:
        raise SynthkdError(f"{path} has {size[0]}x{size[1]} pixels, over the limit of {limit}; shrink it, or raise "
                           "SYNTHKD_MAX_IMAGE_PIXELS if you mean it")
    return mode, size


class _ImageFiles:
    """``read(i)``: image file i, decoded (a file that cannot be is named), and its class id."""

    def __init__(self, files: list[Path], labels: list[int]):
        self.files, self.labels = files, labels

    def __call__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as image:
                image.load()
        except OSError as error:
            raise SynthkdError(f"{path} cannot be decoded ({error}); remove or replace it") from error
        return image, self.labels[index]


@register_dataset("folder", usage="folder:PATH[:HxW]", check=folder_args,
                  description="image files in PATH/CLASS/ (or PATH/ unlabelled), read on access and resized to HxW "
                              "(default: the most common size)")
def folder(args: list[str]) -> PILDataset:
    root, size = folder_args(args)
    classes, entries = _entries(root)
    limit = max_image_pixels()
    headers = [_header(f, limit) for f, _ in entries]
    mode = "L" if all(m in ("L", "1", "I;16") for m, _ in headers) else "RGB"
    if size is None:
        width, height = Counter(s for _, s in headers).most_common(1)[0][0]
        size = (height, width)
    suffix = f":{size[0]}x{size[1]}"
    read = _ImageFiles([f for f, _ in entries], [label for _, label in entries])
    return PILDataset(read, len(entries), classes, f"folder:{root}{suffix}", mode=mode, size=size)
