"""Magnitude sparsity: the smallest weights of every convolution and linear layer set to zero and
held there while the rest trains (a student as dense as the teacher in shape, sparse in content)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def prune_by_magnitude(module: nn.Module, sparsity: float) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Zero the smallest-magnitude ``sparsity`` of every convolution and linear weight; returns
    (weight, mask of kept entries) pairs."""
    masks = []
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            magnitude = layer.weight.detach().abs()
            count = int(sparsity * magnitude.numel())
            if count == 0:
                continue
            keep = magnitude > magnitude.flatten().kthvalue(count).values
            with torch.no_grad():
                layer.weight.mul_(keep)
            masks.append((layer.weight, keep))
    return masks


def hold_at_zero(masks: list[tuple[nn.Parameter, torch.Tensor]]) -> list[Any]:
    """Gradient hooks that keep pruned entries at zero (no gradient: Adam and SGD leave them be)."""
    return [weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device)) for weight, keep in masks]
