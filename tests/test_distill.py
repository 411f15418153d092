import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ensemble.distill import distillation_loss, soft_target_loss
from ensemble.teacher import Teacher


def test_soft_target_loss_hand_computed():
    z = torch.tensor([[1.0, 2.0, 0.0]])
    p = torch.tensor([[0.2, 0.5, 0.3]])
    T = 2.0
    e = [math.exp(v / T) for v in (1.0, 2.0, 0.0)]
    log_q = [math.log(v / sum(e)) for v in e]
    expected = T * T * sum(pi * (math.log(pi) - lq) for pi, lq in zip((0.2, 0.5, 0.3), log_q))
    assert soft_target_loss(z, p, T).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_loss_mixes_soft_and_hard():
    torch.manual_seed(0)
    z, p = torch.randn(4, 5), F.softmax(torch.randn(4, 5), 1)
    y = torch.tensor([0, 1, 2, 3])
    got = distillation_loss(z, p, y, temperature=3.0, alpha=0.7)
    want = 0.7 * soft_target_loss(z, p, 3.0) + 0.3 * F.cross_entropy(z, y)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert distillation_loss(z, p, y, 3.0, 0.0).item() == pytest.approx(
        F.cross_entropy(z, y).item(), rel=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.5, 20.0])
def test_gradient_is_T_times_q_minus_p(T):
    torch.manual_seed(1)
    z = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    p = F.softmax(torch.randn(6, 10, dtype=torch.float64) * 3, 1)
    soft_target_loss(z, p, T).backward()
    q = F.softmax(z.detach() / T, 1)
    # the loss is a batch mean, so each example's gradient is scaled by 1/B
    torch.testing.assert_close(z.grad * 6, T * (q - p))


def test_teacher_means_probabilities_or_logits():
    a, b = nn.Linear(3, 4), nn.Linear(3, 4)
    x = torch.randn(5, 3)
    T = 2.0
    with torch.no_grad():
        za, zb = a(x), b(x)
    probs = Teacher([a, b], "probs").probs(x, T)
    torch.testing.assert_close(probs, (F.softmax(za / T, 1) + F.softmax(zb / T, 1)) / 2)
    logits = Teacher([a, b], "logits").probs(x, T)
    torch.testing.assert_close(logits, F.softmax((za + zb) / 2 / T, 1))
    assert not any(p.requires_grad for p in a.parameters())  # frozen explicitly


def test_stacked_loss_is_each_members_own():
    torch.manual_seed(1)
    z, p = torch.randn(3, 8, 5), F.softmax(torch.randn(3, 8, 5), 2)
    y = torch.randint(0, 5, (3, 8))
    temperature, alpha = torch.tensor([1.0, 4.0, 20.0]), torch.tensor([0.9, 0.0, 0.5])
    stacked = distillation_loss(z, p, y, temperature, alpha)
    each = [distillation_loss(z[k], p[k], y[k], temperature[k].item(), alpha[k].item())
            for k in range(3)]
    torch.testing.assert_close(stacked, torch.stack(each))
