"""The failure detector: density models, conformal p-values, baselines, metrics, the detector
directory, and the calibrate/detect/evaluate commands on the tiny digits teacher."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import kstest, rankdata

from synthkd.data import load_dataset
from synthkd.detector import (
    DENSITIES, SCORERS, Detector, FeatureScorer, GaussianMixture, KNearestNeighbours, Mahalanobis, NormalizingFlow,
    build_density, cached_extract, conformal_p_values, detection_metrics, energy, mann_whitney, max_softmax,
)
from synthkd.detector.attacks import fgsm, pgd
from synthkd.detector.features import batchnorm_deviation, default_batchnorm_layers
from synthkd.detector.metrics import fpr_at_tpr
from synthkd.errors import SynthkdError
from synthkd.models import Classifier
from synthkd.detector.settings import CalibrationSettings
from synthkd.pipelines.calibrate import calibrate
from synthkd.pipelines.config import RunConfig

from test_cli import error_line, invoke, ok


def known_mixture(n: int = 3000, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    weights = torch.tensor([0.5, 0.3, 0.2])
    scales = torch.tensor([[1.0, 0.5], [0.5, 1.5], [1.0, 1.0]])
    component = torch.multinomial(weights, n, replacement=True, generator=generator)
    x = means[component] + scales[component] * torch.randn(n, 2, generator=generator)
    return x, means, weights, scales


# ---------------------------------------------------------------------------- density models
@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_gmm_recovers_a_known_mixture(covariance):
    x, means, weights, scales = known_mixture()
    gmm = GaussianMixture(covariance=covariance, candidates=(1, 2, 3, 4, 5, 6)).fit_features(x)
    assert gmm.components == 3, gmm.bic  # chosen by BIC
    order = [int(torch.cdist(m[None], gmm.means.float()).argmin()) for m in means]
    assert sorted(order) == [0, 1, 2]
    assert torch.allclose(gmm.means.float()[order], means, atol=0.15)
    assert torch.allclose(gmm.weights.float()[order], weights, atol=0.03)
    variances = gmm.covariances.diagonal(dim1=1, dim2=2) if covariance == "full" else gmm.covariances
    assert torch.allclose(variances.float()[order].sqrt(), scales, rtol=0.1)
    # the mixture's log-likelihood is the true density's, up to estimation error
    true_log_density = torch.logsumexp(torch.stack([
        torch.distributions.Normal(means[j], scales[j]).log_prob(x).sum(1) + weights[j].log() for j in range(3)]), 0)
    assert abs(float(gmm.score_features(x).mean() - true_log_density.mean())) < 0.02


def test_gmm_fits_large_sets_coarse_to_fine():
    """EM and the BIC choice on a subset, then passes over every row: the mixture is still recovered,
    and the full-data passes raise the likelihood of the subset's solution."""
    x, means, *_ = known_mixture(3000, seed=1)
    subset_only = GaussianMixture(candidates=(1, 2, 3, 4), subset_size=150, refine_iter=0).fit_features(x)
    refined = GaussianMixture(candidates=(1, 2, 3, 4), subset_size=150, refine_iter=5).fit_features(x)
    assert refined.components == 3, refined.bic
    order = [int(torch.cdist(m[None], refined.means.float()).argmin()) for m in means]
    assert torch.allclose(refined.means.float()[order], means, atol=0.2)
    assert float(refined.score_features(x).mean()) > float(subset_only.score_features(x).mean()) + 1e-3


def test_gmm_survives_singular_features():
    x, *_ = known_mixture(500)
    singular = torch.cat([x, x[:, :1] * 2, torch.full((len(x), 1), 3.0)], 1)  # a collinear and a constant column
    for covariance in ("full", "diag"):
        scores = GaussianMixture(4, covariance).fit_features(singular).score_features(singular)
        assert torch.isfinite(scores).all()


