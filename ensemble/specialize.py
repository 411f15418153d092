"""Section 5 on the training side: the coordinator that finds the class subsets, the trainer of
one specialist, and the ensemble of generalists and specialists combined by eq. 5.

The maths lives in the pure `specialists` package; this module feeds it models and data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ensemble import checkpoint
from ensemble.config import ModelConfig, SpecialistsConfig, parse
from ensemble.data import Splits, labels_to_device, to_device
from ensemble.distill import Teacher
from ensemble.errors import TrainingError
from ensemble.train import EVAL_BATCH, Trainer, confusion_matrix, model_from_checkpoint, \
    pick_device
from specialists.clustering import affinity, assign_subsets, pair_agreement, prediction_covariance
from specialists.combine import active_specialists, combine
from specialists.specialist import (SpecialistNet, draw_batch, dustbin_offset, local_labels,
                                    specialist_output)

KNOWN_GROUPS = {  # confusable groups known in advance, to judge the clustering (never used by it)
    "fashion-mnist": {"garments": [0, 2, 3, 4, 6], "footwear": [5, 7, 9]},
}


def coordinate(cfg: SpecialistsConfig, generalists: list[bytes], data: Splits,
               device: str | torch.device = "auto") -> dict:
    """Cluster the covariance of the generalists' predicted probabilities into class subsets."""
    dev = pick_device(device)
    models = [model_from_checkpoint(blob, dev)[0] for blob in generalists]
    images = data.val_x if cfg.covariance_on == "val" else data.train_x
    if len(images) == 0:
        raise TrainingError(f"specialists.covariance_on={cfg.covariance_on!r} names an empty "
                            "split; use the other one")
    probs = Teacher(models).probs(to_device(images, dev), cfg.temperature)
    cov = prediction_covariance(probs.double()).cpu()
    subsets = assign_subsets(affinity(cov, cfg.compare), cfg.k, cfg.iterations, cfg.seed,
                             cfg.overlap, cfg.min_tie, cfg.min_size)
    report = {"subsets": subsets, "names": [[data.classes[c] for c in s] for s in subsets],
              "covariance_on": cfg.covariance_on, "inputs": len(images), "device": str(dev),
              "covariance": cov.tolist()}
    if data.name in KNOWN_GROUPS:
        groups = KNOWN_GROUPS[data.name]
        report["known_groups"] = groups
        report["agreement"] = pair_agreement(subsets, list(groups.values()))
    return report


