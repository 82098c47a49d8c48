"""Neighbourhood distillation of students born from the teacher: their interfaces are the teacher's
kept channels. The kept channels found at every cut are the right ones (a teacher whose dropped
channels are dead computes, at the kept ones, exactly what the born student's pieces compute), the
cached targets are the teacher's activations sliced by them (memory, disk, a shard redone), the
merged student is its chained pieces, a width-1.0 student's pieces are the teacher's, the CLI
distills born students without adapters, and a cache of other kept channels is refused naming the
cut."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from synthkd.cli import main
from synthkd.data import load_dataset
from synthkd.data.activation_cache import computed_boundaries
from synthkd.data.reader import SyntheticDataset
from synthkd.errors import SynthkdError
from synthkd.evaluation import evaluate
from synthkd.models import Classifier
from synthkd.models.born import format_probe
from synthkd.models.neighbourhoods import evaluating
from synthkd.neighbourhood_training import NeighbourhoodDistiller, NeighbourhoodSettings
from synthkd.pipelines.distill import build_student, data_fingerprint
from synthkd.teacher_activations import TeacherActivations

from test_activation_cache import distill_command, on_two_ranks, run, tree_hashes
from test_born import LIBRARY_TEACHERS, teacher_of, zoo_teacher
from test_neighbourhoods import chain


def distiller_of(teacher: Classifier, student: Classifier, accelerator, **settings) -> NeighbourhoodDistiller:
    config = NeighbourhoodSettings(**{"cuts": "blocks", "seed": 0, "holdout": 8, **settings})
    return NeighbourhoodDistiller(teacher, student, config, accelerator)


def with_dead_channels(teacher: Classifier, student: Classifier) -> nn.Module:
    """A copy of the teacher's network whose channels the born student dropped output exactly zero
    (their filters, batch-norm scales, shifts and means zeroed): at the kept channels it computes
    what the born student computes, wherever the channels flow."""
    net = copy.deepcopy(teacher.net)
    modules = dict(net.named_modules())
    with torch.no_grad():
        for path, kept in student.config.born_from["channels"].items():
            module = modules[path]
            dropped = sorted(set(range(module.weight.shape[0])) - set(kept))
            module.weight[dropped] = 0
            if getattr(module, "bias", None) is not None:
                module.bias[dropped] = 0
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean[dropped] = 0
    return net.eval()


def activations_at_cuts(net: nn.Module, cuts: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The network's output at every cut module, then its logits."""
    found: dict[str, torch.Tensor] = {}
    modules = dict(net.named_modules())
    hooks = [modules[cut].register_forward_hook(lambda _m, _i, out, cut=cut: found.__setitem__(cut, out.clone()))
             for cut in cuts]
    with torch.no_grad():
        logits = net(x)
    for hook in hooks:
        hook.remove()
    return [found[cut] for cut in cuts] + [logits]


# A transformers model is cut at explicit paths of its own modules (its top level is one wrapper).
HF_CUTS = "model.resnet.embedder,model.resnet.encoder.stages.0"


@pytest.mark.parametrize("spec", ["zoo", "make", *LIBRARY_TEACHERS, "hf"])
def test_the_kept_channels_at_every_cut_are_the_teachers(spec, accelerator, tmp_path):
    teacher = zoo_teacher("resnet8", width=1.0) if spec == "zoo" else teacher_of(spec, tmp_path)
    teacher.eval()
    student = build_student("teacher:width=0.5", teacher, from_teacher=True).eval()
    distiller = distiller_of(teacher, student, accelerator, cuts=HF_CUTS if spec == "hf" else "blocks")
    assert any(kept is not None for kept in distiller.kept_channels)
    assert all(pair is None for pair in distiller.channel_pairs)  # no adapter anywhere
    dead = with_dead_channels(teacher, student)
    x = format_probe(teacher.input_format, count=4)
    boundaries = [x] + activations_at_cuts(dead, distiller.cuts, x)
    kept = [None] + distiller.kept_channels + [None]
    sliced = [b if channels is None else b[:, channels] for b, channels in zip(boundaries, kept)]
    with evaluating(*distiller.student_split.pieces), torch.no_grad():
        for k, piece in enumerate(distiller.student_split.pieces):
            assert torch.allclose(piece(sliced[k]), sliced[k + 1], atol=1e-5), distiller.names[k]
    for b, channels in zip(boundaries, kept):  # the channels left out carry nothing in the dead teacher
        if channels is not None:
            assert float(b.abs().sum()) > 0
            assert float(b.abs().sum()) == pytest.approx(float(b[:, channels].abs().sum()))


def born_half(teacher: Classifier, accelerator, **settings) -> NeighbourhoodDistiller:
    return distiller_of(teacher, build_student("teacher:width=0.5", teacher, from_teacher=True), accelerator, **settings)