@pytest.mark.parametrize("make", [lambda: GaussianMixture(3), lambda: GaussianMixture(covariance="diag", candidates=(2, 3)),
                                  lambda: NormalizingFlow(transforms=2, hidden_features=(16,), epochs=3)])
def test_density_save_load_round_trip(tmp_path, make):
    x, *_ = known_mixture(600)
    scorer = make().fit_features(x)
    scorer.save_pretrained(tmp_path / "scorer")
    loaded = FeatureScorer.from_pretrained(tmp_path / "scorer")
    assert type(loaded) is type(scorer) and loaded.get_config() == scorer.get_config()
    assert torch.equal(loaded.score_features(x), scorer.score_features(x))


@pytest.mark.parametrize("name", DENSITIES.names())
def test_every_registered_density_fits_scores_and_round_trips(tmp_path, name):
    """What a density registered in synthkd.detector.densities must do, whichever it is."""
    x, *_ = known_mixture(400)
    density = build_density(CalibrationSettings(name, components=2, smoothing=0.01), seed=0)
    assert density.kind in SCORERS and not density.fitted
    far = torch.tensor([[40.0, -40.0]])
    fitted = density.fit_features(x)
    assert fitted.score_features(far) < fitted.score_features(x).min()  # the convention: higher = more typical
    fitted.save_pretrained(tmp_path / name)
    assert torch.equal(FeatureScorer.from_pretrained(tmp_path / name).score_features(x), fitted.score_features(x))


def test_a_density_registered_by_a_test_file_alone(teacher_dir, tmp_path):
    """A new density is one module that registers itself: here a toy one (minus the squared
    distance to the mean), registered from this file, calibrated by the command line and the
    run schema's choice, then unregistered."""

    class ToyDensity(FeatureScorer):
        kind = "toy"

        def fit_features(self, features, labels=None):
            self.register_buffer("mean", features.float().mean(0))
            return self

        def score_features(self, features):
            self._check_fitted()
            x = self._check_dim(features, len(self.mean)).float().to(self.mean.device)
            return -((x - self.mean) ** 2).sum(1)

        def get_config(self):
            return {}

        def load_tensors(self, tensors):
            self.register_buffer("mean", tensors["mean"])

    DENSITIES.add("toy", lambda settings, seed: ToyDensity())
    try:
        out = tmp_path / "toy"
        text = ok("calibrate", "--model", teacher_dir, "--data", "digits:train", "--density", "toy", "--out", out).stdout
        assert text.startswith("toy on ") and isinstance(Detector.from_pretrained(out).density, ToyDensity)
        rows = [json.loads(line) for line in ok("detect", "--detector", out, "--inputs", "noise:uniform[:10]",
                                                  "--json").stdout.splitlines()]
        assert len(rows) == 10 and all(row["flagged"] == (row["p_value"] < 0.05) for row in rows)
        errors: list[str] = []
        RunConfig.from_mapping({"detector": {"enabled": True, "density": "toy"}}, "", errors)
        assert not [e for e in errors if e.startswith("detector")], errors
    finally:
        DENSITIES.unregister("toy")
        SCORERS.unregister("toy")
    assert "--density expected one of" in error_line(invoke("calibrate", "--model", teacher_dir, "--data", "digits:train",
                                                           "--density", "toy", "--out", tmp_path / "again"))


def test_flow_learns_the_density():
    x, *_ = known_mixture(2000)
    flow = NormalizingFlow(transforms=3, hidden_features=(32, 32), epochs=30, seed=0).fit_features(x)
    far = torch.tensor([[20.0, 20.0], [-15.0, 3.0]])
    assert flow.score_features(far).max() < flow.score_features(x).quantile(0.01)
    assert flow.history[-1] > flow.history[0]  # held-out likelihood improved


