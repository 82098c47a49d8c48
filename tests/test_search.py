"""Student Search: the exact knapsack against brute force, budgets and candidate spaces, a tiny
search end to end (merge, costs, pruning), the candidate cache (hits, a corrupt entry), bad
input, the CLI, and the same search under two processes."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from synthkd.cli import main, make_accelerator
from synthkd.data import load_dataset
from synthkd.evaluation import evaluate
from synthkd.errors import SynthkdError
from synthkd.models import Classifier, ModelConfig
from synthkd.neighbourhood_training import count_flops
from synthkd.pipelines.search import SearchSettings, explore, search
from synthkd.search import candidate_space, pareto_frontier, parse_budget, select
from synthkd.search.costs import count_parameters
from synthkd.search.knapsack import Solution

from conftest import REPO, free_port, subprocess_env
from conftest import launcher

# The tiny teacher is resnet8 x0.5 (one block per stage); these candidates give each of its five
# stage-level neighbourhoods six options (three widths, each also pruned to half its weights).
SPACE = "width=0.25,0.5,1.0;sparsity=0.5"
CONFIG = dict(cuts="stages", epochs=1, batch_size=16)


def settings(cache_dir, **changes) -> SearchSettings:
    """The search settings of these tests, over SPACE, with ``changes``."""
    return SearchSettings(**{"candidates": SPACE, "cache_dir": str(cache_dir), **CONFIG, **changes})


# --- the knapsack ----------------------------------------------------------------------------


def brute_force(costs, errors, links, budget):
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(costs[k][i] for k, i in enumerate(choice)) + sum(links[k][choice[k]][choice[k + 1]] for k in range(len(costs) - 1))
        error = sum(errors[k][i] for k, i in enumerate(choice))
        if cost <= budget * (1 + 1e-12) and (best is None or error < best[1]):  # float sums: another order
            best = (cost, error)
    return best


@pytest.mark.parametrize("integer_costs", [True, False])
def test_knapsack_matches_brute_force(integer_costs):
    rng = random.Random(0)
    for _ in range(150):
        sizes = [rng.randint(1, 4) for _ in range(rng.randint(1, 4))]
        draw = (lambda: rng.randint(0, 10**9)) if integer_costs else (lambda: rng.uniform(0, 2e-3))
        costs = [[draw() for _ in range(n)] for n in sizes]
        errors = [[rng.uniform(0, 1) for _ in range(n)] for n in sizes]
        links = [[[draw() * rng.randint(0, 1) for _ in range(b)] for _ in range(a)] for a, b in zip(sizes, sizes[1:])]
        frontier = pareto_frontier(costs, errors, lambda k, a, b: links[k][a][b])
        assert all(x.cost < y.cost and x.error > y.error for x, y in zip(frontier, frontier[1:]))
        everything = [brute_force(costs, errors, links, float("inf"))]
        assert frontier[-1].error == pytest.approx(everything[0][1])  # the best student of all is on it
        cheapest = min(s.cost for s in frontier)
        for budget in [rng.uniform(0, 2) * sum(max(c) for c in costs) for _ in range(5)] + [cheapest]:
            expected = brute_force(costs, errors, links, budget)
            if expected is None:
                with pytest.raises(SynthkdError, match="cheapest possible"):
                    select(frontier, budget)
                continue
            chosen = select(frontier, budget)
            assert chosen.cost <= budget and chosen.error == pytest.approx(expected[1])
            recomputed = sum(costs[k][i] for k, i in enumerate(chosen.choice)) + sum(
                links[k][chosen.choice[k]][chosen.choice[k + 1]] for k in range(len(sizes) - 1))
            assert recomputed == pytest.approx(chosen.cost)


def test_infeasible_budget_names_the_cheapest_cost():
    frontier = [Solution(5.0, 1.0, (0,)), Solution(9.0, 0.5, (1,))]
    with pytest.raises(SynthkdError, match=r"cheapest possible one costs 5 .*raise the budget"):
        select(frontier, 4.0, lambda v: f"{v:g} units")


# --- budgets and candidate spaces ------------------------------------------------------------


def test_budgets():
    assert parse_budget("params=0.3").limit(1000) == pytest.approx(300)
    assert parse_budget("0.5").kind == "params"
    assert parse_budget("flops=25%").limit(400) == pytest.approx(100)
    assert parse_budget("flops=2e6").limit(1) == 2e6
    assert parse_budget("params=50000").limit(1) == 50000
    assert parse_budget("latency=1.5ms").limit(1) == pytest.approx(1.5e-3)
    assert parse_budget("latency=0.5").limit(2e-3) == pytest.approx(1e-3)
    for bad, message in [("memory=0.3", "unknown budget kind 'memory'"), ("params=lots", "cannot read"),
                         ("latency=3", "unit"), ("params=2ms", "no unit"), ("flops=0", "positive")]:
        with pytest.raises(SynthkdError, match=message):
            parse_budget(bad)


def test_candidate_grid(teacher):
    space = candidate_space("width=0.5,1;depth=1,2;sparsity=0.5", teacher)
    assert [c.name for c in space] == ["w0.5-d1", "w0.5-d1-s0.5", "w0.5-d2", "w0.5-d2-s0.5",
                                       "w1-d1", "w1-d1-s0.5", "w1-d2", "w1-d2-s0.5"]
    assert space[1].arch == "resnet8" and space[1].arch_kwargs["width"] == 0.25 and space[1].arch_kwargs["blocks"] == 1
    assert space[1].sparsity == 0.5
    inner = candidate_space("inner=0.25,0.5;depth=1", teacher)  # the default kind: the teacher's interfaces kept
    assert [c.name for c in inner] == ["i0.25-d1", "i0.5-d1"]
    assert inner[1].arch_kwargs == {**teacher.config.arch_kwargs, "inner": 0.5, "blocks": 1}
    for bad in ("colour=1", "width=a", "width=0", "sparsity=1", "width", "inner=0"):
        with pytest.raises(SynthkdError):
            candidate_space(bad, teacher)


def test_candidate_factory(teacher, tmp_path):
    factory = tmp_path / "space.py"
    factory.write_text(textwrap.dedent("""
        from synthkd.search import Candidate

        def candidates(teacher):
            kwargs = dict(teacher.config.arch_kwargs)
            return [Candidate("narrow", "resnet8", {**kwargs, "width": 0.125}),
                    {"name": "pruned", "arch": "resnet8", "arch_kwargs": kwargs, "sparsity": 0.75}]
    """))
    space = candidate_space(f"{factory}:candidates", teacher)
    # a pruned candidate brings its dense network along
    assert [(c.name, c.sparsity) for c in space] == [("narrow", 0.0), ("pruned", 0.75), ("pruned-dense", 0.0)]
    assert space[2].network == space[1].network


def test_fewer_blocks_need_stage_cuts(teacher, synthetic_dir, tmp_path, accelerator):
    deeper = Classifier.from_config(ModelConfig(  # two blocks per stage; only the classes and input format matter
        arch="resnet14", arch_kwargs={"width": 0.25, "in_channels": 1, "num_classes": 10},
        input=teacher.input_format, class_names=list(teacher.config.class_names)))
    with pytest.raises(SynthkdError, match=r"candidate 'w1-d1'.*layer1.1.*stage-level cuts"):
        explore(deeper, synthetic_dir, settings(tmp_path, candidates="width=1;depth=1", cuts="blocks"), accelerator=accelerator)


# --- a search end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One candidate cache for the searches of this module: the first one trains, later ones reuse."""
    return tmp_path_factory.mktemp("search-cache")


