"""The teacher of a student (§2, §5.3): soft targets from frozen models, loaded from checkpoints.

Two kinds: the generalists' average (their probabilities at T, or the softmax at T of their mean
logits), and, with specialists, eq. 5's combination of the generalists and the specialists that
cover each input's top classes (`specialists.ensemble.Ensemble`). Both answer `probs(x, T)`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ensemble import checkpoint
from ensemble.config import SpecialistsConfig
from ensemble.data import Splits
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