def test_smoothing_widens_the_flow_by_the_noise_variance():
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    point = torch.tensor([[2.5, 2.5]])
    plain, smoothed = (NormalizingFlow(transforms=2, hidden_features=(32, 32), epochs=30, smoothing=s).fit_features(x)
                       for s in (0.0, 1.0))
    # N(0, I) convolved with N(0, I) is N(0, 2I): log-density at the point -log(4 pi) - 6.25/2 = -5.66; unsmoothed -8.09
    assert abs(float(smoothed.score_features(point)) - (-math.log(4 * math.pi) - 6.25 / 2)) < 0.5
    assert abs(float(plain.score_features(point)) - (-math.log(2 * math.pi) - 6.25)) < 0.5


def test_nan_features_are_refused():
    x, *_ = known_mixture(100)
    x[7, 1] = float("nan")
    with pytest.raises(SynthkdError, match="NaN or inf.*row 7"):
        GaussianMixture(2).fit_features(x)
    fitted = GaussianMixture(2).fit_features(known_mixture(100)[0])
    with pytest.raises(SynthkdError, match="NaN or inf"):
        fitted.score_features(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(SynthkdError, match="2-dimensional features, got 3"):
        fitted.score_features(torch.zeros(1, 3))


# ---------------------------------------------------------------------------- conformal
def test_conformal_p_values_are_uniform_on_exchangeable_data():
    generator = torch.Generator().manual_seed(0)
    calibration_size, repeats = 199, 3000
    p_values = torch.stack([
        conformal_p_values(scores[-1:], scores[:-1])
        for scores in torch.randn(repeats, calibration_size + 1, generator=generator)
    ]).flatten().numpy()
    # p takes the values k / (n + 1), k = 1..n+1, each with probability 1 / (n + 1)
    assert kstest(p_values, "uniform").pvalue > 0.01
    assert abs((p_values < 0.05).mean() - 0.045) < 0.012  # P(p < alpha) = floor(alpha (n+1) - ...) / (n+1) <= alpha
    shifted = torch.stack([conformal_p_values(s[-1:] - 1.0, s[:-1]) for s in torch.randn(repeats, 200, generator=generator)])
    assert kstest(shifted.flatten().numpy(), "uniform").pvalue < 1e-6  # not exchangeable: the test must notice


def test_conformal_p_value_is_the_rank():
    calibration = torch.tensor([3.0, 1.0, 2.0, 5.0])
    p = conformal_p_values(torch.tensor([0.0, 1.0, 2.5, 9.0]), calibration)
    assert torch.allclose(p, torch.tensor([1, 2, 3, 5]) / 5.0)


# ---------------------------------------------------------------------------- baselines and metrics
def test_baselines_match_a_direct_computation():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 4))
    logits = rng.normal(size=(60, 3)) * 3
    queries = rng.normal(size=(7, 4))
    labels = logits.argmax(1)

    softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.allclose(max_softmax(torch.tensor(logits)).numpy(), softmax.max(1), atol=1e-6)
    assert np.allclose(energy(torch.tensor(logits)).numpy(), np.log(np.exp(logits).sum(1)), atol=1e-5)

    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    centred = features - means[labels]
    precision = np.linalg.inv(centred.T @ centred / len(features))
    direct = -np.min([np.einsum("nd,de,ne->n", queries - m, precision, queries - m) for m in means], 0)
    mahalanobis = Mahalanobis(reg_covar=0.0).fit_features(torch.tensor(features), torch.tensor(labels))
    assert np.allclose(mahalanobis.score_features(torch.tensor(queries)).numpy(), direct, rtol=1e-4)

    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    distances = np.sort(np.linalg.norm(unit_queries[:, None] - unit[None], axis=2), 1)
    knn = KNearestNeighbours(k=5).fit_features(torch.tensor(features))
    assert np.allclose(knn.score_features(torch.tensor(queries)).numpy(), -distances[:, 4], atol=1e-5)


