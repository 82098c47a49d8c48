"""Stage: how well a detector flags the three failure sources, against baselines, in one run.

Failure sources: the classifier's mistakes on the in-distribution set (negatives: the inputs it
gets right), out-of-distribution sets and adversarial versions (:data:`synthkd.detector.ATTACKS`)
of the in-distribution inputs (negatives: the clean in-distribution inputs). Every scorer is
computed on the same features: the detector, the logit scores (:data:`synthkd.detector.LOGIT_SCORES`:
maximum softmax probability, energy) and the baselines fitted on the detector's own fitting
features. Metrics follow the conventions of :mod:`synthkd.detector`. Writes ``metrics.json`` and
PNG plots.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Subset

from synthkd.accelerator import make_accelerator
from synthkd.data import LabelledTensors, load_dataset
from synthkd.detector import CONVENTION, LOGIT_SCORES, Detector, Features, cached_extract
from synthkd.detector.attacks import attack
from synthkd.detector.conformal import conformal_p_values
from synthkd.detector.features import dataset_fingerprint, features_cache_dir
from synthkd.detector.metrics import detection_metrics, mann_whitney
from synthkd.detector.plots import plot_roc_curves, plot_score_histograms
from synthkd.detector.settings import DetectorEvaluationSettings
from synthkd.errors import SynthkdError
from synthkd.evaluation import as_model_labels, model_class_ids
from synthkd.io import atomic_write_json
from synthkd.models import Classifier
from synthkd.seeds import derive_seed

MISCLASSIFICATION = "misclassification"
Scorer = Callable[[Features], torch.Tensor]

def _limited(dataset: Dataset, limit: int | None) -> Dataset:
    return Subset(dataset, range(min(limit, len(dataset)))) if limit is not None and limit < len(dataset) else dataset


def adversarial_set(model: Classifier, dataset: Dataset, name: str, epsilon: float, pgd_steps: int,
                    accelerator: Accelerator, seed: int = 0, batch_size: int = 256,
                    ids: torch.Tensor | None = None) -> LabelledTensors:
    """Adversarial versions of every image, attacking the true label (the prediction where unknown);
    ``ids``: the model's class id of each of the dataset's labels (:func:`model_class_ids`)."""
    loader = accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, shuffle=False))
    model = model.to(accelerator.device).eval()
    generator = torch.Generator().manual_seed(derive_seed(seed, "attack start", accelerator.process_index))
    images_out, labels_out = [], []
    for batch in loader:
        images = batch.images.to(accelerator.device)
        labels = as_model_labels(torch.as_tensor(batch.targets).long().to(accelerator.device), ids)
        with torch.no_grad():
            predicted = model(images).argmax(1)
        adversarial = attack(name, model, images, torch.where(labels >= 0, labels, predicted), epsilon, pgd_steps, generator)
        adversarial, labels = accelerator.gather_for_metrics((adversarial, labels))
        images_out.append(adversarial.cpu())
        labels_out.append(labels.cpu())
    return LabelledTensors(torch.cat(images_out), torch.cat(labels_out))


def collect_sources(
    model: Classifier, dataset: str, settings: DetectorEvaluationSettings, layer: str, accelerator: Accelerator,
    cache_dir: Path | None, attack_limit: int | None = None, batchnorm: Sequence[str] = (),
) -> dict[str, Features]:
    """Features (and deviations at the ``batchnorm`` layers) of the in-distribution set (first key),
    each out-of-distribution set and each attack on the first ``attack_limit`` in-distribution
    images, at most ``settings.limit`` inputs of each, extracted once and cached."""
    limit, epsilon, pgd_steps = settings.limit, settings.epsilon, settings.pgd_steps
    loaded = load_dataset(dataset)
    ids = model_class_ids(model.config.class_names, loaded)  # a [classes=...] subset numbers its labels 0..
    in_data = _limited(loaded, limit)
    found = cached_extract(model, in_data, accelerator, layer, cache_dir, batchnorm=batchnorm)
    sources = {dataset: replace(found, labels=as_model_labels(found.labels, ids))}
    for spec in settings.ood_specs():
        if spec in sources:
            raise SynthkdError(f"{spec} is the in-distribution set; give other sets with --ood")
        sources[spec] = cached_extract(model, _limited(load_dataset(spec), limit), accelerator, layer, cache_dir,
                                       batchnorm=batchnorm)
    attacked = _limited(in_data, attack_limit)
    attacked_fingerprint = dataset_fingerprint(attacked)
    for name in settings.attacks:
        sources[name] = cached_extract(
            model, lambda name=name: adversarial_set(model, attacked, name, epsilon, pgd_steps, accelerator, ids=ids),
            accelerator, layer, cache_dir if attacked_fingerprint else None,
            data_key=f"{attacked_fingerprint}|{name}|eps={epsilon}|steps={pgd_steps}", batchnorm=batchnorm,
        )
    return sources


def failure_splits(scores: dict[str, torch.Tensor], sources: dict[str, Features], in_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(negatives, failures) scores of one scorer for every failure source."""
    in_data, in_scores = sources[in_name], scores[in_name]
    splits = {}
    labelled = in_data.labels >= 0
    wrong = in_data.predictions != in_data.labels
    if labelled.any() and (labelled & wrong).any() and (labelled & ~wrong).any():
        splits[MISCLASSIFICATION] = (in_scores[labelled & ~wrong], in_scores[labelled & wrong])
    for source in sources:
        if source != in_name:
            splits[source] = (in_scores, scores[source])
    return splits


