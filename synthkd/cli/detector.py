"""Commands of the failure detector: calibrate, detect, and evaluate (accuracy, and with
--detector the detection metrics and plots)."""

from __future__ import annotations

import json

import click

from ..errors import SynthkdError
from .base import main, make_accelerator, model_options, open_model


def _split_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


@main.command()
@model_options("model", "--weights")
@click.option("--data", required=True, help="Synthetic set directory, image folder, or dataset spec to fit and calibrate on.")
@click.option("--density", type=click.Choice(["gmm", "gmm-diag", "flow", "flow-nsf"]), default="gmm", show_default=True)
@click.option("--alpha", type=float, default=0.05, show_default=True, help="False-alarm rate: flag inputs with p-value below it.")
@click.option("--layer", help="Module path of the network whose input is the feature (default: the last nn.Linear).")
@click.option("--components", type=int, help="Gaussian mixture components (default: chosen by BIC).")
@click.option("--holdout", type=float, default=0.2, show_default=True, help="Fraction kept for the calibration scores.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batchnorm-weight", type=float, default=0.0, show_default=True,
              help="Weight of the inputs' deviation from the model's BatchNorm statistics in the score (0: off; "
                   "2 on Fashion-MNIST flags more adversarial inputs, fewer mistakes).")
@click.option("--batchnorm-layers", help="Comma-separated BatchNorm module paths for it (default: the middle half).")
@click.option("--smoothing", type=float, default=0.0, show_default=True,
              help="Widen the density by Gaussian noise of this variance (standardised feature units); "
                   "about 0.1 for synthetic data (README).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Detector directory to write.")
def calibrate(model_spec, weights, input_shape, mean, std, data, density, alpha, layer, components, holdout, seed,
              batchnorm_weight, batchnorm_layers, smoothing, out):
    """Fit a density model of the model's features (no labels) and calibrate its p-values."""
    from synthkd.pipelines.calibrate import calibrate as run_calibrate

    model = open_model(model_spec, weights, input_shape, mean, std)
    accelerator = make_accelerator()
    detector = run_calibrate(model, data, out, density, alpha, layer, components, holdout, seed, accelerator,
                             batchnorm_weight, _split_list(batchnorm_layers), smoothing)
    if accelerator.is_main_process:
        info = detector.info
        click.echo(f"{density} on {info['num_fit']} features of layer {detector.layer!r}, {info['num_calibration']} "
                   f"calibration scores, alpha {alpha}: wrote {out}")


@main.command()
@click.option("--detector", "detector_dir", required=True, type=click.Path(), help="Detector directory from `synthkd calibrate`.")
@click.option("--inputs", required=True, help="Dataset spec, image folder, or synthetic set directory.")
@click.option("--model", "model_dir", type=click.Path(), help="Check that this model directory is the one the detector was fitted on.")
@click.option("--alpha", type=float, help="False-alarm rate (default: the detector's).")
@click.option("--batch-size", type=int, default=512, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input on stdout.")
def detect(detector_dir, inputs, model_dir, alpha, batch_size, as_json):
    """Per input: score, conformal p-value, flag (p < alpha) and the predicted class."""
    from synthkd.detector import Detector
    from synthkd.detector.conformal import check_alpha
    from synthkd.detector.features import extract
    from synthkd.models import load_model
    from synthkd.pipelines.calibrate import open_inputs

    detector = Detector.from_pretrained(detector_dir, load_model(model_dir) if model_dir else None)
    alpha = check_alpha(detector.alpha if alpha is None else alpha)
    accelerator = make_accelerator()
    detector.to(accelerator.device)
    data = extract(detector.model, open_inputs(inputs), accelerator, detector.layer, batch_size, detector.batchnorm)
    scores = detector.score_features(data.features, data.deviations)
    p_values = detector.p_values(scores)
    if not accelerator.is_main_process:
        return
    names = detector.model.config.class_names
    predictions = data.predictions.tolist()
    if not as_json:
        click.echo(f"{'index':>7}  {'score':>10}  {'p_value':>7}  flag  predicted")
    for index, (score, p_value, predicted) in enumerate(zip(scores.tolist(), p_values.tolist(), predictions)):
        flagged = p_value < alpha
        if as_json:
            click.echo(json.dumps({"index": index, "score": score, "p_value": p_value, "flagged": flagged,
                                   "predicted": predicted, "predicted_class": names[predicted] if names else str(predicted)}))
        else:
            click.echo(f"{index:>7}  {score:>10.3f}  {p_value:>7.4f}  {'FLAG' if flagged else '   -'}  {names[predicted] if names else predicted}")
    if not as_json:
        click.echo(f"flagged {int((p_values < alpha).sum())} of {len(p_values)} inputs at alpha {alpha}")


@main.command()
@model_options("model", "--weights")
@click.option("--dataset", required=True, help="Dataset spec, e.g. fashion-mnist:test.")
@click.option("--batch-size", type=int, default=512, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--detector", "detector_dir", type=click.Path(), help="Also evaluate this detector (needs --out).")
@click.option("--ood", help="Comma-separated out-of-distribution specs (digits, noise, flips, inversions are short names).")
@click.option("--attacks", help="Comma-separated attacks on the dataset: fgsm, pgd.")
@click.option("--epsilon", type=float, default=0.1, show_default=True, help="L-inf attack budget in [0,1] pixel units.")
@click.option("--pgd-steps", type=int, default=10, show_default=True)
@click.option("--limit", type=int, help="At most this many inputs per source.")
@click.option("--out", type=click.Path(file_okay=False), help="Directory for metrics.json and PNG plots (with --detector).")
def evaluate(model_spec, weights, input_shape, mean, std, dataset, batch_size, as_json, detector_dir, ood, attacks,
             epsilon, pgd_steps, limit, out):
    """Accuracy of a model on a dataset; with --detector, how well the detector flags failures."""
    from synthkd.data import load_dataset
    from synthkd.evaluation import evaluate as run_evaluate

    model = open_model(model_spec, weights, input_shape, mean, std)
    accelerator = make_accelerator()
    if detector_dir is None:
        if ood or attacks or out:
            raise SynthkdError("--ood, --attacks and --out evaluate a detector; give it with --detector DIR")
        report = run_evaluate(model, load_dataset(dataset), accelerator, batch_size)
        if not accelerator.is_main_process:
            return
        if as_json:
            click.echo(json.dumps({"dataset": dataset, **report}))
            return
        click.echo(f"accuracy {report['accuracy']:.4f} on {report['num_images']} images of {dataset}")
        for name, value in report["per_class"].items():
            click.echo(f"  {name:>14}  {value:.4f}")
        return
    from synthkd.pipelines.evaluate_detector import evaluate_detector

    if out is None:
        raise SynthkdError("--detector writes metrics.json and plots; give the directory with --out DIR")
    report = evaluate_detector(model, detector_dir, dataset, out, _split_list(ood), _split_list(attacks), epsilon,
                               pgd_steps, accelerator, limit)
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
    click.echo(f"false-alarm rate at alpha {alarms['alpha']}: {alarms['false_alarm_rate']:.4f} on {dataset}; wrote {out}")
