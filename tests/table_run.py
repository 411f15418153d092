"""A small finished run directory for the table verb's tests, built without training.

Every model is an MLP whose weights are small multiples of 1/8 and every image is binary (pixels
0 or 255, so 0.0 or 1.0 as input): all logits are exact in float32 whatever the order of the
sums, so the tables come out the same on every CPU. Class c lights up its own block of pixels
(tests/conftest.py's digits, binarised), some pixels flipped at random; a model's hidden units
look for the blocks and its output weights carry seeded noise, so each model makes its own
errors.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ensemble import checkpoint
from ensemble.config import RunConfig, parse, to_dict
from ensemble.data import write_idx
from ensemble.models import build_model, specialist_model
from ensemble.rundir import RunDir

SIZE, CLASSES = 8, 10
BLOCK = SIZE * SIZE // CLASSES

STUDENT = {"model": {"hidden": [16], "dropout_in": 0.0, "dropout_hidden": 0.0},
           "train": {"epochs": 2, "batch_size": 50, "lr": 0.1}}
STUDENTS = {  # name -> (config, the §3 row its `paper` key names, noise of its output weights)
    "hard": ({**STUDENT, "alpha": 0.0}, "hard", 6),
    "distilled": (STUDENT, "distilled", 4),
    "no3": ({**STUDENT, "drop_classes": [3]}, "no3", 5),
    "only78": ({**STUDENT, "keep_classes": [7, 8]}, "only78", 8),
    "w8-T1": ({**STUDENT, "model": {**STUDENT["model"], "hidden": [8]},
                        "temperature": 1.0}, "grid", 7),
    "w8-T4": ({**STUDENT, "model": {**STUDENT["model"], "hidden": [8]},
                        "temperature": 4.0}, "grid", 5),
    "w16-T1": ({**STUDENT, "temperature": 1.0}, "grid", 6),
    "w16-T4": ({**STUDENT, "temperature": 4.0}, "grid", 4),
    "w16-T4-s1": ({**STUDENT, "temperature": 4.0}, "grid", 5),
    "x-s0": ({**STUDENT, "temperature": 2.0}, "", 5),
    "x-s1": ({**STUDENT, "temperature": 2.0}, "", 6),
    "ens": ({**STUDENT, "soft_targets": "ensemble"}, "", 4),
}


def write_data(root, n_train: int = 300, n_test: int = 200, flip: float = 0.08):
    """ROOT/mnist/ of binary digits: class c's block lit, `flip` of all pixels flipped."""
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for part, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, CLASSES, n).astype(np.uint8)
        lit = np.zeros((n, SIZE * SIZE), bool)
        for c in range(CLASSES):
            lit[labels == c, c * BLOCK:(c + 1) * BLOCK] = True
        lit ^= rng.random(lit.shape) < flip
        write_idx(folder / f"{part}-images-idx3-ubyte.gz",
                  (lit * 255).astype(np.uint8).reshape(n, SIZE, SIZE))
        write_idx(folder / f"{part}-labels-idx1-ubyte.gz", labels)
    return root


def weights(name: str, model: torch.nn.Module, noise: int) -> dict:
    """`model`'s state dict set so: hidden unit j finds block j mod 10, output c adds the units of
    block c, plus seeded integer noise (in eighths) on the output weights and biases."""
    rng = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    hidden, out = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        hidden.weight.zero_()
        hidden.bias.fill_(-0.5)
        out.weight.zero_()
        for j in range(hidden.out_features):
            c = j % CLASSES
            hidden.weight[j, c * BLOCK:(c + 1) * BLOCK] = 0.25
            if c < out.out_features:
                out.weight[c, j] = 1.0
        out.weight += torch.tensor(rng.integers(-noise, noise + 1, tuple(out.weight.shape)) / 8,
                                   dtype=torch.float32)
        out.bias.copy_(torch.tensor(rng.integers(-noise, noise + 1, out.out_features) / 8))
    return model.state_dict()


def save(run: RunDir, name: str, kind: str, model: dict, state: dict, index: int,
         extra: dict | None = None) -> dict:
    """Two epochs of a made-up history and the checkpoint of the second."""
    history = [{"epoch": e, "seconds": 2.0 + index + e, "train_seconds": 1.0 + e,
                "val_errors": 60 - 10 * e - index, "test_errors": 70 - 10 * e - index}
               for e in (1, 2)]
    meta = {"name": name, "kind": kind, "epoch": 2, "seed": index, "model": model,
            "classes": CLASSES, "image_shape": [1, SIZE, SIZE], "best_epoch": 2,
            "history": history, "summary": {"wall_seconds": sum(r["seconds"] for r in history)},
            **(extra or {})}
    blob = checkpoint.dumps_state(checkpoint.TrainingState(
        state, {k: v.clone() for k, v in state.items()}, {}, {}, meta))
    checkpoint.save_epoch(run.checkpoints(name), 2, blob)
    return {"history": history}


def build(path, tagged: bool = True) -> RunDir:
    """The run directory at `path`: 2 generalists, 1 specialist with eq. 5's results, the
    students above; `tagged` writes each student's `paper` key (the key the table verb reads)."""
    students = {n: {**cfg, **({"paper": row} if tagged and row else {})}
                for n, (cfg, row, _) in STUDENTS.items()}
    cfg = parse(RunConfig, {
        "name": "table-test", "data": {"val_size": 100, "download": False},
        "generalists": {"count": 2, "model": {"hidden": [16], "dropout_in": 0.0,
                                               "dropout_hidden": 0.0}},
        "specialists": {"k": 2}, "students": students})
    run = RunDir(path)
    run.create(cfg)
    metrics = {}
    shape = (1, SIZE, SIZE)
    gen_model = to_dict(cfg.generalists.model)
    for i in range(2):
        name = f"generalist-{i}"
        net = build_model(cfg.generalists.model, shape, CLASSES)
        metrics[name] = save(run, name, "generalist", gen_model, weights(name, net, 3 + i), i)
    net = specialist_model(build_model(cfg.generalists.model, shape, CLASSES),
                           cfg.generalists.model, 3)
    metrics["specialist-0"] = save(run, "specialist-0", "specialist", gen_model,
                                   weights("specialist-0", net, 3), 2,
                                   {"members": [3, 5, 8], "generalist_classes": CLASSES})
    for i, (name, (_, _, noise)) in enumerate(STUDENTS.items()):
        student = cfg.students[name]
        net = build_model(student.model, shape, CLASSES)
        metrics[f"student-{name}"] = save(run, f"student-{name}", "student",
                                          to_dict(student.model),
                                          weights(f"student-{name}", net, noise), 3 + i)
    run.write_metrics(metrics)
    run.write_json("ensemble.json", {
        "top_n": 1, "val": {"generalist_errors": 21, "ensemble_errors": 19},
        "test": {"generalist_errors": 40, "ensemble_errors": 37},
        "table4": [{"specialists": 0, "examples": 140, "generalist_correct": 120,
                    "ensemble_correct": 120, "change": 0, "relative": 0.0},
                   {"specialists": 1, "examples": 60, "generalist_correct": 40,
                    "ensemble_correct": 43, "change": 3, "relative": 0.075}]})
    return run
