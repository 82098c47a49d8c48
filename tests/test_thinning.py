"""Interface-keeping students: the inner channel groups torch.fx finds, thinning that keeps every
cut's activation shape, the teacher's most important channels copied in, a thinned user network
saved and loaded through the ``thinned`` architecture, and networks with nothing to thin."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from conftest import randomise_norms
from synthkd.errors import SynthkdError
from synthkd.models import Classifier, InputFormat, ModelConfig, create_model, import_factory, trusting_code
from synthkd.models.neighbourhoods import activation_shapes, resolve_cuts, split_network
from synthkd.models.resnet import BasicBlock
from synthkd.models.thinning import (
    THINNED_ARCH, check_interfaces, copy_from_teacher, inner_groups, rebuild, thin, thinned_arch_kwargs,
)

NETWORKS = {  # arch: (width, input shape)
    "resnet8": (0.5, (1, 8, 8)),
    "resnet20": (0.25, (3, 16, 16)),
    "resnet18": (0.125, (3, 16, 16)),
}


def teacher(arch: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    width, (channels, _, _) = NETWORKS[arch]
    return randomise_norms(create_model(arch, width=width, in_channels=channels, **kwargs))


def probe(arch: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *NETWORKS[arch][1], generator=torch.Generator().manual_seed(1))


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(t.shape) for key, t in net.state_dict().items()}


# --- zoo ResNets -------------------------------------------------------------------------------

@pytest.mark.parametrize("cuts", ["blocks", "stages"])
@pytest.mark.parametrize("arch", list(NETWORKS))
def test_resnet_has_one_inner_group_per_basic_block(arch, cuts):
    net = teacher(arch)
    blocks = [path for path, module in net.named_modules() if isinstance(module, BasicBlock)]
    groups = inner_groups(net, cuts)
    assert [(g.producer, g.norms, g.consumer) for g in groups] == [
        (f"{b}.conv1", (f"{b}.bn1",), f"{b}.conv2") for b in blocks
    ]
    names = resolve_cuts(net, cuts) + ["head"]
    for group in groups:  # the neighbourhood is the block's own (blocks) or its stage's (stages)
        assert group.producer.startswith(names[group.neighbourhood] + ".")
        assert group.channels == net.get_submodule(group.producer).out_channels


@pytest.mark.parametrize("cuts", ["blocks", "stages"])
@pytest.mark.parametrize("arch", list(NETWORKS))
def test_thin_keeps_every_cut_shape_and_drops_parameters(arch, cuts):
    net = teacher(arch).train()  # the shape check must not move its batch-norm statistics
    student, kept = thin(net, 0.5, cuts, probe=probe(arch))
    assert net.training and student.training
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), teacher(arch).state_dict().values()))
    net.eval()
    student.eval()
    cut_paths = resolve_cuts(net, cuts)
    assert activation_shapes(split_network(student, cut_paths), probe(arch)) == \
        activation_shapes(split_network(net, cut_paths), probe(arch))
    assert parameter_count(student) < parameter_count(net)
    assert set(kept) == {g.producer for g in inner_groups(net, cuts)}
    # the same shapes as the zoo's own thinner blocks
    assert shapes(student) == shapes(create_model(arch, width=NETWORKS[arch][0], in_channels=NETWORKS[arch][1][0], inner=0.5))


@pytest.mark.parametrize("arch", list(NETWORKS))
def test_thin_at_ratio_one_is_the_teacher(arch):
    net = teacher(arch)
    student, kept = thin(net, 1.0, "blocks", probe=probe(arch))
    assert student is not net
    assert all(count == net.get_submodule(path).out_channels for path, count in kept.items())
    with torch.no_grad():
        assert torch.equal(student.eval()(probe(arch, 4)), net(probe(arch, 4)))


def test_copy_from_teacher_keeps_the_strongest_inner_channels():
    net = teacher("resnet20")
    student = copy_from_teacher(create_model("resnet20", width=0.25, inner=0.5), net, "blocks")
    teacher_state, student_state = net.state_dict(), student.state_dict()
    inner = set()
    for path, block in net.named_modules():
        if not isinstance(block, BasicBlock):
            continue
        score = block.conv1.weight.abs().sum((1, 2, 3)) * block.bn1.weight.abs()
        keep = score.topk(block.conv1.out_channels // 2).indices.sort().values
        expected = {
            f"{path}.conv1.weight": block.conv1.weight[keep],
            f"{path}.conv2.weight": block.conv2.weight[:, keep],
            **{f"{path}.bn1.{name}": getattr(block.bn1, name)[keep]
               for name in ("weight", "bias", "running_mean", "running_var")},
        }
        for key, tensor in expected.items():
            assert torch.equal(student_state[key], tensor), key
        inner.update(expected)
    assert len(inner) == 9 * 6
    for key, tensor in teacher_state.items():
        if key not in inner:
            assert torch.equal(student_state[key], tensor), key
    thinned, _ = thin(net, 0.5, "blocks", probe=probe("resnet20"))
    assert all(torch.equal(student_state[k], v) for k, v in thinned.state_dict().items())


def test_thinned_zoo_architecture_rebuilds_the_student():
    net = teacher("resnet18")
    student, kept = thin(net, 0.25, "stages", probe=probe("resnet18"))
    kwargs = thinned_arch_kwargs("resnet18", {"width": 0.125}, kept)
    rebuilt = create_model(THINNED_ARCH, **kwargs).eval()
    rebuilt.load_state_dict(student.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(probe("resnet18")), student.eval()(probe("resnet18")))


def test_copy_from_teacher_names_a_mismatch_outside_the_inner_groups():
    with pytest.raises(SynthkdError, match=r"stem\.0\.weight: teacher \(4, 3, 3, 3\), student \(2, 3, 3, 3\)"):
        copy_from_teacher(create_model("resnet20", width=0.125), teacher("resnet20"), "blocks")


def test_check_interfaces_names_the_cut_and_both_shapes():
    narrower = create_model("resnet8", width=0.25, in_channels=1)
    with pytest.raises(SynthkdError, match=r"cut 'stem' has shape \(4, 8, 8\), the teacher's \(8, 8, 8\)"):
        check_interfaces(teacher("resnet8"), narrower, "blocks", probe("resnet8"))


def test_fresh_weights_thin_only_the_groups():
    net = teacher("resnet8")
    student, kept = thin(net, 0.5, "blocks", probe=probe("resnet8"), teacher_weights=False)
    pruned, _ = thin(net, 0.5, "blocks", probe=probe("resnet8"))
    assert shapes(student) == shapes(pruned)
    thinned = {g.producer.rpartition(".")[0] + f".{m}" for g in inner_groups(net) for m in ("conv1", "bn1", "conv2")}
    for key, tensor in student.state_dict().items():
        if key.rpartition(".")[0] not in thinned:
            assert torch.equal(tensor, net.state_dict()[key]), key
    assert not torch.equal(student.layer1[0].conv1.weight, pruned.layer1[0].conv1.weight)


def test_bad_ratio_and_unknown_producer_are_errors():
    with pytest.raises(SynthkdError, match="ratio"):
        thin(teacher("resnet8"), 0.0, "blocks", probe=probe("resnet8"))
    with pytest.raises(SynthkdError, match=r"cannot thin layer1\.0\.conv2 .*thinnable producers: layer1\.0\.conv1"):
        rebuild(teacher("resnet8"), {"layer1.0.conv2": 2})


# --- a known answer and networks with nothing to thin ------------------------------------------

class Toy(nn.Module):
    """Batch-norm free: a block of two convolutions and a linear head, cut after the block."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))

    def forward(self, x):
        return self.head(self.block(x))


