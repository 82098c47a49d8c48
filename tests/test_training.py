"""The training loop, evaluation and augmentation: small real runs on digits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from synthkd.augment import MixUp, training_augmentation
from synthkd.data import load_dataset
from synthkd.errors import SynthkdError
from synthkd.evaluation import accuracy_report, evaluate, predict
from synthkd.models import Classifier, InputFormat, ModelConfig
from synthkd.pipelines.train_teacher import TeacherSettings, train_teacher
from synthkd.training import TrainSettings, fit


def _model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    config = ModelConfig(
        arch="resnet8", arch_kwargs={"width": 0.25, "in_channels": 1, "num_classes": 10},
        input=InputFormat(1, 8, 8, (0.3,), (0.4,)), class_names=[str(i) for i in range(10)],
    )
    return Classifier.from_config(config)


def _cross_entropy(net, batch):
    images, labels = batch
    return F.cross_entropy(net(images), labels)


def test_fit_lowers_the_loss_and_restores_the_model(accelerator):
    data = load_dataset("digits:train[:256]")
    model = _model()
    history = fit(model, data, _cross_entropy, TrainSettings(epochs=4, batch_size=32, lr=0.05), accelerator,
                  eval_dataset=load_dataset("digits:test[:100]"))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], history
    assert all(0.0 <= h["eval_accuracy"] <= 1.0 for h in history)
    assert history[-1]["eval_accuracy"] > 0.3
    # fit hands the model back in the default memory format, trained in place
    assert model.net.stem[0].weight.is_contiguous()
    assert evaluate(model, load_dataset("digits:test[:100]"), accelerator)["accuracy"] == pytest.approx(
        history[-1]["eval_accuracy"])


def test_training_is_reproducible_from_its_seed(tmp_path, accelerator):
    def run(seed, name):
        model, _ = train_teacher("digits:train[:128]", TeacherSettings(arch="resnet8", width=0.25, epochs=1, batch_size=32),
                                 tmp_path / name, seed=seed, accelerator=accelerator)
        return model.fingerprint()

    first = run(0, "a")
    torch.rand(100)  # whatever happened to the global RNG in between
    assert run(0, "b") == first
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert run(1, "c") != first


def _noisy_cross_entropy(net, batch):
    """Draws from the global RNG, as augmentation and MixUp do."""
    images, labels = batch
    return F.cross_entropy(net((images + 0.1 * torch.randn_like(images)).clamp(0, 1)), labels)


def test_an_interrupted_fit_resumes_after_its_last_epoch(tmp_path, accelerator):
    data = load_dataset("digits:train[:256]")
    config = TrainSettings(epochs=3, batch_size=32, lr=0.05)
    uninterrupted = _model()
    expected = fit(uninterrupted, data, _noisy_cross_entropy, config, accelerator)

    calls = {"n": 0}

    def dies_in_the_third_epoch(net, batch):
        calls["n"] += 1
        if calls["n"] > 2 * (256 // 32):
            raise KeyboardInterrupt
        return _noisy_cross_entropy(net, batch)

    with pytest.raises(KeyboardInterrupt):
        fit(_model(), data, dies_in_the_third_epoch, config, accelerator, checkpoint_dir=tmp_path)
    torch.rand(100)  # whatever the global RNG went through before the rerun
    resumed_model = _model(seed=1)  # the checkpoint, not the fresh weights, must win
    resumed = fit(resumed_model, data, _noisy_cross_entropy, config, accelerator, checkpoint_dir=tmp_path)
    assert [h["epoch"] for h in resumed] == [1, 2, 3]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in expected], rel=1e-4)
    for resumed_tensor, expected_tensor in zip(resumed_model.state_dict().values(), uninterrupted.state_dict().values()):
        assert torch.allclose(resumed_tensor.float(), expected_tensor.float(), atol=1e-5)


def test_a_checkpoint_of_other_settings_is_refused(tmp_path, accelerator):
    data = load_dataset("digits:train[:64]")
    fit(_model(), data, _cross_entropy, TrainSettings(epochs=1, batch_size=32), accelerator, checkpoint_dir=tmp_path)
    before = (tmp_path / "training_state.pt").read_bytes()
    with pytest.raises(SynthkdError, match="lr"):
        fit(_model(), data, _cross_entropy, TrainSettings(epochs=1, batch_size=32, lr=0.5), accelerator, checkpoint_dir=tmp_path)
    assert (tmp_path / "training_state.pt").read_bytes() == before


def test_a_checkpoint_of_other_inputs_is_refused_naming_them(tmp_path, accelerator):
    data = load_dataset("digits:train[:64]")
    config = TrainSettings(epochs=1, batch_size=32)
    fit(_model(), data, _cross_entropy, config, accelerator, checkpoint_dir=tmp_path,
        checkpoint_inputs={"data": "a", "teacher": "t1", "settings": {"flip": True}})
    with pytest.raises(SynthkdError) as refusal:
        fit(_model(), data, _cross_entropy, config, accelerator, checkpoint_dir=tmp_path,
            checkpoint_inputs={"data": "b", "teacher": "t1", "settings": {"flip": False}})
    assert 'data: "a" -> "b"; settings.flip: true -> false)' in str(refusal.value)
    history = fit(_model(), data, _cross_entropy, config, accelerator, checkpoint_dir=tmp_path,
                  checkpoint_inputs={"data": "a", "teacher": "t1", "settings": {"flip": True}})
    assert len(history) == 1  # the same inputs resume (here: nothing left to train)


def test_a_checkpoint_from_before_inputs_were_recorded_resumes_on_its_settings(tmp_path, accelerator, capsys):
    data = load_dataset("digits:train[:64]")
    config = TrainSettings(epochs=1, batch_size=32)
    fit(_model(), data, _cross_entropy, config, accelerator, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    state["config"] = json.loads(state.pop("record"))["config"]  # the earlier layout
    torch.save(state, tmp_path / "training_state.pt")
    assert len(fit(_model(), data, _cross_entropy, config, accelerator, checkpoint_dir=tmp_path,
                   checkpoint_inputs={"data": "x"})) == 1
    assert "records only its training settings" in capsys.readouterr().err
    with pytest.raises(SynthkdError, match="config.lr"):
        fit(_model(), data, _cross_entropy, TrainSettings(epochs=1, batch_size=32, lr=0.5), accelerator, checkpoint_dir=tmp_path)


def test_predict_and_accuracy_report(accelerator):
    data = load_dataset("digits:test[:50]")
    model = _model().eval()
    logits, labels = predict(model, data, accelerator, batch_size=16)
    assert logits.shape == (50, 10) and torch.equal(labels, data.labels)
    with torch.no_grad():
        assert torch.allclose(logits, model(data.images.float() / 255), atol=1e-5)

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    report = accuracy_report(logits, labels, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(0.5)
    assert report["num_images"] == 4
    assert report["per_class"] == pytest.approx({"a": 1.0, "b": 1 / 3})  # no "c": it has no images


def test_training_augmentation_keeps_shape_and_range():
    images = torch.rand(16, 1, 8, 8)
    augment = training_augmentation(8, 8, flip=True)
    torch.manual_seed(0)
    out = augment(images)
    assert out.shape == images.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, images)
    images.requires_grad_(True)
    augment(images).sum().backward()  # differentiable (kornia)
    assert images.grad is not None


def test_mixup():
    torch.manual_seed(0)
    images = torch.rand(32, 1, 4, 4)
    mixup = MixUp(alpha=1.0, p=1.0)
    mixed = mixup(images)
    assert mixed.shape == images.shape and not torch.equal(mixed, images)
    # every output is a convex combination: stays inside the per-pixel range of the batch
    assert (mixed >= images.min(0).values - 1e-6).all() and (mixed <= images.max(0).values + 1e-6).all()
    assert torch.equal(MixUp(alpha=1.0, p=0.0)(images), images)
    assert torch.equal(MixUp(alpha=0.0)(images), images)
    assert torch.equal(mixup.eval()(images), images)


def test_kd_without_augmentation_reads_the_stored_logits_and_never_runs_the_teacher(teacher, synthetic_dir, tmp_path,
                                                                                    accelerator):
    """The logits a synthetic set stores are the teacher's on exactly those images, so KD on the
    images as made needs no teacher forward pass; the loss still falls."""
    from synthkd.pipelines.distill import DistillSettings, build_student, distill_e2e

    calls = []
    teacher.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    settings = DistillSettings(epochs=6, batch_size=8, lr=0.05, flip=False, mixup=0.0, augment=False)
    student = build_student("resnet8", teacher, width=0.25)
    _, metrics = distill_e2e(teacher, student, synthetic_dir, tmp_path / "student", settings, accelerator=accelerator)
    assert calls == [] and metrics["targets"] == "stored logits"
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]


def test_kd_without_augmentation_is_refused_where_stored_logits_cannot_serve(teacher, synthetic_dir, tmp_path):
    from synthkd.pipelines.distill import DistillSettings, distill_e2e

    for settings, words in ((DistillSettings(augment=False), "--no-flip and --mixup 0"),
                            (DistillSettings(augment=False, flip=False, mixup=0.0, mode="neighbourhood"), "--mode e2e")):
        with pytest.raises(SynthkdError, match=words):
            settings.check()
    plain = DistillSettings(augment=False, flip=False, mixup=0.0, epochs=1)
    with pytest.raises(SynthkdError, match="real dataset; drop --no-augment"):
        distill_e2e(teacher, teacher, "digits:train[:16]", tmp_path / "s", plain)
