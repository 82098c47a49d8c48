"""Loss terms: KD, total variation, image l2, Jensen-Shannon and the BatchNorm-statistics loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synthkd.errors import SynthkdError
from synthkd.losses import DISTILLATION_LOSSES, BatchNormStatisticsLoss, image_l2, jensen_shannon, kd_loss, total_variation


def test_kd_loss_zero_for_identical_logits_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(8, 10)
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, logits + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    other = torch.randn(8, 10)
    assert kd_loss(logits, other).item() > 0.01


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_is_t_squared_kl(temperature):
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    p = F.softmax(teacher / temperature, 1)
    q = F.softmax(student / temperature, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert kd_loss(student, teacher, temperature).item() == pytest.approx(temperature**2 * kl.item(), rel=1e-5)


def test_kd_loss_gradient_moves_student_towards_teacher():
    torch.manual_seed(2)
    teacher = torch.randn(4, 5)
    student = torch.zeros(4, 5, requires_grad=True)
    optimizer = torch.optim.SGD([student], lr=1.0)
    start = kd_loss(student, teacher).item()
    for _ in range(50):
        optimizer.zero_grad()
        kd_loss(student, teacher).backward()
        optimizer.step()
    assert kd_loss(student, teacher).item() < 0.05 * start
    assert torch.equal(student.argmax(1), teacher.argmax(1))


def test_distillation_losses_by_name():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    for name in DISTILLATION_LOSSES.names():
        loss = DISTILLATION_LOSSES.get(name)
        assert loss(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-6)  # nothing to learn from itself
        assert loss(student, teacher, 4.0).item() > 0
    assert {"kd", "mse"} <= set(DISTILLATION_LOSSES.names())
    with pytest.raises(SynthkdError, match="kd"):
        DISTILLATION_LOSSES.get("hinge")


def test_total_variation():
    assert total_variation(torch.full((2, 3, 5, 5), 0.7)).item() == 0.0
    assert total_variation(torch.full((2, 3, 5, 5), 0.7), p=1).item() == 0.0
    # vertical stripes 0,1,0,1: every horizontal neighbour differs by 1, no vertical one
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., 1::2] = 1.0
    assert total_variation(stripes).item() == pytest.approx(1.0)
    assert total_variation(stripes, p=1).item() == pytest.approx(1.0)
    assert total_variation(stripes * 0.5).item() == pytest.approx(0.25)
    assert total_variation(stripes * 0.5, p=1).item() == pytest.approx(0.5)
    smooth = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    noisy = torch.rand(1, 1, 16, 16)
    assert total_variation(smooth) < total_variation(noisy)


def test_image_l2():
    assert image_l2(torch.full((3, 1, 4, 4), 0.5)).item() == 0.0
    assert image_l2(torch.ones(3, 2, 4, 4)).item() == pytest.approx(0.25)
    assert image_l2(torch.zeros(3, 2, 4, 4)).item() == pytest.approx(0.25)


def test_jensen_shannon():
    torch.manual_seed(3)
    a, b = torch.randn(6, 10), torch.randn(6, 10)
    assert jensen_shannon(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert jensen_shannon(a, b).item() == pytest.approx(jensen_shannon(b, a).item(), rel=1e-5)
    assert jensen_shannon(a, b).item() > 0
    # Bounded by log 2, reached by confident predictions of different classes.
    sure_a = torch.tensor([[50.0, 0.0]])
    sure_b = torch.tensor([[0.0, 50.0]])
    assert jensen_shannon(sure_a, sure_b).item() == pytest.approx(math.log(2), rel=1e-3)
    assert jensen_shannon(a, b).item() < math.log(2)


def _bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def _bn_loss(net: nn.Module, x: torch.Tensor, first_layer_weight: float = 10.0) -> float:
    statistics = BatchNormStatisticsLoss(net, first_layer_weight=first_layer_weight, distributed=False)
    with torch.no_grad():
        net(x)
    loss = statistics.loss().item()
    statistics.remove()
    return loss


def _matched_bn(x: torch.Tensor) -> nn.Module:
    """One BatchNorm whose running statistics are those of ``x`` (biased variance)."""
    bn = nn.BatchNorm2d(x.shape[1]).eval()
    with torch.no_grad():
        bn.running_mean.copy_(x.mean((0, 2, 3)))
        bn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    return bn


def test_bn_loss_is_zero_on_the_running_statistics_and_grows_with_a_shift_of_the_mean():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 6, 6)
    bn = _matched_bn(x)
    assert _bn_loss(bn, x) == pytest.approx(0.0, abs=1e-4)
    losses = [_bn_loss(bn, x + shift) for shift in (0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in zip(losses, losses[1:])), losses
    assert _bn_loss(bn, x - 0.4) == pytest.approx(losses[2], rel=1e-4)  # either direction alike


def test_bn_loss_grows_with_a_change_of_the_variance():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 6, 6)
    bn = _matched_bn(x)
    mean = x.mean((0, 2, 3), keepdim=True)
    losses = [_bn_loss(bn, mean + scale * (x - mean)) for scale in (1.0, 1.5, 2.0, 3.0)]
    assert losses[0] == pytest.approx(0.0, abs=1e-4)
    assert all(a < b for a, b in zip(losses, losses[1:])), losses
    assert _bn_loss(bn, mean + 0.5 * (x - mean)) > 0.0  # a narrower batch is off too


def test_bn_loss_scales_with_the_first_layer_weight():
    net = _bn_net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.rand(4, 3, 6, 6)
    one, two, three = (_bn_loss(net, x, weight) for weight in (1.0, 2.0, 3.0))
    # Only the first layer's term is weighted: the loss is affine in the weight, and positive.
    assert one > 0 and two > one
    assert three - two == pytest.approx(two - one, rel=1e-4)
    alone = _bn_loss(net[1], net[0](x), 1.0)  # the first BatchNorm on its own: its term at weight 1
    assert two - one == pytest.approx(alone, rel=1e-4)


def test_bn_loss_near_zero_when_running_stats_are_the_batch_stats():
    net = _bn_net()
    x = 2.0 + 3.0 * torch.rand(16, 3, 8, 8)
    statistics = BatchNormStatisticsLoss(net, distributed=False)
    net.eval()
    net(x)
    unmatched = statistics.loss().item()
    assert unmatched > 1.0

    # By hand: each layer's running stats := the (biased) statistics of the input it gets in
    # eval mode, set layer by layer since each depends on the ones before.
    with torch.no_grad():
        h = x
        for module in net:
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(h.mean((0, 2, 3)))
                module.running_var.copy_(h.var((0, 2, 3), unbiased=False))
            h = module(h)
    net(x)
    assert statistics.loss().item() < 1e-4

    # The same through BatchNorm itself: one train-mode pass with a cumulative average.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()
    net(x)
    matched = statistics.loss().item()
    statistics.remove()
    # Not exactly 0: BatchNorm keeps the unbiased variance (a factor n/(n-1), n = 16*8*8), and
    # the first layer's term is weighted 10.
    assert matched < 0.05
    assert matched < 1e-3 * unmatched


def test_bn_loss_decreases_when_optimising_the_input():
    net = _bn_net()
    net.train()
    with torch.no_grad():  # running statistics of a "real" data distribution
        for _ in range(20):
            net(0.2 + 0.5 * torch.rand(32, 3, 8, 8) ** 2)
    net.eval().requires_grad_(False)
    torch.manual_seed(1)
    x = torch.rand(16, 3, 8, 8, requires_grad=True)
    statistics = BatchNormStatisticsLoss(net, distributed=False)
    optimizer = torch.optim.Adam([x], lr=0.05)
    losses = []
    for _ in range(30):
        net(x)
        loss = statistics.loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    statistics.remove()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert losses[-1] < 0.5 * losses[0], losses


def test_bn_loss_needs_batchnorm():
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        BatchNormStatisticsLoss(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_bn_loss_needs_a_forward_pass_and_hooks_are_removed():
    net = _bn_net().eval()
    statistics = BatchNormStatisticsLoss(net, distributed=False)
    assert not statistics.distributed  # torch.distributed is not initialised in the tests
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(len(m._forward_pre_hooks) == 1 for m in bns)
    with pytest.raises(RuntimeError, match="forward pass"):
        statistics.loss()
    net(torch.rand(2, 3, 4, 4))
    assert statistics.loss().item() > 0
    with pytest.raises(RuntimeError, match="forward pass"):
        statistics.loss()  # each forward pass gives one loss
    statistics.remove()
    assert all(len(m._forward_pre_hooks) == 0 for m in bns)
    net(torch.rand(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="forward pass"):
        statistics.loss()  # nothing was recorded after remove()