def test_dropping_dead_channels_leaves_the_output_unchanged():
    torch.manual_seed(0)
    net = Toy()
    with torch.no_grad():  # channels 1 and 3 are dead: zero filters and zero bias
        net.block[0].weight[[1, 3]] = 0
        net.block[0].bias[[1, 3]] = 0
    x = torch.randn(3, 2, 4, 4)
    student, kept = thin(net, 0.5, ["block"], probe=x)
    assert kept == {"block.0": 2}
    assert torch.equal(student.block[0].weight, net.block[0].weight[[0, 2]])
    assert torch.equal(student.block[2].weight, net.block[2].weight[:, [0, 2]])
    with torch.no_grad():
        assert torch.allclose(student(x), net(x), atol=1e-6, rtol=0)
        # the first two channels instead (one of them alive) would have changed it
        naive = rebuild(Toy(), {"block.0": 2})
        naive.load_state_dict({k: v[:2] if k.startswith("block.0") else v[:, :2] if k == "block.2.weight" else v
                               for k, v in net.state_dict().items()})
        assert not torch.allclose(naive(x), net(x), atol=1e-3)


class Chain(nn.Module):
    """conv -> bn -> functional relu -> conv: one group (the control for the cases below)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.nn.functional.relu(self.bn(self.conv1(x))))


class AddAfterProducer(Chain):
    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x) + x)))


class Branch(Chain):
    def forward(self, x):
        hidden = torch.relu(self.bn(self.conv1(x)))
        return self.conv2(hidden) + hidden


class Concat(Chain):
    def forward(self, x):
        return self.conv2(torch.cat([self.bn(self.conv1(x)), x], 1)[:, :4])


class SharedNorm(Chain):
    def forward(self, x):
        return self.conv2(self.bn(self.conv1(self.bn(x))))


def test_a_plain_chain_is_one_group():
    assert [(g.producer, g.norms, g.consumer, g.channels) for g in inner_groups(Chain())] == [("conv1", ("bn",), "conv2", 4)]


@pytest.mark.parametrize("cut, groups", [
    ("0", []),  # the producer's output is a cut activation
    ("1", []),  # so is its normalised output
    ("3", [("0", "3")]),  # the consumer may end a neighbourhood: its output keeps its shape
    ("4", [("0", "3")]),
])
def test_a_group_never_crosses_a_cut(cut, groups):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    assert [(g.producer, g.consumer) for g in inner_groups(net, [cut])] == groups


@pytest.mark.parametrize("cls", [AddAfterProducer, Branch, Concat, SharedNorm])
def test_a_piece_that_cannot_be_thinned_has_no_group(cls):
    assert inner_groups(cls()) == []


# --- a user network from FILE.py:factory, saved and loaded ---------------------------------------

USER_CNN = textwrap.dedent('''
    from torch import nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                             nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def make(num_classes=10):
        return nn.Sequential(block(1, 8), nn.MaxPool2d(2), block(8, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, num_classes))
''')


def test_user_cnn_thins_saves_and_loads(tmp_path):
    path = tmp_path / "cnn.py"
    path.write_text(USER_CNN)
    arch = f"{path}:make"
    torch.manual_seed(0)
    net = randomise_norms(import_factory(arch)(num_classes=5))
    assert [(g.producer, g.consumer) for g in inner_groups(net, "blocks")] == [("0.0", "0.3"), ("2.0", "2.3")]
    cuts = ["0", "2"]  # the head (pool, MLP) is one neighbourhood: its hidden layer is thinnable too
    assert [(g.producer, g.norms, g.consumer, g.neighbourhood) for g in inner_groups(net, cuts)] == [
        ("0.0", ("0.1",), "0.3", 0), ("2.0", ("2.1",), "2.3", 1), ("5", (), "8", 2),
    ]
    x = torch.rand(4, 1, 8, 8)
    student, kept = thin(net, 0.5, cuts, probe=x)
    assert kept == {"0.0": 4, "2.0": 8, "5": 16}
    assert parameter_count(student) < parameter_count(net)
    config = ModelConfig(arch=THINNED_ARCH, arch_kwargs=thinned_arch_kwargs(arch, {"num_classes": 5}, kept),
                         input=InputFormat(1, 8, 8), class_names=[str(i) for i in range(5)])
    Classifier(student, config).save_pretrained(tmp_path / "student")
    with trusting_code():  # the base is the user's own FILE.py: loading it runs code, so it needs their opt-in
        loaded = Classifier.from_pretrained(tmp_path / "student").eval()
    assert shapes(loaded.net) == shapes(student)
    with torch.no_grad():
        assert torch.equal(loaded(x), Classifier(student.eval(), config)(x))
