"""The failure detector on the standard setting: does a density of the teacher's features,
fitted on synthetic samples only, flag the teacher's failures as well as baselines fitted on the
real training data?

Classifier: the cached resnet20 teacher. Detectors (GMM with BIC-chosen components, and a MAF
flow) calibrated twice: on the real training features (fashion-mnist:train, 20% held out for
calibration) and on the cached inverted synthetic set only. Failure sources: test-set mistakes,
digits upsampled to 28x28, Gaussian and uniform noise, vertically flipped and inverted
Fashion-MNIST, FGSM and PGD (L-inf, [0,1] pixels) on the first test images. Baselines on the same
features: MSP, energy, Mahalanobis and kNN (fitted on real training features, and on synthetic
ones). Also the synthetic GMM (16 components) and flow smoothed by Gaussian noise of variance 0.1
in standardised feature units (``gmm-smooth``, ``flow-smooth``; ``--smoothing``), the smoothed
GMM with the BatchNorm term (``gmm+bn``, weight 2; the trade-off over other weights is printed),
the false-alarm rate at alpha = 0.05 and fit/score times on 60k/10k features (the coarse-to-fine
GMM fit beside a full EM fit).

    python benchmarks/detector_fashion_mnist.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, load_setting, print_table, standard_synthetic, standard_teacher, timed, write_json  # noqa: E402

from synthkd.accelerator import make_accelerator  # noqa: E402
from synthkd.data import load_dataset  # noqa: E402
from synthkd.detector import CONVENTION, GaussianMixture, NormalizingFlow, cached_extract  # noqa: E402
from synthkd.detector.features import CACHE_ENV  # noqa: E402
from synthkd.detector.settings import CalibrationSettings, DetectorEvaluationSettings  # noqa: E402
from synthkd.pipelines.calibrate import calibrate  # noqa: E402
from synthkd.pipelines.evaluate_detector import (  # noqa: E402
    MISCLASSIFICATION, alarm_rates, collect_sources, detection_report, detector_scorers, source_summary, write_plots,
)

OOD = ["digits:test", "noise:gaussian", "noise:uniform", "fashion-mnist:test|vflip", "fashion-mnist:test|invert"]
ATTACKS = ["fgsm", "pgd"]
QUICK = {"limit": 2000, "attack_limit": 300, "fit_data": "fashion-mnist:train[:12000]"}
# Weight of the BatchNorm term. Chosen before this benchmark existed on adversarial versions of training
# images 50000-52000 and the teacher's mistakes on training images 48000-60000, never the test set;
# the sweep below shows the trade-off on the test sources.
BATCHNORM_WEIGHT = 2.0
# Smoothing for synthetic features, chosen the same way (on those training-image sources) among
# variances 0.01-1 and 4, 8 or 16 components; BIC under smoothing picks too few components (4 here).
SMOOTHING = 0.1
SMOOTH_COMPONENTS = 16
BATCHNORM_SWEEP = (0.5, 1.0, 2.0, 4.0)
SECONDS = 20  # "seconds, not minutes": a fit or a scoring pass under this many seconds meets the target
FULL = {"limit": None, "attack_limit": 2000, "fit_data": "fashion-mnist:train"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=0.1, help="attack budget, L-inf in [0,1] pixel units")
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--quick", action="store_true", help="the same measurement on subsets (minutes)")
    parser.add_argument("--out")
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL, epsilon=args.epsilon, pgd_steps=args.pgd_steps, alpha=args.alpha)
    config = load_setting()
    cache = Path(args.cache)
    work = cache / ("detector-bench-quick" if args.quick else "detector-bench")
    shutil.rmtree(work, ignore_errors=True)  # time the fits, not a reuse of an earlier run
    os.environ[CACHE_ENV] = str(cache / "detector-features")  # features are reused across runs (keyed by content)
    timings: dict[str, float] = {}
    accelerator = make_accelerator()

    teacher = standard_teacher(config, config["teacher"]["epochs"], cache, timings)
    synthetic = standard_synthetic(config, teacher, config["generate"]["num_images"], config["generate"]["iterations"],
                                   cache, timings)
    calibration_data = {"real": settings["fit_data"], "synthetic": synthetic}
    detectors = {}
    for source_name, data in calibration_data.items():
        for density in ("gmm", "flow"):
            with timed(timings, f"calibrate_{density}_{source_name}_seconds"):
                detectors[f"{density} ({source_name})"] = calibrate(
                    teacher, data, work / f"{density}-{source_name}", CalibrationSettings(density, args.alpha),
                    accelerator=accelerator)
    for name, density, weight in (("gmm-smooth", "gmm", 0.0), ("flow-smooth", "flow", 0.0), ("gmm+bn", "gmm", BATCHNORM_WEIGHT)):
        with timed(timings, f"calibrate_{name}_synthetic_seconds"):
            smoothed = CalibrationSettings(density, args.alpha, components=SMOOTH_COMPONENTS, batchnorm_weight=weight,
                                           smoothing=SMOOTHING)
            detectors[f"{name} (synthetic)"] = calibrate(teacher, synthetic, work / f"{name}-synthetic", smoothed,
                                                         accelerator=accelerator)
    layer = detectors["gmm (real)"].layer

    in_name = "fashion-mnist:test"
    with timed(timings, "sources_seconds (features of every source, attacks included)"):
        evaluation = DetectorEvaluationSettings(OOD, ATTACKS, args.epsilon, args.pgd_steps, settings["limit"])
        sources = collect_sources(teacher, in_name, evaluation, layer, accelerator, cache / "detector-features",
                                  settings["attack_limit"], batchnorm=detectors["gmm+bn (synthetic)"].batchnorm)
    scorers = {}
    for name, detector in detectors.items():
        scorers[name] = detector_scorers(detector, name, baselines=False)[name]
    for source_name in calibration_data:
        baselines = detector_scorers(detectors[f"gmm ({source_name})"])
        scorers.setdefault("msp", baselines["msp"])
        scorers.setdefault("energy", baselines["energy"])
        scorers[f"mahalanobis ({source_name})"] = baselines["mahalanobis"]
        scorers[f"knn ({source_name})"] = baselines["knn"]
    scores = {name: {source: fn(data) for source, data in sources.items()} for name, fn in scorers.items()}
    report = detection_report(scores, sources, in_name)
    alarms = {name: alarm_rates(d, scores[name], sources, in_name, args.alpha) for name, d in detectors.items()}
    write_plots(scores, sources, in_name, work / "plots", {n: d.threshold() for n, d in detectors.items()})

    sweep = batchnorm_sweep(detectors["gmm+bn (synthetic)"], sources, in_name)
    speed = measure_speed(teacher, settings["fit_data"], detectors, layer, accelerator, cache / "detector-features", sources[in_name])
    results = {
        "settings": {**settings, "ood": OOD, "attacks": ATTACKS, "layer": layer, "synthetic_set": synthetic.name,
                     "smoothing": SMOOTHING, "smooth_components": SMOOTH_COMPONENTS,
                     "batchnorm_weight": BATCHNORM_WEIGHT,
                     "attack_norm": "linf, [0,1] pixels, attacking the true label", "in_distribution": in_name},
        "convention": CONVENTION,
        "inputs": source_summary(sources, in_name),
        "detectors": {name: {k: v for k, v in d.info.items()} | {"components": getattr(d.density, "components", None)}
                      for name, d in detectors.items()},
        **report,
        "batchnorm_weight_sweep (gmm+bn synthetic, AUROC)": sweep,
        "alarms": alarms,
        "speed": speed,
        "timings": timings,
    }
    results["targets"] = targets(results)
    print_tables(results)
    write_json(args.out, results)


def batchnorm_sweep(detector, sources, in_name) -> dict:
    """AUROC per failure source of the synthetic detector with the BatchNorm term at other weights
    (the same fitted terms, reweighted)."""
    sweep, chosen = {}, detector.batchnorm_weight
    for weight in BATCHNORM_SWEEP:
        detector.batchnorm_weight = weight
        scores = {"sweep": {source: detector.score_features(f.features, f.deviations) for source, f in sources.items()}}
        report = detection_report(scores, sources, in_name)["sources"]
        sweep[f"weight {weight:g}"] = {source: metrics["sweep"]["auroc"] for source, metrics in report.items()}
    detector.batchnorm_weight = chosen
    return sweep


def measure_speed(teacher, fit_data, detectors, layer, accelerator, cache_dir, test_features) -> dict:
    """Fit time on the training features (60k in the full run) and score time on the test features."""
    train = cached_extract(teacher, load_dataset(fit_data), accelerator, layer, cache_dir)
    standardized = detectors["gmm (real)"].standardize(train.features).to(accelerator.device)
    test = detectors["gmm (real)"].standardize(test_features.features).to(accelerator.device)
    speed = {"num_fit": len(train), "num_scored": len(test)}
    components = detectors["gmm (real)"].density.components
    models = {
        f"gmm, {components} components (BIC choice of the real detector)": GaussianMixture(components),
        f"gmm, {components} components, full EM on every row (before coarse-to-fine)":
            GaussianMixture(components, subset_size=None),
        "flow (maf)": NormalizingFlow(),
    }
    for name, model in models.items():
        started = time.perf_counter()
        model.fit_features(standardized)
        fitted = time.perf_counter()
        scores = model.score_features(test)
        scored = time.perf_counter()
        speed[name] = {"fit_seconds": fitted - started, "score_seconds": scored - fitted,
                       "mean_log_likelihood_scored": float(scores.mean())}
    return speed


def targets(results: dict) -> dict:
    """Every target of issue 4, met or not, with the figures behind it."""
    sources = results["sources"]
    failure_sources = [s for s in sources if s != MISCLASSIFICATION]
    out = {}
    for density in ("gmm", "flow", "gmm-smooth", "flow-smooth", "gmm+bn"):
        rows = {s: {"detector": sources[s][f"{density} (synthetic)"]["auroc"], "mahalanobis (real)": sources[s]["mahalanobis (real)"]["auroc"]}
                for s in failure_sources}
        out[f"{density} (synthetic) AUROC >= mahalanobis (real) on OOD and adversarial"] = {
            "met": all(r["detector"] >= r["mahalanobis (real)"] for r in rows.values()),
            "sources_met": sum(r["detector"] >= r["mahalanobis (real)"] for r in rows.values()),
            "sources": len(rows), "per_source": rows}
    misclassification = sources[MISCLASSIFICATION]
    for name in ("gmm (real)", "flow (real)", "gmm (synthetic)", "flow (synthetic)", "gmm-smooth (synthetic)",
                 "flow-smooth (synthetic)", "gmm+bn (synthetic)"):
        out[f"misclassification AUROC of {name} >= msp"] = {
            "met": misclassification[name]["auroc"] >= misclassification["msp"]["auroc"],
            "detector": misclassification[name]["auroc"], "msp": misclassification["msp"]["auroc"]}
    for name, alarm in results["alarms"].items():
        rate = alarm["false_alarm_rate"]
        entry = {"false_alarm_rate": rate, "alpha": alarm["alpha"]}
        if "(real)" in name:
            entry["met"] = 0.03 <= rate <= 0.07
        out[f"false-alarm rate at alpha of {name}" + (" in 0.03..0.07" if "(real)" in name else " (shift reported)")] = entry
    for name, timing in results["speed"].items():
        if isinstance(timing, dict) and "before" not in name:  # the full-EM fit is the reference, not a target
            out[f"{name}: fit {results['speed']['num_fit']} / score {results['speed']['num_scored']} in seconds"] = {
                "met": timing["fit_seconds"] < SECONDS and timing["score_seconds"] < SECONDS, **timing}
    return out


def print_tables(results: dict) -> None:
    scorers = list(next(iter(results["sources"].values())))
    rows = [{"scorer": scorer, **{source: results["sources"][source][scorer]["auroc"] for source in results["sources"]}}
            for scorer in scorers]
    print_table(rows, "AUROC per failure source (positives = failures)")
    rows = [{"scorer": scorer, **{source: results["sources"][source][scorer]["fpr_at_95_tpr"] for source in results["sources"]}}
            for scorer in scorers]
    print_table(rows, "FPR at 95% TPR")
    print_table([{"scorer": s, **{k: v for k, v in m.items() if k != "num_negatives"}} for s, m in results["mann_whitney"].items()],
                "Mann-Whitney U, misclassified vs correct test inputs")
    print_table([{"detector": n, "alpha": a["alpha"], "false_alarm_rate": a["false_alarm_rate"], **a["flag_rate"]}
                 for n, a in results["alarms"].items()], "Flag rate at alpha (in-distribution: false alarms)")
    sweep = results["batchnorm_weight_sweep (gmm+bn synthetic, AUROC)"]
    print_table([{"weight": w, **row} for w, row in sweep.items()], "AUROC of gmm+bn (synthetic) by BatchNorm weight")
    print_table([{"target": k, "met": v.get("met", "-")} for k, v in results["targets"].items()], "Targets of issue 4")


if __name__ == "__main__":
    main()
