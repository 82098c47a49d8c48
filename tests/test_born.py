"""Students born from the teacher: the teacher pruned through its dependency graph (torch-pruning),
residual streams included. Width 1.0 is the teacher itself; the born network holds the teacher's
chosen filters; parameter and FLOPs budgets are kept; zoo, torchvision, timm and FILE.py teachers
are born, saved and reloaded (library sources without trust); the bad specs are one-line errors."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch
from torch import nn

from synthkd.errors import SynthkdError
from synthkd.models import Classifier, InputFormat, ModelConfig, create_model, import_factory, load_model, trusting_code
from synthkd.models.born import (born_like, format_probe, network_cost, prune, prune_to_budget, prune_to_width,
                                 recalibrate_batchnorm)
from synthkd.pipelines.distill import build_student, student_spec_problem

FORMAT = InputFormat(1, 12, 12)


def randomise_norms(net: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with random scales and statistics, so channel importance is not uniform and a
    wrongly copied channel shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.1)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return net.eval()


def zoo_teacher(arch: str = "resnet20", width: float = 0.5) -> Classifier:
    torch.manual_seed(0)
    kwargs = {"width": width, "in_channels": 1, "num_classes": 10}
    return Classifier(randomise_norms(create_model(arch, **kwargs)),
                      ModelConfig(arch, FORMAT, kwargs, [str(i) for i in range(10)])).eval()


def images(count: int = 32) -> torch.Tensor:
    return torch.rand(count, *FORMAT.shape, generator=torch.Generator().manual_seed(1))


def shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(t.shape) for key, t in net.state_dict().items()}


def test_born_at_width_one_computes_exactly_the_teachers_function():
    teacher = zoo_teacher()
    student = build_student("teacher:width=1.0", teacher, from_teacher=True).eval()
    assert student.config.arch == "pruned" and student.config.arch_kwargs["channels"] == {}
    with torch.no_grad():
        assert torch.equal(student(images()), teacher(images()))


def test_half_width_has_the_zoo_shapes_and_the_teachers_chosen_filters():
    teacher = zoo_teacher(width=1.0)
    teacher.requires_grad_(False)  # as distillation holds it
    born = prune_to_width(teacher.net, format_probe(FORMAT), 0.5)
    assert shapes(born.net) == shapes(create_model("resnet20", width=0.5, in_channels=1))
    stem = born.kept["stem.0"]["out"]
    assert len(stem) == 8 and stem == sorted(set(stem))
    assert torch.equal(born.net.stem[0].weight, teacher.net.stem[0].weight[stem])
    # the residual stream is one group: every layer on it keeps the stem's channels, on both sides
    assert born.kept["layer1.0.conv2"]["out"] == stem and born.kept["layer1.0.conv1"]["in"] == stem
    inner = born.kept["layer1.0.conv1"]["out"]
    assert torch.equal(born.net.layer1[0].conv1.weight, teacher.net.layer1[0].conv1.weight[inner][:, stem])
    # the zoo student of those shapes is born as exactly this network
    student = build_student("resnet20:width=0.5", teacher, from_teacher=True)
    assert all(torch.equal(student.net.state_dict()[k], v) for k, v in born.net.state_dict().items())
    fresh = build_student("resnet20:width=0.5", teacher, from_teacher=False)
    assert not torch.equal(fresh.net.stem[0].weight, born.net.stem[0].weight)


def test_the_filters_kept_are_the_most_important():
    teacher = zoo_teacher(width=1.0)
    with torch.no_grad():  # make filters 3 and 11 of the stem and the residual stream the weakest
        for module in teacher.net.modules():
            if isinstance(module, nn.Conv2d) and module.out_channels == 16 and module.in_channels in (1, 16):
                module.weight[[3, 11]] *= 1e-3
    kept = prune_to_width(teacher.net, format_probe(FORMAT), 0.875).kept["stem.0"]["out"]
    assert kept == [c for c in range(16) if c not in (3, 11)]


@pytest.mark.parametrize("importance", ["l1", "bn", "taylor"])
def test_every_importance_criterion_prunes_to_the_same_shapes(importance):
    teacher = zoo_teacher(width=1.0)
    inputs = FORMAT.normalize(images())
    born = prune_to_width(teacher.net, format_probe(FORMAT), 0.5, importance, inputs)
    assert shapes(born.net) == shapes(create_model("resnet20", width=0.5, in_channels=1))
    assert all(p.grad is None for p in born.net.parameters())
    assert all(p.grad is None for p in teacher.net.parameters())


def test_importance_criteria_pick_differently():
    teacher = zoo_teacher(width=1.0)
    probe = format_probe(FORMAT)
    picks = [prune_to_width(teacher.net, probe, 0.5, name, FORMAT.normalize(images())).kept["layer1.0.conv1"]["out"]
             for name in ("l1", "bn", "taylor")]
    assert len({tuple(p) for p in picks}) > 1


@pytest.mark.parametrize("kind, fraction", [("params", 0.25), ("flops", 0.3)])
def test_budgets_are_kept_by_the_widest_pruning(kind, fraction):
    teacher = zoo_teacher(width=1.0)
    probe = format_probe(FORMAT)
    full = network_cost(kind, teacher.net, probe)
    born = prune_to_budget(teacher.net, probe, kind, fraction)
    assert network_cost(kind, born.net, probe) <= fraction * full
    assert network_cost(kind, born.net, probe) > 0.85 * fraction * full  # the widest that fits, not any
    student = build_student(f"teacher:{kind}={fraction}", teacher, from_teacher=True)
    assert network_cost(kind, student.net, probe) <= fraction * full


def test_fewer_blocks_drop_whole_blocks_and_keep_the_first():
    teacher = zoo_teacher(width=1.0)
    student = build_student("resnet20:width=0.5,blocks=2", teacher, from_teacher=True)
    assert len(student.net.layer2) == 2
    born = born_like(create_model("resnet20", width=0.5, blocks=2, in_channels=1), teacher.net, format_probe(FORMAT))
    assert "layer1.2.conv1" not in born.kept
    assert all(torch.equal(student.net.state_dict()[k], v) for k, v in born.net.state_dict().items())


def test_recalibration_reestimates_batchnorm_statistics_only():
    teacher = zoo_teacher(width=1.0)
    student = build_student("teacher:width=0.5", teacher, from_teacher=True)
    before = {k: v.clone() for k, v in student.net.state_dict().items()}
    recalibrate_batchnorm(student, images())
    after = student.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert all(m.momentum == 0.1 for m in student.net.modules() if isinstance(m, nn.BatchNorm2d))
    recalibrated = build_student("teacher:width=0.5", teacher, from_teacher=True, images=images())
    plain = build_student("teacher:width=0.5,recalibrate=false", teacher, from_teacher=True, images=images())
    assert torch.equal(recalibrated.net.stem[1].running_mean, after["stem.1.running_mean"])
    assert torch.equal(plain.net.stem[1].running_mean, before["stem.1.running_mean"])


def test_random_init_keeps_the_shapes_with_fresh_weights():
    teacher = zoo_teacher(width=1.0)
    born = build_student("teacher:params=0.25", teacher, from_teacher=True)
    fresh = build_student("teacher:params=0.25", teacher, from_teacher=False)
    assert shapes(born.net) == shapes(fresh.net)
    assert not torch.equal(born.net.stem[0].weight, fresh.net.stem[0].weight)


USER_CNN = textwrap.dedent('''
    import torch
    from torch import nn


    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


    def make(num_classes=10):
        return nn.Sequential(block(3, 8), nn.MaxPool2d(2), block(8, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, num_classes))


    class Scale(nn.Module):
        """A per-channel factor held in a buffer: the dependency graph does not prune buffers."""

        def __init__(self, channels):
            super().__init__()
            self.register_buffer("factor", torch.ones(1, channels, 1, 1))

        def forward(self, x):
            return x * self.factor


    def scaled():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Scale(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 10))
''')

LIBRARY_TEACHERS = ["torchvision:resnet18?num_classes=10", "timm:resnet10t?num_classes=10"]


def teacher_of(spec: str, tmp_path) -> Classifier:
    torch.manual_seed(0)
    if spec.startswith(("torchvision:", "timm:")):
        return load_model(spec, input_shape=(3, 16, 16))
    if spec == "hf":  # a transformers ResNet saved locally
        from transformers import ResNetConfig, ResNetForImageClassification

        config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
        ResNetForImageClassification(config).save_pretrained(tmp_path / "hf")
        return load_model(f"hf:{tmp_path / 'hf'}", input_shape=(3, 16, 16))
    path = tmp_path / "cnn.py"
    path.write_text(USER_CNN)
    net = randomise_norms(import_factory(f"{path}:{spec}")())
    return Classifier(net, ModelConfig(f"{path}:{spec}", InputFormat(3, 16, 16), {}, [str(i) for i in range(10)]))


@pytest.mark.parametrize("spec", [*LIBRARY_TEACHERS, "hf", "make"])
def test_library_and_file_teachers_are_born_saved_and_reloaded(spec, tmp_path):
    teacher = teacher_of(spec, tmp_path)
    randomise_norms(teacher.net)
    student = build_student("teacher:width=0.5", teacher, from_teacher=True).eval()
    assert sum(p.numel() for p in student.parameters()) < 0.5 * sum(p.numel() for p in teacher.parameters())
    student.save_pretrained(tmp_path / "student")
    x = torch.rand(2, 3, 16, 16)
    if spec == "make":  # the user's own file: loading runs it, so it needs their trust
        with pytest.raises(SynthkdError, match="--trust-code"):
            Classifier.from_pretrained(tmp_path / "student")
        with trusting_code():
            loaded = Classifier.from_pretrained(tmp_path / "student")
    else:
        loaded = Classifier.from_pretrained(tmp_path / "student")
    assert shapes(loaded.net) == shapes(student.net)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), student(x))


def test_a_network_the_graph_cannot_follow_names_the_module(tmp_path):
    teacher = teacher_of("scaled", tmp_path)
    with pytest.raises(SynthkdError, match=r"after pruning, '1' \(Scale\) fails .*choose another student"):
        build_student("teacher:width=0.5", teacher, from_teacher=True)


@pytest.mark.parametrize("spec, message", [
    ("teacher:width=1.5", r"width is a fraction of the teacher's in \(0, 1\], got 1.5"),
    ("teacher:params=0", r"params is a fraction"),
    ("teacher:width=0.5,params=0.3", "give one size"),
    ("teacher:depth=2", "not depth"),
    ("teacher:width=0.5,importance=magic", "importance=magic is none of l1, bn, taylor"),
    ("resnet20:width=0.5,importance=magic", "importance=magic"),
    ("teacher:width=0.5,recalibrate=maybe", "recalibrate is true or false"),
])
def test_bad_specs_are_refused_before_any_model(spec, message):
    assert student_spec_problem(spec) is not None
    assert re.search(message, student_spec_problem(spec)), student_spec_problem(spec)


def test_an_unreachable_budget_says_the_least_reachable():
    with pytest.raises(SynthkdError, match=r"params=0.001 cannot be reached by pruning.*ask for at least params="):
        build_student("teacher:params=0.001", zoo_teacher(), from_teacher=True)


def test_taylor_without_images_says_where_it_works():
    with pytest.raises(SynthkdError, match="importance=taylor needs synthetic images"):
        prune(zoo_teacher().net, format_probe(FORMAT), lambda _p, c: c // 2, "taylor")


def test_the_api_distills_a_born_student_that_reloads(teacher_dir, synthetic_dir, tmp_path):
    import synthkd

    student, metrics = synthkd.distill(str(teacher_dir), synthetic_dir, tmp_path / "student", student="teacher:params=0.5",
                                       epochs=1, batch_size=16)
    teacher = Classifier.from_pretrained(teacher_dir)
    assert student.config.arch == "pruned"
    assert sum(p.numel() for p in student.parameters()) <= 0.5 * sum(p.numel() for p in teacher.parameters())
    loaded = Classifier.from_pretrained(tmp_path / "student").eval()  # a zoo base: no trust needed
    with torch.no_grad():
        assert torch.equal(loaded(images()), student.eval()(images()))


def test_a_run_config_takes_the_same_specs(tmp_path):
    from synthkd.pipelines.config import validate

    errors: list[str] = []
    base = {"out": str(tmp_path / "run"), "teacher": {"dataset": "digits:train"}}
    assert validate({**base, "student": {"arch": "teacher:flops=0.3,importance=taylor"}}, errors) and not errors
    assert validate({**base, "student": {"arch": "resnet20:width=0.5,importance=bn"}, "distill": {"mode": "neighbourhood"}},
                    errors) and not errors
    validate({**base, "student": {"arch": "teacher:width=2"}}, errors)
    assert len(errors) == 1 and "in (0, 1]" in errors[0]


def test_a_bare_parameter_is_pruned_and_rebuilt(tmp_path):
    path = tmp_path / "scaled.py"
    path.write_text(textwrap.dedent('''
        import torch
        from torch import nn


        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3, padding=1)
                self.scale = nn.Parameter(torch.rand(1, 8, 1, 1))
                self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

            def forward(self, x):
                return self.head(self.conv(x) * self.scale)
    '''))
    arch = f"{path}:Net"
    net = import_factory(arch)().eval()
    teacher = Classifier(net, ModelConfig(arch, InputFormat(3, 8, 8), {}, [str(i) for i in range(10)]))
    student = build_student("teacher:width=0.5", teacher, from_teacher=True).eval()
    assert student.config.arch_kwargs["channels"] == {"conv": {"out": 4}, "scale": {"out": 4}, "head.2": {"in": 4}}
    student.save_pretrained(tmp_path / "student")
    with trusting_code():
        loaded = Classifier.from_pretrained(tmp_path / "student").eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))
