"""Exercise synthkd's GPU code paths end to end, through the CLI only, and time a plain-torch
micro-benchmark; a table on stdout, every step in a JSON file.

    python3 benchmarks/gpu_check.py --out runs/gpu_check.json            # GPU sizes (about 2-3 min on an H200)
    python3 benchmarks/gpu_check.py --quick --out runs/gpu_check.json    # tiny sizes (CPU: a few minutes)

Runs on scikit-learn's digits (``digits:train`` / ``digits:test``, no download) in a temporary
directory: train-teacher, generate (inversion, fast, diffusion), distill (e2e bf16 and fp16,
neighbourhood, with the fast generator interleaved), search, calibrate (GMM and flow), detect,
evaluate (--json), the detector evaluation and ``synthkd run configs/digits_quick.yaml`` shortened,
each with ``--mixed-precision bf16`` where the command takes it. Every CLI step is a subprocess
(``python -m synthkd ...``, run outside the checkout so the installed package is the one imported)
with its own time limit, killed with its process group when it runs over; a failing step is
recorded (return code, seconds, the last lines of its output) and the steps after it go on, except
those that need what it should have made, which are marked skipped. Steps not started before
``--budget`` seconds are skipped too, so the whole run ends in bounded time. The JSON is rewritten
after every step, so a run killed from outside still leaves what it measured.

Only the documented CLI commands and flags are used (and the zoo's resnet20 through
``synthkd.models.create_model`` for the micro-benchmark), so internal refactors do not break it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAIL_LINES = 30
PROGRESS = re.compile(r"\d+%\|.*\|.*(it/s|s/it|\?it)")


# --------------------------------------------------------------------------------------------
# sizes

FULL = dict(
    teacher_epochs=10, inv_images=1024, inv_iters=50, inv_batch=256,
    fast_images=1024, fast_steps=20, fast_batch=256,
    e2e_epochs=20, fp16_epochs=10, nb_epochs=4, nb_finetune=3, kd_batch=128,
    search_candidates="width=0.5,1.0;depth=1,2", search_epochs=2, search_finetune=2,
    diff_steps=40, diff_batch=64, diff_sample_steps=10, diff_images=256,
    live_images=512, live_epochs=3, live_steps=10,
    detect_inputs="digits:test[:200]", attacks="fgsm,pgd", eval_limit=445,
    run_overrides=["teacher.epochs=3", "generate.num_images=256", "generate.iterations=20", "distill.epochs=3"],
    bench_iters=30, bench_warmup=5, bench_max_seconds=20,
    step_timeout=45, run_timeout=75, budget=170,
)
QUICK = dict(
    teacher_epochs=1, inv_images=64, inv_iters=5, inv_batch=64,
    fast_images=64, fast_steps=2, fast_batch=64,
    e2e_epochs=1, fp16_epochs=1, nb_epochs=1, nb_finetune=1, kd_batch=32,
    search_candidates="width=0.5,1.0", search_epochs=1, search_finetune=1,
    diff_steps=3, diff_batch=16, diff_sample_steps=3, diff_images=32,
    live_images=64, live_epochs=1, live_steps=2,
    detect_inputs="digits:test[:50]", attacks="fgsm", eval_limit=100,
    run_overrides=["teacher.epochs=1", "generate.num_images=64", "generate.batch_size=64", "generate.iterations=5",
                   "distill.epochs=1", "distill.batch_size=32"],
    bench_iters=3, bench_warmup=1, bench_max_seconds=5,
    step_timeout=120, run_timeout=150, budget=330,
)


# --------------------------------------------------------------------------------------------
# helpers


def tail(text: str, n: int = TAIL_LINES) -> list[str]:
    """The last n non-empty lines, progress-bar carriage returns taken as line breaks."""
    lines = [line.rstrip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    bars = [i for i, line in enumerate(lines) if PROGRESS.search(line)]
    keep = set(bars[-1:])  # of the progress-bar lines only the last one
    return [line for i, line in enumerate(lines) if i not in bars or i in keep][-n:]


def json_lines(text: str) -> list:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except Exception:  # noqa: BLE001 - figures are best effort
        return None


def dig(obj, *keys):
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def rounded(x, nd=4):
    return round(x, nd) if isinstance(x, float) else x


ACC_PATTERNS = [
    # "teacher 0.5955  student 0.0809  gap 51.46 points on digits:test"
    (re.compile(r"teacher\s+([0-9.]+)\s+student\s+([0-9.]+)"), ("teacher_acc", "student_acc")),
    # "teacher accuracy on digits:test: 0.5955"
    (re.compile(r"accuracy on \S+:\s*([0-9.]+)"), ("accuracy",)),
    # "wrote 64 images in 1 shards to DIR"
    (re.compile(r"wrote (\d+) images"), ("images_written",)),
    # train-diffusion: "trained 40 steps (final loss 0.3060)"
    (re.compile(r"final loss ([0-9.]+)"), ("final_loss",)),
    # calibrate: "gmm on 51 features of layer 'fc', 13 calibration scores"
    (re.compile(r"on (\d+) features of layer '([^']+)', (\d+) calibration"), ("fit_features", "layer", "calibration_scores")),
]


def figures_from_output(text: str) -> dict:
    figs = {}
    for pattern, names in ACC_PATTERNS:
        found = pattern.findall(text)
        if found:
            last = found[-1] if isinstance(found[-1], tuple) else (found[-1],)
            for name, value in zip(names, last):
                try:
                    figs[name] = float(value) if "." in value else int(value)
                except ValueError:
                    figs[name] = value
    return figs


def kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(cmd: list[str], cwd: Path, env: dict, timeout: float, log: Path, shown: str) -> tuple[int, float, str, bool]:
    """Run cmd in its own process group, stdout+stderr to log; kill the group past timeout."""
    start = time.perf_counter()
    timed_out = False
    with open(log, "w") as fh:
        fh.write("$ " + shown + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            rc = 124
        except KeyboardInterrupt:
            kill_group(proc)
            raise
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    return rc, seconds, text, timed_out


# --------------------------------------------------------------------------------------------
# the micro-benchmark (run in a subprocess: `gpu_check.py --microbench`)


def microbench(iters: int, warmup: int, batch: int, max_seconds: float = 20.0) -> dict:
    import torch
    import torch.nn.functional as F

    result: dict = {"torch": torch.__version__, "batch": batch, "input": [1, 28, 28], "iters": iters, "warmup": warmup}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    result["device"] = torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    if cuda:
        torch.backends.cudnn.benchmark = True
        result["cudnn_benchmark"] = True
    from synthkd.models import create_model

    make = lambda: create_model("resnet20", width=1.0, in_channels=1, num_classes=10)  # noqa: E731
    result["model"] = "synthkd.models.create_model('resnet20')"
    print(json.dumps({"meta": result}), flush=True)  # what is known so far, in case of a time-out
    configs = [("fp32", False, None), ("fp32+channels_last", True, None), ("bf16-autocast+channels_last", True, torch.bfloat16)]
    rows = []
    for name, channels_last, dtype in configs:
        row = {"config": name}
        try:
            torch.manual_seed(0)
            model = make().to(device).train()
            x = torch.randn(batch, 1, 28, 28, device=device)
            y = torch.randint(0, 10, (batch,), device=device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)

            def step():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                model.zero_grad(set_to_none=True)
                return loss

            for _ in range(warmup):
                step()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            done = 0
            while done < iters:  # at most max_seconds per configuration (a slow CPU), at least one step
                loss = step()
                done += 1
                if not cuda and time.perf_counter() - t0 > max_seconds:
                    break
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            row.update(ms_per_iter=round(1000 * dt / done, 3), images_per_s=round(batch * done / dt, 1), iters=done,
                       loss=round(float(loss.detach()), 4))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result["rows"] = rows
    if cuda:
        result["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


ENV_PROBE = r"""
import json, platform, sys, importlib.metadata as md
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for name in ("synthkd", "torch", "torchvision", "accelerate", "diffusers", "kornia", "kornia_rs", "zuko",
             "transformers", "huggingface_hub", "numpy", "scikit-learn", "importlib_metadata"):
    try:
        info[name] = md.version(name)
    except Exception as exc:
        info[name] = None