def test_detection_metrics_and_mann_whitney():
    negatives = torch.tensor([5.0, 4.0, 3.0, 2.5, 1.0])  # typical inputs score high
    failures = torch.tensor([2.0, 0.5, 3.5])
    metrics = detection_metrics(negatives, failures)
    # pairs (failure lower than negative): 2.0 < 4 of 5; 0.5 < all 5; 3.5 < 2 of 5 -> 11 / 15
    assert metrics["auroc"] == pytest.approx(11 / 15)
    test = mann_whitney(negatives, failures)
    assert test["implied_auroc"] == pytest.approx(metrics["auroc"])
    assert test["statistic"] == pytest.approx(11.0)
    ranks = rankdata(np.r_[-failures.numpy(), -negatives.numpy()])[:3]
    assert test["statistic"] == pytest.approx(ranks.sum() - 3 * 4 / 2)
    # flagging 95% of failures needs a threshold at 3.5: negatives 5, 4 stay, 3.0, 2.5, 1.0 flagged -> FPR 0.6
    assert metrics["fpr_at_95_tpr"] == pytest.approx(0.6)
    is_failure = np.r_[np.zeros(5), np.ones(3)]
    assert fpr_at_tpr(is_failure, -torch.cat([negatives, failures]).numpy(), 0.3) == 0.0
    assert detection_metrics(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]))["aupr_out"] == 1.0


# ---------------------------------------------------------------------------- attacks
def test_attacks_stay_in_the_budget_and_hurt(teacher):
    data = load_dataset("digits:test[:64]")
    images = data.images.float() / 255
    labels = data.labels
    clean = (teacher(images).argmax(1) == labels).float().mean()
    for adversarial in (fgsm(teacher, images, labels, 0.1), pgd(teacher, images, labels, 0.1, steps=5)):
        assert float((adversarial - images).abs().max()) <= 0.1 + 1e-6
        assert adversarial.min() >= 0 and adversarial.max() <= 1
        assert (teacher(adversarial).argmax(1) == labels).float().mean() < clean - 0.2


# ---------------------------------------------------------------------------- the detector
@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory, teacher_dir, accelerator):
    out = tmp_path_factory.mktemp("detector") / "gmm"
    calibrate(Classifier.from_pretrained(teacher_dir), "digits:train", out,
              CalibrationSettings("gmm", alpha=0.1, components=4), accelerator=accelerator)
    return out


def test_detector_round_trip_and_predict(detector_dir, teacher):
    detector = Detector.from_pretrained(detector_dir, teacher)
    info = json.loads((detector_dir / "detector.json").read_text())
    assert info["layer"] == "fc" and info["num_fit"] + info["num_calibration"] == len(load_dataset("digits:train"))
    assert sorted(detector.baselines) == ["knn", "mahalanobis"] and detector.normalize
    test = load_dataset("digits:test")
    images = test.images.float() / 255
    scores = detector.score(images)
    assert torch.allclose(detector.p_values(scores), conformal_p_values(scores, detector.calibration_scores))
    flagged = detector.predict(images)
    assert torch.equal(flagged, detector.p_values(scores) < 0.1)
    assert 0.02 < flagged.float().mean() < 0.25  # held-out calibration: about alpha on in-distribution data
    noise = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert detector.predict(noise).float().mean() > 0.9


def test_detector_refuses_another_model(detector_dir, tmp_path):
    other = Classifier.from_config(Classifier.from_pretrained(detector_dir / "model").config)
    with pytest.raises(SynthkdError, match="fitted on the model with fingerprint [0-9a-f]{16}.*fingerprint is [0-9a-f]{16}"):
        Detector.from_pretrained(detector_dir, other)


def test_detector_refuses_bad_inputs(detector_dir):
    detector = Detector.from_pretrained(detector_dir)
    with pytest.raises(SynthkdError, match="N x C x H x W"):
        detector.score(torch.rand(8, 8))
    with pytest.raises(SynthkdError, match="2 channels but the model takes 1; give 1 or 3-channel images"):
        detector.score(torch.rand(2, 2, 8, 8))
    images = torch.rand(3, 1, 8, 8)
    images[1, 0, 2, 2] = float("nan")
    with pytest.raises(SynthkdError, match="NaN or inf"):
        detector.score(images)
    assert detector.score(torch.rand(2, 3, 28, 28)).shape == (2,)  # RGB and other sizes are converted


