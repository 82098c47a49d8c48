"""Bad inputs, one table: for every command, each class of bad input gives exit code 2, exactly one
line on stderr, and leaves every existing file byte-identical (the whole work tree is hashed before
and after). The artefacts (teacher, synthetic set, student, detector, run) are made once, tiny."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from synthkd.cli import main
from synthkd.io import LOCK_NAME

TEACHER = ["--arch", "resnet8", "--width", "0.25", "--batch-size", "64"]


def invoke(*args, env: dict | None = None):
    """The command with "y" on stdin: no bad input may be accepted by answering a prompt."""
    return CliRunner().invoke(main, [str(a) for a in args], input="y\n", env=env)


def must_pass(*args):
    result = invoke(*args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """teacher -> synthetic set -> student -> detector -> a finished run, on digits, in seconds."""
    root = tmp_path_factory.mktemp("bad-inputs")
    must_pass("train-teacher", "--dataset", "digits:train[:256]", *TEACHER, "--epochs", 1, "--out", root / "teacher")
    must_pass("generate", "--teacher", root / "teacher", "--num-images", 32, "--batch-size", 16, "--iterations", 2,
              "--out", root / "set")
    must_pass("distill", "--teacher", root / "teacher", "--data", root / "set", "--student", "resnet8", "--student-width",
              "0.25", "--epochs", 1, "--batch-size", 16, "--out", root / "student")
    must_pass(*DISTILL(root, root / "student-real")[:3], "--data", "digits:test[:64]", *DISTILL(root, root / "student-real")[5:])
    must_pass("calibrate", "--model", root / "teacher", "--data", "digits:test[:120]", "--out", root / "detector")
    must_pass("generate", "--teacher", root / "teacher", "--method", "activations", "--cuts", "layer1", "--num-images", 16,
              "--batch-size", 16, "--iterations", 1, "--out", root / "activations")
    (root / "run.yaml").write_text(f"out: {root / 'run'}\nteacher:\n  model: {root / 'teacher'}\n"
                                   "generate:\n  num_images: 16\n  batch_size: 16\n  iterations: 1\n"
                                   "distill:\n  epochs: 1\n  batch_size: 16\nstudent:\n  arch: resnet8\n  width: 0.25\n"
                                   "eval_dataset: digits:test[:40]\n")
    must_pass("run", root / "run.yaml", "--quiet")
    return root


def tree_state(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but the writers' lock files."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def copy(work: Path, name: str, to: str) -> Path:
    target = work / "cases" / to
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(work / name, target, ignore=shutil.ignore_patterns(LOCK_NAME))
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class Evil:
    def __reduce__(self):
        return (print, ("PWNED",))


# ---------------------------------------------------------------------------------------------
# The cases: (command, class of bad input) -> a function of the work tree returning the arguments.


@dataclass
class Case:
    command: str
    bad: str
    make: Callable[[Path], list]
    expect: str  # a phrase the one error line must contain
    env: Callable[[Path], dict] | None = None  # environment variables of the command

    @property
    def id(self) -> str:
        return f"{self.command}: {self.bad}"


def model_with(work: Path, name: str, **changes) -> Path:
    model = copy(work, "teacher", name)
    edit_json(model / "config.json", **changes)
    return model


def truncated_model(work: Path) -> Path:
    model = copy(work, "teacher", "truncated")
    truncate(model / "model.safetensors")
    return model


def folder_with_text_png(work: Path) -> str:
    folder = work / "cases" / "text-png"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "x.png").write_text("not an image\n")
    return f"folder:{folder}"


def bad_cifar(work: Path) -> str:
    root = work / "cases" / "cifar"
    root.mkdir(parents=True, exist_ok=True)
    (root / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 5), dtype=np.uint8), b"labels": [0, 1]}))
    return f"cifar10:{root}:test"


def with_evil_state(work: Path, name: str) -> Path:
    out = copy(work, name, f"{name}-evil-state")
    torch.save({"x": Evil()}, out / "training_state.pt")
    return out


def cache_of_other_shapes(work: Path) -> Path:
    """An activation cache directory whose settings record half the channels at cut layer1."""
    plan = json.loads(must_pass(*PLAN(work), "--json").output)["neighbourhoods"]
    shapes = [plan[0]["input_shape"]] + [n["output_shape"] for n in plan]
    shapes[1][0] //= 2
    cache = work / "cases" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "run.json").write_text(json.dumps({"shapes": shapes}))
    return cache


def three_channel_student(work: Path) -> Path:
    """A valid student for 3-channel 8x8 images (the teacher takes 1 channel)."""
    from synthkd.models import Classifier, InputFormat, ModelConfig

    student = work / "cases" / "rgb-student"
    if not student.is_dir():
        config = ModelConfig(arch="resnet8", arch_kwargs={"width": 0.25, "in_channels": 3, "num_classes": 10},
                             input=InputFormat(3, 8, 8), class_names=[str(i) for i in range(10)])
        Classifier.from_config(config).save_pretrained(student)
    return student


def hf_with_remote_code(work: Path) -> str:
    """A transformers model directory whose config maps its classes to its own code, which leaves a
    marker file when imported (transformers asks "[y/N]" on stdin for such a model by default)."""
    model = work / "cases" / "hf-remote-code"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "evil-net", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForImageClassification": "evil.EvilModel"}}))
    (model / "evil.py").write_text(f"open({str(work / 'MARKER')!r}, 'w').close()\nprint('PWNED')\n")
    return f"hf:{model}"


BRANCHY = """import torch


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        logits = self.head(x.flatten(1))
        return logits * 3 if x.mean() > 0.9 else logits  # another answer on bright images


