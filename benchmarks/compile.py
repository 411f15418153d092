"""What `train.compile` (torch.compile of the training forward pass) gains on this machine.

    python benchmarks/compile.py [--samples 20000] [--threads 2] [--out results/compile.md]

For the paper's teacher (784-1200-1200-10, dropout 0.2/0.5, max-norm) and a 300-unit student,
at batch 100 and 512: samples/s of the trainer eager and compiled, in this process on the same
synthetic tensors, best of 3 epochs after a first epoch that pays for compiling (reported apart).
The last lines are `name: value`, one ratio each (compiled / eager).
"""
from __future__ import annotations

import argparse
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

from ensemble.config import ModelConfig, TrainConfig
from ensemble.data import Splits
from ensemble.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"teacher 2x1200": ModelConfig(hidden=(1200, 1200), dropout_in=0.2, dropout_hidden=0.5,
                                        max_norm=3.87),
          "student 2x300": ModelConfig(hidden=(300, 300), dropout_in=0.0, dropout_hidden=0.0)}


def splits(samples: int) -> Splits:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (samples, 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, samples).astype(np.int64)
    return Splits("mnist", tuple(map(str, range(10))), x, y, x[:0], y[:0], x[:0], y[:0])


def measure(model: ModelConfig, batch: int, compiled: bool, data: Splits, threads: int):
    """(first epoch's seconds, best samples/s of the next 3 epochs)."""
    cfg = TrainConfig(epochs=4, batch_size=batch, lr=0.01, schedule="constant", compile=compiled)
    trainer = Trainer("bench", model, cfg, data, 0, threads)
    first = trainer.train_epoch()["train_seconds"]
    best = max(trainer.train_epoch()["samples_per_s"] for _ in range(3))
    if compiled and trainer.compiled is None:
        raise SystemExit("torch.compile failed here; the trainer fell back to eager")
    return first, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results" / "compile.md"))
    args = parser.parse_args()
    data = splits(args.samples)
    rows, ratios = [], []
    for label, model in MODELS.items():
        for batch in (100, 512):
            eager_first, eager = measure(model, batch, False, data, args.threads)
            compiled_first, compiled = measure(model, batch, True, data, args.threads)
            key = f"compiled_vs_eager_{label.split()[0]}_b{batch}"
            ratios.append(f"{key}: {compiled / eager:.2f}")
            rows.append(f"| {label} | {batch} | {eager:,.0f} | {compiled:,.0f} | "
                        f"{compiled / eager:.2f} | {compiled_first - eager_first:+.1f} s |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    text = "\n".join([
        "# torch.compile in the trainer", "",
        f"`python benchmarks/compile.py --samples {args.samples} --threads {args.threads}`; "
        f"{platform.machine()}, {args.threads} torch threads, torch {torch.__version__}, git "
        f"commit {commit}. Samples/s: best of 3 epochs of {args.samples:,} synthetic images "
        "after a first epoch; compile cost: how much longer the compiled trainer's first epoch "
        "took.", "",
        "| model | batch | eager samples/s | compiled samples/s | ratio | compile cost |",
        "|---|---:|---:|---:|---:|---:|", *rows, "", *ratios, ""])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
