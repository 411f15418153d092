"""Eight 300-unit students trained as one stacked model against the same eight one after the
other, on the same cores, in one process (issue: many small models at once; target >= 2x).

    python benchmarks/stacked.py [--data-dir ../shared/data] [--epochs 2] [--repeats 2]
                                 [--out results/stacked.md]

The students are those of a temperature sweep: 784-300-300-10, no dropout, distilled (alpha 0.9)
at T in {1, 2, 2.5, 3, 4, 6, 8, 20}, each with its own seed, on MNIST's 50,000 training images
(10,000 held out for validation). Their teacher is a 2x1200 generalist trained for one epoch
here: its quality does not change what a student's step costs. Both ways time only the epochs
(each includes every member's evaluation on validation and test), not building the students.
The per-member results of the two ways are compared: weights and validation errors.

A floor for the stacked way: the same run's matrix multiplications alone (each step's batched
forward, weight-gradient and input-gradient matmuls, and the evaluations' matmuls, on random
tensors of the same shapes, timed here), with nothing around them. One after the other's seconds
over that floor is the most stacking could gain on these cores in fp32.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import torch

from ensemble.config import DataConfig, ModelConfig, StudentConfig, TrainConfig
from ensemble.data import load_splits
from ensemble.distill import Student
from ensemble.stacked import StackedStudents
from ensemble.train import EVAL_BATCH, Trainer

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURES = (1.0, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 20.0)


def matmul_floor(members: int, widths: list[int], batch: int, steps: int, evaluated: int,
                 repeats: int = 50) -> float:
    """Seconds the stacked run's matmuls take alone: `steps` training steps of `members` MLPs of
    layer widths `widths` (input first) at `batch`, and `evaluated` images through all of them."""
    layers = list(zip(widths[:-1], widths[1:]))
    x = [torch.randn(members, batch, i) for i, _ in layers]
    g = [torch.randn(members, batch, o) for _, o in layers]
    w = [torch.randn(members, i, o) for i, o in layers]
    b = [torch.randn(members, 1, o) for _, o in layers]

    def step():
        for k in range(len(layers)):
            torch.baddbmm(b[k], x[k], w[k])  # forward
            torch.bmm(x[k].transpose(1, 2), g[k])  # weight gradient
            if k:
                torch.bmm(g[k], w[k].transpose(1, 2))  # input gradient (none for the images)

    chunk = EVAL_BATCH
    first = torch.randn(widths[0], members * widths[1])
    images = torch.randn(chunk, widths[0])
    h = [torch.randn(members, chunk, i) for i, _ in layers[1:]]

    def evaluate():  # as StackedStudents._predict: one shared first layer, then batched
        images @ first
        for k, (i, o) in enumerate(layers[1:], 1):
            torch.baddbmm(b[k], h[k - 1], w[k])

    def seconds(fn, n):
        fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n

    return seconds(step, repeats) * steps + seconds(evaluate, 5) * evaluated / chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="both ways this often; the best")
    parser.add_argument("--out", default=str(ROOT / "results" / "stacked.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_splits(DataConfig(name="mnist", val_size=10000, download=False), args.data_dir)
    teacher = Trainer("generalist-0", ModelConfig(hidden=(1200, 1200)),
                      TrainConfig(epochs=1, lr=0.1, schedule="constant"), splits, 0, args.threads)
    teacher.run_epoch(1)
    blobs = [teacher.checkpoint()]
    train = TrainConfig(epochs=args.epochs, batch_size=100, lr=0.02, schedule="cosine")
    model = ModelConfig(hidden=(300, 300), dropout_in=0.0, dropout_hidden=0.0, max_norm=0.0)
    cfgs = [StudentConfig(model=model, train=train, temperature=t, alpha=0.9)
            for t in TEMPERATURES]
    names = [f"student-w300-T{t:g}" for t in TEMPERATURES]
    seeds = [1000 + i for i in range(len(cfgs))]

    def one_after_the_other():
        students, seconds = [], 0.0
        for name, cfg, seed in zip(names, cfgs, seeds):
            student = Student(name, cfg, splits, blobs, seed, args.threads)
            start = time.perf_counter()
            for _ in range(args.epochs):
                student.train_epoch()
            seconds += time.perf_counter() - start
            students.append(student)
        return students, seconds

    def as_one_stack():
        stack = StackedStudents(names, cfgs, splits, blobs, seeds, args.threads)
        start = time.perf_counter()
        for _ in range(args.epochs):
            stack.train_epoch()
        return stack, time.perf_counter() - start

    alone_runs, stacked_runs = [], []  # alternated: a busy spell on a shared machine hits both
    for _ in range(args.repeats):
        one_by_one, seconds = one_after_the_other()
        alone_runs.append(seconds)
        stacked, seconds = as_one_stack()
        stacked_runs.append(seconds)
    alone_seconds, stacked_seconds = min(alone_runs), min(stacked_runs)

    rows, worst = [], 0.0
    for a, b in zip(stacked.members, one_by_one):
        diff = max(float((p - q).detach().abs().max()) for p, q in zip(a.model.parameters(),
                                                              b.model.parameters()))
        worst = max(worst, diff)
        rows.append(f"| {a.name} | {b.history[-1]['val_errors']} | {a.history[-1]['val_errors']} "
                    f"| {diff:.1e} |")
    ratio = alone_seconds / stacked_seconds
    steps = -(-len(splits.train_y) // train.batch_size) * args.epochs
    floor = matmul_floor(len(cfgs), [784, 300, 300, 10], train.batch_size, steps,
                         (len(splits.val_y) + len(splits.test_y)) * args.epochs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    samples = len(splits.train_y) * args.epochs * len(cfgs)
    macs = 784 * 300 + 300 * 300 + 300 * 10  # per example, one forward pass
    evaluated = (len(splits.val_y) + len(splits.test_y)) * args.epochs * len(cfgs)
    gflop = (6 * macs * samples + 2 * macs * evaluated) / 1e9  # training ~3 passes, eval 1
    text = "\n".join([
        "# Stacked students", "",
        f"`python benchmarks/stacked.py --epochs {args.epochs} --threads {args.threads} "
        f"--repeats {args.repeats}`; "
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, git commit {commit}.", "",
        f"8 students 784-300-300-10 (T = {', '.join(f'{t:g}' for t in TEMPERATURES)}), "
        f"{len(splits.train_y):,} MNIST training images, batch 100, {args.epochs} epochs each, "
        f"evaluation included; each way run {args.repeats} times, alternating, the best kept "
        f"(one after the other: {', '.join(f'{x:.1f}' for x in alone_runs)} s; stacked: "
        f"{', '.join(f'{x:.1f}' for x in stacked_runs)} s).", "",
        "| way | seconds | samples/s (all students) | GFLOP/s |", "|---|---:|---:|---:|",
        f"| one after the other | {alone_seconds:.1f} | {samples / alone_seconds:,.0f} | "
        f"{gflop / alone_seconds:.0f} |",
        f"| stacked (one model) | {stacked_seconds:.1f} | {samples / stacked_seconds:,.0f} | "
        f"{gflop / stacked_seconds:.0f} |", "",
        f"GFLOP/s: {gflop:.0f} GFLOP (6 x multiply-adds per training example, 2 x per evaluated "
        "one) over the seconds; results/throughput.md has this machine's matmul peak.", "",
        f"stacked_vs_one_by_one: {ratio:.2f} (target >= 2)", "",
        f"The stacked run's matmuls alone (same shapes, same count, timed here): {floor:.1f} s "
        f"({gflop / floor:.0f} GFLOP/s), {floor / stacked_seconds:.0%} of the stacked run; so "
        f"stacking could gain at most {alone_seconds / floor:.2f}x on these cores in fp32.", "",
        f"matmul_floor_seconds: {floor:.1f}", f"ceiling_vs_one_by_one: {alone_seconds / floor:.2f}",
        "",
        "Per student after the last epoch (validation errors of 10,000):", "",
        "| student | one by one | stacked | max weight difference |", "|---|---:|---:|---:|",
        *rows, "", f"max_weight_difference: {worst:.1e}", ""])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