def branchy():
    return Branchy()
"""


def branchy_model(work: Path) -> list:
    """A model given as code whose forward branches on the data, as --model and its flags."""
    from safetensors.torch import save_file

    folder = work / "cases" / "branchy"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "branchy.py").write_text(BRANCHY)
    save_file({"head.weight": torch.randn(10, 64), "head.bias": torch.zeros(10)}, str(folder / "w.safetensors"))
    return ["--model", f"{folder / 'branchy.py'}:branchy", "--weights", folder / "w.safetensors", "--input-shape", "1,8,8"]


def existing_file(work: Path, name: str) -> Path:
    path = work / "cases" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("the user's own file\n")
    return path


def student_of_classes(work: Path, count: int) -> Path:
    """A valid student for the teacher's images that predicts ``count`` classes."""
    from synthkd.models import Classifier, InputFormat, ModelConfig

    student = work / "cases" / f"{count}-class-student"
    if not student.is_dir():
        config = ModelConfig(arch="resnet8", arch_kwargs={"width": 0.25, "in_channels": 1, "num_classes": count},
                             input=InputFormat(1, 8, 8), class_names=[str(i) for i in range(count)])
        Classifier.from_config(config).save_pretrained(student)
    return student


def png_claiming(folder: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels (and holds none)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    (folder / "c").mkdir(parents=True, exist_ok=True)
    (folder / "c" / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                                      + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return folder


def out_with_lock_directory(work: Path) -> Path:
    out = work / "cases" / "locked"
    (out / LOCK_NAME).mkdir(parents=True, exist_ok=True)
    return out


def set_with_shard_name(work: Path, name: str) -> Path:
    data = copy(work, "set", "renamed-shard")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][0]["file"] = name
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def activation_set_with_shard(work: Path, name: str) -> Path:
    """The module's activation set with its first shard listed under ``name``."""
    data = copy(work, "activations", "escaping-activations")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["neighbourhoods"][0][0]["file"] = name
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def detector_with(work: Path, edit: Callable[[Path], None]) -> Path:
    detector = copy(work, "detector", "bad-detector")
    edit(detector)
    return detector


def run_config(work: Path, name: str) -> Path:
    """The module's run config, writing to a new run directory ``name``."""
    config = work / "cases" / f"{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text((work / "run.yaml").read_text().replace(str(work / "run"), str(work / "cases" / name)))
    return config


def config_file(work: Path, name: str, content: str | bytes) -> Path:
    config = work / "cases" / name
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_bytes(content.encode() if isinstance(content, str) else content)
    return config


# 10 levels of 10 aliases each: 10^10 values once expanded, in 11 lines.
ALIAS_BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)) + "teacher: *a9\n"


