"""Student recipes tried against one trained teacher, chosen by validation errors (issue 4).

    python benchmarks/student_recipes.py --run runs/paper-mnist [--epochs 15] [--data-dir DIR]
        [--only NAME ...] [--out results/student_recipes.md]

Loads the run's generalists (their best weights) as the teacher, then trains each recipe below
as a 784-800-800-10 student on the run's own data split, one after another on one thread, no
Ray: the teacher's soft targets are computed once per recipe (untranslated transfer set) or per
batch (jittered). The table lists every recipe tried with its best epoch by validation; test
errors are reported, never used to choose. The run's own hard-label student, if any, is the
baseline row.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from ensemble.config import StudentConfig, TrainConfig
from ensemble.data import load_splits
from ensemble.distill import Student
from ensemble.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]

# name: (what changes from the §3 student at T=20, alpha 0.9, lr 0.02, no jitter)
RECIPES: dict[str, dict] = {
    "T20-lr0.02": {},  # configs/paper/mnist.yaml's distilled student
    "T20-lr0.05": {"lr": 0.05},
    "T20-lr0.1": {"lr": 0.1},
    "T20-lr0.05-alpha1": {"lr": 0.05, "alpha": 1.0},
    "T4-lr0.05": {"lr": 0.05, "temperature": 4.0},
    "T20-lr0.05-jitter2": {"lr": 0.05, "jitter": 2},
}


def student_config(base: StudentConfig, change: dict, epochs: int) -> StudentConfig:
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    train = dataclasses.replace(base.train, epochs=epochs,
                                **{k: v for k, v in change.items() if k in train_keys})
    return dataclasses.replace(base, train=train,
                               **{k: v for k, v in change.items() if k not in train_keys})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished run directory (its teacher)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--data-dir")
    parser.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "results" / "student_recipes.md"))
    args = parser.parse_args()
    run = RunDir(args.run)
    if not run.exists():
        raise SystemExit(f"no run at {args.run}")
    cfg = run.load_config()
    teachers = [run.latest(n)[0] for n in run.models() if n.startswith("generalist-")]
    if not teachers:
        raise SystemExit(f"{args.run} has no generalist checkpoint to distil from")
    splits = load_splits(cfg.data, args.data_dir)
    base = StudentConfig(train=TrainConfig(lr=0.02, schedule="cosine", jitter=0))
    torch.set_num_threads(1)
    rows = []
    hard = run.latest("student-hard")
    if hard is not None:
        s = hard[1]["summary"]
        rows.append(f"| hard labels (the run's own student-hard) | – | 0 | "
                    f"{hard[1]['train']['lr']:g} | {hard[1]['train']['jitter']} | "
                    f"{s['epochs']} | {s['best_epoch']} | {s['val_errors']} | "
                    f"{s['test_errors']} | {s['wall_seconds']:.0f} s |")
    for name, change in RECIPES.items():
        if args.only and name not in args.only:
            continue
        scfg = student_config(base, change, args.epochs)
        start = time.perf_counter()
        student = Student(name, scfg, splits, teachers, seed=cfg.seed + 1001)
        for _ in range(args.epochs):
            record = student.train_epoch()
            print(f"{name:<22} epoch {record['epoch']:>3}  loss {record['loss']:9.4f}  "
                  f"val {record['val_errors']:>5}  test {record['test_errors']:>5}", flush=True)
        s = student.summary()
        rows.append(f"| {name} | {scfg.temperature:g} | {scfg.alpha:g} | {scfg.train.lr:g} | "
                    f"{scfg.train.jitter} | {s['epochs']} | {s['best_epoch']} | "
                    f"{s['val_errors']} | {s['test_errors']} | "
                    f"{time.perf_counter() - start:.0f} s |")
    teacher_summary = run.latest(next(n for n in run.models()
                                      if n.startswith("generalist-")))[1]["summary"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    text = "\n".join([
        f"# 784-800-800-10 student recipes distilled from {args.run}", "",
        f"`python benchmarks/student_recipes.py --run {args.run} --epochs {args.epochs}`; "
        f"teacher: {len(teachers)} generalist(s), the first with {teacher_summary['test_errors']} "
        f"test errors ({teacher_summary['val_errors']} on validation) after "
        f"{teacher_summary['epochs']} epochs. Every student: SGD, momentum 0.9, cosine schedule, "
        f"batch 100, one thread; {platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, git commit {commit}. Validation errors choose; test errors out of "
        f"{len(splits.test_y):,} are reported only.", "",
        "| recipe | T | alpha | lr | jitter | epochs | best epoch | val errors | test errors "
        "| wall time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows]) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
