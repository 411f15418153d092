"""§5.1: the trainer of one specialist. It starts from its generalist's weights with an output
layer over its subset plus a dustbin, draws share `fraction` of each batch from the subset, and
corrects the dustbin logit for that sampling (`specialists.specialist`). With
`specialists.soft_weight` > 0 it also learns the generalist's soft targets, as §6 proposes to
keep a specialist from overfitting its enriched, effectively small training set."""
from __future__ import annotations

import torch
from torch import nn

from ensemble import checkpoint
from ensemble.config import ModelConfig, SpecialistsConfig, parse
from ensemble.data import Splits
from ensemble.distill import distillation_loss
from ensemble.errors import TrainingError
from ensemble.models import head_of, load_model, specialist_model
from ensemble.train import Trainer
from specialists.specialist import (collapsed_soft_targets, draw_batch, dustbin_offset,
                                    init_from_generalist, local_labels)


class SpecialistTrainer(Trainer):
    """Trains one specialist: the generalist's weights, an output layer over `members` plus a
    dustbin, batches with share `fraction` from the subset, and the dustbin correction."""
    kind = "specialist"

    def __init__(self, name: str, members: list[int], generalist: bytes, cfg: SpecialistsConfig,
                 data: Splits, seed: int, threads: int = 1, device: str | torch.device = "auto"):
        self.member_list, self.generalist_blob = [int(c) for c in members], generalist
        self.fraction, self.full_classes = cfg.fraction, data.num_classes
        self.epoch_of = cfg.epoch
        model_cfg = parse(ModelConfig, checkpoint.read_meta(generalist)["model"], "model")
        super().__init__(name, model_cfg, cfg.train, data, seed, threads, device)
        members_t = torch.tensor(self.member_list, device=self.device)
        inside = torch.isin(self.y, members_t)
        self.inside, self.outside = inside.nonzero().flatten(), (~inside).nonzero().flatten()
        if len(self.inside) == 0 or len(self.outside) == 0:
            raise TrainingError(f"{name}: the training set needs examples both in and out of "
                                f"its subset {self.member_list}")
        self.natural = len(self.inside) / len(self.y)
        self.measured = cfg.fraction
        self.classes = len(self.member_list) + 1
        self.y = local_labels(self.y, members_t, self.full_classes)
        self.val = (self.val[0], local_labels(self.val[1], members_t, self.full_classes))
        self.test = (self.test[0], local_labels(self.test[1], members_t, self.full_classes))
        self._set_offset()
        self.soft_weight, self.soft_temperature = cfg.soft_weight, cfg.soft_temperature
        self.members_t, self.generalist = members_t, None
        self.rest = torch.ones(self.full_classes, dtype=torch.bool, device=self.device)
        self.rest[members_t] = False
        if self.soft_weight > 0:  # frozen: its soft targets of each (augmented) batch
            self.generalist = load_model(generalist, self.device)[0].requires_grad_(False)

    def make_model(self, data: Splits) -> nn.Module:
        base, _ = load_model(self.generalist_blob, torch.device("cpu"))
        _, output = head_of(base, self.model_cfg.head)
        model = specialist_model(base, self.model_cfg, len(self.member_list))
        self.head = head_of(model, self.model_cfg.head)[1]
        init_from_generalist(self.head, output, torch.tensor(self.member_list))
        return model.train()

    def epoch_batches(self):
        shown = len(self.y) if self.epoch_of == "training set" else \
            len(self.inside) / self.fraction  # the subset's examples about once each
        steps = max(1, -(-int(shown) // self.cfg.batch_size))
        drawn_in = torch.zeros((), dtype=torch.long, device=self.device)
        for _ in range(steps):
            idx = draw_batch(self.inside, self.outside, self.cfg.batch_size, self.fraction,
                             self.batches)
            drawn_in += (self.y[idx] < len(self.member_list)).sum()  # measured, not assumed
            yield idx
        self.measured = int(drawn_in) / (steps * self.cfg.batch_size)
        self._set_offset()  # before the epoch's evaluation, which sees the corrected logits

    def loss_on(self, xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The paper's hard-label loss, or with soft_weight > 0 §2's mix of it and the
        generalist's soft targets (specialists.specialist.collapsed_soft_targets)."""
        if self.generalist is None:
            return super().loss_on(xb, idx)
        logits = self.forward(xb)
        with torch.no_grad():
            targets = collapsed_soft_targets(self.generalist(xb).float(), self.members_t,
                                             self.rest, self.soft_temperature,
                                             self.head.dustbin_offset)
        return distillation_loss(logits, targets, self.y[idx], self.soft_temperature,
                                 self.soft_weight, self.cfg.label_smoothing)

    def _set_offset(self) -> None:
        self.head.dustbin_offset.fill_(dustbin_offset(self.measured, self.natural))

    def extra_meta(self) -> dict:
        return {"members": self.member_list, "generalist_classes": self.full_classes,
                "fraction_measured": self.measured, "natural_share": self.natural,
                "dustbin_offset": float(self.head.dustbin_offset),
                "soft_weight": self.soft_weight, "soft_temperature": self.soft_temperature}