def resumed(work: Path, name: str) -> Path:
    """A finished output directory copied, to resume with other settings."""
    return copy(work, name, f"{name}-resumed")


def unprunable_teacher(work: Path) -> list:
    """A FILE.py teacher whose per-channel factor is a buffer, which the dependency graph does not prune."""
    folder = work / "cases" / "unprunable"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Scale(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.register_buffer('factor', torch.ones(1, 8, 1, 1))\n\n"
        "    def forward(self, x):\n        return x * self.factor\n\n\n"
        "def make():\n    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), Scale(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), "
        "nn.Linear(8, 10))\n")
    torch.manual_seed(0)
    from synthkd.models import import_factory

    torch.save(import_factory(f"{folder / 'net.py'}:make")().state_dict(), folder / "weights.pt")
    return ["--teacher", f"{folder / 'net.py'}:make", "--teacher-weights", folder / "weights.pt", "--input-shape", "1,8,8"]


T = lambda w: ["--teacher", w / "teacher"]  # noqa: E731
DISTILL = lambda w, out: ["distill", *T(w), "--data", w / "set", "--student", "resnet8", "--student-width", "0.25",  # noqa: E731
                          "--epochs", 1, "--batch-size", 16, "--out", out]
PLAN = lambda w: [*DISTILL(w, w / "cases" / "s"), "--mode", "neighbourhood", "--cuts", "layer1,layer2", "--plan"]  # noqa: E731
TRAIN = lambda out: ["train-teacher", "--dataset", "digits:train[:256]", *TEACHER, "--epochs", 1, "--out", out]  # noqa: E731