def detection_report(scores: dict[str, dict[str, torch.Tensor]], sources: dict[str, Features], in_name: str) -> dict[str, Any]:
    """Per failure source and scorer: AUROC, AUPR-in/out, FPR at 95% TPR; per scorer: the
    Mann-Whitney test between correctly and wrongly classified in-distribution inputs."""
    report: dict[str, Any] = {"sources": {}, "mann_whitney": {}}
    for scorer, scorer_scores in scores.items():
        for source, (negatives, failures) in failure_splits(scorer_scores, sources, in_name).items():
            report["sources"].setdefault(source, {})[scorer] = detection_metrics(negatives, failures)
            if source == MISCLASSIFICATION:
                report["mann_whitney"][scorer] = mann_whitney(negatives, failures)
    return report


ALARM_SLACK = 0.01  # a false-alarm rate this far above alpha still counts as holding it (sampling noise)


def alarm_rates(calibration_scores: torch.Tensor, scores: dict[str, torch.Tensor], sources: dict[str, Features],
                in_name: str, alpha: float, calibrated_on: str = "") -> dict[str, Any]:
    """Fraction of inputs flagged at alpha: on in-distribution inputs it is the false-alarm rate,
    which conformal calibration keeps at most alpha only when the calibration inputs are
    exchangeable with them; the report says plainly whether it held and by how much it was off."""
    flags = {source: conformal_p_values(source_scores, calibration_scores) < alpha for source, source_scores in scores.items()}
    splits = failure_splits({s: f.float() for s, f in flags.items()}, sources, in_name)
    rate = float(flags[in_name].float().mean())
    holds = rate <= alpha + ALARM_SLACK
    verdict = (f"false-alarm rate {rate:.3f} on {in_name} at alpha {alpha:g}: the calibration on {calibrated_on or 'its data'} "
               + ("holds alpha" if holds else f"does NOT hold alpha here (off by {rate - alpha:+.3f})"))
    return {
        "alpha": alpha,
        "false_alarm_rate": rate,
        "holds_alpha": holds,
        "alpha_excess": rate - alpha,
        "verdict": verdict,
        "flag_rate": {source: float(failures.mean()) for source, (_, failures) in splits.items()},
    }


