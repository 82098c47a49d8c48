"""The detector's score parts and combination rules: each rule on a toy case with a known answer,
the conformal p-values of combined scores uniform on exchangeable data, the class-subset dataset
modifier of the near-OOD split, and the command-line errors of a bad score."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from synthkd.data import load_dataset
from synthkd.detector import Detector, Features, conformal_p_values, doctor
from synthkd.detector.conformal import interpolated_p_values
from synthkd.detector.combinations import COMBINATIONS, combine
from synthkd.detector.settings import CalibrationSettings
from synthkd.errors import SynthkdError
from synthkd.pipelines.calibrate import fit_detector

from test_cli import error_line, invoke, ok


# ---------------------------------------------------------------------------- rules, known answers
def test_fisher_rule_is_twice_the_sum_of_log_p_values():
    p_values = torch.tensor([[0.5, 0.5], [0.1, 1.0], [1.0, 1.0], [0.01, 0.2]])
    expected = torch.tensor([2 * math.log(0.25), 2 * math.log(0.1), 0.0, 2 * math.log(0.002)])
    assert torch.allclose(combine("fisher", p_values), expected)
    # two moderate p-values outweigh one small one (evidence adds up)
    assert combine("fisher", torch.tensor([[0.05, 0.05]])) < combine("fisher", torch.tensor([[0.003, 1.0]]))


def test_min_rule_is_bonferroni():
    p_values = torch.tensor([[0.5, 0.2], [0.9, 0.6], [0.01, 1.0], [0.3, 0.3]])
    assert torch.allclose(combine("min", p_values), torch.tensor([0.4, 1.2, 0.02, 0.6]))
    assert torch.allclose(combine("min", torch.tensor([[0.1, 0.2, 0.3]])), torch.tensor([0.3]))


def test_rules_are_registered_and_unknown_ones_named():
    assert {"fisher", "min"} <= set(COMBINATIONS.names())
    with pytest.raises(SynthkdError, match="fisher"):
        combine("product", torch.rand(3, 2))


def test_doctor_is_the_softmax_sum_of_squares():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e9, -1e9]])
    assert torch.allclose(doctor(logits), torch.tensor([0.25, 1.0, 0.75**2 + 0.25**2]), atol=1e-6)


def test_interpolated_p_values_are_the_conformal_ones_at_reference_scores():
    reference = torch.tensor([3.0, 1.0, 2.0, 4.0])
    scores = torch.tensor([0.0, 1.0, 1.5, 2.0, 4.0, 9.0])
    assert torch.allclose(interpolated_p_values(scores, reference), torch.tensor([1, 2, 2.5, 3, 5, 5]) / 5)
    at_reference = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(interpolated_p_values(at_reference, reference), conformal_p_values(at_reference, reference))


# ---------------------------------------------------------------------------- fitted parts
def two_classes(n: int, seed: int) -> Features:
    """Two Gaussian clusters in 4-d; the classifier predicts the cluster (its logits: a noisy
    linear read-out, so confidence varies), exchangeable draws for a fixed seed stream."""
    generator = torch.Generator().manual_seed(seed)
    cluster = torch.randint(2, (n,), generator=generator)
    centres = torch.tensor([[4.0, 0.0, 1.0, 1.0], [0.0, 4.0, 1.0, 1.0]])
    features = centres[cluster] + torch.randn(n, 4, generator=generator)
    margin = features[:, 0] - features[:, 1] + 0.5 * torch.randn(n, generator=generator)
    logits = torch.stack([margin / 2, -margin / 2], 1)
    return Features(features, logits, cluster)


def fitted(teacher, score: str = "density", parts=("density", "msp"), density: str = "gmm") -> Detector:
    settings = CalibrationSettings(density=density, components=2, score=score, parts=list(parts))
    detector = fit_detector(teacher, two_classes(1500, 0), "fc", [], settings, 0, torch.device("cpu"))
    detector.calibrate_parts(two_classes(1000, 1))
    return detector


def test_class_density_flags_an_input_predicted_against_its_region(teacher):
    detector = fitted(teacher)
    at_class_one = torch.tensor([[0.0, 4.0, 1.0, 1.0]])
    agreeing = Features(at_class_one, torch.tensor([[-3.0, 3.0]]), torch.tensor([1]))
    disagreeing = Features(at_class_one, torch.tensor([[3.0, -3.0]]), torch.tensor([1]))
    scores = {part: detector.part_scores(data, ["density", "class-density", "agreement"])
              for part, data in (("agree", agreeing), ("disagree", disagreeing))}
    assert torch.allclose(scores["agree"]["density"], scores["disagree"]["density"])  # label-free: the same
    assert scores["disagree"]["class-density"] < scores["agree"]["class-density"] - 3
    # agreement is log P(predicted | x) under the labelled mixture: about 0 where it agrees
    assert -0.05 < float(scores["agree"]["agreement"]) <= 0
    assert torch.allclose(scores["agree"]["class-density"] - scores["agree"]["density"], scores["agree"]["agreement"],
                          atol=1e-4)


@pytest.mark.parametrize("score, parts", [("fisher", ("density", "msp")), ("min", ("density", "msp")),
                                          ("fisher", ("class-density", "doctor", "energy")),
                                          ("class-density", ("density", "msp"))])
def test_conformal_p_values_of_combined_scores_are_uniform_on_exchangeable_data(teacher, score, parts):
    """Over draws of the held-out inputs (reference and calibration halves) and of the test inputs,
    all exchangeable, the final p-value is uniform whatever the parts' dependence; only near 1 may
    it pile up (inputs above every reference score of each part tie there), which flags nothing."""
    detector = fitted(teacher, score, parts)
    pool = detector.part_scores(two_classes(6000, 2), detector.available_parts())
    generator = torch.Generator().manual_seed(0)
    p_values = []
    for _ in range(300):
        order = torch.randperm(6000, generator=generator)
        detector.calibration_parts = {part: values[order[:200]] for part, values in pool.items()}
        test = {part: values[order[200:210]] for part, values in pool.items()}
        p_values.append(detector.explain_parts(test, score, parts)["p_values"])
    p_values = torch.cat(p_values)
    counts = torch.histc(p_values, bins=10, min=0, max=1) / (len(p_values) / 10)  # 1 where uniform
    assert counts[:9].min() > 0.8 and counts[:9].max() < 1.2, counts  # loose: the 10 inputs of a draw share it
    assert counts[9] > 0.8, counts
    for alpha in (0.05, 0.1, 0.2):  # false alarms at alpha, up to sampling noise (3000 draws)
        assert abs(float((p_values < alpha).float().mean()) - alpha) < 0.02
    far = {part: values[:10] - 50 for part, values in pool.items()}  # a control: atypical inputs are not uniform
    assert float(detector.explain_parts(far, score, parts)["p_values"].max()) < 0.05


def test_explain_gives_each_part_p_value_and_flags_an_outlier(teacher):
    detector = fitted(teacher, "fisher")
    far = Features(torch.tensor([[30.0, -30.0, 1.0, 1.0]]), torch.tensor([[0.1, 0.0]]), torch.tensor([0]))
    explained = detector.explain(far)
    assert set(explained["part_p_values"]) == {"density", "msp"}
    assert float(explained["part_p_values"]["density"]) < 0.01 and bool(explained["flagged"])


def test_saved_detector_keeps_its_score_and_can_switch(teacher, tmp_path):
    detector = fitted(teacher, "min")
    detector.save_pretrained(tmp_path / "d")
    loaded = Detector.from_pretrained(tmp_path / "d")
    data = two_classes(50, 3)
    assert loaded.score_name == "min" and torch.equal(loaded.scores(data), detector.scores(data))
    assert torch.equal(loaded.scores(data, "fisher"), detector.scores(data, "fisher"))


def test_a_part_the_detector_was_not_fitted_with_is_refused(teacher):
    detector = fitted(teacher)
    with pytest.raises(SynthkdError, match="batchnorm.*needs BatchNorm layers"):
        detector.check_score("fisher", ["density", "batchnorm"])
    with pytest.raises(SynthkdError, match="Gaussian-mixture density"):
        fitted(teacher, "class-density", density="flow")
    with pytest.raises(SynthkdError, match="fisher, min"):
        detector.check_score("sum")


# ---------------------------------------------------------------------------- near-OOD split
def test_class_subsets_keep_the_near_ood_classes_apart():
    inside = load_dataset("digits:train[classes=0-7]")
    held_out = load_dataset("digits:train[classes=8,9]")
    everything = load_dataset("digits:train")
    assert inside.num_classes == 8 and held_out.class_names == ["8", "9"]
    assert len(inside) + len(held_out) == len(everything)
    assert set(inside.labels.tolist()) == set(range(8)) and set(held_out.labels.tolist()) == {0, 1}
    original = everything.labels
    assert torch.equal(inside.images, everything.images[original < 8])  # same images, same order
    assert torch.equal(held_out.images, everything.images[original >= 8])
    reordered = load_dataset("digits:test[classes=9,1][:5]")  # renumbered in the order given, then sliced
    assert reordered.class_names == ["9", "1"] and len(reordered) == 5
    for bad in ("digits:train[classes=7-2]", "digits:train[classes=a]", "digits:train[classes=0-10]"):
        with pytest.raises(SynthkdError, match="classes"):
            load_dataset(bad)


def test_a_class_subset_is_scored_as_the_models_classes(teacher, accelerator, tmp_path):
    from synthkd.evaluation import evaluate

    everything = evaluate(teacher, load_dataset("digits:test"), accelerator)["per_class"]
    subset = evaluate(teacher, load_dataset("digits:test[classes=9,8]"), accelerator)
    assert subset["per_class"] == {"8": everything["8"], "9": everything["9"]}  # ids 8, 9, not renumbered 0, 1
    # the detector's evaluation takes the model's ids too: its mistakes and the attacks' true labels
    from synthkd.detector.features import default_layer
    from synthkd.detector.settings import DetectorEvaluationSettings
    from synthkd.pipelines.evaluate_detector import collect_sources

    sources = collect_sources(teacher, "digits:test[classes=9,8]", DetectorEvaluationSettings(ood=[], attacks=["fgsm"]),
                              default_layer(teacher), accelerator, cache_dir=None)
    assert set(sources["digits:test[classes=9,8]"].labels.tolist()) == set(sources["fgsm"].labels.tolist()) == {8, 9}
    for name in ("cat", "dog"):  # classes the model does not have
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / name / "a.png")
    with pytest.raises(SynthkdError, match="classes cat, dog are not among the model's 10 classes"):
        evaluate(teacher, load_dataset(f"folder:{tmp_path}"), accelerator)


# ---------------------------------------------------------------------------- command line
def test_cli_combined_score_and_its_errors(teacher_dir, tmp_path):
    out = tmp_path / "detector"
    text = ok("calibrate", "--model", teacher_dir, "--data", "digits:train", "--components", "2",
              "--score", "fisher", "--parts", "density,msp", "--calibration-views", "crop", "--out", out).stdout
    assert "score fisher of density,msp" in text
    rows = [json.loads(line) for line in ok("detect", "--detector", out, "--inputs", "noise:uniform[:6]",
                                            "--json").stdout.splitlines()]
    assert len(rows) == 6 and all(set(r["part_p_values"]) == {"density", "msp"} and r["score_name"] == "fisher"
                                  for r in rows)
    assert all(r["flagged"] == (r["p_value"] < 0.05) for r in rows)
    text = ok("detect", "--detector", out, "--inputs", "digits:test[:4]", "--score", "class-density").stdout
    assert text.splitlines()[0].split() == ["index", "score", "p_value", "flag", "predicted"]  # one part: no part columns

    result = invoke("detect", "--detector", out, "--inputs", "digits:test[:4]", "--score", "fishr")
    assert result.exit_code == 2 and "fisher, min" in error_line(result) and "msp" in error_line(result)
    result = invoke("detect", "--detector", out, "--inputs", "digits:test[:4]", "--score", "min",
                    "--parts", "density,batchnorm")
    assert result.exit_code == 2 and "needs BatchNorm layers" in error_line(result)
    result = invoke("calibrate", "--model", teacher_dir, "--data", "digits:train", "--density", "flow",
                    "--score", "class-density", "--out", tmp_path / "flow")
    assert result.exit_code == 2 and "Gaussian-mixture density" in error_line(result)
    result = invoke("calibrate", "--model", teacher_dir, "--data", "digits:train", "--score", "fisher",
                    "--parts", "density", "--out", tmp_path / "one")
    assert result.exit_code == 2 and "at least two" in error_line(result)


def test_run_schema_takes_the_score(tmp_path):
    from synthkd.pipelines.config import load_config

    path = "configs/digits_quick.yaml"
    config = load_config(path, ["detector.score=min", "detector.parts=[class-density, doctor]",
                                "detector.calibration_views=mixup"])
    assert (config.detector.score, config.detector.parts, config.detector.calibration_views) == (
        "min", ["class-density", "doctor"], "mixup")
    with pytest.raises(SynthkdError, match="detector.score: expected one of .*fisher, min"):
        load_config(path, ["detector.score=sum"])
    with pytest.raises(SynthkdError, match="detector.parts: names an unknown score part 'softmax'"):
        load_config(path, ["detector.parts=[density, softmax]"])
