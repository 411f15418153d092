"""The teacher of a student (§2, §5.3): soft targets from frozen models, loaded from checkpoints.

Two kinds: the generalists' average (their probabilities at T, or the softmax at T of their mean
logits), and, with specialists, eq. 5's combination of the generalists and the specialists that
cover each input's top classes (`specialists.ensemble.Ensemble`). Both answer `probs(x, T)`.

On a transfer set without augmentation a teacher's answers are the same for every student, so
they are computed once (`teacher_outputs`: the generalists' logits, or eq. 5's q, on the whole
training split) and each student derives its own soft targets from them (`soft_targets`: its
temperature, its way of averaging, its subset of the examples).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ensemble import checkpoint
from ensemble.config import SpecialistsConfig
from ensemble.data import Splits, as_float, to_pixels
from ensemble.errors import TrainingError
from ensemble.models import load_model
from ensemble.train import EVAL_BATCH, pick_device
from specialists.ensemble import Ensemble, evaluate


class Teacher:
    """Frozen models whose averaged output is the soft target: the mean of their probabilities at
    T, or the softmax at T of their mean logits (`mean`)."""

    def __init__(self, models: Sequence[nn.Module], mean: str = "probs"):
        if not models:
            raise TrainingError("a teacher needs at least one model")
        self.models = [m.eval().requires_grad_(False) for m in models]
        self.mean = mean

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every model's logits (M, N, C) for inputs x (N, ...), computed in chunks."""
        return torch.cat([torch.stack([m(xb) for m in self.models])
                          for xb in (as_float(x[i:i + EVAL_BATCH])
                                     for i in range(0, len(x), EVAL_BATCH))], 1)

    def probs(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """Soft targets (N, C) for inputs x (N, ...)."""
        return soft_targets(self.logits(x), temperature, self.mean)


def load_teacher(generalists: Sequence[bytes], device: torch.device, mean: str = "probs",
                 specialists: Sequence[bytes] | None = None,
                 specialists_cfg: SpecialistsConfig | None = None) -> Teacher | Ensemble:
    """The generalists' average from their checkpoints; given `specialists` (checkpoints, maybe
    none), eq. 5's ensemble of the generalists and them."""
    models = [load_model(blob, device)[0] for blob in generalists]
    if specialists is None:
        return Teacher(models, mean)
    specs, members = [], []
    for blob in specialists:
        model, meta = load_model(blob, device)
        specs.append(model)
        members.append(meta["members"])
    classes = checkpoint.read_meta(generalists[0])["classes"]
    return Ensemble(Teacher(models), specs, members, classes, specialists_cfg)


def evaluate_ensemble(generalists: list[bytes], specialists: list[bytes],
                      cfg: SpecialistsConfig, data: Splits,
                      device: str | torch.device = "auto") -> dict:
    """Errors of the generalists alone and with the specialists (eq. 5) on validation and test,
    and the paper's Table 4 on test (specialists.ensemble.evaluate), from checkpoints."""
    dev = pick_device(device)
    return evaluate(load_teacher(generalists, dev, specialists=specialists,
                                 specialists_cfg=cfg), data, dev)


@torch.no_grad()
def teacher_outputs(generalists: list[bytes], data: Splits, threads: int = 1,
                    specialists: list[bytes] | None = None,
                    specialists_cfg: SpecialistsConfig | None = None,
                    device: str | torch.device = "auto") -> torch.Tensor:
    """What a teacher says of every training example, for all its students at once, on the CPU:
    the generalists' logits (M, N, C), or with `specialists` eq. 5's q (N, C)."""
    torch.set_num_threads(threads)  # as its students would have: the same rounding
    dev = pick_device(device)
    teacher = load_teacher(generalists, dev, specialists=specialists,
                           specialists_cfg=specialists_cfg)
    x = to_pixels(data.train_x, dev)
    if isinstance(teacher, Ensemble):
        return teacher.predict(x)[1].cpu()
    return teacher.logits(x).cpu()


def soft_targets(outputs: torch.Tensor, temperature: float, mean: str = "probs") -> torch.Tensor:
    """A student's soft targets (N, C) at `temperature` from `teacher_outputs`: from logits
    (M, N, C) the mean of the models' probabilities, or the softmax of their mean logits
    (`mean`); from eq. 5's q (N, C), softmax(log q / T). As `Teacher.probs` and
    `Ensemble.probs` would give."""
    if outputs.dim() == 2:
        return F.softmax(outputs.clamp_min(1e-30).log() / temperature, dim=1)
    if mean == "logits":
        return F.softmax(outputs.mean(0) / temperature, dim=1)
    return F.softmax(outputs / temperature, dim=2).mean(0)