def source_summary(sources: dict[str, Features], in_name: str) -> dict[str, Any]:
    """Size of each source; accuracy where labels are known (an attack's accuracy = 1 - success rate)."""
    summary = {}
    for name, data in sources.items():
        labelled = data.labels >= 0
        entry: dict[str, Any] = {"num_inputs": len(data)}
        if labelled.any():
            entry["accuracy"] = float((data.predictions == data.labels)[labelled].float().mean())
        summary[name] = entry
    return summary


def write_plots(scores: dict[str, dict[str, torch.Tensor]], sources: dict[str, Features], in_name: str,
                out: Path, thresholds: dict[str, float] | None = None) -> list[str]:
    """roc-SOURCE.png (every scorer) and hist-SCORER.png (every source); returns the file names."""
    written = []
    splits = {scorer: failure_splits(s, sources, in_name) for scorer, s in scores.items()}
    for source in next(iter(splits.values())):
        name = f"roc-{_slug(source)}.png"
        plot_roc_curves({sc: splits[sc][source][0] for sc in splits}, {sc: splits[sc][source][1] for sc in splits},
                        out / name, f"ROC: {source}")
        written.append(name)
    for scorer, scorer_scores in scores.items():
        name = f"hist-{_slug(scorer)}.png"
        plot_score_histograms(scorer_scores, out / name, f"{scorer} scores per source",
                              (thresholds or {}).get(scorer))
        written.append(name)
    return written


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def detector_scorers(detector: Detector, name: str = "detector", baselines: bool = True) -> dict[str, Scorer]:
    """The detector, and (with ``baselines``) the logit scores and its fitted baselines."""
    scorers: dict[str, Scorer] = {name: lambda f: detector.scores(f)}
    if baselines:
        for logit_score in LOGIT_SCORES.names():
            scorers[logit_score] = lambda f, score=LOGIT_SCORES.get(logit_score): score(f.logits)
        for baseline, scorer in detector.baselines.items():
            scorers[baseline] = lambda f, scorer=scorer: scorer.score_features(f.features.to(_device_of(scorer))).cpu()
    return scorers


def _device_of(scorer: torch.nn.Module) -> torch.device:
    return next(iter(scorer.buffers())).device


def evaluate_detector(
    model: Classifier,
    detector: Detector | str | Path,
    dataset: str,
    out: str | Path,
    settings: DetectorEvaluationSettings | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, Any]:
    """Evaluate ``detector`` for ``model`` on ``dataset`` (in-distribution) and the failure sources
    of ``settings``. Writes OUT/metrics.json and PNG plots; returns the report."""
    settings = settings or DetectorEvaluationSettings()
    settings.check()
    accelerator = accelerator or make_accelerator()
    if not isinstance(detector, Detector):
        detector = Detector.from_pretrained(detector, model)
    detector.check_model(model)
    detector.model = model.eval()
    detector.to(accelerator.device)
    out = Path(out)
    sources = collect_sources(model, dataset, settings, detector.layer, accelerator, features_cache_dir(out / "features"),
                              batchnorm=detector.batchnorm)
    scores = {name: {source: fn(data) for source, data in sources.items()} for name, fn in detector_scorers(detector).items()}
    attack = {"epsilon": settings.epsilon, "pgd_steps": settings.pgd_steps, "norm": "linf", "space": "[0,1] pixels"}
    report = {
        "dataset": dataset,
        "model_fingerprint": detector.model_fingerprint,
        "detector": {"density": detector.density.kind, "layer": detector.layer, "score": detector.score_name,
                     "parts": detector.parts, **detector.info},
        "convention": CONVENTION,
        "attack": attack if settings.attacks else None,
        "inputs": source_summary(sources, dataset),
        **detection_report(scores, sources, dataset),
        "alarms": alarm_rates(detector.calibration_scores, scores["detector"], sources, dataset, detector.alpha,
                              str(detector.info.get("data", ""))),
    }
    if accelerator.is_main_process:
        report["plots"] = write_plots(scores, sources, dataset, out, {"detector": detector.threshold()})
        atomic_write_json(out / "metrics.json", report)
    accelerator.wait_for_everyone()
    return report
