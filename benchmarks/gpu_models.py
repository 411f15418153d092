"""Epoch times of the CIFAR nets (resnet32x4, resnet8x4) on one GPU: fp32 against bf16 and
channels_last, and four generalists packed at 0.25 GPU each against one alone.

    python benchmarks/gpu_models.py [--train-size 50000] [--batch-size 64]
        [--models resnet32x4 resnet8x4] [--deadline-s 360] [--out results/gpu_models.md]

A prepared script for a machine lent for minutes (issue 20): no download, synthetic pixels of
CIFAR-100's shape (3x32x32, 100 classes) resident on the device; timing needs no real images.
Each variant trains one epoch after a warm-up epoch of 1/10 the size (kernels chosen, cuDNN
tuned), on the trainer the actors use; a variant whose epoch would pass the deadline is skipped
and listed. Packing runs the same one-epoch job as Ray tasks asking for 0.25 GPU: one, then four
at once; the ratio of images per second says what sharing a GPU gains. On a CPU it runs the
same steps (small --train-size for a try), which only checks the script.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ensemble.config import ModelConfig, TrainConfig
from ensemble.data import Splits
from ensemble.train import Trainer, pick_device

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [("fp32", "fp32", False), ("bf16", "bf16", False),
            ("bf16, channels_last", "bf16", True)]


def synthetic(n: int, seed: int = 0, held_out: int = 256) -> Splits:
    """CIFAR-100-shaped uint8 images and labels (validation and test: `held_out` each, only for
    the epoch's evaluation, which the timing leaves out)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n + 2 * held_out, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 100, n + 2 * held_out).astype(np.int64)
    v = n + held_out
    return Splits("synthetic-cifar100", tuple(map(str, range(100))), x[:n], y[:n],
                  x[n:v], y[n:v], x[v:], y[v:])


def one_epoch(kind: str, precision: str, channels_last: bool, data: Splits, batch: int,
              device: str = "auto", gpu_ids=None) -> dict:
    """Seconds and images per second of one training epoch (after a short warm-up)."""
    cfg = TrainConfig(epochs=2, batch_size=batch, lr=0.05, schedule="constant",
                      precision=precision, channels_last=channels_last)
    warm = dataclasses.replace(data, train_x=data.train_x[:len(data.train_x) // 10],
                               train_y=data.train_y[:len(data.train_y) // 10])
    dev = pick_device(device, gpu_ids)
    Trainer("warm-up", ModelConfig(kind=kind), cfg, warm, 0, device=str(dev)).train_epoch()
    trainer = Trainer(kind, ModelConfig(kind=kind), cfg, data, 0, device=str(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    record = trainer.train_epoch()
    end = record["finished_at"] - (record["seconds"] - record["train_seconds"])  # training's end
    return {"seconds": record["train_seconds"], "images_per_s": record["samples_per_s"],
            "start": end - record["train_seconds"], "end": end, "images": len(data.train_y),
            "device": str(dev)}


def packed(kind: str, data: Splits, batch: int, count: int) -> dict:
    """`count` one-epoch jobs at once as Ray tasks of 0.25 GPU: wall time and images/s."""
    import ray

    @ray.remote(num_gpus=0.25 if torch.cuda.is_available() else 0)
    def job(data):
        return one_epoch(kind, "bf16", True, data, batch, gpu_ids=ray.get_gpu_ids())

    ref = ray.put(data)
    start = time.perf_counter()
    results = ray.get([job.remote(ref) for _ in range(count)])
    wall = time.perf_counter() - start
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"wall": wall, "each": [r["seconds"] for r in results],
            "images_per_s": sum(r["images"] for r in results) / span}  # while any trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--deadline-s", type=float, default=360.0)
    parser.add_argument("--models", nargs="+", default=["resnet32x4", "resnet8x4"])
    parser.add_argument("--out", default=str(ROOT / "results" / "gpu_models.md"))
    args = parser.parse_args()
    deadline = time.perf_counter() + args.deadline_s
    data = synthetic(args.train_size)
    rows, skipped, last = [], [], 0.0
    for kind in args.models:
        for label, precision, channels_last in VARIANTS:
            if time.perf_counter() + 2 * last > deadline:
                skipped.append(f"{kind} {label}")
                continue
            start = time.perf_counter()
            r = one_epoch(kind, precision, channels_last, data, args.batch_size)
            last = time.perf_counter() - start
            rows.append(f"| {kind} | {label} | {r['seconds']:.1f} | {r['images_per_s']:,.0f} |")
            print(rows[-1], flush=True)
    pack_lines = []
    if time.perf_counter() + 6 * last < deadline:
        import ray

        ray.init(num_gpus=1 if torch.cuda.is_available() else 0, include_dashboard=False,
                 logging_level="ERROR")
        small = args.models[-1]
        alone, four = packed(small, data, args.batch_size, 1), \
            packed(small, data, args.batch_size, 4)
        ray.shutdown()
        pack_lines = ["", f"## {small} (bf16, channels_last) packed at 0.25 GPU", "",
                      "| jobs at once | wall seconds | each job's epoch (s) | images/s, all |",
                      "|---:|---:|---|---:|",  # images/s: all jobs' images over the span
                      #   from the first training epoch's start to the last one's end
                      f"| 1 | {alone['wall']:.1f} | {alone['each'][0]:.1f} | "
                      f"{alone['images_per_s']:,.0f} |",
                      f"| 4 | {four['wall']:.1f} | {', '.join(f'{s:.1f}' for s in four['each'])}"
                      f" | {four['images_per_s']:,.0f} |", "",
                      f"Four at once give {four['images_per_s'] / alone['images_per_s']:.2f}x "
                      "the images per second of one: all their training images over the span "
                      "from the first epoch's start to the last one's end (wall times also hold "
                      "each job's warm-up and model building)."]
    else:
        skipped.append("packing (no time left)")
    device = pick_device("auto")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU (a check of the script, not a result)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    lines = [f"# The CIFAR nets on {name}", "",
             f"`python benchmarks/gpu_models.py --train-size {args.train_size} --batch-size "
             f"{args.batch_size} --models {' '.join(args.models)}`; torch {torch.__version__}, "
             f"git commit {commit}; synthetic CIFAR-100-shaped images resident on the device; "
             "one training epoch after a warm-up.", "",
             "| model | precision | epoch seconds | images/s |", "|---|---|---:|---:|", *rows,
             *pack_lines]
    if skipped:
        lines += ["", f"Skipped before the deadline: {', '.join(skipped)}."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    sys.exit(0)


if __name__ == "__main__":
    main()
