"""Knowledge-distillation losses against explicit formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.compress import FeatureDistillation, freeze_teacher, kd_loss, transfer_kd_loss


def reference(student, teacher, labels, temperature, alpha):
    """alpha T^2 mean_i sum_c p_t (log p_t - log p_s) + (1 - alpha) mean_i -log softmax(s)_y, on kept rows."""
    log_ps = torch.log_softmax(student / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    ce = -torch.log_softmax(student, dim=-1).gather(-1, labels[:, None]).mean()
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def test_classifier_matches_hand_computation():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    teacher = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([2, 0])
    loss = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.7)
    assert loss.item() == pytest.approx(reference(student, teacher, labels, 2.0, 0.7).item(), rel=1e-6)

    # fully by hand for row 0 alone, with python floats
    def softmax(xs):
        z = sum(math.exp(x) for x in xs)
        return [math.exp(x) / z for x in xs]

    ps, pt = softmax([0.5, 1.0, 1.5]), softmax([1.5, 0.5, 0.0])
    kl = sum(t * (math.log(t) - math.log(s)) for t, s in zip(pt, ps))
    ce = -math.log(softmax([1.0, 2.0, 3.0])[2])
    expected = 0.7 * 4.0 * kl + 0.3 * ce
    assert kd_loss(student[:1], teacher[:1], labels[:1], 2.0, 0.7).item() == pytest.approx(expected, rel=1e-6)


def test_token_level_with_ignore_index():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 4], [-100, 0, 2]])
    keep = labels.reshape(-1) != -100
    expected = reference(student.reshape(-1, 5)[keep], teacher.reshape(-1, 5)[keep], labels.reshape(-1)[keep], 3.0, 0.4)
    loss = kd_loss(student, teacher, labels, temperature=3.0, alpha=0.4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    noisy = student.clone()
    noisy[0, 1] += 100.0  # an ignored position must not matter
    assert kd_loss(noisy, teacher, labels, 3.0, 0.4).item() == pytest.approx(loss.item(), rel=1e-6)


def test_alpha_zero_is_cross_entropy_and_alpha_one_ignores_labels():
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    labels = torch.tensor([0, 5, 2, -100])
    assert kd_loss(student, teacher, labels, 2.0, 0.0).item() == pytest.approx(
        F.cross_entropy(student, labels).item(), rel=1e-6
    )
    assert kd_loss(student, teacher, None, 2.0, 1.0).item() == pytest.approx(
        kd_loss(student, teacher, torch.tensor([1, 1, 1, 1]), 2.0, 1.0).item(), rel=1e-6
    )
    kd_loss(student, teacher, labels, 2.0, 0.5).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_all_positions_ignored_gives_finite_zero():
    loss = kd_loss(torch.randn(2, 3, requires_grad=True), torch.randn(2, 3), torch.tensor([-100, -100]), 2.0, 0.5)
    assert loss.item() == 0.0 and loss.requires_grad


def test_mismatched_class_dims_raise_naming_both_sizes():
    with pytest.raises(ValueError, match=r"student has 5.*teacher has 6"):
        kd_loss(torch.randn(2, 5), torch.randn(2, 6), torch.tensor([0, 1]), 2.0, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([0, 1]), 2.0, 1.5)
    with pytest.raises(ValueError, match="labels=None"):
        kd_loss(torch.randn(2, 5), torch.randn(2, 5), None, 2.0, 0.5)


def test_feature_distillation_projects_when_widths_differ():
    torch.manual_seed(2)
    distill = FeatureDistillation(student_dim=4, teacher_dim=6)
    student, teacher = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 6)
    loss = distill(student, teacher)
    assert loss.item() == pytest.approx(F.mse_loss(distill.projection(student), teacher).item(), rel=1e-6)
    loss.backward()
    assert distill.projection.weight.grad.abs().sum() > 0 and student.grad.abs().sum() > 0

    same = FeatureDistillation(6, 6)
    assert isinstance(same.projection, nn.Identity) and not list(same.parameters())
    mask = torch.tensor([[True, True, False], [True, False, False]])
    hidden = torch.randn(2, 3, 6)
    expected = F.mse_loss(hidden[mask], teacher[mask])
    assert same(hidden, teacher, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_freeze_teacher():
    teacher = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train()
    assert freeze_teacher(teacher) is teacher
    assert not teacher.training and not teacher[1].training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_transfer_set_loss_is_soft_on_the_transfer_batch_and_hard_on_the_labelled_one():
    """Hinton's transfer set: the KL term sees only the transfer logits, the cross-entropy only the labelled ones."""
    torch.manual_seed(0)
    transfer_student = torch.randn(5, 4, requires_grad=True)
    transfer_teacher = torch.randn(5, 4)
    labelled = torch.randn(3, 4, requires_grad=True)
    labels = torch.tensor([0, 3, 1])
    loss = transfer_kd_loss(transfer_student, transfer_teacher, labelled, labels, temperature=2.0, alpha=0.7)
    soft = kd_loss(transfer_student, transfer_teacher, None, 2.0, 1.0)
    expected = 0.7 * soft + 0.3 * F.cross_entropy(labelled, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    # the labelled logits get only the hard term's gradient: (softmax - onehot) / n, scaled by 1 - alpha
    hard_grad = (torch.softmax(labelled.detach(), -1) - F.one_hot(labels, 4).float()) / 3
    torch.testing.assert_close(labelled.grad, 0.3 * hard_grad)
    # alpha = 1: the labels are not used at all; token-level logits with ignored positions work too
    only_soft = transfer_kd_loss(transfer_student, transfer_teacher, labelled, labels, 2.0, 1.0)
    assert only_soft.item() == pytest.approx(soft.item(), rel=1e-6)
    tokens = torch.randn(2, 3, 7)
    token_labels = torch.tensor([[1, -100, 2], [-100, -100, 6]])
    lm = transfer_kd_loss(torch.randn(2, 3, 7), torch.randn(2, 3, 7), tokens, token_labels, 1.0, 0.5)
    assert torch.isfinite(lm)
    all_ignored = transfer_kd_loss(tokens, tokens, tokens, torch.full((2, 3), -100), 1.0, 0.5)
    assert all_ignored.item() == pytest.approx(0.0, abs=1e-6)  # identical soft targets, no labels: nothing to learn
