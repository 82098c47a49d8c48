"""The model spec grammar shown by ``-h`` (``--teacher``, ``--student``, ``--model``), kept in one
place: a new way to name a model adds its row here (or, for a registry of sources, its rows are
appended from that registry in :func:`model_spec_help`)."""

from __future__ import annotations

MODEL_SPEC_FORMS: tuple[tuple[str, str], ...] = (
    ("DIR", "a model directory written by synthkd (config.json + model.safetensors): carries its weights, "
            "input format and class names"),
    ("ARCH[:KEY=VALUE,...]", "a zoo architecture (see `synthkd models`) with its arguments, for a student: "
                             "--student resnet20:inner=0.5 (thinner inside each block, the teacher's width at every "
                             "cut), resnet20:blocks=1,width=0.5, resnet20:sparsity=0.5"),
    ("teacher[:inner=R]", "for a student: the teacher itself with every inner channel group of each neighbourhood "
                          "thinned to R (any traceable network, found with torch.fx)"),
    ("teacher:width=W|params=F|flops=F", "for a student: the teacher pruned through its dependency graph (torch-pruning; "
                                         "residual streams included) to width W of every channel group, or to the widest "
                                         "width within F of its parameters or FLOPs; importance=l1|bn|taylor and "
                                         "recalibrate=true|false (here or in a zoo spec that is a narrower copy of the "
                                         "teacher, e.g. resnet20:width=0.5) choose how it is born"),
    ("FILE.py:FACTORY", "a function in a Python file returning an nn.Module, with --weights / --teacher-weights "
                        "FILE and --input-shape C,H,W (--mean, --std)"),
    ("package.module:FACTORY", "the same, from an importable module"),
)


def model_spec_help() -> list[tuple[str, str]]:
    """(form, meaning) rows of every way to name a model: the fixed forms, then the model sources."""
    from .sources import SOURCES

    return list(MODEL_SPEC_FORMS) + [(SOURCES.get(name).usage, SOURCES.get(name).description) for name in SOURCES.names()]