def cached(distiller: NeighbourhoodDistiller, synthetic_dir, accelerator, out, kept=None) -> TeacherActivations:
    dataset = SyntheticDataset(synthetic_dir)
    return TeacherActivations(distiller.teacher, distiller.teacher_split, dataset, distiller.config,
                              data_fingerprint(synthetic_dir, dataset), accelerator, out,
                              needed=list(range(len(distiller.names))), kept=kept)


def test_the_cached_targets_are_the_teachers_activations_sliced(teacher, synthetic_dir, accelerator, tmp_path):
    distiller = born_half(teacher, accelerator, cache_views=2)
    whole = cached(distiller, synthetic_dir, accelerator, tmp_path, kept=None)
    memory = cached(distiller, synthetic_dir, accelerator, tmp_path, kept=distiller.kept_channels)
    distiller.config = dataclasses.replace(distiller.config, cache="disk", cache_dir=str(tmp_path / "c"))
    disk = cached(distiller, synthetic_dir, accelerator, tmp_path, kept=distiller.kept_channels)
    kept = [None] + distiller.kept_channels + [None]
    for k in range(len(distiller.names)):
        for side in (0, 1):
            channels = kept[k + side]
            expected = whole.pair(k)[side] if channels is None else whole.pair(k)[side][:, channels]
            assert torch.equal(memory.pair(k)[side], expected)
            assert torch.equal(disk.pair(k)[side], expected)
    assert memory.pair(1)[0].shape[1] == len(distiller.kept_channels[0]) < whole.pair(1)[0].shape[1]
    # A damaged shard of a sliced boundary is made again from the teacher's whole activation,
    # which the cache no longer holds: recomputed from the image, to the same values.
    damaged = tmp_path / "c" / "b-03" / "v01-shard-00000.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-16] + b"\0" * 16)
    redone = cached(distiller, synthetic_dir, accelerator, tmp_path, kept=distiller.kept_channels)
    assert torch.equal(redone.pair(2)[1], disk.pair(2)[1])


def test_a_merged_born_student_is_its_chained_pieces(teacher, synthetic_dir, accelerator, tmp_path):
    distiller = born_half(teacher, accelerator, epochs=1, batch_size=16)
    before = {name: tensor.clone() for name, tensor in distiller.student.state_dict().items()}
    dataset = SyntheticDataset(synthetic_dir)
    distiller.train(dataset, tmp_path, data_fingerprint(synthetic_dir, dataset))
    merged = distiller.merge().eval()
    assert not merged.config.cut_adapters and not hasattr(merged.net, "cut_adapters")
    assert any(not torch.equal(before[name], tensor) for name, tensor in merged.state_dict().items())  # trained
    x = format_probe(teacher.input_format, count=4)
    with evaluating(*distiller.student_split.pieces), torch.no_grad():
        assert torch.equal(chain(distiller.student_split.pieces, x), merged.net(x))


def test_a_width_one_born_students_pieces_are_the_teachers(teacher, synthetic_dir, accelerator, tmp_path):
    student = build_student("teacher:width=1.0", teacher, from_teacher=True)
    distiller = distiller_of(teacher, student, accelerator)
    activations = cached(distiller, synthetic_dir, accelerator, tmp_path, kept=distiller.kept_channels)
    for k in range(len(distiller.names)):
        inputs, targets = activations.pair(k)
        assert distiller._local_error(k, inputs, targets) == pytest.approx(0.0, abs=1e-10)


def distill_args(teacher_dir, synthetic_dir, out, student: str, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher_dir), "--student", student, "--data", str(synthetic_dir), "--mode",
            "neighbourhood", "--epochs", "1", "--batch-size", "16", "--out", str(out), *extra]


@pytest.mark.parametrize("student", ["teacher:width=0.5", "resnet8:width=0.25", "teacher:params=0.25"])
def test_cli_distills_a_born_student_without_adapters(student, teacher_dir, synthetic_dir, accelerator, tmp_path):
    out = tmp_path / "student"
    result = CliRunner().invoke(main, distill_args(teacher_dir, synthetic_dir, out, student, "--eval-dataset",
                                                   "digits:test", "--cache-dtype", "float16"))
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    loaded = Classifier.from_pretrained(out)
    assert not loaded.config.cut_adapters and loaded.config.born_from["channels"]
    teacher = Classifier.from_pretrained(teacher_dir)
    assert sum(p.numel() for p in loaded.parameters()) < 0.5 * sum(p.numel() for p in teacher.parameters())
    report = evaluate(loaded, load_dataset("digits:test"), accelerator)
    assert report["accuracy"] == pytest.approx(metrics["student"]["accuracy"])


