"""Stage: make a per-neighbourhood activation set (no images) into the resumable format of
:mod:`synthkd.data.activations`; ranks share the (neighbourhood, shard) jobs round-robin."""

from __future__ import annotations

import os
from typing import Any

from accelerate import Accelerator

from synthkd.accelerator import make_accelerator, progress_bar
from synthkd.data.activations import ActivationWriter
from synthkd.generators.activations import ActivationSynthesizer
from synthkd.generators.base import teacher_record
from synthkd.models import Classifier
from synthkd.seeds import derive_seed


def generate_activations(
    teacher: Classifier,
    synthesizer: ActivationSynthesizer,
    num_inputs: int,
    out: str | os.PathLike,
    batch_size: int = 256,
    seed: int = 0,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """``num_inputs`` input activations for every neighbourhood of ``teacher`` made by ``synthesizer``;
    returns the manifest."""
    accelerator = accelerator or make_accelerator()
    teacher.to(accelerator.device)
    record = {"method": synthesizer.method, "config": {**synthesizer.config(), "seed": seed},
              "teacher": teacher_record(teacher), "names": synthesizer.names}
    writer = ActivationWriter(out, record, synthesizer.input_shapes, num_inputs, batch_size, accelerator)
    jobs = writer.pending()
    for k, shard in progress_bar(accelerator, jobs, desc="generate (activations)"):
        inputs = synthesizer.synthesize(k, writer.shard_count(shard), derive_seed(seed, "activations", k, shard))
        writer.write(k, shard, inputs)
    return writer.finalize()
