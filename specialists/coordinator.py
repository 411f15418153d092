"""§5.2: the coordinator. From the generalists' predicted probabilities on held-out inputs (no
labels), the covariance of the classes' columns, clustered into subsets of confusable classes
(`specialists.clustering`), one specialist per subset."""
from __future__ import annotations

import torch

from ensemble.config import SpecialistsConfig
from ensemble.data import Splits, to_device
from ensemble.errors import TrainingError
from ensemble.models import load_model
from ensemble.teacher import Teacher
from ensemble.train import pick_device
from specialists.clustering import (affinity, assign_subsets, leakage,
                                    prediction_covariance)


def coordinate(cfg: SpecialistsConfig, generalists: list[bytes], data: Splits,
               device: str | torch.device = "auto") -> dict:
    """Cluster the covariance of the generalists' (checkpoints) predicted probabilities into
    class subsets: {subsets, names, covariance, the inputs used, device}."""
    dev = pick_device(device)
    models = [load_model(blob, dev)[0] for blob in generalists]
    images = data.val_x if cfg.covariance_on == "val" else data.train_x
    if len(images) == 0:
        raise TrainingError(f"specialists.covariance_on={cfg.covariance_on!r} names an empty "
                            "split; use the other one")
    probs = Teacher(models).probs(to_device(images, dev), cfg.temperature).double()
    cov = prediction_covariance(probs).cpu()
    subsets = assign_subsets(affinity(cov, cfg.compare), cfg.k, cfg.iterations, cfg.seed,
                             cfg.overlap, cfg.min_tie, cfg.min_size, cfg.max_size,
                             leakage(probs.cpu()), cfg.overlap_mass)
    return {"subsets": subsets, "names": [[data.classes[c] for c in s] for s in subsets],
            "covariance_on": cfg.covariance_on, "inputs": len(images), "device": str(dev),
            "covariance": cov.tolist()}
