"""§5.3: the generalist and the specialists that cover its top classes, combined per input by
eq. 5 (`specialists.combine`), and the paper's Table 4 (test examples grouped by how many
specialists cover their true class)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ensemble.config import SpecialistsConfig
from ensemble.data import Splits, as_float, labels_to_device, to_pixels
from ensemble.train import CONFUSION_UP_TO, EVAL_BATCH, confusion_matrix
from specialists.combine import active_specialists, combine
from specialists.specialist import DustbinHead


class Ensemble:
    """Generalists and specialists combined per input by eq. 5. `generalist`: anything whose
    `probs(x, T)` gives the generalists' probabilities (ensemble.teacher.Teacher)."""

    def __init__(self, generalist, specialists: list[nn.Module], members: list[list[int]],
                 classes: int, cfg: SpecialistsConfig):
        self.generalist = generalist
        self.specialists = [m.eval().requires_grad_(False) for m in specialists]
        self.members, self.classes, self.cfg = members, classes, cfg
        if not cfg.dustbin_correction:  # the dustbins as trained (their heads' eval offset 0)
            for head in (h for m in self.specialists for h in m.modules()
                         if isinstance(h, DustbinHead)):
                head.dustbin_offset.zero_()

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
            xb = as_float(x[i:i + EVAL_BATCH])
            pg = self.generalist.probs(xb, 1.0)
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


def evaluate(ens: Ensemble, data: Splits, device: torch.device) -> dict:
    """Errors of the generalists alone and with the specialists on validation and test, and the
    paper's Table 4 on test: examples grouped by how many specialists cover their true class."""
    out = {"device": str(device)}
    for part, images, labels in (("val", data.val_x, data.val_y), ("test", data.test_x,
                                                                     data.test_y)):
        x, y = to_pixels(images, device), labels_to_device(labels, device)
        pg, q, active = ens.predict(x)
        right_g, right_q = pg.argmax(1) == y, q.argmax(1) == y
        out[part] = {"generalist_errors": int((~right_g).sum()),
                     "ensemble_errors": int((~right_q).sum()),
                     "mean_active": float(active.float().sum(1).mean()) if len(y) else 0.0}
        if part == "test":
            if ens.classes <= CONFUSION_UP_TO:  # beyond: too many counts for a figure
                out[part]["generalist_confusion"] = confusion_matrix(y, pg.argmax(1), ens.classes)
                out[part]["ensemble_confusion"] = confusion_matrix(y, q.argmax(1), ens.classes)
            out["table4"] = table4(y, right_g, right_q, ens.members)
    return out


def table4(y: torch.Tensor, right_g: torch.Tensor, right_q: torch.Tensor,
           members: list[list[int]]) -> list[dict]:
    """Table 4: per number of specialists covering the true class (labels y (N,)), the examples,
    how many the generalists and the ensemble got right (right_g, right_q: (N,) bool), and the
    relative change."""
    cover = torch.zeros(len(y), dtype=torch.long, device=y.device)
    for m in members:
        cover += torch.isin(y, torch.tensor(m, device=y.device)).long()
    rows = []
    for n in sorted(set(cover.tolist())):
        sel = cover == n
        g, e = int(right_g[sel].sum()), int(right_q[sel].sum())
        rows.append({"specialists": n, "examples": int(sel.sum()), "generalist_correct": g,
                     "ensemble_correct": e, "change": e - g, "relative": (e - g) / g if g else 0.0})
    return rows
