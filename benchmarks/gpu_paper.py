"""Epoch times of the paper's MNIST teacher and students on one device, and the whole table's
time projected from them (issue 8: the full table in <= 10 minutes on one H100).

    python benchmarks/gpu_paper.py [--config configs/paper/mnist.yaml] [--data-dir DIR]
        [--epochs 3] [--deadline-s 420] [--device auto] [--precision config|fp32|bf16]
        [--out results/gpu_paper.md]

No Ray: the trainers run as the actors would run them, with every split resident on the device
(batches are indexed there; nothing crosses from the host per step). It times `--epochs` epochs
of the config's teacher, then of a hard-label and a distilled student (soft targets from that
teacher, computed once), and stops early when the next epoch would pass `--deadline-s`. The
first epoch of each (warm-up: kernels chosen, caches filled) is reported but not used in the
projection. Projection: the teacher's epochs plus every student's epochs, one after the other,
each at its measured epoch time scaled by its transfer set's size (an upper bound: students can
share the device). On a machine lent for a few minutes, carry MNIST along (an ignored folder in
the checkout, e.g. `data/mnist/*.gz`) and pass `--data-dir data`.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ensemble.config import load_config
from ensemble.data import load_splits, transfer_mask
from ensemble.distill import Student
from ensemble.errors import ConfigError
from ensemble.train import Trainer, pick_device
from precision import precision_sets

ROOT = Path(__file__).resolve().parents[1]


def timed_epochs(trainer: Trainer, epochs: int, deadline: float) -> list[dict]:
    """Train up to `epochs` epochs, fewer if the next would end after `deadline`."""
    records = []
    for _ in range(epochs):
        if records and time.perf_counter() + records[-1]["seconds"] > deadline:
            break
        records.append(trainer.train_epoch())
    return records


def steady(records: list[dict]) -> float | None:
    """Mean seconds of an epoch after the first (the first alone when only one ran)."""
    later = records[1:] or records
    return sum(r["seconds"] for r in later) / len(later) if later else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/paper/mnist.yaml")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--deadline-s", type=float, default=420.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--precision", choices=("config", "fp32", "bf16"), default="config",
                        help="every model in this precision (default: as the config says)")
    parser.add_argument("--out", default=str(ROOT / "results" / "gpu_paper.md"))
    args = parser.parse_args()
    deadline = time.perf_counter() + args.deadline_s
    path = args.config if Path(args.config).exists() else ROOT / args.config
    try:
        cfg = load_config(path)
        if args.precision != "config":
            cfg = load_config(path, precision_sets(cfg, args.precision))
    except ConfigError as err:
        sys.exit(str(err))
    device = pick_device(args.device)
    splits = load_splits(cfg.data, args.data_dir)
    gen = cfg.generalists
    teacher = Trainer("generalist-0", gen.model, gen.train, splits, cfg.seed, args.threads,
                      str(device))
    measured = {"teacher": timed_epochs(teacher, args.epochs, deadline)}
    blobs = [teacher.checkpoint()]
    hard = next((s for s in cfg.students.values() if not s.uses_teacher), None)
    soft = next((s for s in cfg.students.values() if s.uses_teacher), None)
    for label, scfg in (("hard-label student", hard), ("distilled student", soft)):
        if scfg is not None and time.perf_counter() < deadline:
            student = Student(label, scfg, splits, blobs if scfg.uses_teacher else [],
                              cfg.seed + 1000, args.threads, str(device))
            measured[label] = timed_epochs(student, args.epochs, deadline)

    n_train = len(splits.train_y)
    plan = [("teacher", gen.train.epochs * gen.count, "teacher", 1.0)]
    for name, scfg in cfg.students.items():
        share = float(transfer_mask(splits.train_y, scfg.drop_classes, scfg.keep_classes,
                                    scfg.transfer_size).sum()) / n_train
        kind = "distilled student" if scfg.uses_teacher else "hard-label student"
        plan.append((f"student-{name}", scfg.train.epochs, kind, share))
    rows, total, missing = [], 0.0, []
    for name, epochs, kind, share in plan:
        per_epoch = steady(measured.get(kind, []))
        if per_epoch is None:
            missing.append(name)
            rows.append(f"| {name} | {epochs} | {share:.0%} | not measured | – |")
            continue
        seconds = per_epoch * share * epochs
        total += seconds
        rows.append(f"| {name} | {epochs} | {share:.0%} | {per_epoch * share:.2f} s | "
                    f"{seconds:.0f} s |")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {args.threads} thread(s)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    lines = [f"# The paper's MNIST table on {name}: epoch times and projection", "",
             f"`python benchmarks/gpu_paper.py --config {args.config} --epochs {args.epochs} "
             f"--precision {args.precision}`; "
             f"torch {torch.__version__}, git commit {commit}; every split resident on "
             f"{device.type}.", "",
             "| model | epoch | seconds (training + evaluation) | errors (val / test) |",
             "|---|---:|---:|---:|"]
    for kind, records in measured.items():
        lines += [f"| {kind} | {r['epoch']} | {r['seconds']:.2f} | "
                  f"{r['val_errors']} / {r['test_errors']} |" for r in records]
    lines += ["", f"## Projected: {args.config} end to end", "",
              "| model | epochs | transfer set | per epoch | total |", "|---|---:|---:|---:|---:|",
              *rows, "",
              f"projected_seconds: {total:.0f}" + (f" (without {', '.join(missing)}: not "
                                                    "measured before the deadline)"
                                                    if missing else ""), ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
