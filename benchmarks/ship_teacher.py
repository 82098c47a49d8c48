"""Put a trained standard teacher into the repository (benchmarks/standard_teacher/), so every
benchmark starts in seconds on a fresh machine instead of retraining it (benchmarks/common.py
standard_teacher reads it; --retrain-teacher or SYNTHKD_RETRAIN_TEACHER=1 retrains).

Copies model.safetensors and config.json, measures the teacher's accuracy on the real test split
with the library's evaluation (what `synthkd evaluate` prints), and writes teacher.json beside them
with the command that trained it, the settings the benchmarks check and that accuracy.

    python benchmarks/ship_teacher.py --source .cache/benchmarks/teacher-resnet20-w1.0-e15    # a finished teacher
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHIPPED_TEACHER, load_setting  # noqa: E402

from synthkd.accelerator import make_accelerator  # noqa: E402
from synthkd.data import load_dataset  # noqa: E402
from synthkd.evaluation import evaluate  # noqa: E402
from synthkd.io import atomic_write_json, read_json  # noqa: E402
from synthkd.models import Classifier  # noqa: E402

LIMIT_BYTES = 2 * 1024 * 1024  # what the repository takes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="the trained teacher's model directory")
    parser.add_argument("--config", help="the setting it was trained for (default configs/fashion_mnist.yaml)")
    parser.add_argument("--dest", default=str(SHIPPED_TEACHER), help="where it goes (default: where the benchmarks look)")
    args = parser.parse_args()
    source = Path(args.source)
    config = load_setting(args.config)
    teacher = config["teacher"]
    size = (source / "model.safetensors").stat().st_size
    if size > LIMIT_BYTES:
        parser.error(f"{source / 'model.safetensors'} is {size} bytes, over the {LIMIT_BYTES} the repository takes")
    metrics_file = source / "metrics.json"
    epochs = len(read_json(metrics_file)["history"]) if metrics_file.is_file() else teacher["epochs"]
    model = Classifier.from_pretrained(source)
    result = evaluate(model, load_dataset(config["eval_dataset"]), make_accelerator())
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(source / name, dest / name)
    atomic_write_json(dest / "teacher.json", {
        "arch": teacher["arch"], "width": teacher["width"], "epochs": epochs, "dataset": teacher["dataset"],
        "command": (f"synthkd train-teacher --dataset {teacher['dataset']} --arch {teacher['arch']} --width "
                    f"{teacher['width']} --epochs {epochs} --batch-size {teacher['batch_size']} --lr {teacher['lr']} "
                    f"{'--flip' if teacher['flip'] else '--no-flip'} "
                    f"--eval-dataset {config['eval_dataset']} --out DIR"),
        "fingerprint": model.fingerprint(), "bytes": size,
        "eval_dataset": config["eval_dataset"], "accuracy": result["accuracy"], "per_class": result["per_class"],
    })
    print(f"shipped {source} to {dest}: {result['accuracy']:.4f} on {config['eval_dataset']}, {size} bytes")


if __name__ == "__main__":
    main()
