"""``synthkd distill --plan``: the figures are the pieces' own (parameters, FLOPs, the cache's bytes
as a run lays it out), the ranks share every neighbourhood and every cache boundary once, and
nothing is written."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from synthkd.cli import main
from synthkd.data.activation_cache import boundaries_of
from synthkd.data.reader import SyntheticDataset
from synthkd.neighbourhood_plan import plan_lines, plan_neighbourhoods
from synthkd.neighbourhood_training import NeighbourhoodDistiller, NeighbourhoodSettings
from synthkd.pipelines.distill import build_student, data_fingerprint
from synthkd.teacher_activations import TeacherActivations


def test_plan_figures_are_the_pieces_real_counts(teacher, accelerator, synthetic_dir, tmp_path):
    config = NeighbourhoodSettings(cuts="blocks", epochs=3, batch_size=8, holdout=8, cache="memory", cache_views=2)
    student = build_student("resnet8:inner=0.5", teacher, width=0.5, from_teacher=True)
    distiller = NeighbourhoodDistiller(teacher, student, config, accelerator, owned=[])
    plan = plan_neighbourhoods(distiller, 40, 2, tmp_path / "out", repeats=1)

    fmt = teacher.input_format
    x = fmt.normalize(fmt.adapt(SyntheticDataset(synthetic_dir).images[:1]))
    for k, (row, piece) in enumerate(zip(plan["neighbourhoods"], distiller.student_split.pieces)):
        assert row["name"] == distiller.names[k]
        assert row["parameters"] == sum(p.numel() for p in piece.parameters()) > 0
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            piece(x)
        assert row["flops_per_image"] == counter.get_total_flops()
        assert row["input_shape"] == list(x.shape[1:]) and row["step_seconds"] > 0
        with torch.no_grad():
            x = distiller.teacher_split.pieces[k](x)
        assert row["output_shape"] == list(x.shape[1:])

    owners = sorted(k for rank in plan["ranks"] for k, name in enumerate(distiller.names) if name in rank["neighbourhoods"])
    assert owners == list(range(len(distiller.names)))  # every neighbourhood on exactly one of the 2 ranks
    for rank in plan["ranks"]:
        owned = [distiller.names.index(name) for name in rank["neighbourhoods"]]
        assert rank["boundaries_read"] == boundaries_of(owned)
        assert rank["memory_bytes"] == sum(plan["cache"]["boundary_bytes"][b] for b in rank["boundaries_read"])
    dataset = SyntheticDataset(synthetic_dir)
    run = TeacherActivations(teacher, distiller.teacher_split, dataset, config, data_fingerprint(synthetic_dir, dataset),
                             accelerator, tmp_path / "run", needed=[0])
    assert plan["cache"]["bytes"] == run.summary["bytes"] and plan["cache"]["where"] == "memory"
    assert plan["steps_per_epoch"] == len(run.train_rows) // 8
    assert any(line.startswith("estimated time:") for line in plan_lines(plan))


def test_cli_plan_splits_the_disk_cache_and_writes_nothing(teacher_dir, synthetic_dir, tmp_path):
    out, cache = tmp_path / "student", tmp_path / "cache"
    result = CliRunner().invoke(main, [
        "distill", "--teacher", str(teacher_dir), "--student", "resnet8", "--data", str(synthetic_dir), "--mode",
        "neighbourhood", "--epochs", "2", "--batch-size", "8", "--finetune-epochs", "1", "--cache", "disk",
        "--cache-dir", str(cache), "--cache-views", "3", "--plan", "--plan-ranks", "2", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert not out.exists() and not cache.exists()
    assert plan["num_images"] == 40 and plan["views"] == 3 and plan["num_ranks"] == 2
    made = sorted(b for rank in plan["ranks"] for b in rank["boundaries_made"])
    assert made == list(range(len(plan["neighbourhoods"]) + 1))  # each boundary made once, by one rank
    assert sum(rank["disk_bytes"] for rank in plan["ranks"]) == plan["cache"]["bytes"]
    estimate = plan["estimate"]
    assert estimate["finetune_seconds"] > 0
    assert estimate["seconds"] == estimate["cache_seconds"] + estimate["train_seconds"] + estimate["finetune_seconds"]


def test_run_plan_sizes_the_distill_stage_of_a_config(teacher_dir, tmp_path):
    """``synthkd run CONFIG --plan`` before anything ran: generate.num_images images, nothing written."""
    config = tmp_path / "run.yaml"
    config.write_text(f"out: {tmp_path / 'run'}\nteacher:\n  model: {teacher_dir}\nstudent:\n  arch: resnet8\n"
                      "generate:\n  num_images: 64\ndistill:\n  mode: neighbourhood\n  epochs: 2\n  batch_size: 16\n"
                      "  cache_views: 2\n")
    result = CliRunner().invoke(main, ["run", str(config), "distill.cuts=stages", "--plan", "--plan-ranks", "2", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["num_images"] == 64 and plan["views"] == 2 and plan["num_ranks"] == 2 and plan["epochs"] == 2
    assert [n["name"] for n in plan["neighbourhoods"]] == ["stem", "layer1", "layer2", "layer3", "head"]
    assert not (tmp_path / "run").exists()
