"""Commands of the failure detector: calibrate, detect, and evaluate (accuracy, and with
--detector the detection metrics and plots). Their settings come from
:mod:`synthkd.detector.settings`; the work is done by the stages in ``pipelines``."""

from __future__ import annotations

import json
from typing import Any

import click

from ..detector.settings import CalibrationSettings, DetectorEvaluationSettings, DetectSettings
from ..errors import SynthkdError
from .base import (accelerator_options, loader_options, main, make_accelerator, model_options, one_writer, open_model, tagged,
                   trust_code_option)
from .options import CommaList, settings_options


@main.command()
@tagged(model_options("model", "--weights"), spec="model")
@tagged(click.option("--data", required=True, help="Synthetic set directory, image folder, or dataset spec to fit and calibrate on."),
        spec="dataset")
@settings_options(CalibrationSettings, "settings")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the density fit and the fit/calibration split.")
@click.option("--batchnorm-layers", type=CommaList(str), default="",
              help="Comma-separated BatchNorm module paths for it (default: the middle half).")
@accelerator_options()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Detector directory to write.")
@one_writer
def calibrate(model_spec, weights, input_shape, mean, std, data, settings, seed, batchnorm_layers, device, out):
    """Fit a density model of the model's features (no labels) and calibrate its p-values."""
    from synthkd.pipelines.calibrate import calibrate as run_calibrate

    model = open_model(model_spec, weights, input_shape, mean, std)
    accelerator = make_accelerator(device.mixed_precision)
    detector = run_calibrate(model, data, out, settings, seed=seed, batchnorm_layers=batchnorm_layers,
                             accelerator=accelerator)
    if accelerator.is_main_process:
        info = detector.info
        click.echo(f"{settings.density} on {info['num_fit']} features of layer {detector.layer!r}, "
                   f"{info['num_calibration']} calibration scores, score {detector.score_name}"
                   f"{' of ' + ','.join(detector.parts) if detector.score_name not in detector.parts else ''}, "
                   f"alpha {settings.alpha}: wrote {out}")


@main.command()
@click.option("--detector", "detector_dir", required=True, type=click.Path(), help="Detector directory from `synthkd calibrate`.")
@tagged(click.option("--inputs", required=True, help="Dataset spec, image folder, or synthetic set directory."),
        spec="dataset")
@click.option("--model", "model_dir", type=click.Path(), help="Check that this model directory is the one the detector was fitted on.")
@settings_options(DetectSettings, "settings")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input on stdout.")
@accelerator_options()
@trust_code_option
def detect(detector_dir, inputs, model_dir, settings, as_json, device):
    """Per input: score, conformal p-value, flag (p < alpha), the predicted class and, for a
    combination rule, each part's p-value."""
    from synthkd.models import load_model
    from synthkd.pipelines.detect import detect as run_detect

    accelerator = make_accelerator(device.mixed_precision)
    detection = run_detect(detector_dir, inputs, settings, load_model(model_dir) if model_dir else None, accelerator)
    if not accelerator.is_main_process:
        return
    rows = detection.rows()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    parts = list(detection.part_p_values)
    click.echo(f"{'index':>7}  {'score':>10}  {'p_value':>7}  " + "".join(f"{'p_' + p:>15}  " for p in parts)
               + "flag  predicted")
    for row in rows:
        click.echo(f"{row['index']:>7}  {row['score']:>10.3f}  {row['p_value']:>7.4f}  "
                   + "".join(f"{row['part_p_values'][p]:>15.4f}  " for p in parts)
                   + f"{'FLAG' if row['flagged'] else '   -'}  {row['predicted_class']}")
    click.echo(f"flagged {int(detection.flagged.sum())} of {len(rows)} inputs at alpha {detection.alpha}")


@main.command()
@tagged(model_options("model", "--weights"), spec="model")
@tagged(click.option("--dataset", required=True, help="Dataset spec, e.g. fashion-mnist:test."), spec="dataset")
@settings_options(DetectSettings, "batching", only=("batch_size",))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--detector", "detector_dir", type=click.Path(), help="Also evaluate this detector (needs --out).")
@settings_options(DetectorEvaluationSettings, "evaluation")
@loader_options
@click.option("--out", type=click.Path(file_okay=False), help="Directory for metrics.json and PNG plots (with --detector).")
@accelerator_options()
@one_writer
def evaluate(model_spec, weights, input_shape, mean, std, dataset, batching, as_json, detector_dir, evaluation, out, device):
    """Accuracy of a model on a dataset; with --detector, how well the detector flags failures."""
    model = open_model(model_spec, weights, input_shape, mean, std)
    accelerator = make_accelerator(device.mixed_precision)
    if detector_dir is None:
        if evaluation.ood or evaluation.attacks or out:
            raise SynthkdError("--ood, --attacks and --out evaluate a detector; give it with --detector DIR")
        _evaluate_accuracy(model, dataset, batching.batch_size, as_json, accelerator)
        return
    if out is None:
        raise SynthkdError("--detector writes metrics.json and plots; give the directory with --out DIR")
    _evaluate_detector(model, detector_dir, dataset, evaluation, out, as_json, accelerator)


def _evaluate_accuracy(model, dataset: str, batch_size: int, as_json: bool, accelerator: Any) -> None:
    from synthkd.data import load_dataset
    from synthkd.evaluation import evaluate as run_evaluate

    report = run_evaluate(model, load_dataset(dataset), accelerator, batch_size)
    if not accelerator.is_main_process:
        return
    if as_json:
        click.echo(json.dumps({"dataset": dataset, **report}))
        return
    click.echo(f"accuracy {report['accuracy']:.4f} on {report['num_images']} images of {dataset}")
    for name, value in report["per_class"].items():
        click.echo(f"  {name:>14}  {value:.4f}")


def _evaluate_detector(model, detector_dir: str, dataset: str, evaluation: DetectorEvaluationSettings, out: str,
                       as_json: bool, accelerator: Any) -> None:
    from synthkd.pipelines.evaluate_detector import evaluate_detector

    report = evaluate_detector(model, detector_dir, dataset, out, evaluation, accelerator)
    if not accelerator.is_main_process:
        return
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"{'source':<28} {'scorer':<12} {'AUROC':>6} {'AUPR-in':>7} {'AUPR-out':>8} {'FPR@95':>6}")
    for source, scorers in report["sources"].items():
        for scorer, metrics in scorers.items():
            click.echo(f"{source:<28} {scorer:<12} {metrics['auroc']:>6.3f} {metrics['aupr_in']:>7.3f} "
                       f"{metrics['aupr_out']:>8.3f} {metrics['fpr_at_95_tpr']:>6.3f}")
    alarms = report["alarms"]
    click.echo(f"{alarms['verdict']}; wrote {out}")