CASES = [
    # Numbers out of range: refused where the setting is declared, before anything is read.
    Case("train-teacher", "--batch-size 0", lambda w: [*TRAIN(w / "cases" / "t"), "--batch-size", 0], "--batch-size must be positive"),
    Case("train-teacher", "--epochs 0", lambda w: [*TRAIN(w / "cases" / "t"), "--epochs", 0], "--epochs must be positive"),
    Case("train-teacher", "--epochs -1", lambda w: [*TRAIN(w / "cases" / "t"), "--epochs", -1], "--epochs must be positive"),
    Case("train-teacher", "--width 0", lambda w: [*TRAIN(w / "cases" / "t"), "--width", 0], "--width must be positive"),
    Case("distill", "--batch-size 0", lambda w: [*DISTILL(w, w / "cases" / "s"), "--batch-size", 0], "--batch-size must be positive"),
    Case("distill", "--epochs 0", lambda w: [*DISTILL(w, w / "cases" / "s"), "--epochs", 0], "--epochs must be positive"),
    Case("distill", "--student-width -1", lambda w: [*DISTILL(w, w / "cases" / "s"), "--student-width", -1], "must be positive"),
    Case("distill", "student resnet8:inner=-1", lambda w: [*DISTILL(w, w / "cases" / "s"), "--student", "resnet8:inner=-1"],
         "inner must be a positive number"),
    Case("distill", "student resnet8:blocks=0", lambda w: [*DISTILL(w, w / "cases" / "s"), "--student", "resnet8:blocks=0"],
         "blocks must be a positive whole number"),
    Case("distill", "student resnet8:sparsity=abc", lambda w: [*DISTILL(w, w / "cases" / "s"), "--student",
                                                               "resnet8:sparsity=abc"], "sparsity must be a number in [0, 1)"),
    Case("distill", "student teacher:inner=abc", lambda w: [*DISTILL(w, w / "cases" / "s"), "--student", "teacher:inner=abc"],
         "inner must be a positive number"),
    Case("distill", "--mixup -1", lambda w: [*DISTILL(w, w / "cases" / "s"), "--mixup", -1], "--mixup must be at least 0"),
    Case("distill", "--student teacher:params=0.001 (no pruning reaches it)",
         lambda w: [*DISTILL(w, w / "cases" / "s"), "--student", "teacher:params=0.001"], "cannot be reached by pruning"),
    Case("distill", "--student teacher:width=1.5", lambda w: [*DISTILL(w, w / "cases" / "s"), "--student", "teacher:width=1.5"],
         "in (0, 1]"),
    Case("distill", "a teacher the dependency graph cannot prune", lambda w: [
        "distill", *unprunable_teacher(w), "--data", "digits:test[:64]", "--student", "teacher:width=0.5", "--epochs", 1,
        "--out", w / "cases" / "s"], "'1' (Scale) fails"),
    Case("generate", "--num-images 0", lambda w: ["generate", *T(w), "--num-images", 0, "--out", w / "cases" / "g"], "must be positive"),
    Case("evaluate", "--batch-size 0", lambda w: ["evaluate", "--model", w / "teacher", "--dataset", "digits:test", "--batch-size", 0],
         "--batch-size must be positive"),
    Case("detect", "--batch-size 0", lambda w: ["detect", "--detector", w / "detector", "--inputs", "digits:test[:8]", "--batch-size", 0],
         "--batch-size must be positive"),
    # Damaged or hand-edited model directories.
    Case("evaluate", "truncated model.safetensors", lambda w: ["evaluate", "--model", truncated_model(w), "--dataset", "digits:test[:8]"],
         "is not a readable safetensors file"),
    Case("generate", "truncated model.safetensors", lambda w: ["generate", "--teacher", truncated_model(w), "--out", w / "cases" / "g"],
         "is not a readable safetensors file"),
    Case("evaluate", "config.json bad arch_kwargs", lambda w: ["evaluate", "--model", model_with(w, "kw", arch_kwargs={"depth": 3}),
                                                               "--dataset", "digits:test[:8]"], "cannot build 'resnet8' with arch_kwargs"),
    Case("evaluate", "config.json width 2000", lambda w: ["evaluate", "--model", model_with(
        w, "wide", arch_kwargs={**json.loads((w / "teacher" / "config.json").read_text())["arch_kwargs"], "width": 2000}),
        "--dataset", "digits:test[:8]"], "does not belong to these weights"),
    Case("evaluate", "config.json asks torchvision for weights=DEFAULT", lambda w: ["evaluate", "--model", model_with(
        w, "tv-weights", arch="torchvision:resnet18", arch_kwargs={"weights": "DEFAULT"}), "--dataset", "digits:test[:8]"],
         "never downloads"),
    Case("evaluate", "config.json asks timm for pretrained weights", lambda w: ["evaluate", "--model", model_with(
        w, "timm-weights", arch="timm:test_resnet?pretrained=true", arch_kwargs={"num_classes": 10}), "--dataset",
        "digits:test[:8]"], "never downloads"),
    Case("evaluate", "config.json names an hf id without its config", lambda w: ["evaluate", "--model", model_with(
        w, "hf-id", arch="hf:google/vit-base-patch16-224", arch_kwargs={}), "--dataset", "digits:test[:8]"], "never downloads"),
    Case("evaluate", "config.json input_shape 0", lambda w: ["evaluate", "--model", model_with(w, "shape", input_shape=[1, 0, 8]),
                                                             "--dataset", "digits:test[:8]"], "three positive integers"),
    Case("evaluate", "config.json class_names of wrong length",
         lambda w: ["evaluate", "--model", model_with(w, "names", class_names=["a", "b"]), "--dataset", "digits:test[:8]"],
         "class names"),
    Case("evaluate", "hf: directory with remote code, 'y' on stdin", lambda w: ["evaluate", "--model", hf_with_remote_code(w),
                                                                              "--dataset", "digits:test[:8]"], "--trust-code"),
    Case("evaluate", "config.json names code", lambda w: ["evaluate", "--model", model_with(w, "code", arch="os:system",
                                                          arch_kwargs={"command": "echo PWNED"}), "--dataset", "digits:test[:8]"],
         "--trust-code"),
    Case("distill", "--plan of a cache bigger than the disk", lambda w: [*PLAN(w), "--cache", "disk", "--cache-views", 10**8],
         "short"),
    Case("distill", "--plan against a cache of other shapes", lambda w: [*PLAN(w), "--cache", "disk", "--cache-dir",
                                                                         cache_of_other_shapes(w)], "cut 'layer1'"),
    Case("distill", "--json without --plan", lambda w: [*DISTILL(w, w / "cases" / "s"), "--json"], "with --plan"),
    Case("distill", "neighbourhood student with 3 channels, teacher 1", lambda w: [
        *DISTILL(w, w / "cases" / "s")[:5], "--student", three_channel_student(w), "--mode", "neighbourhood", "--cuts", "layer1",
        "--epochs", 1, "--out", w / "cases" / "s"], "teacher's input format"),
    Case("inspect", "--student of another class count", lambda w: ["inspect", "--teacher", w / "teacher", "--data", w / "set",
                                                                   "--student", student_of_classes(w, 3)],
         "the student predicts 3"),
    # Data that cannot be read.
    Case("evaluate", "empty slice digits:test[5:2]", lambda w: ["evaluate", "--model", w / "teacher", "--dataset", "digits:test[5:2]"],
         "empty"),
    Case("evaluate", "classes=0-100000,1-100000", lambda w: ["evaluate", "--model", w / "teacher", "--dataset",
                                                            "digits:test[classes=0-100000,1-100000]"], "has classes 0-9, not 100000"),
    Case("evaluate", "slice before classes", lambda w: ["evaluate", "--model", w / "teacher", "--dataset",
                                                        "digits:test[:10][classes=0-7]"], "write the classes first"),
    Case("train-teacher", "empty slice", lambda w: ["train-teacher", "--dataset", "digits:train[5:2]", *TEACHER, "--epochs", 1,
                                                    "--out", w / "cases" / "t"], "empty"),
    Case("distill", "empty slice as --data", lambda w: [*DISTILL(w, w / "cases" / "s")[:3], "--data", "digits:test[5:2]",
                                                        "--out", w / "cases" / "s"], "empty"),
    Case("calibrate", "text file named x.png", lambda w: ["calibrate", "--model", w / "teacher", "--data", folder_with_text_png(w),
                                                          "--out", w / "cases" / "d"], "x.png is not an image"),
    Case("detect", "text file named x.png", lambda w: ["detect", "--detector", w / "detector", "--inputs", folder_with_text_png(w)],
         "x.png is not an image"),
    Case("evaluate", "malformed CIFAR batch", lambda w: ["evaluate", "--model", w / "teacher", "--dataset", bad_cifar(w)],
         "CIFAR-10"),
    Case("distill", "shard name with a trailing newline", lambda w: [*DISTILL(w, w / "cases" / "s")[:3], "--data",
                                                                     set_with_shard_name(w, "shard-00000.safetensors\n"),
                                                                     "--out", w / "cases" / "s"], "invalid shard name"),
    Case("distill", "shard path leaving the set", lambda w: [*DISTILL(w, w / "cases" / "s")[:3], "--data",
                                                             set_with_shard_name(w, "../../set/shard-00000.safetensors"),
                                                             "--out", w / "cases" / "s"], "invalid shard name"),
    Case("distill", "activation-set shard path leaving the set", lambda w: [
        "distill", *T(w), "--data", activation_set_with_shard(w, "../../set/shard-00000.safetensors"), "--mode", "neighbourhood",
        "--inputs", "activations", "--cuts", "layer1", "--student", "resnet8", "--student-width", "0.25", "--epochs", 1,
        "--out", w / "cases" / "s"], "outside"),
    Case("distill", "activation-set shard with an absolute path", lambda w: [
        "distill", *T(w), "--data", activation_set_with_shard(w, str(w / "set" / "shard-00000.safetensors")), "--mode",
        "neighbourhood", "--inputs", "activations", "--cuts", "layer1", "--student", "resnet8", "--student-width", "0.25",
        "--epochs", 1, "--out", w / "cases" / "s"], "outside"),
    Case("detect", "PNG header claiming 100000x100000", lambda w: ["detect", "--detector", w / "detector", "--inputs",
                                                                  f"folder:{png_claiming(w / 'cases' / 'bomb', 100000, 100000)}"],
         "claims more pixels than an image may have"),
    Case("evaluate", "hf:imagefolder with a PNG header claiming 100000x100000", lambda w: [
        "evaluate", "--model", w / "teacher", "--dataset", f"hf:imagefolder:{png_claiming(w / 'cases' / 'bomb', 100000, 100000)}:train"],
         "claims more pixels than an image may have"),
    Case("distill", "--cache-dir a regular file", lambda w: [
        *DISTILL(w, w / "cases" / "s")[:-2], "--mode", "neighbourhood", "--cache", "disk", "--cache-dir",
        existing_file(w, "cache-file"), "--out", w / "cases" / "s"], "is a file, not a directory"),
    Case("search", "--cache-dir a regular file", lambda w: ["search", *T(w), "--data", w / "set", "--cache-dir",
                                                            existing_file(w, "cache-file"), "--out", w / "cases" / "q"],
         "is a file, not a directory"),
    Case("search", "HOME a regular file (the default cache)", lambda w: ["search", *T(w), "--data", w / "set", "--epochs", 1,
                                                                        "--out", w / "cases" / "q"], "Not a directory",
         env=lambda w: {"HOME": str(existing_file(w, "home-file")), "XDG_CACHE_HOME": None, "SYNTHKD_CACHE": None}),
    Case("distill", "--out holding a directory named like the lock file", lambda w: DISTILL(w, out_with_lock_directory(w)),
         "where synthkd keeps its lock file"),
    Case("evaluate", "evil pickle as --weights", lambda w: ["evaluate", *branchy_model(w)[:2], "--weights",
                                                            with_evil_state(w, "teacher") / "training_state.pt", "--input-shape",
                                                            "1,8,8", "--dataset", "digits:test[:8]"], "Unsupported global"),
    # Resumes: an evil pickle as the checkpoint, and every changed setting or input.
    Case("train-teacher", "evil pickle as training_state.pt", lambda w: [*TRAIN(with_evil_state(w, "teacher"))],
         "is not a training state"),
    Case("distill", "evil pickle as training_state.pt", lambda w: DISTILL(w, with_evil_state(w, "student")),
         "is not a training state"),
    Case("train-teacher", "resumed with --no-flip", lambda w: [*TRAIN(resumed(w, "teacher")), "--no-flip"], "settings.flip: true -> false"),
    Case("train-teacher", "resumed with another --dataset", lambda w: [*TRAIN(resumed(w, "teacher"))[:-4], "--epochs", 1, "--dataset",
                                                                       "digits:train[:255]", "--out", w / "cases" / "teacher-resumed"],
         "data: "),
    Case("train-teacher", "resumed with another --width", lambda w: [*TRAIN(resumed(w, "teacher")), "--width", 0.5], "settings.width"),
    Case("distill", "resumed with --temperature 2", lambda w: [*DISTILL(w, resumed(w, "student")), "--temperature", 2],
         "settings.temperature: 4.0 -> 2.0"),
    Case("distill", "resumed with --mixup 0", lambda w: [*DISTILL(w, resumed(w, "student")), "--mixup", 0], "settings.mixup"),
    Case("distill", "resumed with --no-flip", lambda w: [*DISTILL(w, resumed(w, "student")), "--no-flip"], "settings.flip"),
    Case("distill", "resumed with another --data", lambda w: [*DISTILL(w, resumed(w, "student"))[:3], "--data", "digits:test[:40]",
                                                              *DISTILL(w, w / "cases" / "student-resumed")[5:]], "data: "),
    Case("distill", "resumed with another --teacher", lambda w: ["distill", "--teacher", w / "student", "--data", "digits:test[:64]",
                                                                 *DISTILL(w, resumed(w, "student-real"))[5:]], "teacher: "),
    Case("distill", "resumed with another --student-width", lambda w: [*DISTILL(w, resumed(w, "student")), "--student-width", 0.5],
         "student: "),
    # Detector directories.
    Case("detect", "truncated detector.safetensors", lambda w: ["detect", "--detector", detector_with(
        w, lambda d: truncate(d / "detector.safetensors")), "--inputs", "digits:test[:8]"], "detector.safetensors"),
    Case("detect", "model copy naming code", lambda w: ["detect", "--detector", detector_with(
        w, lambda d: edit_json(d / "model" / "config.json", arch="os:system")), "--inputs", "digits:test[:8]"], "--trust-code"),
    Case("detect", "baselines entry leaving the directory", lambda w: ["detect", "--detector", detector_with(
        w, lambda d: edit_json(d / "detector.json", baselines=["../../detector/baselines/msp"])), "--inputs", "digits:test[:8]"],
         "outside"),
    # The other commands, with the same classes of input.
    Case("generate", "--iterations 0", lambda w: ["generate", *T(w), "--iterations", 0, "--out", w / "cases" / "g"], "must be positive"),
    Case("generate", "teacher directory naming code", lambda w: ["generate", "--teacher", model_with(w, "gen-code", arch="os:system"),
                                                                 "--out", w / "cases" / "g"], "--trust-code"),
    Case("generate", "competitor student naming code", lambda w: ["generate", *T(w), "--student", model_with(w, "comp-code", arch="os:system"),
                                                                  "--competition-weight", 1, "--out", w / "cases" / "g"], "--trust-code"),
    Case("generate", "resumed with another --iterations", lambda w: ["generate", *T(w), "--num-images", 32, "--batch-size", 16,
                                                                     "--iterations", 3, "--out", resumed(w, "set")],
         "config.iterations: 2 -> 3"),
    Case("search", "--batch-size 0", lambda w: ["search", *T(w), "--data", w / "set", "--batch-size", 0, "--out", w / "cases" / "q"],
         "--batch-size must be positive"),
    Case("search", "empty slice as --data", lambda w: ["search", *T(w), "--data", "digits:test[5:2]", "--epochs", 1,
                                                       "--out", w / "cases" / "q"], "empty"),
    Case("search", "truncated teacher weights", lambda w: ["search", "--teacher", truncated_model(w), "--data", w / "set",
                                                           "--out", w / "cases" / "q"], "is not a readable safetensors file"),
    Case("train-diffusion", "--batch-size 0", lambda w: ["train-diffusion", "--dataset", "digits:train", "--batch-size", 0,
                                                         "--out", w / "cases" / "u"], "--batch-size must be positive"),
    Case("train-diffusion", "empty slice", lambda w: ["train-diffusion", "--dataset", "digits:train[5:2]", "--image-size", 8,
                                                      "--out", w / "cases" / "u"], "empty"),
    Case("calibrate", "--holdout 1.5", lambda w: ["calibrate", "--model", w / "teacher", "--data", "digits:test[:120]", "--holdout", 1.5,
                                                  "--out", w / "cases" / "d"], "--holdout"),
    Case("calibrate", "empty slice as --data", lambda w: ["calibrate", "--model", w / "teacher", "--data", "digits:test[5:2]",
                                                          "--out", w / "cases" / "d"], "empty"),
    Case("calibrate", "truncated model.safetensors", lambda w: ["calibrate", "--model", truncated_model(w), "--data", "digits:test[:120]",
                                                                "--out", w / "cases" / "d"], "is not a readable safetensors file"),
    Case("detect", "empty slice as --inputs", lambda w: ["detect", "--detector", w / "detector", "--inputs", "digits:test[5:2]"], "empty"),
    Case("detect", "--alpha 2", lambda w: ["detect", "--detector", w / "detector", "--inputs", "digits:test[:8]", "--alpha", 2], "--alpha"),
    Case("evaluate", "--detector whose baselines leave it", lambda w: [
        "evaluate", "--model", w / "teacher", "--dataset", "digits:test[:40]", "--detector", detector_with(
            w, lambda d: edit_json(d / "detector.json", baselines=["/etc"])), "--out", w / "cases" / "e"], "outside"),
    Case("evaluate", "--ood with a misspelt dataset", lambda w: [
        "evaluate", "--model", w / "teacher", "--dataset", "digits:test[:40]", "--detector", w / "detector", "--ood", "digts:test",
        "--out", w / "cases" / "e"], "digts"),
    Case("export", "--out the model's own weights, with --overwrite", lambda w: [
        "export", "--model", w / "teacher", "--overwrite", "--out", w / "teacher" / "model.safetensors"], "inside the model directory"),
    Case("export", "--out an existing file", lambda w: ["export", "--model", w / "teacher", "--out", existing_file(w, "mine.onnx")],
         "already exists"),
    Case("export", "--out an existing FILE.json", lambda w: ["export", "--model", w / "teacher", "--out", existing_file(
        w, "new.onnx.json").with_suffix("")], "already exists"),
    Case("export", "torchscript of a forward branching on the data",
         lambda w: ["export", *branchy_model(w), "--format", "torchscript", "--out", w / "cases" / "b.pt"], "trace may be wrong"),
    Case("export", "exported-program of a forward branching on the data",
         lambda w: ["export", *branchy_model(w), "--format", "exported-program", "--out", w / "cases" / "b.pt2"],
         "cannot export this model"),
    Case("export", "onnx of a forward branching on the data",
         lambda w: ["export", *branchy_model(w), "--format", "onnx", "--out", w / "cases" / "b.onnx"], "cannot export this model"),
    Case("export", "no --out", lambda w: ["export", "--model", w / "teacher"], "Missing option '--out'"),
    # synthkd run: every spec checked before the first stage.
    Case("run", "detector.ood with a misspelt dataset", lambda w: ["run", run_config(w, "run-1"), "detector.enabled=true",
                                                                   "detector.ood=[digts:test]"], "digts"),
    Case("run", "distill.cuts naming no module", lambda w: ["run", run_config(w, "run-2"), "distill.mode=neighbourhood",
                                                            "distill.cuts=nolayer"], "nolayer"),
    Case("run", "student.arch teacher:width=2", lambda w: ["run", run_config(w, "run-6"), "student.arch=teacher:width=2"],
         "in (0, 1]"),
    Case("run", "eval_dataset misspelt", lambda w: ["run", run_config(w, "run-3"), "eval_dataset=digts:test"], "digts"),
    Case("run", "--plan before the teacher is trained", lambda w: ["run", run_config(w, "run-plan"), "teacher.model=null",
                                                                   "teacher.dataset=digits:train", "distill.mode=neighbourhood",
                                                                   "--plan"], "not trained yet"),
    Case("run", "teacher.arch unknown", lambda w: ["run", run_config(w, "run-4"), "teacher.model=null", "teacher.dataset=digits:train",
                                                   "teacher.arch=resnet99"], "resnet99"),
    Case("run", "YAML alias bomb", lambda w: ["run", config_file(w, "bomb.yaml", ALIAS_BOMB)], "more than 100,000 values"),
    Case("run", "YAML alias bomb as an override", lambda w: ["run", run_config(w, "run-6"), "seed=" + " ".join(
        ALIAS_BOMB.replace("\n", ", ").rstrip(", ").join("{}").split())], "more than 100,000 values"),
    Case("run", "YAML alias naming itself", lambda w: ["run", config_file(w, "recursive.yaml", "teacher: &a [*a]\n")],
         "contains itself"),
    Case("run", "config of binary garbage", lambda w: ["run", config_file(w, "garbage.yaml", bytes(range(256)) * 4)],
         "is not a YAML text file"),
    Case("run", "teacher.model naming code",
         lambda w: ["run", run_config(w, "run-5"), f"teacher.model={model_with(w, 'run-code', arch='os:system')}"],
         "--trust-code"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, work: Path, monkeypatch):
    monkeypatch.chdir(work)
    args, env = case.make(work), case.env(work) if case.env else None
    before = tree_state(work)
    result = invoke(*args, env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case.expect in lines[0], lines[0]
    assert "PWNED" not in result.output and not (work / "MARKER").exists()
    assert "weights_only=False" not in result.output  # torch's advice to load a pickle with its code is never passed on
    changed = {name for name in set(before) | set(tree_state(work)) if before.get(name) != tree_state(work).get(name)}
    assert not changed, f"files changed: {sorted(changed)}"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_inspect_of_a_read_only_set_prints_the_diagnostic(work):
    data = copy(work, "set", "read-only-set")
    (data / "diagnostic.json").unlink()
    data.chmod(0o555)
    try:
        result = invoke("inspect", "--teacher", work / "teacher", "--data", data, "--json")
    finally:
        data.chmod(0o755)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["made_of"] and "not saved" in result.stderr