def chained(exploration, choice, x):
    """The chosen neighbourhoods run one after another, each with its own adapters, as trained."""
    for k, i in enumerate(choice):
        x = exploration.neighbourhood(k, i).eval()(x)
    return x


def test_search_end_to_end(teacher, synthetic_dir, cache_dir, tmp_path, accelerator):
    out = tmp_path / "student"
    student, report = search(teacher, synthetic_dir, out, settings(cache_dir, budget="params=0.5"), eval_dataset="digits:test",
                             accelerator=accelerator)
    assert report["trained"] == 5 * 6 and report["cached"] == 0  # 3 widths, each also pruned; 5 neighbourhoods
    assert [row["neighbourhood"] for row in report["chosen"]] == ["stem", "layer1", "layer2", "layer3", "head"]
    teacher_params = count_parameters(teacher.net)
    assert report["teacher_costs"]["params"] == teacher_params and report["limit"] == pytest.approx(0.5 * teacher_params)
    assert report["chosen_costs"]["params"] <= report["limit"]
    # The least error under the budget: no uniform student that fits does better.
    for uniform in report["uniform"].values():
        if uniform["costs"]["params"] <= report["limit"]:
            assert report["chosen_error"] <= uniform["error"] + 1e-9
    assert report["frontier"][0]["cost"] <= report["chosen_costs"]["params"] <= report["frontier"][-1]["cost"]
    for name in ("model.safetensors", "config.json", "metrics.json", "report.json", "frontier.png"):
        assert (out / name).is_file(), name
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["chosen"] == report["chosen"]
    assert 0 <= report["student"]["accuracy"] <= 1 and report["student"] == report["merged"]  # no fine-tune

    # The saved student loads like any model, and its counted costs are the ones selected.
    loaded = Classifier.from_pretrained(out).eval()
    assert loaded.config.arch == "neighbourhood-chain"
    fmt = teacher.input_format
    probe = fmt.normalize(torch.rand(1, *fmt.shape, generator=torch.Generator().manual_seed(0)))
    assert count_parameters(loaded.net) == report["chosen_costs"]["params"]
    assert count_flops(loaded.net, probe) == report["chosen_costs"]["flops"]

    # Merging (fusing each cut's adapter pair) changes nothing: the student equals the chain of
    # the trained neighbourhoods with their own adapters.
    exploration = explore(teacher, synthetic_dir, settings(cache_dir), accelerator=accelerator)
    images = torch.rand(8, *fmt.shape)
    for choice in [tuple(rng.randrange(len(o)) for o in exploration.options) for rng in [random.Random(s) for s in range(4)]]:
        with torch.no_grad():
            assert torch.allclose(exploration.assemble(choice).eval()(images), chained(exploration, choice, fmt.normalize(images)),
                                  atol=1e-4)

    # Pruned pieces keep at least half of every convolution and linear weight at zero after the
    # re-distillation; the parameter cost leaves those out.
    pruned = [o for options in exploration.options for o in options if o.candidate.sparsity]
    assert len(pruned) == 15
    for option in pruned:
        weights = [t for n, t in option.state.items() if n.startswith("piece.") and n.endswith("weight") and t.ndim in (2, 4)]
        assert weights and all((w == 0).sum() >= w.numel() // 2 for w in weights)
        dense = next(o for o in exploration.options[option.neighbourhood] if o.candidates == [option.candidate.name.rsplit("-s", 1)[0]])
        assert option.costs["params"] < dense.costs["params"] and option.costs["flops"] == dense.costs["flops"]

    # The bound checked before training: exactly the trained pieces' costs, less the adapters.
    for kind in ("params", "flops"):
        least, teacher_cost = exploration.cost_lower_bound(kind)
        assert teacher_cost == exploration.teacher_costs[kind]
        assert least == sum(min(o.costs[kind] for o in options) for options in exploration.options)
        assert least <= min(s.cost for s in exploration.frontier(kind))


def test_pruned_weights_stay_zero_through_the_finetune(teacher, synthetic_dir, cache_dir, tmp_path, accelerator):
    # Only the teacher's width, dense or pruned: 60% of the teacher's parameters needs pruned pieces.
    out = tmp_path / "student"
    _, report = search(teacher, synthetic_dir, out, settings(cache_dir, budget="params=0.6", candidates="width=1;sparsity=0.5",
                                                            finetune_epochs=1, finetune_lr=0.01), accelerator=accelerator)
    sparse = [k for k, row in enumerate(report["chosen"]) if row["candidate"] == "w1-s0.5"]
    assert sparse
    loaded = Classifier.from_pretrained(out)
    assert count_parameters(loaded.net) == report["chosen_costs"]["params"] <= report["limit"]
    for k in sparse:
        for layer in loaded.net.pieces[k].modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                assert (layer.weight == 0).sum() >= layer.weight.numel() // 2


def test_second_search_trains_nothing(teacher, synthetic_dir, cache_dir, tmp_path, accelerator):
    """Another budget (and kind) over the same space: every piece comes from the cache."""
    first = explore(teacher, synthetic_dir, settings(cache_dir), accelerator=accelerator)
    _, report = search(teacher, synthetic_dir, tmp_path / "again", settings(cache_dir, budget="flops=0.3"), accelerator=accelerator)
    assert report["trained"] == 0 and report["cached"] == 30
    assert report["chosen_costs"]["flops"] <= report["limit"]
    for options, again in zip(first.options, report["options"].values()):
        assert [o.relative_mse for o in options] == [o["relative_mse"] for o in again]
    # Other training settings are other cache entries.
    _, report = search(teacher, synthetic_dir, tmp_path / "other", settings(cache_dir, candidates="width=0.5", lr=0.005),
                       accelerator=accelerator)
    assert report["trained"] == 5 and report["cached"] == 0


def test_corrupt_cache_entry_is_retrained(teacher, synthetic_dir, tmp_path, accelerator, capfd):
    cache = tmp_path / "cache"
    config = settings(cache, candidates="width=0.5")
    explore(teacher, synthetic_dir, config, accelerator=accelerator)
    (entry,) = cache.iterdir()
    (entry / "neighbourhoods" / "02.safetensors").write_bytes(b"\x00garbage")
    capfd.readouterr()
    exploration = explore(teacher, synthetic_dir, config, accelerator=accelerator)
    assert [o.resumed for options in exploration.options for o in options] == [True, True, False, True, True]
    stderr = capfd.readouterr().err
    assert "'layer2'" in stderr and "corrupt" in stderr and "training it again" in stderr
    load_file(str(entry / "neighbourhoods" / "02.safetensors"))  # rewritten whole


def test_infeasible_and_unknown_budgets(teacher_dir, synthetic_dir, tmp_path):
    def run(budget):
        return CliRunner().invoke(main, ["search", "--teacher", str(teacher_dir), "--data", str(synthetic_dir), "--budget", budget,
                                         "--candidates", SPACE, "--epochs", "1", "--batch-size", "16", "--cache-dir",
                                         str(tmp_path / "cache"), "--out", str(tmp_path / "s")])

    result = run("params=100")
    assert result.exit_code == 2, result.output
    assert "no student fits the budget of 100 parameters: the cheapest piece of every neighbourhood" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "s").exists()
    assert not (tmp_path / "cache").exists()  # refused before any piece was distilled
    result = run("watts=3")
    assert result.exit_code == 2 and result.stderr.strip().startswith("error: --budget unknown budget kind 'watts'")