def test_a_cache_of_other_kept_channels_names_the_cut(teacher, teacher_dir, synthetic_dir, accelerator, tmp_path):
    cache = tmp_path / "cache"
    result = CliRunner().invoke(main, distill_args(teacher_dir, synthetic_dir, tmp_path / "a", "teacher:width=0.5",
                                                   "--cache", "disk", "--cache-dir", str(cache)))
    assert result.exit_code == 0, (result.output, result.exception)
    result = CliRunner().invoke(main, distill_args(teacher_dir, synthetic_dir, tmp_path / "b",
                                                   "teacher:width=0.5,importance=bn", "--cache", "disk",
                                                   "--cache-dir", str(cache)))
    assert result.exit_code == 2, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the activation cache") and "at cut 'stem'" in error, error
    with pytest.raises(SynthkdError, match="at cut 'stem'"):  # a narrower student: the shapes differ there
        distiller = distiller_of(teacher, build_student("teacher:width=0.25", teacher, from_teacher=True), accelerator,
                                 cache="disk", cache_dir=str(cache))
        cached(distiller, synthetic_dir, accelerator, tmp_path, kept=distiller.kept_channels)


def test_a_rank_recomputes_the_whole_activations_the_cache_does_not_hold():
    sliced = [False, True, True, False, True, False]
    assert computed_boundaries([3], sliced) == [1, 2, 3]  # boundary 0 is read: stored whole
    assert computed_boundaries([0, 3], sliced) == [0, 1, 2, 3]
    assert computed_boundaries([2, 5], sliced) == [1, 2, 4, 5]  # boundary 3 is read
    assert computed_boundaries([4], [False] * 6) == [4]  # nothing sliced: one piece per boundary


def test_cli_plans_a_born_student(teacher_dir, synthetic_dir, tmp_path):
    out = tmp_path / "student"
    result = CliRunner().invoke(main, distill_args(teacher_dir, synthetic_dir, out, "teacher:width=0.5", "--cache",
                                                   "disk", "--plan", "--plan-ranks", "2", "--json"))
    assert result.exit_code == 0, (result.output, result.exception)
    plan = json.loads(result.stdout)
    teacher = Classifier.from_pretrained(teacher_dir)
    stem = next(n for n in plan["neighbourhoods"] if n["name"] == "stem")
    assert stem["output_shape"][0] == teacher.net.stem[0].out_channels // 2  # only the kept channels are cached
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks on one GPU: NCCL refuses a shared device")
def test_two_ranks_make_the_same_sliced_cache_as_one(teacher_dir, synthetic_dir, tmp_path):
    """Under 2 ranks a rank whose target follows a sliced boundary another rank made recomputes
    the teacher's whole activation, and the cache is byte for byte the one a single process makes."""
    two, one = tmp_path / "two-cache", tmp_path / "one-cache"
    born = ("--student", "teacher:width=0.5")
    done = run(on_two_ranks(distill_command(teacher_dir, synthetic_dir, tmp_path / "s2", two, *born)))
    assert done.returncode == 0, done.stderr[-3000:]
    done = run(distill_command(teacher_dir, synthetic_dir, tmp_path / "s1", one, *born))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {shard["rank"] for shard in json.loads((two / "manifest.json").read_text())["shards"]}
    shards = [name for name in tree_hashes(one) if name.endswith(".safetensors")]
    assert ranks == {0, 1} and len(shards) == 6 * 3
    assert all(tree_hashes(two)[name] == tree_hashes(one)[name] for name in shards)


def test_a_student_born_from_another_teacher_is_refused_without_adapters(teacher, accelerator):
    student = build_student("teacher:width=0.5", teacher, from_teacher=True)
    with torch.no_grad():
        teacher.net.fc.bias.add_(1.0)  # another teacher: its channels are not the ones the student kept
    with pytest.raises(SynthkdError, match="cut 'stem'.*born from another teacher.*--adapters"):
        distiller_of(teacher, student, accelerator)
    assert distiller_of(teacher, student, accelerator, adapters=True).channel_pairs[0] is not None


def test_a_born_student_learns_from_a_per_neighbourhood_activation_set(teacher, accelerator, tmp_path):
    """Each neighbourhood's own synthetic inputs, restricted to the kept channels, and the teacher
    piece's outputs on the whole of them, restricted the same way."""
    from synthkd.generators.activations import ActivationSynthesizer
    from synthkd.pipelines.activations import generate_activations
    from synthkd.pipelines.distill import distill_neighbourhood

    out = tmp_path / "activations"
    generate_activations(teacher, ActivationSynthesizer(teacher, iterations=2), 16, out, batch_size=16, seed=0,
                         accelerator=accelerator)
    student = build_student("teacher:width=0.5", teacher, from_teacher=True)
    config = NeighbourhoodSettings(epochs=1, batch_size=8, holdout=4)
    merged, metrics = distill_neighbourhood(teacher, student, out, tmp_path / "student", config, None, None, accelerator,
                                            inputs="activations")
    assert not merged.config.cut_adapters
    assert all(0 <= record["relative_mse"] < float("inf") for record in metrics["neighbourhoods"].values())
