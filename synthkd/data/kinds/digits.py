"""``digits:SPLIT``: scikit-learn's 8x8 digits with a fixed, class-stratified train/test split."""

from __future__ import annotations

import numpy as np
import torch

from ..datasets import ImageDataset, register_dataset, split_args


def _check(args: list[str]) -> None:
    split_args(args, "digits", needs_path=False)


@register_dataset("digits", usage="digits:SPLIT", check=_check,
                  description="scikit-learn's 1,797 8x8 digits; every 4th image of each class is test")
def digits(args: list[str]) -> ImageDataset:
    from sklearn.datasets import load_digits

    _, split = split_args(args, "digits", needs_path=False)
    loaded = load_digits()
    images = torch.from_numpy(np.round(loaded.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(loaded.target.astype(np.int64))
    # A fixed, class-stratified split: every 4th image of each class is test.
    order = torch.argsort(labels, stable=True)
    rank_in_class = torch.empty_like(labels)
    for label in labels.unique():
        members = order[labels[order] == label]
        rank_in_class[members] = torch.arange(len(members))
    chosen = (rank_in_class % 4 == 3) if split == "test" else (rank_in_class % 4 != 3)
    return ImageDataset(images[chosen], labels[chosen], [str(i) for i in range(10)], f"digits:{split}")