def test_cli_search(teacher_dir, synthetic_dir, cache_dir, tmp_path):
    out = tmp_path / "student"
    result = CliRunner().invoke(main, [
        "search", "--teacher", str(teacher_dir), "--data", str(synthetic_dir), "--budget", "latency=50ms",
        "--candidates", SPACE, "--epochs", "1", "--batch-size", "16", "--finetune-epochs", "1",
        "--eval-dataset", "digits:test", "--cache-dir", str(cache_dir), "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "from the cache" in result.stdout and "student" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "latency" and report["chosen_costs"]["latency"] <= report["limit"]
    assert len(json.loads((out / "metrics.json").read_text())["finetune_history"]) == 1
    loaded = Classifier.from_pretrained(out)
    assert evaluate(loaded, load_dataset("digits:test"), make_accelerator())["accuracy"] == pytest.approx(report["student"]["accuracy"])


# --- processes -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks on one GPU: NCCL refuses a shared device")
def test_search_under_two_processes(teacher_dir, synthetic_dir, tmp_path):
    """The candidate pieces are spread over both ranks, and the student is the one a single process finds."""
    def args(out: Path) -> list[str]:
        return ["search", "--teacher", str(teacher_dir), "--data", str(synthetic_dir), "--budget", "params=0.5",
                "--candidates", SPACE, "--epochs", "1", "--batch-size", "16", "--cache-dir", str(out / "cache"),
                "--out", str(out / "student")]

    launch = [*launcher(), "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(free_port())]
    two = subprocess.run([*launch, "-m", "synthkd", *args(tmp_path / "two")], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-4000:]
    assert two.stdout.count("pieces trained") == 1  # only the main process reports
    one = subprocess.run([sys.executable, "-m", "synthkd", *args(tmp_path / "one")], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    reports = {n: json.loads((tmp_path / n / "student" / "report.json").read_text()) for n in ("one", "two")}
    assert reports["two"]["num_processes"] == 2 and reports["two"]["trained"] == 30
    ranks = {o["rank"] for options in reports["two"]["options"].values() for o in options}
    assert ranks == {0, 1}
    assert [r["candidate"] for r in reports["two"]["chosen"]] == [r["candidate"] for r in reports["one"]["chosen"]]
    reference = load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    state = load_file(str(tmp_path / "two" / "student" / "model.safetensors"))
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.allclose(state[name], tensor, atol=1e-5), name
