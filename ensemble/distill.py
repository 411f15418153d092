"""Distillation (§2): soft targets at temperature T from frozen teachers, and the student trainer.

    loss = alpha * T^2 * CE(p_teacher,T, q_student,T) + (1 - alpha) * CE(labels, q_student,1)

The T^2 keeps the soft term's gradient the same size whatever T is: per example, its gradient with
respect to the student's logits z is exactly T * (q_T - p_T).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ensemble.config import StudentConfig
from ensemble.data import Splits, transfer_mask
from ensemble.teacher import Teacher, load_teacher, soft_targets
from ensemble.train import Trainer


def soft_target_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                     temperature: float | torch.Tensor) -> torch.Tensor:
    """T^2 * mean over the batch of KL(teacher_probs || softmax(student_logits / T)): the
    cross-entropy of §2 less the teacher's own entropy, so the same gradient, and a loss that
    reads 0 when the student matches the teacher (the cross-entropy at T=20 sits near 900).

    student_logits: (B, C); teacher_probs: (B, C), rows summing to 1 (already at temperature T).
    Returns a scalar (). Stacked students (ensemble.stacked): (N, B, C) each, `temperature` a
    tensor (N,), and the loss of each (N,).
    """
    t = temperature if not torch.is_tensor(temperature) else temperature[..., None, None]
    log_q = F.log_softmax(student_logits / t, dim=-1)
    kl = torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_q
    return kl.sum(dim=-1).mean(dim=-1) * temperature ** 2


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                      labels: torch.Tensor, temperature: float | torch.Tensor,
                      alpha: float | torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """alpha * soft_target_loss + (1 - alpha) * CE(labels, softmax(student_logits)), the labels
    smoothed by `smoothing`.

    student_logits: (B, C); teacher_probs: (B, C) at temperature T; labels: (B,) int64. Returns ().
    Stacked students: (N, B, C), (N, B, C), (N, B), `temperature` and `alpha` tensors (N,); the
    loss of each (N,).
    """
    if torch.is_tensor(alpha):  # stacked: every term for every member (alpha 0 weighs it out)
        hard = F.cross_entropy(student_logits.transpose(1, 2), labels, reduction="none",
                               label_smoothing=smoothing).mean(1)
        soft = soft_target_loss(student_logits, teacher_probs, temperature)
        return alpha * soft + (1 - alpha) * hard
    loss = torch.zeros((), device=student_logits.device)
    if alpha > 0:
        loss = loss + alpha * soft_target_loss(student_logits, teacher_probs, temperature)
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits, labels,
                                                    label_smoothing=smoothing)
    return loss


def unaugmented(cfg: StudentConfig) -> bool:
    """Whether the student's transfer set is shown as it is (so its soft targets are fixed)."""
    return not cfg.train.augment


class Student(Trainer):
    """Trains a student on the transfer set with soft targets from `teachers` (checkpoint blobs of
    the generalists), or with `soft_targets: ensemble` from the generalists and `specialists`
    combined by eq. 5; with alpha = 0 it is a plain hard-label baseline and needs no teacher."""
    kind = "student"

    def __init__(self, name: str, cfg: StudentConfig, data: Splits, teachers: Sequence[bytes],
                 seed: int, threads: int = 1, device: str | torch.device = "auto",
                 specialists: Sequence[bytes] = (), specialists_cfg=None,
                 outputs: torch.Tensor | None = None):
        keep = transfer_mask(data.train_y, cfg.drop_classes, cfg.keep_classes, cfg.transfer_size)
        super().__init__(name, cfg.model, cfg.train, data.with_train(keep), seed, threads, device)
        self.temperature, self.alpha = cfg.temperature, cfg.alpha
        self.teacher: Teacher | None = None  # or eq. 5's specialists.ensemble.Ensemble
        self.targets: torch.Tensor | None = None  # soft targets of the whole transfer set
        self.targets_from = "none"  # where its soft targets come from (its checkpoints say)
        if not cfg.uses_teacher:
            return
        if unaugmented(cfg) and outputs is not None and not self.streams:  # computed once
            self.targets = soft_targets(outputs[..., torch.from_numpy(keep), :],
                                        self.temperature, cfg.teacher_mean).to(self.device)
            self.targets_from = "shared"
            return
        with_specialists = cfg.soft_targets == "ensemble"
        self.teacher = load_teacher(teachers, self.device, cfg.teacher_mean,
                                    specialists if with_specialists else None, specialists_cfg)
        if unaugmented(cfg) and not self.streams:  # its soft targets are computed once
            self.targets = self.teacher.probs(self.x, self.temperature)
            self.targets_from = "computed once"
        else:
            self.targets_from = "per batch"

    def extra_meta(self) -> dict:
        return {"targets_from": self.targets_from}

    def loss_on(self, xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = self.forward(xb)
        if self.teacher is None and self.targets is None:  # hard labels only
            return F.cross_entropy(logits, self.y[idx], label_smoothing=self.cfg.label_smoothing)
        probs = self.targets[idx] if self.targets is not None else \
            self.teacher.probs(xb, self.temperature)
        return distillation_loss(logits, probs, self.y[idx], self.temperature, self.alpha,
                                 self.cfg.label_smoothing)