def test_calibrate_on_a_synthetic_set(synthetic_dir, teacher, tmp_path, accelerator):
    detector = calibrate(teacher, synthetic_dir, tmp_path / "flow", CalibrationSettings("flow", holdout=0.25),
                         accelerator=accelerator)
    assert detector.info["num_calibration"] == 10 and len(detector.calibration_scores) == 10
    assert torch.equal(Detector.from_pretrained(tmp_path / "flow").calibration_scores, detector.calibration_scores)
    with pytest.raises(SynthkdError, match="holdout"):
        calibrate(teacher, synthetic_dir, tmp_path / "x", CalibrationSettings(holdout=1.5), accelerator=accelerator)
    with pytest.raises(SynthkdError, match="density expected one of gmm, gmm-diag, flow"):
        calibrate(teacher, synthetic_dir, tmp_path / "x", CalibrationSettings(density="kde"), accelerator=accelerator)


def test_smoothing_reaches_the_mixture(teacher, tmp_path, accelerator):
    detector = calibrate(teacher, "digits:train", tmp_path / "smooth", CalibrationSettings(components=2, smoothing=0.5),
                         accelerator=accelerator)
    loaded = Detector.from_pretrained(tmp_path / "smooth", teacher).density
    assert loaded.reg_covar == 0.5 and torch.equal(loaded.covariances, detector.density.covariances)
    # the variance is added to a positive semi-definite covariance: no eigenvalue falls below it
    assert torch.linalg.eigvalsh(loaded.covariances).min() >= 0.5 - 1e-9
    plain = calibrate(teacher, "digits:train", tmp_path / "plain", CalibrationSettings(components=2),
                      accelerator=accelerator).density
    assert torch.linalg.eigvalsh(plain.covariances).min() < 0.5
    flow = calibrate(teacher, "digits:train[:200]", tmp_path / "flow", CalibrationSettings("flow", smoothing=0.1),
                     accelerator=accelerator)
    assert Detector.from_pretrained(tmp_path / "flow", teacher).density.smoothing == flow.density.smoothing == 0.1
    with pytest.raises(SynthkdError, match="smoothing expected 0 .off. or a positive noise variance"):
        calibrate(teacher, "digits:train", tmp_path / "x", CalibrationSettings(smoothing=-0.1), accelerator=accelerator)
    with pytest.raises(SynthkdError, match="weight is 0"):
        calibrate(teacher, "digits:train", tmp_path / "x", batchnorm_layers=["stem.1"], accelerator=accelerator)


def test_batchnorm_deviation_matches_a_direct_computation():
    layer = torch.nn.BatchNorm2d(3).eval()
    layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    layer.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    images = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    means = images.mean((2, 3))
    expected = ((means - layer.running_mean) ** 2 / (layer.running_var + layer.eps)).mean(1)
    assert torch.allclose(batchnorm_deviation(layer, images), expected)
    layer_1d = torch.nn.BatchNorm1d(3).eval()  # vectors are their own channel means
    assert torch.allclose(batchnorm_deviation(layer_1d, means), (means**2 / (1 + layer_1d.eps)).mean(1))


