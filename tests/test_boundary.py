"""The boundary techniques (generators/boundary.py, their loss terms in synthkd/losses.py), the
per-class diagnostic of a synthetic set (generators/diagnostic.py, `synthkd inspect`), the replay
memory of the interleaved student and the KD views labelled once (`distill --teacher-views`)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from synthkd.data import load_dataset
from synthkd.data.reader import SyntheticDataset
from synthkd.errors import SynthkdError
from synthkd.generators.base import STATE_NAME
from synthkd.generators.boundary import (
    BoundarySettings, confusable_partners, exchange_channels, interpolation_targets,
)
from synthkd.generators.diagnostic import DIAGNOSTIC_NAME, diagnose
from synthkd.generators.fast import FastGenerator, FastSettings
from synthkd.generators.inversion import ActivationInversion, InversionLossSettings, InversionSettings
from synthkd.losses import agreement_masked_adversarial, instance_discrimination, soft_cross_entropy
from synthkd.pipelines.distill import DistillSettings, KDObjective, LabelledViews, build_student, distill_e2e
from synthkd.pipelines.config import load_config
from synthkd.pipelines.generate import generate
from synthkd.pipelines.interleave import GrowingSyntheticSet

from conftest import run_killed_after_shards
from test_cli import error_line, invoke, ok

NO_VIEWS = dict(flip=False, jitter=0.0, crop_scale=1.0)  # 8x8 digits: no sub-pixel jitter/crop, no flips


# ------------------------------------------------------------------ loss terms on toy cases


def test_adversarial_term_is_minus_the_kd_divergence_on_agreeing_samples_only():
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    student = torch.tensor([[1.0, 0.5, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)  # agrees on row 0 only
    p = F.softmax(teacher[0], 0)
    kl = float((p * (p.log() - F.log_softmax(student[0].detach(), 0))).sum())
    value = agreement_masked_adversarial(teacher, student)
    assert math.isclose(float(value.detach()), -kl / 2, rel_tol=1e-5)
    value.backward()
    assert torch.equal(student.grad[1], torch.zeros(3))  # the disagreeing sample is left alone
    # A descent step on the term moves the agreeing sample away from the teacher.
    moved = (student - 0.5 * student.grad).detach()
    assert float(agreement_masked_adversarial(teacher, moved)) < float(value.detach())
    assert float(agreement_masked_adversarial(teacher, teacher)) == 0.0


def test_instance_discrimination_has_its_infonce_value_and_spreads_features():
    features = torch.eye(3)  # orthogonal: similarity 1 to itself, 0 to the others
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 2))
    assert math.isclose(float(instance_discrimination(features, None, 0.5)), expected, rel_tol=1e-5)
    # A bank feature equal to sample 0 is a hard negative: the loss rises.
    assert float(instance_discrimination(features, features[:1], 0.5)) > expected
    close = torch.tensor([[1.0, 0.1], [1.0, -0.1]], requires_grad=True)
    instance_discrimination(close, None, 0.1).backward()
    apart = (close - 0.01 * close.grad).detach()
    angle = lambda x: float(F.cosine_similarity(x[0:1], x[1:2]))  # noqa: E731
    assert angle(apart) < angle(close.detach())


def test_soft_cross_entropy_and_interpolation_targets():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    targets = torch.tensor([1, 2])
    assert torch.isclose(soft_cross_entropy(logits, F.one_hot(targets, 3).float()), F.cross_entropy(logits, targets))
    partners = torch.tensor([1, 0, 1])
    soft = interpolation_targets(targets, partners, 3, fraction=1.0, aimed_share=0.6, seed=0)
    assert torch.allclose(soft, torch.tensor([[0.4, 0.6, 0.0], [0.0, 0.4, 0.6]]))
    assert torch.equal(interpolation_targets(targets, partners, 3, 0.0, 0.6, seed=0), F.one_hot(targets, 3).float())


def test_confusable_partners_come_from_the_classifier_weights(teacher):
    linear = teacher.net.fc
    with torch.no_grad():
        linear.weight[7] = linear.weight[2] + 1e-3  # class 7 made nearly class 2
    partners = confusable_partners(teacher)
    assert int(partners[2]) == 7 and int(partners[7]) == 2
    assert all(int(partners[c]) != c for c in range(10))


def test_channel_exchange_takes_channels_from_another_class():
    features = torch.arange(4.0).view(4, 1, 1, 1).repeat(1, 6, 2, 2)  # sample i holds the value i
    targets = torch.tensor([0, 0, 1, 1])
    mixed = exchange_channels(features, targets, fraction=1.0, channels=0.5, seed=0)
    for row in range(4):
        values = mixed[row, :, 0, 0]
        taken = values != row
        assert int(taken.sum()) == 3  # half of the 6 channels
        partner = int(values[taken][0])
        assert targets[partner] != targets[row] and torch.all(values[taken] == partner)
    assert torch.equal(exchange_channels(features, targets, 0.0, 0.5, seed=0), features)


# ------------------------------------------------------------------ the techniques in the generators


def test_each_technique_changes_what_a_generator_makes(teacher):
    targets = torch.arange(20) % 10
    config = FastSettings(steps_per_batch=3, draws_per_adaptation=2)
    loss = InversionLossSettings(**NO_VIEWS)

    def batches(techniques, student=None):
        generator = FastGenerator(teacher, config, loss, student, seed=0, boundary=BoundarySettings(techniques=techniques))
        return [generator.generate(targets, seed=s) for s in range(2)]  # an adapted batch and a redraw

    plain = batches([])
    student = build_student("resnet8", teacher, 0.25, seed=0)
    for techniques, changed in ((["contrastive"], 0), (["interpolate"], 0), (["exchange"], 1)):
        made = batches(techniques)
        assert not torch.allclose(made[changed], plain[changed]), techniques
    adversarial = batches(["adversarial"], student)
    competition_only = FastGenerator(teacher, config, loss, student, seed=0).generate(targets, seed=0)
    assert not torch.allclose(adversarial[0], competition_only)
    assert torch.equal(batches(["exchange"])[0], plain[0])  # exchange touches redraws only


def test_bad_technique_input_is_one_line_and_exit_2(teacher_dir, tmp_path):
    base = ["generate", "--teacher", teacher_dir, "--num-images", "16", "--batch-size", "16", "--out", tmp_path / "set"]
    assert 'expected one of adversarial, contrastive, exchange, interpolate, replay, got "wormhole"' in error_line(
        invoke(*base, "--techniques", "contrastive,wormhole"))
    assert "--adversarial-weight must be at least 0" in error_line(invoke(*base, "--adversarial-weight", "-1"))
    assert "adversarial technique needs a student" in error_line(invoke(*base, "--techniques", "adversarial"))
    assert "exchange does not work with --method inversion" in error_line(invoke(*base, "--techniques", "exchange"))
    assert "replay trains the interleaved student" in error_line(invoke(*base, "--method", "fast", "--techniques", "replay"))
    assert not (tmp_path / "set").exists()
    distill = ["distill", "--teacher", teacher_dir, "--data", tmp_path / "live", "--out", tmp_path / "student"]
    assert "add --synthesize fast" in error_line(invoke(*distill, "--techniques", "replay"))
    assert "--teacher-views labels augmented views" in error_line(invoke(*distill, "--teacher-views", "2", "--no-augment",
                                                                         "--no-flip", "--mixup", "0"))
    config = tmp_path / "run.yaml"
    config.write_text(f"teacher: {{model: {teacher_dir}}}\ngenerate: {{boundary: {{techniques: [adversarial]}}}}\n")
    with pytest.raises(SynthkdError, match="generate.boundary.techniques: adversarial needs a student"):
        load_config(config)
    config.write_text(f"teacher: {{model: {teacher_dir}}}\ngenerate: {{method: fast, boundary: {{techniques: "
                      "[contrastive, wormhole], contrastive_weight: -1}}\n")
    with pytest.raises(SynthkdError) as refused:
        load_config(config)
    assert 'generate.boundary.techniques: expected one of adversarial, contrastive' in str(refused.value)
    assert "generate.boundary.contrastive_weight: must be at least 0" in str(refused.value)
    config.write_text(f"teacher: {{model: {teacher_dir}}}\ngenerate: {{method: fast, boundary: {{techniques: "
                      "[contrastive, exchange], bank_size: 64}}\n")
    relevant = load_config(config).generate.relevant()
    assert relevant["boundary"] == {"techniques": ["contrastive", "exchange"], "contrastive_weight": 0.5,
                                    "contrastive_temperature": 0.1, "bank_size": 64, "exchange_fraction": 0.5,
                                    "exchange_channels": 0.5}


def test_inversion_with_a_feature_bank_resumes_exactly(teacher, tmp_path, accelerator):
    boundary = BoundarySettings(techniques=["contrastive", "interpolate"], bank_size=24)
    settings = InversionSettings(iterations=4, **NO_VIEWS)

    def make(out, rounds=None):
        generator = ActivationInversion(teacher, settings, boundary=boundary)
        return generate(teacher, generator, 48, out, batch_size=16, seed=1, accelerator=accelerator, max_rounds=rounds)

    whole = make(tmp_path / "whole")
    assert make(tmp_path / "resumed", rounds=1) is None  # stopped after one shard, state saved
    assert load_file(str(tmp_path / "resumed" / STATE_NAME))["feature_bank"].shape == (16, 32)
    resumed = make(tmp_path / "resumed")
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in whole["shards"]]
    assert whole["config"]["boundary"]["techniques"] == ["contrastive", "interpolate"]
    bank = load_file(str(tmp_path / "whole" / STATE_NAME))["feature_bank"]
    assert bank.shape == (24, 32) and torch.allclose(bank.norm(dim=1), torch.ones(24))
    with pytest.raises(SynthkdError, match="other settings"):
        other = BoundarySettings(techniques=["contrastive"], bank_size=24)
        generate(teacher, ActivationInversion(teacher, settings, boundary=other), 48, tmp_path / "whole", batch_size=16,
                 seed=1, accelerator=accelerator)


@pytest.mark.slow
def test_a_killed_fast_set_with_boundary_techniques_resumes(teacher_dir, tmp_path):
    out = tmp_path / "set"
    command = [sys.executable, "-m", "synthkd", "generate", "--teacher", str(teacher_dir), "--method", "fast",
               "--num-images", "64", "--batch-size", "16", "--steps-per-batch", "2", "--no-flip", "--jitter", "0",
               "--crop-scale", "1", "--techniques", "contrastive,interpolate,exchange", "--bank-size", "40",
               "--out", str(out)]
    run_killed_after_shards(command, shards=2, timeout=600)
    assert not (out / "manifest.json").exists() and (out / STATE_NAME).is_file()
    result = ok(*command[3:])
    assert "resuming the fast generator" in result.stderr
    data = SyntheticDataset(out)
    assert len(data) == 64 and data.manifest["config"]["boundary"]["techniques"] == ["contrastive", "interpolate", "exchange"]
    # Features of the adapted batches only: shard 0 before the kill, shard 2 after (a resumed run adapts first).
    assert load_file(str(out / STATE_NAME))["feature_bank"].shape[0] == 32
    assert json.loads((out / DIAGNOSTIC_NAME).read_text())["num_images"] == 64


# ------------------------------------------------------------------ the diagnostic


def test_the_diagnostic_flags_a_collapsed_class(teacher):
    real = load_dataset("digits:test[:300]")
    images = torch.stack([real[i].images for i in range(len(real))])
    targets = torch.tensor([real[i].targets for i in range(len(real))])
    collapsed = targets == 3
    copies = images[collapsed][:1].repeat(int(collapsed.sum()), 1, 1, 1)
    images[collapsed] = (copies + 1e-4 * torch.randn_like(copies)).clamp(0, 1)  # one image, barely perturbed
    student = build_student("resnet8", teacher, 0.25, seed=0)
    diagnostic = diagnose(teacher, images, targets, student)
    assert diagnostic["collapsed"] == ["3"]
    by_class = {c["class"]: c for c in diagnostic["classes"]}
    assert by_class["3"]["diversity"] < 0.01 < by_class["4"]["diversity"]
    assert by_class["0"]["teacher_confidence"] > 0.5 and 0 <= by_class["0"]["agreement"] <= 1
    assert sum(p["count"] for p in diagnostic["boundary_pairs"]) == diagnostic["near_boundary"]
    assert diagnose(teacher, images, targets)["student"] is False


def test_inspect_writes_the_diagnostic_beside_the_manifest(teacher_dir, synthetic_dir, tmp_path):
    import shutil

    data = tmp_path / "set"
    shutil.copytree(synthetic_dir, data)
    result = ok("inspect", "--teacher", teacher_dir, "--data", data, "--student", teacher_dir)
    assert "near a boundary" in result.stdout and "agree" in result.stdout
    written = json.loads((data / DIAGNOSTIC_NAME).read_text())
    assert written["num_images"] == 40 and written["student"] is True
    assert all(c["agreement"] == 1.0 for c in written["classes"] if c["count"])  # the teacher agrees with itself
    SyntheticDataset(data)  # the file beside the manifest leaves the set readable


# ------------------------------------------------------------------ replay and the KD views


def test_replay_mixes_the_newest_round_with_a_bounded_memory(tmp_path):
    growing = GrowingSyntheticSet(tmp_path, length=8, replay_newest=0.5, replay_size=3)
    growing.images = torch.arange(10.0).view(10, 1, 1, 1)
    growing.logits = torch.zeros(10, 2)
    growing.newest = 4  # images 6..9 came in the last round
    assert [growing.source(i) for i in range(8)] == [6, 7, 8, 9, 3, 4, 5, 3]
    growing.newest = 0  # generation finished: every image alike
    assert [growing.source(i) for i in range(8)] == list(range(8))


def test_teacher_views_are_labelled_once_and_train_a_student(teacher, synthetic_dir, tmp_path, accelerator):
    kd = DistillSettings(epochs=2, batch_size=16, flip=False, teacher_views=2)
    objective = KDObjective(teacher, kd)
    views = LabelledViews(SyntheticDataset(synthetic_dir), teacher, objective.augment, 2, seed=0)
    assert views.images.shape == (2, 40, 1, 8, 8) and len(views) == 40
    with torch.no_grad():
        relabelled = teacher(views.images[1].float())
    assert torch.allclose(relabelled, views.logits[1], atol=2e-2)
    assert not torch.equal(views.images[0], views.images[1])  # two different views of each image
    _, metrics = distill_e2e(teacher, build_student("resnet8", teacher, 0.25), synthetic_dir, tmp_path / "s", kd, 0,
                             "digits:test[:100]", accelerator)
    assert metrics["targets"] == "2 views labelled once" and metrics["student"]["accuracy"] > 0.0
