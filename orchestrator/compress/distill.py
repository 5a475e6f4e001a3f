"""Knowledge distillation: train a small student on a large teacher's soft predictions (Hinton et al. 2015).

Use::

    teacher = freeze_teacher(load_teacher())
    with torch.no_grad():
        t_logits = teacher(x)
    loss = kd_loss(student(x), t_logits, labels, temperature=2.0, alpha=0.5)
    # with a transfer set (unlabelled inputs u): soft term on u, hard term on the labelled x
    loss = transfer_kd_loss(student(u), teacher(u), student(x), labels, temperature=2.0, alpha=0.5)

For hidden-state matching add ``FeatureDistillation(student_dim, teacher_dim)`` and register it as a submodule of
the student wrapper (it has a trainable projection when widths differ, so the optimizer must see it).

Suggested settings: temperature 2-4 (higher transfers more of the teacher's "dark knowledge" about wrong classes),
alpha 0.5-0.9; feature loss weight ~0.1-1 relative to the logit loss. The T^2 factor keeps the soft-target gradient
scale independent of T, so alpha means the same thing at any temperature. For language models the logits are
token-level ([B, L, V]); padding/prompt tokens marked with ``ignore_index`` in ``labels`` are excluded from both
terms, and student and teacher must share the tokenizer (same V; a mismatch raises).

DeepSpeed ZeRO and precision: only the student is wrapped by ``deepspeed.initialize``; the frozen teacher is a
plain module on each rank (ZeRO does not shard it; for a teacher too large to replicate, run it under
``deepspeed.init_inference`` or precompute logits). Teacher forward in bf16/fp16 is fine; ``kd_loss`` upcasts
logits to fp32 before softmax, because a low-precision log-softmax over a large vocabulary loses the small
probabilities that distillation is about.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureDistillation", "HiddenState", "StudentWithProjection", "freeze_teacher", "kd_loss", "transfer_kd_loss"]


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
) -> Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels), averaged over kept positions.

    Works for [B, C] and token-level [B, L, V] logits (labels [B] / [B, L]). Positions whose label is
    ``ignore_index`` count in neither term. ``labels=None`` means pure distillation (unlabelled transfer set) and
    requires alpha == 1.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher disagree on the class/vocab dimension: student has {student_logits.shape[-1]}, "
            f"teacher has {teacher_logits.shape[-1]} (distillation needs the same label space/tokenizer)"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} is outside the allowed range 0 <= alpha <= 1")
    if labels is None and alpha != 1.0:
        raise ValueError(f"labels=None leaves nothing for the (1 - alpha) hard-label term; got alpha={alpha!r}")

    num_classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, num_classes).float()
    teacher = teacher_logits.detach().reshape(-1, num_classes).float()
    if labels is None:
        keep = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
    else:
        flat_labels = labels.reshape(-1)
        if flat_labels.shape[0] != student.shape[0]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(student_logits.shape)}")
        keep = flat_labels != ignore_index
    num_kept = keep.sum()
    if int(num_kept) == 0:  # everything masked: a zero that still carries a graph, not NaN
        return student_logits.sum() * 0.0

    student, teacher = student[keep], teacher[keep]
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl_per_position = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    soft = kl_per_position.mean() * temperature**2
    if labels is None or alpha == 1.0:
        return alpha * soft
    hard = F.cross_entropy(student, flat_labels[keep])
    return alpha * soft + (1.0 - alpha) * hard


def transfer_kd_loss(
    transfer_student_logits: Tensor,
    transfer_teacher_logits: Tensor,
    student_logits: Tensor,
    labels: Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
) -> Tensor:
    """alpha * T^2 * KL on the transfer set + (1 - alpha) * CE on the labelled batch (Hinton et al.'s transfer set).

    With few labels, matching the teacher only where labels exist gives the student little to learn from: the
    teacher's soft predictions on many unlabelled inputs carry what the labels cannot. The two batches may differ
    in size; each term is averaged over its own kept positions.
    """
    soft = kd_loss(transfer_student_logits, transfer_teacher_logits, None, temperature, 1.0)
    if alpha == 1.0:
        return soft
    num_classes = student_logits.shape[-1]
    flat_labels = labels.reshape(-1)
    keep = flat_labels != ignore_index
    if not bool(keep.any()):
        return alpha * soft + student_logits.sum() * 0.0
    hard = F.cross_entropy(student_logits.reshape(-1, num_classes).float()[keep], flat_labels[keep])
    return alpha * soft + (1.0 - alpha) * hard


class FeatureDistillation(nn.Module):
    """MSE between a student hidden state and a teacher hidden state, projecting the student when widths differ.

    The projection (student_dim -> teacher_dim) is learned with the student and dropped after training; matching in
    the teacher's space keeps the teacher's features untouched. ``mask`` ([B, L], True = real token) excludes
    padding from the mean.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.projection: nn.Module = (
            nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim, bias=False)
        )

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        projected = self.projection(student_hidden)
        # compared in fp32 on the student's device: an fp16 cast of the teacher's outlier features can overflow
        target = teacher_hidden.detach().to(projected.device, torch.float32)
        if projected.shape != target.shape:
            raise ValueError(
                f"projected student hidden {tuple(projected.shape)} does not match teacher hidden {tuple(target.shape)}"
            )
        squared = (projected.float() - target).pow(2).mean(dim=-1)
        if mask is None:
            return squared.mean()
        keep = mask.to(torch.bool)
        return squared[keep].mean() if bool(keep.any()) else squared.sum() * 0.0


def freeze_teacher(model: nn.Module) -> nn.Module:
    """Put the teacher in eval mode (no dropout, fixed BatchNorm) and stop its gradients; returns the same module.

    Note that a later ``.train()`` on a parent module that contains the teacher flips it back to train mode; keep
    the teacher outside the student's module tree.
    """
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class HiddenState:
    """Captures the input of ``model.<layer>`` at every forward (e.g. layer="head": the penultimate features)."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.value: Tensor | None = None
        self._handle = model.get_submodule(layer).register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def remove(self) -> None:
        self._handle.remove()


class StudentWithProjection(nn.Module):
    """The student plus the feature projection, as one module: DeepSpeed's optimizer must train both.

    ``forward`` is the student's, so evaluation sees plain logits. Export keeps the ``student.`` weights only.
    """

    STATE_PREFIX = "student."

    def __init__(self, student: nn.Module, features: FeatureDistillation) -> None:
        super().__init__()
        self.student, self.features = student, features

    def forward(self, *args: Tensor) -> Tensor:
        return self.student(*args)