def test_detector_with_the_batchnorm_term(teacher, tmp_path, accelerator):
    detector = calibrate(teacher, "digits:train", tmp_path / "bn",
                         CalibrationSettings(alpha=0.1, components=3, batchnorm_weight=2.0), accelerator=accelerator)
    assert detector.batchnorm == default_batchnorm_layers(teacher) and len(detector.batchnorm) >= 1
    loaded = Detector.from_pretrained(tmp_path / "bn", teacher)
    assert loaded.batchnorm == detector.batchnorm and loaded.batchnorm_weight == 2.0
    images = load_dataset("digits:test").images[:64].float() / 255
    scores = loaded.score(images)
    assert torch.allclose(scores, detector.score(images))
    data = loaded.features(images)  # the score is the weighted sum of the two standardised terms
    mean, std, bn_mean, bn_std = loaded.term_stats.tolist()
    expected = (loaded.density_term(data.features) - mean) / std + 2.0 * (-data.deviations.mean(1) - bn_mean) / bn_std
    assert torch.allclose(scores, expected, atol=1e-5)
    # the deviations alone separate noise from digits: the term carries information of its own
    noise = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy, clean = loaded.features(noise).deviations.mean(1), data.deviations.mean(1)
    # AUROC of noise against digits by deviation: 0.95-0.98 across CPUs' kernels (the ratio of the
    # means, 1.9-2.3, moved with them)
    assert (noisy[:, None] > clean[None, :]).float().mean() > 0.9
    with pytest.raises(SynthkdError, match="needs the deviations at its"):
        loaded.score_features(data.features)
    with pytest.raises(SynthkdError, match="'fc' is not a BatchNorm layer"):
        calibrate(teacher, "digits:train", tmp_path / "x", CalibrationSettings(batchnorm_weight=1.0), batchnorm_layers=["fc"],
                  accelerator=accelerator)


def test_features_are_cached(teacher, tmp_path, accelerator):
    data = load_dataset("digits:test[:30]")
    first = cached_extract(teacher, data, accelerator, "fc", tmp_path)
    [path] = tmp_path.glob("features-*.safetensors")
    again = cached_extract(teacher, data, accelerator, "fc", tmp_path)
    assert torch.equal(first.features, again.features) and torch.equal(first.labels, data.labels)
    cached_extract(teacher, load_dataset("digits:test[:30]|vflip"), accelerator, "fc", tmp_path)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2  # other data, other key


def test_dataset_transforms():
    plain, flipped = load_dataset("digits:test[:4]"), load_dataset("digits:test[:4]|vflip|invert")
    assert torch.allclose(flipped[2][0], 1 - plain[2][0].flip(-2)) and flipped[2][1] == plain[2][1]
    with pytest.raises(SynthkdError, match="unknown image transform 'blur'"):
        load_dataset("digits:test|blur")


