"""Stage: train a small unconditional DDPM on a real dataset, for when no pretrained diffusion
model is at hand. The result is a diffusers pipeline directory (``DDPMPipeline.save_pretrained``)
that ``synthkd generate --method diffusion --pipeline DIR`` and ``DDPMPipeline.from_pretrained``
load. Training follows diffusers' ``train_unconditional`` example: noise an image at a random
timestep, regress the noise with MSE, AdamW with warm-up and cosine decay, under Accelerate.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from synthkd.accelerator import log_progress, make_accelerator, progress_bar
from synthkd.data import load_dataset
from synthkd.io import atomic_write_json, read_json
from synthkd.models import InputFormat, unwrap
from synthkd.seeds import derive_seed
from synthkd.settings import Settings, setting
from synthkd.training import Checkpoint

from .distill import data_fingerprint

if TYPE_CHECKING:  # diffusers is imported where a model is built: it takes a second to import
    from diffusers import DDPMScheduler, UNet2DModel

METRICS_NAME = "metrics.json"


@dataclass
class DiffusionTrainSettings(Settings):
    """``synthkd train-diffusion``: a small UNet DDPM trained on real images."""

    epochs: int = setting(2, positive=True, help="Passes over the dataset.")
    max_steps: int | None = setting(None, positive=True, help="Optimiser steps (overrides --epochs).")
    batch_size: int = setting(128, positive=True, help="Images per optimiser step.")
    lr: float = setting(1e-3, positive=True, help="AdamW learning rate.")
    warmup_steps: int = setting(100, at_least=0, cli=False, help="Linear warm-up steps before the cosine decay.")
    image_size: int = setting(32, positive=True, help="Side the images are resized to (the UNet halves it once per "
                                                      "extra level).")
    # 0.66 s per step of 128 on 2 CPU cores; (32, 64, 64): 1.3 s
    block_out_channels: tuple[int, ...] = setting((16, 32, 64), help="UNet widths, one per level.")
    layers_per_block: int = setting(1, positive=True, cli=False, help="ResNet blocks per UNet level.")
    num_train_timesteps: int = setting(1000, positive=True, cli=False, help="Noise levels of the DDPM schedule.")
    seed: int = setting(0, help="Initial weights, batch order and noise.")

    def cross_problems(self) -> list[tuple[str, str]]:
        widths = self.block_out_channels
        if not widths or min(widths) < 1:
            return [("block_out_channels", f"must be positive widths, got {list(widths)}")]
        factor = 2 ** (len(widths) - 1)
        if self.image_size % factor:
            return [("image_size", f"must be divisible by {factor} for a UNet with {len(widths)} levels")]
        groups = min(8, min(widths))
        if any(c % groups for c in widths):
            return [("block_out_channels", f"every width must be divisible by {groups} (group normalisation)")]
        return []


def build_unet(config: DiffusionTrainSettings, channels: int) -> UNet2DModel:
    """A small UNet2DModel: plain ResNet blocks, self-attention only at the coarsest resolution."""
    from diffusers import UNet2DModel

    levels = len(config.block_out_channels)
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=config.layers_per_block,
        block_out_channels=tuple(config.block_out_channels),
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        norm_num_groups=min(8, min(config.block_out_channels)),
    )


def train_diffusion(
    dataset: str,
    out: str | os.PathLike,
    config: DiffusionTrainSettings | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Train a DDPM on ``dataset`` and save it to ``out``; returns the metrics. A stopped run
    resumes after its last finished epoch; a finished one is returned as it is."""
    config = config or DiffusionTrainSettings()
    config.check()
    accelerator = accelerator or make_accelerator()
    out = Path(out)
    if (out / METRICS_NAME).is_file() and (out / "model_index.json").is_file():
        metrics = read_json(out / METRICS_NAME)
        if metrics.get("config") == _plain(asdict(config)) and metrics.get("dataset") == dataset:
            return metrics
    data = load_dataset(dataset)
    channels = data[0].images.shape[0]
    model_format = InputFormat(channels, config.image_size, config.image_size)

    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    set_seed(config.seed)  # the initial weights come from the global RNG
    unet = build_unet(config, channels)
    noise_scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps)
    order = torch.Generator()  # seeded per epoch, so a resumed run sees the same order
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, drop_last=len(data) > config.batch_size,
                        generator=order)
    steps_per_epoch = len(loader)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=1e-2)
    # A prepared scheduler steps once per process for every optimiser step.
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, min(config.warmup_steps, total_steps // 4) * accelerator.num_processes,
        total_steps * accelerator.num_processes,
    )
    checkpoint = Checkpoint(out, config, accelerator, {"data": data_fingerprint(dataset, data)})
    history = checkpoint.restore(unet, optimizer, lr_scheduler)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)

    run = DiffusionTraining(unet, optimizer, lr_scheduler, noise_scheduler, model_format, config, accelerator, total_steps)
    run.step = sum(record["steps"] for record in history)
    for epoch in range(len(history), epochs):
        order.manual_seed(derive_seed(config.seed, "epoch", epoch))
        history.append(run.epoch(loader, epoch, epochs))
        checkpoint.save(accelerator.unwrap_model(unet), optimizer, lr_scheduler, history)
    return run.finish(dataset, out, history)