import torch
info["cuda_available"] = torch.cuda.is_available()
info["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = list(torch.cuda.get_device_capability(0))
    info["bf16_supported"] = torch.cuda.is_bf16_supported()
for mod in ("synthkd", "synthkd.generators", "synthkd.pipelines", "diffusers", "kornia", "zuko"):
    try:
        m = __import__(mod, fromlist=["_"])
        info["import:" + mod] = getattr(m, "__file__", "ok")
    except Exception as exc:
        info["import:" + mod] = "FAILED " + type(exc).__name__ + ": " + str(exc)[:200]
print(json.dumps(info))
"""


# --------------------------------------------------------------------------------------------
# the steps


def build_steps(s: dict, work: Path, have_evaluate_detector: bool, config: Path) -> list[dict]:
    W = lambda name: str(work / name)  # noqa: E731
    bf16 = ["--mixed-precision", "bf16"]
    kd_settings = ["--batch-size", str(s["kd_batch"]), "--no-flip", "--eval-dataset", "digits:test"]
    kd = ["--student", "resnet8", "--student-width", "0.5", *kd_settings]
    # a neighbourhood student keeps the teacher's activation shape at every cut: thinner inside its blocks
    nd = ["--student", "resnet8:inner=0.5", *kd_settings]
    steps = [
        dict(name="env", cmd=[sys.executable, "-c", ENV_PROBE], shown="python3 -c ENV_PROBE (versions, CUDA, imports)",
             parse="env"),
        dict(name="microbench", cmd=[sys.executable, str(Path(__file__).resolve()), "--microbench",
                                     "--bench-iters", str(s["bench_iters"]), "--bench-warmup", str(s["bench_warmup"]),
                                     "--bench-max-seconds", str(s["bench_max_seconds"])],
             parse="microbench", timeout=max(s["step_timeout"], 90)),
        dict(name="train-teacher", args=["train-teacher", "--dataset", "digits:train", "--arch", "resnet8",
                                         "--epochs", str(s["teacher_epochs"]), "--no-flip", "--eval-dataset", "digits:test",
                                         *bf16, "--out", W("teacher")], model="teacher"),
        dict(name="evaluate teacher", args=["evaluate", "--model", W("teacher"), "--dataset", "digits:test", "--json"],
             needs=["train-teacher"], parse="evaluate"),
        dict(name="generate inversion", args=["generate", "--teacher", W("teacher"), "--method", "inversion",
                                              "--num-images", str(s["inv_images"]), "--iterations", str(s["inv_iters"]),
                                              "--batch-size", str(s["inv_batch"]), "--no-flip", *bf16, "--out", W("syn-inv")],
             needs=["train-teacher"], images=s["inv_images"]),
        dict(name="generate fast", args=["generate", "--teacher", W("teacher"), "--method", "fast",
                                         "--num-images", str(s["fast_images"]), "--steps-per-batch", str(s["fast_steps"]),
                                         "--batch-size", str(s["fast_batch"]), "--no-flip", *bf16, "--out", W("syn-fast")],
             needs=["train-teacher"], images=s["fast_images"]),
        dict(name="distill e2e bf16", args=["distill", "--teacher", W("teacher"), *kd, "--data", W("syn-inv"),
                                            "--mode", "e2e", "--epochs", str(s["e2e_epochs"]), *bf16, "--out", W("st-e2e-bf16")],
             needs=["generate inversion"], model="st-e2e-bf16"),
        dict(name="distill e2e fp16 (fast set)", args=["distill", "--teacher", W("teacher"), *kd, "--data", W("syn-fast"),
                                                       "--mode", "e2e", "--epochs", str(s["fp16_epochs"]),
                                                       "--mixed-precision", "fp16", "--out", W("st-e2e-fp16")],
             needs=["generate fast"], model="st-e2e-fp16"),
        dict(name="distill neighbourhood bf16", args=["distill", "--teacher", W("teacher"), *nd, "--data", W("syn-inv"),
                                                      "--mode", "neighbourhood", "--cuts", "blocks",
                                                      "--epochs", str(s["nb_epochs"]), "--finetune-epochs", str(s["nb_finetune"]),
                                                      *bf16, "--out", W("st-nb")],
             needs=["generate inversion"], model="st-nb"),
        dict(name="distill e2e --synthesize fast", args=["distill", "--teacher", W("teacher"), *kd, "--data", W("syn-live"),
                                                         "--mode", "e2e", "--synthesize", "fast",
                                                         "--num-images", str(s["live_images"]),
                                                         "--gen-batch-size", str(s["fast_batch"]),
                                                         "--steps-per-batch", str(s["live_steps"]),
                                                         "--batches-per-round", "1", "--epochs", str(s["live_epochs"]),
                                                         *bf16, "--out", W("st-live")],
             needs=["train-teacher"], model="st-live"),
        dict(name="search", args=["search", "--teacher", W("teacher"), "--data", W("syn-inv"), "--budget", "params=0.5",
                                  "--candidates", s["search_candidates"], "--cuts", "stages",
                                  "--epochs", str(s["search_epochs"]), "--finetune-epochs", str(s["search_finetune"]),
                                  "--batch-size", str(s["kd_batch"]), "--eval-dataset", "digits:test",
                                  "--cache-dir", W("search-cache"), *bf16, "--out", W("st-search")],
             needs=["generate inversion"], model="st-search"),
        dict(name="evaluate e2e bf16", args=["evaluate", "--model", W("st-e2e-bf16"), "--dataset", "digits:test", "--json"],
             needs=["distill e2e bf16"], parse="evaluate"),
        dict(name="evaluate e2e fp16", args=["evaluate", "--model", W("st-e2e-fp16"), "--dataset", "digits:test", "--json"],
             needs=["distill e2e fp16 (fast set)"], parse="evaluate"),
        dict(name="evaluate neighbourhood", args=["evaluate", "--model", W("st-nb"), "--dataset", "digits:test", "--json"],
             needs=["distill neighbourhood bf16"], parse="evaluate"),
        dict(name="evaluate search", args=["evaluate", "--model", W("st-search"), "--dataset", "digits:test", "--json"],
             needs=["search"], parse="evaluate"),
        dict(name="calibrate gmm", args=["calibrate", "--model", W("teacher"), "--data", W("syn-inv"), "--density", "gmm",
                                         "--components", "4", "--out", W("det-gmm")],
             needs=["generate inversion"]),
        dict(name="calibrate flow (zuko)", args=["calibrate", "--model", W("teacher"), "--data", W("syn-inv"),
                                                 "--density", "flow", "--smoothing", "0.1", "--out", W("det-flow")],
             needs=["generate inversion"]),
        dict(name="detect --json", args=["detect", "--detector", W("det-gmm"), "--inputs", s["detect_inputs"],
                                         "--model", W("teacher"), "--json"],
             needs=["calibrate gmm"], parse="detect"),
    ]
    if have_evaluate_detector:
        steps.append(dict(name="evaluate-detector", args=["evaluate-detector", "--model", W("teacher"), "--detector", W("det-gmm"),
                                                          "--dataset", "digits:test", "--ood", "noise",
                                                          "--attacks", s["attacks"], "--limit", str(s["eval_limit"]),
                                                          "--out", W("det-eval")],
                          needs=["calibrate gmm"], parse="detector_eval", outdir="det-eval"))
    else:  # the documented form: evaluate --detector
        steps.append(dict(name="evaluate --detector", args=["evaluate", "--model", W("teacher"), "--detector", W("det-gmm"),
                                                            "--dataset", "digits:test", "--ood", "noise",
                                                            "--attacks", s["attacks"], "--limit", str(s["eval_limit"]),
                                                            "--out", W("det-eval")],
                          needs=["calibrate gmm"], parse="detector_eval", outdir="det-eval"))
    steps += [
        dict(name="train-diffusion", args=["train-diffusion", "--dataset", "digits:train", "--max-steps", str(s["diff_steps"]),
                                           "--batch-size", str(s["diff_batch"]), "--image-size", "8",
                                           "--block-out-channels", "16,32", *bf16, "--out", W("ddpm")]),
        dict(name="generate diffusion", args=["generate", "--teacher", W("teacher"), "--method", "diffusion",
                                              "--pipeline", W("ddpm"), "--scheduler", "ddim",
                                              "--steps", str(s["diff_sample_steps"]), "--num-images", str(s["diff_images"]),
                                              "--batch-size", str(s["diff_images"]), *bf16, "--out", W("syn-ddpm")],
             needs=["train-teacher", "train-diffusion"], images=s["diff_images"]),
        dict(name="run digits_quick.yaml", args=["run", str(config), f"out={work / 'run-digits'}", *s["run_overrides"],
                                                "mixed_precision=bf16", "--quiet"],
             parse="run", outdir="run-digits", timeout=s["run_timeout"]),
    ]
    return steps


def parse_figures(step: dict, text: str, work: Path) -> dict:
    kind = step.get("parse")
    figs: dict = {}
    if kind == "env":
        found = json_lines(text)
        return found[-1] if found else {}
    if kind == "microbench":
        found = [j for j in json_lines(text) if "rows" in j]
        if found:
            return found[-1]
        meta = [j["meta"] for j in json_lines(text) if "meta" in j]
        return {**(meta[-1] if meta else {}), "rows": [j for j in json_lines(text) if "config" in j]}
    figs.update(figures_from_output(text))
    if kind == "evaluate":
        found = [j for j in json_lines(text) if "accuracy" in j]
        if found:
            figs = {"accuracy": rounded(found[-1]["accuracy"]), "num_images": found[-1].get("num_images")}
    elif kind == "detect":
        rows = json_lines(text)
        flags = [r.get("flagged", r.get("flag")) for r in rows if isinstance(r, dict)]
        figs = {"inputs": len(rows), "flagged": sum(1 for f in flags if f)}
    elif kind == "detector_eval":
        metrics = read_json(work / step["outdir"] / "metrics.json") or {}
        for source, methods in (metrics.get("sources") or {}).items():
            auroc = dig(methods, "detector", "auroc")
            if auroc is not None:
                figs[f"auroc[{source}]"] = rounded(auroc, 3)
        far = dig(metrics, "alarms", "false_alarm_rate")
        if far is not None:
            figs["false_alarm_rate"] = rounded(far, 3)
    elif kind == "run":
        run_dir = work / step["outdir"]
        figs["report_html"] = (run_dir / "report.html").exists()
        stage_seconds = {}
        for path in sorted((run_dir / "stages").glob("*.json")) if (run_dir / "stages").is_dir() else []:
            stage = read_json(path) or {}
            if isinstance(stage.get("seconds"), (int, float)):
                stage_seconds[path.stem] = round(stage["seconds"], 2)
            for key, value in (stage.get("results") or {}).items():
                if key.endswith("accuracy") and isinstance(value, (int, float)):
                    figs[key] = rounded(float(value))
        figs["stage_seconds"] = stage_seconds
        auroc = dig(read_json(run_dir / "summary.json") or {}, "detector_auroc")
        if isinstance(auroc, dict):
            figs["detector_auroc"] = {k: rounded(v, 3) for k, v in auroc.items() if isinstance(v, float)}
    if step.get("model"):
        metrics = read_json(work / step["model"] / "metrics.json") or {}
        for key in (("eval", "accuracy"), ("train", "accuracy"), ("merged", "accuracy"), ("gap",)):
            value = dig(metrics, *key)
            if isinstance(value, (int, float)):
                figs["metrics." + ".".join(key)] = rounded(float(value))
    if step.get("images") and step.get("seconds"):
        figs["images_per_s_wall"] = round(step["images"] / step["seconds"], 1)
    return figs


# --------------------------------------------------------------------------------------------
# main


def fmt_figs(figs: dict, width: int = 70) -> str:
    if not figs:
        return ""
    parts = []
    for k, v in figs.items():
        if isinstance(v, (list, dict)):
            continue
        parts.append(f"{k}={v}")
    text = " ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


def print_table(results: list[dict], setup: list[dict] = ()) -> None:
    print()
    print(f"{'step':32} {'status':8} {'rc':>4} {'sec':>7}  figures")
    print("-" * 120)
    for r in setup:
        print(f"{'setup: ' + str(r.get('name')):32} {'ok' if r.get('rc') == 0 else 'FAILED':8} {r.get('rc', ''):>4} "
              f"{r.get('seconds', ''):>7}  {r.get('note', '')}"[:160])
    for r in results:
        rc = "" if r.get("returncode") is None else str(r["returncode"])
        sec = "" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        figs = r.get("figures") or {}
        if r["name"] == "microbench":
            print(f"{r['name']:32} {r['status']:8} {rc:>4} {sec:>7}  {figs.get('device', '')} model: {figs.get('model', '')}"[:160])
            for row in figs.get("rows", []):
                detail = (f"{row.get('images_per_s', '?')} images/s, {row.get('ms_per_iter', '?')} ms/iter"
                          if "error" not in row else row["error"])
                print(f"{'':32}   {row['config']:30} {detail}"[:160])
            continue
        if r["name"] == "env":
            keys = ("python", "torch", "torch_cuda", "cuda_available", "device", "synthkd", "diffusers", "kornia", "zuko")
            shown = " ".join(f"{k}={figs.get(k)}" for k in keys if k in figs)
            print(f"{r['name']:32} {r['status']:8} {rc:>4} {sec:>7}  {shown}"[:200])
            bad = {k: v for k, v in figs.items() if k.startswith("import:") and str(v).startswith("FAILED")}
            for k, v in bad.items():
                print(f"{'':32}   {k} {v}"[:200])
            continue
        extra = r.get("reason", "") if r["status"] == "skipped" else fmt_figs(figs)
        print(f"{r['name']:32} {r['status']:8} {rc:>4} {sec:>7}  {extra}")
    counts = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("-" * 120)
    print("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON file to write (rewritten after every step)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (for a CPU smoke run)")
    p.add_argument("--workdir", help="where the runs go (default: a new temporary directory)")
    p.add_argument("--logs", help="also copy every step's log here (one file per step)")
    p.add_argument("--budget", type=float, help="start no step after this many seconds (default 170, quick 330)")
    p.add_argument("--step-timeout", type=float, help="seconds per step (default 45, quick 120)")
    p.add_argument("--deadline", type=float, help="hard limit in seconds for the whole run: no step runs past it")
    p.add_argument("--setup", help="JSON-lines file of the setup steps gpu_check.sh ran (copied into the report)")
    p.add_argument("--only", help="comma-separated substrings: run only the steps whose names contain one")
    p.add_argument("--microbench", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bench-iters", type=int, default=30, help=argparse.SUPPRESS)
    p.add_argument("--bench-warmup", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--bench-batch", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--bench-max-seconds", type=float, default=20.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.microbench:
        print(json.dumps(microbench(args.bench_iters, args.bench_warmup, args.bench_batch, args.bench_max_seconds)), flush=True)
        return 0

    sizes = dict(QUICK if args.quick else FULL)
    if args.step_timeout:
        sizes["step_timeout"] = args.step_timeout
        sizes["run_timeout"] = max(args.step_timeout, sizes["run_timeout"])
    budget = args.budget if args.budget is not None else sizes["budget"]
    deadline = args.deadline if args.deadline is not None else float("inf")
    budget = min(budget, deadline - 15)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="synthkd-gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", DIFFUSERS_NO_ADVISORY_WARNINGS="1", TQDM_MININTERVAL="5",
               SYNTHKD_CACHE=str(work / "cache"), WANDB_MODE="disabled")

    cli = [sys.executable, "-m", "synthkd"]
    try:  # the detector evaluation has been `evaluate --detector`; use `evaluate-detector` if it exists
        probe = subprocess.run([*cli, "evaluate-detector", "-h"], cwd=work, env=env, capture_output=True,
                               timeout=60, stdin=subprocess.DEVNULL)
        have_evaluate_detector = probe.returncode == 0
    except subprocess.TimeoutExpired:
        have_evaluate_detector = False
    config = REPO / "configs" / "digits_quick.yaml"
    steps = build_steps(sizes, work, have_evaluate_detector, config)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        steps = [s for s in steps if any(w in s["name"] for w in wanted)]

    report = {
        "script": "benchmarks/gpu_check.py", "quick": args.quick, "workdir": str(work), "budget_s": budget,
        "step_timeout_s": sizes["step_timeout"], "host": platform.node(), "python": sys.executable,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "evaluate_detector_command": have_evaluate_detector,
        "deadline_s": args.deadline, "sizes": sizes, "setup": [], "steps": [],
    }
    if args.setup and Path(args.setup).exists():
        report["setup"] = json_lines(Path(args.setup).read_text())
    results = report["steps"]
    status_of: dict[str, str] = {}
    t_start = time.perf_counter()
    print(f"gpu_check: {len(steps)} steps, work dir {work}, budget {budget:.0f} s, "
          f"{'quick' if args.quick else 'full'} sizes", flush=True)

    for i, step in enumerate(steps):
        name = step["name"]
        cmd = step.get("cmd") or [*cli, *step["args"]]
        shown = shlex.join(["synthkd", *step["args"]]) if "args" in step else step.get("shown", shlex.join(cmd))
        entry = {"name": name, "command": shown, "status": None, "returncode": None, "seconds": None, "figures": {}}
        elapsed = time.perf_counter() - t_start
        missing = [n for n in step.get("needs", []) if status_of.get(n) != "ok"]
        if name == "run digits_quick.yaml" and not config.exists():
            entry.update(status="skipped", reason=f"{config} not found")
        elif missing:
            entry.update(status="skipped", reason="needs " + ", ".join(missing))
        elif elapsed > budget:
            entry.update(status="skipped", reason=f"budget: {elapsed:.0f} s > {budget:.0f} s")
        elif deadline - elapsed < 10:
            entry.update(status="skipped", reason=f"deadline: {deadline - elapsed:.0f} s left")
        else:
            timeout = step.get("timeout", sizes["step_timeout"])
            # never run past the budget by more than one step's limit, nor past the deadline
            timeout = min(timeout, max(10.0, budget + sizes["step_timeout"] - elapsed), deadline - elapsed - 3)
            log = logs / f"{i:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_')}.log"
            print(f"[{elapsed:6.1f}s] {name} ...", flush=True)
            try:
                rc, seconds, text, timed_out = run_command(cmd, work, env, timeout, log, shown)
            except Exception as exc:  # noqa: BLE001 - e.g. the interpreter vanished: record, go on
                rc, seconds, text, timed_out = -1, 0.0, f"{type(exc).__name__}: {exc}", False
            entry.update(returncode=rc, seconds=round(seconds, 2), timeout_s=round(timeout, 1), log=str(log))
            entry["status"] = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
            if step.get("images"):
                step["seconds"] = seconds
            try:
                entry["figures"] = parse_figures(step, text, work)
            except Exception as exc:  # noqa: BLE001
                entry["figures"] = {"parse_error": f"{type(exc).__name__}: {exc}"}
            if entry["status"] != "ok":
                entry["output_tail"] = tail(text)
                print(f"    {entry['status']} (rc {rc}) after {seconds:.1f} s; last lines:", flush=True)
                for line in entry["output_tail"][-8:]:
                    print("      | " + line[:200], flush=True)
            else:
                print(f"    ok in {seconds:.1f} s  {fmt_figs(entry['figures'], 100)}", flush=True)
        status_of[name] = entry["status"]
        results.append(entry)
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        out.write_text(json.dumps(report, indent=2))

    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    report["summary"] = {s: sum(1 for r in results if r["status"] == s) for s in ("ok", "failed", "timeout", "skipped")}
    out.write_text(json.dumps(report, indent=2))
    if args.logs:
        dest = Path(args.logs)
        dest.mkdir(parents=True, exist_ok=True)
        for log in logs.glob("*.log"):
            (dest / log.name).write_bytes(log.read_bytes())
    print_table(results, report["setup"])
    print(f"\nwrote {out} ({report['elapsed_s']:.0f} s; work dir {work})", flush=True)
    return 0 if report["summary"]["failed"] == 0 and report["summary"]["timeout"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