class SpecialistTrainer(Trainer):
    """Trains one specialist: the generalist's weights, an output layer over `members` plus a
    dustbin, batches with share `fraction` from the subset, and the dustbin correction."""

    def __init__(self, name: str, members: list[int], generalist: bytes, cfg: SpecialistsConfig,
                 data: Splits, seed: int, threads: int = 1, device: str = "auto"):
        self.member_list, self.generalist_blob = [int(c) for c in members], generalist
        self.fraction, self.full_classes = cfg.fraction, data.num_classes
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

    def make_model(self, data: Splits) -> nn.Module:
        base, _ = model_from_checkpoint(self.generalist_blob, torch.device("cpu"))
        members = torch.tensor(self.member_list)
        return SpecialistNet(base.features, specialist_output(base.output, members)).train()

    def epoch_batches(self):
        steps = -(-len(self.y) // self.cfg.batch_size)
        drawn_in = torch.zeros((), dtype=torch.long, device=self.device)
        for _ in range(steps):
            idx = draw_batch(self.inside, self.outside, self.cfg.batch_size, self.fraction,
                             self.batches)
            drawn_in += (self.y[idx] < len(self.member_list)).sum()  # measured, not assumed
            yield idx
        self.measured = int(drawn_in) / (steps * self.cfg.batch_size)
        self._set_offset()  # before the epoch's evaluation, which sees the corrected logits

    def _set_offset(self) -> None:
        self.model.dustbin_offset.fill_(dustbin_offset(self.measured, self.natural))

    def extra_meta(self) -> dict:
        return {"members": self.member_list, "generalist_classes": self.full_classes,
                "fraction_measured": self.measured, "natural_share": self.natural,
                "dustbin_offset": float(self.model.dustbin_offset)}


class Ensemble:
    """Generalists and specialists combined per input by eq. 5 (§5.3)."""

    def __init__(self, generalists: list[nn.Module], specialists: list[nn.Module],
                 members: list[list[int]], classes: int, cfg: SpecialistsConfig):
        self.teacher = Teacher(generalists)
        self.specialists = [m.eval().requires_grad_(False) for m in specialists]
        self.members, self.classes, self.cfg = members, classes, cfg

    @classmethod
    def from_checkpoints(cls, generalists: list[bytes], specialists: list[bytes],
                         cfg: SpecialistsConfig, device: torch.device) -> "Ensemble":
        gens = [model_from_checkpoint(b, device)[0] for b in generalists]
        specs, members = [], []
        for blob in specialists:
            model, meta = model_from_checkpoint(blob, device)
            specs.append(model)
            members.append(meta["members"])
        classes = checkpoint.read_meta(generalists[0])["classes"]
        return cls(gens, specs, members, classes, cfg)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(p_g (N, C), q (N, C), active (N, M)) for inputs x, in chunks. Each specialist sees
        only the inputs that call on it (about N * top_n / M of them for disjoint subsets)."""
        outs = []
        idx = [torch.tensor(m, device=x.device) for m in self.members]
        S = torch.zeros(len(idx), self.classes, dtype=torch.bool, device=x.device)
        for k, members in enumerate(idx):
            S[k, members] = True
        for i in range(0, len(x), EVAL_BATCH):
            xb = x[i:i + EVAL_BATCH]
            pg = self.teacher.probs(xb, 1.0)
            active = active_specialists(pg, S, self.cfg.top_n)
            if not idx:  # no specialists: the generalists alone
                outs.append((pg, pg, active))
                continue
            P = pg.new_zeros(len(xb), len(idx), self.classes)
            d = pg.new_zeros(len(xb), len(idx))
            for k, (model, members) in enumerate(zip(self.specialists, idx)):
                rows = active[:, k].nonzero().flatten()
                if len(rows):  # inactive rows keep zeros: eq. 5 ignores them
                    probs = F.softmax(model(xb[rows]), 1)
                    P[rows[:, None], k, members] = probs[:, :-1]
                    d[rows, k] = probs[:, -1]
            q = combine(pg, P, d, S, active, self.cfg.combine_tol, self.cfg.combine_steps)
            outs.append((pg, q, active))
        return tuple(torch.cat(parts) for parts in zip(*outs))

    def probs(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """Soft targets at T from the combined q: softmax(log q / T)."""
        _, q, _ = self.predict(x)
        return F.softmax(q.clamp_min(1e-30).log() / temperature, dim=1)


def evaluate_ensemble(generalists: list[bytes], specialists: list[bytes],
                      cfg: SpecialistsConfig, data: Splits,
                      device: str | torch.device = "auto") -> dict:
    """Errors of the generalists alone and with the specialists on validation and test, and the
    paper's Table 4 on test: examples grouped by how many specialists cover their true class."""
    dev = pick_device(device)
    ens = Ensemble.from_checkpoints(generalists, specialists, cfg, dev)
    out = {"device": str(dev)}
    for part, images, labels in (("val", data.val_x, data.val_y), ("test", data.test_x,
                                                                     data.test_y)):
        x, y = to_device(images, dev), labels_to_device(labels, dev)
        pg, q, active = ens.predict(x)
        right_g, right_q = pg.argmax(1) == y, q.argmax(1) == y
        out[part] = {"generalist_errors": int((~right_g).sum()),
                     "ensemble_errors": int((~right_q).sum()),
                     "mean_active": float(active.float().sum(1).mean()) if len(y) else 0.0}
        if part == "test":
            out[part]["generalist_confusion"] = confusion_matrix(y, pg.argmax(1), ens.classes)
            out[part]["ensemble_confusion"] = confusion_matrix(y, q.argmax(1), ens.classes)
        if part == "test":
            cover = torch.zeros(len(y), dtype=torch.long, device=dev)
            for m in ens.members:
                cover += torch.isin(y, torch.tensor(m, device=dev)).long()
            rows = []
            for n in sorted(set(cover.tolist())):
                sel = cover == n
                g, e = int(right_g[sel].sum()), int(right_q[sel].sum())
                rows.append({"specialists": n, "examples": int(sel.sum()),
                             "generalist_correct": g, "ensemble_correct": e, "change": e - g,
                             "relative": (e - g) / g if g else 0.0})
            out["table4"] = rows
    return out
