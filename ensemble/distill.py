"""Distillation (§2): soft targets at temperature T from frozen teachers, and the student trainer.

    loss = alpha * T^2 * CE(p_teacher,T, q_student,T) + (1 - alpha) * CE(labels, q_student,1)

The T^2 keeps the soft term's gradient the same size whatever T is: per example, its gradient with
respect to the student's logits z is exactly T * (q_T - p_T).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ensemble.config import StudentConfig
from ensemble.data import Splits, augment, transfer_mask
from ensemble.errors import TrainingError
from ensemble.train import EVAL_BATCH, Trainer, model_from_checkpoint


def soft_target_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """T^2 * mean over the batch of KL(teacher_probs || softmax(student_logits / T)): the
    cross-entropy of §2 less the teacher's own entropy, so the same gradient, and a loss that
    reads 0 when the student matches the teacher (the cross-entropy at T=20 sits near 900).

    student_logits: (B, C); teacher_probs: (B, C), rows summing to 1 (already at temperature T).
    Returns a scalar ().
    """
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    kl = torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_q
    return kl.sum(dim=1).mean() * temperature ** 2


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                      labels: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """alpha * soft_target_loss + (1 - alpha) * CE(labels, softmax(student_logits)).

    student_logits: (B, C); teacher_probs: (B, C) at temperature T; labels: (B,) int64. Returns ().
    """
    loss = torch.zeros((), device=student_logits.device)
    if alpha > 0:
        loss = loss + alpha * soft_target_loss(student_logits, teacher_probs, temperature)
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits, labels)
    return loss


class Teacher:
    """Frozen models whose averaged output is the soft target: the mean of their probabilities at
    T, or the softmax at T of their mean logits (`mean`)."""

    def __init__(self, models: Sequence[nn.Module], mean: str = "probs"):
        if not models:
            raise TrainingError("a teacher needs at least one model")
        self.models = [m.eval().requires_grad_(False) for m in models]
        self.mean = mean

    @torch.no_grad()
    def probs(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """Soft targets (N, C) for inputs x (N, ...), computed in chunks."""
        out = []
        for i in range(0, len(x), EVAL_BATCH):
            logits = torch.stack([m(x[i:i + EVAL_BATCH]) for m in self.models])  # (M, b, C)
            if self.mean == "logits":
                out.append(F.softmax(logits.mean(0) / temperature, dim=1))
            else:
                out.append(F.softmax(logits / temperature, dim=2).mean(0))
        return torch.cat(out)


class Student(Trainer):
    """Trains a student on the transfer set with soft targets from `teachers` (checkpoint blobs of
    the generalists), or with `soft_targets: ensemble` from the generalists and `specialists`
    combined by eq. 5; with alpha = 0 it is a plain hard-label baseline and needs no teacher."""

    def __init__(self, name: str, cfg: StudentConfig, data: Splits, teachers: Sequence[bytes],
                 seed: int, threads: int = 1, device: str = "auto",
                 specialists: Sequence[bytes] = (), specialists_cfg=None):
        keep = transfer_mask(data.train_y, cfg.drop_classes, cfg.keep_classes, cfg.transfer_size)
        super().__init__(name, cfg.model, cfg.train, data.with_train(keep), seed, threads, device)
        self.temperature, self.alpha = cfg.temperature, cfg.alpha
        self.teacher: Teacher | None = None
        self.targets: torch.Tensor | None = None
        if cfg.uses_teacher and cfg.soft_targets == "ensemble":
            from ensemble.specialize import Ensemble  # specialize builds on this module

            self.teacher = Ensemble.from_checkpoints(list(teachers), list(specialists),
                                                     specialists_cfg, self.device)
        elif cfg.uses_teacher:
            models = [model_from_checkpoint(blob, self.device)[0] for blob in teachers]
            self.teacher = Teacher(models, cfg.teacher_mean)
        if self.teacher is not None:
            if cfg.train.jitter == 0 and cfg.train.elastic == 0:
                # an unaugmented transfer set: its soft targets are computed once
                self.targets = self.teacher.probs(self.x, self.temperature)

    def batch_loss(self, idx: torch.Tensor) -> torch.Tensor:
        xb = augment(self.x[idx], self.cfg, self.batches)
        logits = self.forward(xb)
        if self.teacher is None:
            return F.cross_entropy(logits, self.y[idx])
        probs = self.targets[idx] if self.targets is not None else \
            self.teacher.probs(xb, self.temperature)
        return distillation_loss(logits, probs, self.y[idx], self.temperature, self.alpha)