# ---------------------------------------------------------------------------- command line
def test_cli_calibrate_detect_evaluate(teacher_dir, tmp_path):
    out = tmp_path / "detector"
    text = ok("calibrate", "--model", teacher_dir, "--data", "digits:train", "--density", "gmm", "--components", "3",
              "--alpha", "0.1", "--out", out).stdout
    assert "wrote" in text and (out / "density" / "model.safetensors").is_file()

    lines = ok("detect", "--detector", out, "--inputs", "digits:test[:12]", "--json").stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 12 and set(rows[0]) == {"index", "score", "p_value", "flagged", "predicted", "predicted_class",
                                              "score_name"}
    assert all(r["flagged"] == (r["p_value"] < 0.1) for r in rows)
    text = ok("detect", "--detector", out, "--inputs", "noise:uniform[:10]", "--model", teacher_dir).stdout
    assert "flagged 10 of 10 inputs at alpha 0.1" in text
    folder = tmp_path / "images"  # a flat folder of unlabelled images, any size
    folder.mkdir()
    for index in range(3):
        Image.fromarray((load_dataset("digits:test").images[index, 0].numpy())).resize((16, 16)).save(folder / f"{index}.png")
    rows = [json.loads(line) for line in ok("detect", "--detector", out, "--inputs", folder, "--json").stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]

    report_dir = tmp_path / "report"
    text = ok("evaluate", "--model", teacher_dir, "--detector", out, "--dataset", "digits:test[:120]",
              "--ood", "noise,digits:test[:120]|invert", "--attacks", "fgsm,pgd", "--epsilon", "0.2",
              "--pgd-steps", "3", "--out", report_dir).stdout
    assert "at alpha 0.1: the calibration on digits:train" in text
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert set(metrics["sources"]) == {"noise:gaussian", "noise:uniform", "digits:test[:120]|invert", "fgsm", "pgd"} | (
        {"misclassification"} if metrics["inputs"]["digits:test[:120]"]["accuracy"] < 1 else set())
    assert set(metrics["sources"]["pgd"]) == {"detector", "msp", "energy", "doctor", "mahalanobis", "knn"}
    for values in metrics["sources"]["noise:uniform"].values():
        assert set(values) >= {"auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"}
    assert metrics["sources"]["noise:uniform"]["detector"]["auroc"] > 0.9
    assert metrics["inputs"]["pgd"]["accuracy"] < metrics["inputs"]["digits:test[:120]"]["accuracy"]
    for name in metrics["plots"]:
        assert (report_dir / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_with_the_batchnorm_term(teacher_dir, tmp_path):
    out = tmp_path / "detector"
    ok("calibrate", "--model", teacher_dir, "--data", "digits:train", "--components", "2", "--batchnorm-weight", "2",
       "--smoothing", "0.1", "--out", out)
    assert json.loads((out / "detector.json").read_text())["batchnorm_weight"] == 2.0
    assert json.loads((out / "density" / "config.json").read_text())["reg_covar"] == 0.1
    rows = [json.loads(line) for line in ok("detect", "--detector", out, "--inputs", "digits:test[:5]", "--json").stdout.splitlines()]
    assert len(rows) == 5
    rows = [json.loads(line) for line in ok("detect", "--detector", out, "--inputs", "digits:test[:5]", "--json", "--score",
                                            "fisher", "--parts", "density,batchnorm,msp").stdout.splitlines()]
    assert all(set(row["part_p_values"]) == {"density", "batchnorm", "msp"} for row in rows)
    ok("evaluate", "--model", teacher_dir, "--detector", out, "--dataset", "digits:test[:100]", "--ood", "noise",
       "--out", tmp_path / "report")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["sources"]["noise:uniform"]["detector"]["auroc"] > 0.9


def test_cli_detector_errors(teacher_dir, detector_dir, tmp_path):
    other = tmp_path / "other"
    Classifier.from_config(Classifier.from_pretrained(teacher_dir).config).save_pretrained(other)
    assert "fingerprint" in error_line(invoke("evaluate", "--model", other, "--detector", detector_dir,
                                              "--dataset", "digits:test", "--out", tmp_path / "r"))
    assert "fingerprint" in error_line(invoke("detect", "--detector", detector_dir, "--inputs", "digits:test",
                                              "--model", other))
    assert "not a detector directory" in error_line(invoke("detect", "--detector", tmp_path, "--inputs", "digits:test"))
    assert "--out" in error_line(invoke("evaluate", "--model", teacher_dir, "--detector", detector_dir, "--dataset", "digits:test"))
    assert "--detector" in error_line(invoke("evaluate", "--model", teacher_dir, "--dataset", "digits:test", "--ood", "noise"))
    assert "alpha" in error_line(invoke("calibrate", "--model", teacher_dir, "--data", "digits:train", "--alpha", "2",
                                        "--out", tmp_path / "d"))
    assert "not a BatchNorm layer" in error_line(invoke("calibrate", "--model", teacher_dir, "--data", "digits:train",
                                                        "--batchnorm-weight", "1", "--batchnorm-layers", "stem",
                                                        "--out", tmp_path / "d"))
    assert "--attacks expected one of fgsm, pgd, got \"cw\"" in error_line(invoke(
        "evaluate", "--model", teacher_dir, "--detector", detector_dir, "--dataset", "digits:test", "--attacks", "cw",
        "--out", tmp_path / "r"))
    assert "--density expected one of gmm" in error_line(invoke("calibrate", "--model", teacher_dir, "--data", "digits:train",
                                                               "--density", "kde", "--out", tmp_path / "d"))