class DiffusionTraining:
    """The training loop of :func:`train_diffusion` on prepared objects: epochs, then the saved pipeline."""

    def __init__(self, unet, optimizer, lr_scheduler, noise_scheduler: DDPMScheduler, model_format: InputFormat,
                 config: DiffusionTrainSettings, accelerator: Accelerator, total_steps: int):
        self.unet, self.optimizer, self.lr_scheduler, self.noise_scheduler = unet, optimizer, lr_scheduler, noise_scheduler
        self.format, self.config, self.accelerator, self.total_steps = model_format, config, accelerator, total_steps
        self.step = 0

    def epoch(self, loader: DataLoader, epoch: int, epochs: int) -> dict[str, Any]:
        """One epoch (cut short at ``total_steps``); returns its record."""
        accelerator = self.accelerator
        self.unet.train()
        started, total, batches = time.perf_counter(), 0.0, 0
        bar = progress_bar(accelerator, loader, desc=f"train-diffusion {epoch + 1}/{epochs}", leave=False)
        for batch in bar:
            if self.step >= self.total_steps:
                break
            loss = self.train_step(batch.images)
            self.step, total, batches = self.step + 1, total + loss, batches + 1
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        mean = accelerator.reduce(torch.tensor(total / max(1, batches), device=accelerator.device), "mean").item()
        record = {"epoch": epoch + 1, "steps": batches, "loss": mean, "seconds": time.perf_counter() - started}
        log_progress(accelerator, "train-diffusion", record)
        return record

    def train_step(self, images: torch.Tensor) -> float:
        """Noise the images at random timesteps and regress the noise (MSE); returns the loss."""
        clean = self.format.adapt(images) * 2 - 1  # the UNet works on [-1, 1]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.config.num_train_timesteps, (len(clean),), device=clean.device)
        with self.accelerator.autocast():
            predicted = self.unet(self.noise_scheduler.add_noise(clean, noise, timesteps), timesteps).sample
        loss = F.mse_loss(predicted.float(), noise)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.lr_scheduler.step()
        return loss.item()

    def finish(self, dataset: str, out: Path, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Save the pipeline and the metrics (written last: the run is complete); returns the metrics."""
        accelerator, config = self.accelerator, self.config
        metrics = {
            "dataset": dataset,
            "config": _plain(asdict(config)),
            "image_shape": [self.format.channels, config.image_size, config.image_size],
            "parameters": sum(p.numel() for p in unwrap(self.unet).parameters()),
            "steps": self.step,
            "history": history,
            "train_seconds": sum(record["seconds"] for record in history),
            "num_processes": accelerator.num_processes,
        }
        if accelerator.is_main_process:
            from diffusers import DDPMPipeline

            unet = accelerator.unwrap_model(self.unet)
            DDPMPipeline(unet=unet, scheduler=self.noise_scheduler).save_pretrained(out)
            atomic_write_json(out / METRICS_NAME, metrics)
        accelerator.wait_for_everyone()
        return metrics


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """The config as JSON reads it back (tuples become lists), to compare with a finished run."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
