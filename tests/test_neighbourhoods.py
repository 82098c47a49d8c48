"""Neighbourhood distillation: splitting a network at cut paths and chaining it back, the errors a
user can run into, adapters for a narrower student and their fusion on merge, the assignment of
neighbourhoods to ranks, resuming, the CLI, and the same student from 1 or 2 processes."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from synthkd.cli import main
from synthkd.data import load_dataset
from synthkd.data.reader import SyntheticDataset
from synthkd.errors import SynthkdError
from synthkd.evaluation import evaluate
from synthkd.models import Classifier, ModelConfig, create_model
from synthkd.neighbourhood_training import NeighbourhoodSettings, NeighbourhoodDistiller, balance
from synthkd.models.neighbourhoods import CutAdapter, fuse_adapters, resolve_cuts, split_network
from synthkd.pipelines.distill import build_student, data_fingerprint

from conftest import REPO, free_port, launcher, subprocess_env

# The tiny teacher is resnet8 x0.5 (8/16/32 channels); this student is half as wide.
STUDENT_WIDTH = 0.25
BLOCK_CUTS = ["stem", "layer1.0", "layer2.0", "layer3.0"]


def chain(pieces, x: torch.Tensor) -> torch.Tensor:
    for piece in pieces:
        x = piece(x)
    return x


def parameter_ids(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


# --- split and chain back --------------------------------------------------------------------

NETWORKS = {  # arch: (width, input shape)
    "resnet8": (0.5, (1, 8, 8)),
    "resnet20": (0.25, (3, 16, 16)),
    "resnet18": (0.125, (3, 16, 16)),
}
EXPLICIT = {
    "resnet8": ["stem", "layer1.0", "layer2", "pool"],  # "pool": a cut on flat features
    "resnet20": ["stem.1", "layer1", "layer2.1", "layer3.2"],  # "stem.1": before an in-place ReLU
    "resnet18": ["layer1.1", "layer3", "layer4.0"],
}


@pytest.mark.parametrize("arch", list(NETWORKS))
@pytest.mark.parametrize("cuts", ["blocks", "stages", "explicit"])
def test_chained_pieces_equal_the_network(arch, cuts):
    width, shape = NETWORKS[arch]
    torch.manual_seed(0)
    net = create_model(arch, width=width, in_channels=shape[0], num_classes=10).eval()
    paths = resolve_cuts(net, EXPLICIT[arch] if cuts == "explicit" else cuts)
    split = split_network(net, paths)
    assert len(split.pieces) == len(paths) + 1
    assert split.names == paths + ["head"]
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected = net(x)
        assert torch.allclose(chain(split.pieces, x), expected, atol=1e-5)
    # The pieces hold the network's own parameters, each in exactly one piece: training the
    # pieces trains the network.
    owned = [parameter_ids(piece) for piece in split.pieces]
    assert sum(len(o) for o in owned) == len(parameter_ids(net))
    assert set().union(*owned) == parameter_ids(net)


def test_blocks_and_stages_of_resnet20():
    net = create_model("resnet20", width=0.25)
    assert resolve_cuts(net, "blocks") == ["stem"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert resolve_cuts(net, "stages") == ["stem", "layer1", "layer2", "layer3"]
    assert resolve_cuts(net, "stem,layer2") == ["stem", "layer2"]


# --- what a user can get wrong -----------------------------------------------------------------


def test_unknown_cut_lists_the_valid_paths():
    net = create_model("resnet8", width=0.5)
    with pytest.raises(SynthkdError) as error:
        resolve_cuts(net, "layer1,layer9.0")
    message = str(error.value)
    assert "layer9.0" in message and "valid paths" in message
    for path in ("stem", "layer1.0.conv1", "layer3.0", "fc"):
        assert path in message


def test_cuts_out_of_forward_order():
    net = create_model("resnet8", width=0.5)
    with pytest.raises(SynthkdError, match="forward order"):
        split_network(net, ["layer2", "layer1"])


def test_cut_inside_a_residual_block(teacher, accelerator):
    # layer1.0's shortcut reads the block input, which lies before the cut at conv1.
    with pytest.raises(SynthkdError, match="bottleneck"):
        split_network(create_model("resnet8", width=0.5), ["layer1.0.conv1"])
    student = build_student("resnet8", teacher, STUDENT_WIDTH)
    with pytest.raises(SynthkdError, match="bottleneck"):
        NeighbourhoodDistiller(teacher, student, NeighbourhoodSettings(cuts="stem,layer1.0.bn1"), accelerator)


def test_student_with_other_spatial_sizes(teacher, accelerator, tmp_path):
    factory = tmp_path / "early.py"
    factory.write_text(textwrap.dedent("""
        from synthkd.models.resnet import BasicBlock, ResNet

        def student():
            # resnet8's paths, but downsampling in layer1 rather than layer2
            net = ResNet((4, 8, 16), (1, 1, 1), in_channels=1, num_classes=10)
            net.layer1[0] = BasicBlock(4, 4, stride=2)
            net.layer2[0] = BasicBlock(4, 8, stride=1)
            return net
    """))
    student = build_student(f"{factory}:student", teacher)  # same classes: accepted as a student
    with pytest.raises(SynthkdError) as error:
        NeighbourhoodDistiller(teacher, student, NeighbourhoodSettings(cuts="blocks"), accelerator)
    assert "'layer1.0'" in str(error.value) and "spatial" in str(error.value)


def test_student_with_other_classes(teacher, accelerator):
    fmt = teacher.input_format
    student = Classifier.from_config(ModelConfig(
        arch="resnet8", arch_kwargs={"width": STUDENT_WIDTH, "in_channels": 1, "num_classes": 5},
        input=fmt, class_names=[str(i) for i in range(5)]))
    with pytest.raises(SynthkdError) as error:
        NeighbourhoodDistiller(teacher, student, NeighbourhoodSettings(cuts="stages"), accelerator)
    assert "'head'" in str(error.value) and "classes" in str(error.value)


def test_student_without_the_cut_path(teacher, accelerator):
    student = build_student("resnet20", teacher, STUDENT_WIDTH)  # has layer1.0..2, teacher layer1.0 only
    distiller = NeighbourhoodDistiller(teacher, student, NeighbourhoodSettings(cuts="stages", adapters=True), accelerator)
    assert distiller.cuts == ["stem", "layer1", "layer2", "layer3"]  # deeper student, same stages: fine
    shallow = build_student("resnet8", teacher, STUDENT_WIDTH)
    teacher20 = Classifier.from_config(ModelConfig(
        arch="resnet20", arch_kwargs={"width": 0.5, "in_channels": 1, "num_classes": 10},
        input=teacher.input_format, class_names=list(teacher.config.class_names)))
    with pytest.raises(SynthkdError, match="layer1.2"):
        NeighbourhoodDistiller(teacher20, shallow, NeighbourhoodSettings(cuts="blocks", adapters=True), accelerator)


# --- adapters for a narrower student -----------------------------------------------------------


def test_fused_adapters_equal_the_pair():
    torch.manual_seed(0)
    outgoing, incoming = CutAdapter(4, 8), CutAdapter(8, 4)
    fused = fuse_adapters(outgoing, incoming)
    with torch.no_grad():
        for x in (torch.randn(3, 4, 5, 5), torch.randn(3, 4)):  # feature maps and flat features
            assert torch.allclose(fused(x), incoming(outgoing(x)), atol=1e-5)


def distill(teacher, accelerator, out: Path, data: Path, student=None, **settings):
    """A NeighbourhoodDistiller trained on ``data`` into ``out``: (distiller, report)."""
    student = student if student is not None else build_student("resnet8", teacher, STUDENT_WIDTH, seed=0)
    config = NeighbourhoodSettings(**{"cuts": "blocks", "epochs": 1, "batch_size": 16, "seed": 0, "adapters": True, **settings})
    distiller = NeighbourhoodDistiller(teacher, student, config, accelerator)
    dataset = SyntheticDataset(data)
    return distiller, distiller.train(dataset, out, data_fingerprint(data, dataset))


def test_narrower_student_is_trained_and_merged(teacher, accelerator, synthetic_dir, tmp_path):
    student = build_student("resnet8", teacher, STUDENT_WIDTH, seed=0)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = NeighbourhoodDistiller(teacher, student, NeighbourhoodSettings(cuts="blocks", epochs=1, batch_size=16,
                                                                               adapters=True), accelerator)
    assert distiller.cuts == BLOCK_CUTS
    assert distiller.channel_pairs == [(8, 4), (8, 4), (16, 8), (32, 16), None]
    for k, neighbourhood in enumerate(distiller.neighbourhoods):
        assert (neighbourhood.in_adapter is None) == (k == 0)
        assert (neighbourhood.out_adapter is None) == (k == len(BLOCK_CUTS))

    dataset = SyntheticDataset(synthetic_dir)
    report = distiller.train(dataset, tmp_path / "out", data_fingerprint(synthetic_dir, dataset))
    assert list(report["neighbourhoods"]) == BLOCK_CUTS + ["head"]
    for record in report["neighbourhoods"].values():
        assert math.isfinite(record["relative_mse"]) and record["relative_mse"] >= 0
        assert "resumed" not in record
    assert report["assignment"] == {"0": BLOCK_CUTS + ["head"]}
    changed = [k for k, v in student.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, initial[k])]
    assert any(k.startswith("net.layer3.0.") for k in changed) and any(k.startswith("net.fc.") for k in changed)

    images = load_dataset("digits:test").images[:64].float() / 255
    fmt = teacher.input_format
    with torch.no_grad():
        distiller.neighbourhoods.eval()
        chained = chain(distiller.neighbourhoods, fmt.normalize(fmt.adapt(images)))  # before merge()
        merged = distiller.merge().eval()
        assert merged is student
        output = merged(images)
    assert torch.allclose(output, chained, atol=1e-5)
    assert sorted(merged.config.cut_adapters.items()) == sorted({"stem": 4, "layer1.0": 4, "layer2.0": 8, "layer3.0": 16}.items())

    merged.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["cut_adapters"] == {"stem": 4, "layer1.0": 4, "layer2.0": 8, "layer3.0": 16}
    assert any(k.startswith("cut_adapters.") for k in load_file(str(tmp_path / "model" / "model.safetensors")))
    loaded = Classifier.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), output)

    # Nothing of the teacher in the merged student: no module, no shared storage.
    teacher_modules = {id(m) for m in teacher.modules()}
    assert not teacher_modules & {id(m) for m in merged.modules()}
    teacher_storage = {t.untyped_storage().data_ptr() for t in list(teacher.parameters()) + list(teacher.buffers())}
    merged_storage = {t.untyped_storage().data_ptr() for t in list(merged.parameters()) + list(merged.buffers())}
    assert not teacher_storage & merged_storage


def test_same_width_student_needs_no_adapters(teacher, accelerator, synthetic_dir, tmp_path):
    student = build_student("resnet8", teacher, 0.5, seed=0)
    distiller, report = distill(teacher, accelerator, tmp_path / "out", synthetic_dir, student=student, cuts="stages")
    assert distiller.channel_pairs == [None] * 5
    assert all(n.in_adapter is None and n.out_adapter is None for n in distiller.neighbourhoods)
    merged = distiller.merge()
    assert merged is student and not merged.config.cut_adapters and not hasattr(merged.net, "cut_adapters")


# --- ranks -----------------------------------------------------------------------------------


def test_balance_assigns_every_neighbourhood_once_with_balanced_loads():
    generator = random.Random(0)
    cases = [([5, 3, 3, 2, 1], 2), ([1, 1, 1, 1], 2), ([4.0], 1)]
    cases += [([generator.uniform(0, 10) for _ in range(generator.randint(1, 12))], generator.randint(1, 5)) for _ in range(50)]
    for costs, ranks in cases:
        owned = balance(costs, ranks)
        assert owned == balance(list(costs), ranks)  # deterministic
        assert len(owned) == ranks
        assert sorted(i for o in owned for i in o) == list(range(len(costs)))  # every neighbourhood exactly once
        loads = [sum(costs[i] for i in o) for o in owned]
        # no rank is above the lightest by more than the largest single cost
        assert max(loads) - min(loads) <= max(costs) + 1e-9


def test_more_ranks_than_neighbourhoods():
    owned = balance([3.0, 2.0, 1.0], 5)
    assert sorted(i for o in owned for i in o) == [0, 1, 2]
    assert all(len(o) <= 1 for o in owned) and sum(not o for o in owned) == 2  # one each, two ranks left idle


def test_flops_and_assignment_of_a_distiller(teacher, accelerator):
    student = build_student("resnet8", teacher, STUDENT_WIDTH)
    distiller = NeighbourhoodDistiller(teacher, student, NeighbourhoodSettings(cuts="blocks", adapters=True), accelerator)
    assert len(distiller.flops) == 5 and all(f > 0 for f in distiller.flops)
    assert distiller.flops[4] < min(distiller.flops[:4])  # the head (pool + linear) is the lightest
    assert distiller.assignment == [list(range(5))] and distiller.owned == list(range(5))


@pytest.mark.parametrize("cuts", ["blocks", "stem.1,layer1,layer2.0,layer3"])
def test_a_neighbourhood_trains_the_same_on_any_rank(teacher, accelerator, synthetic_dir, tmp_path, cuts):
    """What every rank of a 2-process run would train, simulated in one process by giving each
    distiller a rank's share (and, as if on 5 ranks, a single neighbourhood): each neighbourhood
    comes out as when one process trains them all. ("stem.1" is a cut before an in-place ReLU,
    which must not overwrite the target of the neighbourhood before it.)"""
    width = STUDENT_WIDTH if cuts == "blocks" else 0.5
    alone, _ = distill(teacher, accelerator, tmp_path / "alone", synthetic_dir, cuts=cuts,
                       student=build_student("resnet8", teacher, width, seed=0))
    shares = balance([float(f) for f in alone.flops], 2)
    assert all(shares)
    shares += [[k] for k in range(len(alone.neighbourhoods))]
    for rank, share in enumerate(shares):
        distiller = NeighbourhoodDistiller(teacher, build_student("resnet8", teacher, width, seed=0),
                                           NeighbourhoodSettings(cuts=cuts, epochs=1, batch_size=16, seed=0, adapters=True),
                                           accelerator)
        distiller.owned = share
        dataset = SyntheticDataset(synthetic_dir)
        report = distiller.train(dataset, tmp_path / f"rank{rank}", data_fingerprint(synthetic_dir, dataset))
        assert list(report["neighbourhoods"]) == [distiller.names[k] for k in share]
        for k in share:
            mine, reference = distiller.neighbourhoods[k].state_dict(), alone.neighbourhoods[k].state_dict()
            for name, tensor in reference.items():
                assert torch.allclose(mine[name], tensor, atol=1e-6), (distiller.names[k], name)


# --- resume ----------------------------------------------------------------------------------


def merged_state(distiller) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in distiller.merge().state_dict().items()}


def test_resume_reuses_finished_neighbourhoods(teacher, accelerator, synthetic_dir, tmp_path):
    out = tmp_path / "out"
    first, report = distill(teacher, accelerator, out, synthetic_dir)
    assert not any("resumed" in r for r in report["neighbourhoods"].values())
    assert sorted(p.name for p in (out / "neighbourhoods").iterdir()) == sorted(
        f"{k:02d}.{ext}" for k in range(5) for ext in ("json", "safetensors"))
    expected = merged_state(first)

    second, report = distill(teacher, accelerator, out, synthetic_dir)
    assert [r.get("resumed") for r in report["neighbourhoods"].values()] == [True] * 5
    again = merged_state(second)
    assert again.keys() == expected.keys()
    assert all(torch.equal(again[k], expected[k]) for k in expected)

    # Other settings: every neighbourhood is trained again, and the files replaced.
    third, report = distill(teacher, accelerator, out, synthetic_dir, epochs=2)
    assert not any("resumed" in r for r in report["neighbourhoods"].values())
    assert all(r["epochs"] == 2 for r in report["neighbourhoods"].values())
    changed = merged_state(third)
    assert not all(torch.equal(changed[k], expected[k]) for k in expected)
    fourth, report = distill(teacher, accelerator, out, synthetic_dir, epochs=2)
    assert all(r.get("resumed") for r in report["neighbourhoods"].values())


def test_resume_with_another_starting_student_retrains(teacher, accelerator, synthetic_dir, tmp_path):
    """A student given as a model directory is a starting point: the same architecture with other
    weights must not pick up the pieces trained from the first one."""
    out = tmp_path / "out"
    distill(teacher, accelerator, out, synthetic_dir)
    torch.manual_seed(123)
    other = Classifier.from_config(build_student("resnet8", teacher, STUDENT_WIDTH, seed=0).config)
    _, report = distill(teacher, accelerator, out, synthetic_dir, student=other)
    assert not any("resumed" in r for r in report["neighbourhoods"].values())


def test_a_damaged_finished_piece_is_trained_again(teacher, accelerator, synthetic_dir, tmp_path):
    out = tmp_path / "out"
    distill(teacher, accelerator, out, synthetic_dir)
    (out / "neighbourhoods" / "02.safetensors").write_bytes(b"not safetensors")
    _, report = distill(teacher, accelerator, out, synthetic_dir)
    assert [bool(r.get("resumed")) for r in report["neighbourhoods"].values()] == [True, True, False, True, True]


# --- command line ----------------------------------------------------------------------------


def test_cli_neighbourhood_distill(teacher_dir, synthetic_dir, tmp_path):
    out = tmp_path / "student"
    result = CliRunner().invoke(main, [
        "distill", "--teacher", str(teacher_dir), "--student", "resnet8",
        "--data", str(synthetic_dir), "--mode", "neighbourhood", "--cuts", "blocks", "--epochs", "1",
        "--finetune-epochs", "1", "--batch-size", "16", "--eval-dataset", "digits:test", "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "student" in result.stdout and "gap" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "neighbourhood" and metrics["cuts"] == BLOCK_CUTS
    assert sorted(metrics["neighbourhoods"]) == sorted(BLOCK_CUTS + ["head"])
    for record in metrics["neighbourhoods"].values():
        assert math.isfinite(record["relative_mse"]) and record["relative_mse"] >= 0
        assert record["seconds"] > 0 and record["rank"] == 0
    for key in ("merged", "student", "teacher"):
        assert 0.0 <= metrics[key]["accuracy"] <= 1.0 and metrics[key]["num_images"] > 0
    assert len(metrics["finetune_history"]) == 1
    assert metrics["distill_seconds"] >= metrics["neighbourhood_seconds"]
    assert (out / "neighbourhoods" / "04.safetensors").is_file()
    student = Classifier.from_pretrained(out)
    # The default neighbourhood student: the teacher's width at every cut, thinner inside its blocks.
    assert not student.config.cut_adapters and student.config.arch == "resnet8"
    assert student.config.arch_kwargs["inner"] == 0.5 and student.config.arch_kwargs["width"] == 0.5
    assert metrics["activation_cache"]["where"] == "memory" and not (out / "activation-cache").exists()
    from synthkd.cli import make_accelerator

    report = evaluate(student, load_dataset("digits:test"), make_accelerator())
    assert report["accuracy"] == pytest.approx(metrics["student"]["accuracy"])


def test_cli_bad_cut_is_a_one_line_error(teacher_dir, synthetic_dir, tmp_path):
    result = CliRunner().invoke(main, [
        "distill", "--teacher", str(teacher_dir), "--data", str(synthetic_dir), "--mode", "neighbourhood",
        "--student", "resnet8", "--cuts", "stem,layer7", "--epochs", "1", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip().startswith("error: cut path(s) layer7 do not exist")
    assert not (tmp_path / "s").exists()


# --- processes -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks on one GPU: NCCL refuses a shared device")
def test_same_student_from_one_or_two_processes(teacher_dir, synthetic_dir, tmp_path):
    def distill_args(out: Path) -> list[str]:
        return ["distill", "--teacher", str(teacher_dir), "--student", "resnet8", "--data", str(synthetic_dir),
                "--mode", "neighbourhood", "--epochs", "2", "--finetune-epochs", "0",
                "--batch-size", "8", "--seed", "3", "--out", str(out)]

    def check(done, what):
        assert done.returncode == 0, f"{what}: exit {done.returncode}\n{done.stderr[-4000:]}"

    launch = [*launcher(), "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    one, two, machines = tmp_path / "one", tmp_path / "two", tmp_path / "machines"
    check(subprocess.run([sys.executable, "-m", "synthkd", *distill_args(one)], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300), "1 process")
    check(subprocess.run([*launch, "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                          "-m", "synthkd", *distill_args(two)], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300), "2 processes")
    # Two machines of one process each, each with its own output directory (no shared disk).
    port = free_port()
    ranks = [subprocess.Popen([*launch, "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
                               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                               "-m", "synthkd", *distill_args(machines / f"machine{rank}")],
                              cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        for rank, process in enumerate(ranks):
            stdout, stderr = process.communicate(timeout=300)
            check(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), f"machine {rank}")
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()

    for out, processes in ((one, 1), (two, 2), (machines / "machine0", 2)):
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["num_processes"] == processes
        ranks_used = {record["rank"] for record in metrics["neighbourhoods"].values()}
        assert ranks_used == set(range(processes)), metrics["neighbourhoods"]
        assert sorted(sum(metrics["assignment"].values(), [])) == sorted(BLOCK_CUTS + ["head"])
        assert all(metrics["assignment"][str(r)] for r in range(processes))
    # Each machine keeps the pieces it trained; only the main process writes the model.
    assert not (machines / "machine1" / "model.safetensors").exists()
    pieces = [sorted(p.name for p in (machines / f"machine{r}" / "neighbourhoods").glob("*.safetensors")) for r in (0, 1)]
    assert pieces[0] and pieces[1] and not set(pieces[0]) & set(pieces[1])

    reference = load_file(str(one / "model.safetensors"))
    for out in (two, machines / "machine0"):
        state = load_file(str(out / "model.safetensors"))
        assert state.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.allclose(state[name].float(), tensor.float(), atol=1e-5), (out.name, name)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="several ranks on one GPU: NCCL refuses a shared device")
def test_extra_ranks_train_the_costliest_neighbourhood_data_parallel(teacher_dir, synthetic_dir, tmp_path):
    out = tmp_path / "four"
    launch = [*launcher(), "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "4",
              "--num_machines", "1", "--main_process_port", str(free_port())]
    done = subprocess.run([*launch, "-m", "synthkd", "distill", "--teacher", str(teacher_dir), "--student", "resnet8",
                           "--data", str(synthetic_dir), "--mode", "neighbourhood",
                           "--cuts", "stem,layer1", "--epochs", "2", "--batch-size", "8", "--out", str(out)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    replicated = {name: record["ranks"] for name, record in metrics["neighbourhoods"].items() if len(record["ranks"]) > 1}
    assert len(metrics["neighbourhoods"]) == 3 and len(replicated) == 1, metrics["neighbourhoods"]
    (ranks,) = replicated.values()
    assert sorted(ranks) == sorted(set(ranks)) and 3 in ranks  # the spare rank joined it
    assert all(metrics["assignment"][str(r)] for r in range(4))
    model = Classifier.from_pretrained(out)
    assert torch.isfinite(model.eval()(torch.rand(2, *model.input_format.shape))).all()
