"""`ensemble predict RUN IMAGES...`: a trained model's top classes for image files.

The model (the student with the fewest validation errors, or the one --model names) carries
what it needs in its checkpoint: its image shape and mode, its class names, and its
normalisation inside it. Each image is read as the run's own images were (converted to the
model's mode, the shorter side resized to its size and the centre cropped), so any picture of
the right kind will do.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ensemble.errors import ConfigError
from ensemble.rundir import RunDir
from ensemble.sources import SUFFIXES

MODES = {1: "L", 3: "RGB"}


def image_files(given: list[str]) -> list[Path]:
    """The image files named, and those inside the folders named (sorted, recursively)."""
    found = []
    for item in given:
        path = Path(item).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not inside:
                raise ConfigError(f"{path} holds no images")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"there is no image or folder {path}")
    return found


def predict(run: RunDir, wanted: str, images: list[str], top: int = 3) -> list[str]:
    """One line per image: its file and the model's `top` classes with their probabilities."""
    from ensemble.data import as_float
    from ensemble.export import choose_model
    from ensemble.models import checkpoint_kind, load_model
    from ensemble.sources import decode

    files = image_files(images)
    name = choose_model(run, wanted)
    saved = run.latest(name)
    if saved is None:
        raise ConfigError(f"{name} has no readable checkpoint in {run.location}")
    model, meta = load_model(saved[0], torch.device("cpu"))
    channels, height, width = (int(d) for d in meta["image_shape"])
    if channels not in MODES or height != width:
        raise ConfigError(f"{name} takes {channels}x{height}x{width} images; predict reads "
                          "square grey or RGB pictures only")
    names = meta.get("class_names") or [str(c) for c in range(meta["classes"])]
    if checkpoint_kind(meta) == "specialist":
        names = [names[c] for c in meta["members"]] + ["dustbin"]
    pixels = torch.stack([torch.from_numpy(decode(f, MODES[channels], height)) for f in files])
    with torch.no_grad():
        probs = model(as_float(pixels)).softmax(1)
    best = probs.topk(min(top, probs.shape[1]), dim=1)
    lines = [f"# {name} (epoch {meta['best_epoch']}): top {best.indices.shape[1]} classes"]
    for f, p, i in zip(files, best.values.tolist(), best.indices.tolist()):
        lines.append(f"{f}: " + ", ".join(f"{names[c]} {q:.3f}" for c, q in zip(i, p)))
    return lines
