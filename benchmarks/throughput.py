"""Throughput of the trainer on the paper's 2x1200 MLP, against baselines run in this process.

    python benchmarks/throughput.py [--samples 20000] [--out results/throughput.md]

1. samples/s of `ensemble.train.Trainer` against the fixed reference loop
   (../shared/bench/plain_loop.py, imported, never edited) on the same tensors, batch 100 and 512
   (target >= 0.95x), and the trainer's GFLOP/s as a share of a matmul peak measured here;
2. the same training inside a 1-CPU Ray actor against in-process with 1 thread (target >= 0.95x);
3. two generalists on two 1-CPU actors against the same two trained one after the other with one
   thread each (target >= 1.8x); 2 and 3 at batch 100 and 512.
The last lines are `name: value`, one figure each.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ensemble.config import ModelConfig, TrainConfig
from ensemble.data import Splits
from ensemble.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
PLAIN = Path(os.environ.get("ENSEMBLE_PLAIN_LOOP", ROOT.parent / "shared" / "bench" / "plain_loop.py"))
HIDDEN = (1200, 1200)
# the reference loop's model and optimiser: dropout 0.2/0.5, SGD lr 0.01 momentum 0.9, no extras
MODEL = ModelConfig(hidden=HIDDEN, dropout_in=0.2, dropout_hidden=0.5, max_norm=0.0)


def load_plain_loop():
    spec = importlib.util.spec_from_file_location("plain_loop", PLAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def splits(samples: int, seed: int = 0) -> Splits:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (samples, 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, samples).astype(np.int64)
    empty_x, empty_y = x[:0], y[:0]
    return Splits("mnist", tuple(map(str, range(10))), x, y, empty_x, empty_y, empty_x, empty_y)


def train_cfg(batch: int) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=batch, lr=0.01, momentum=0.9, schedule="constant")


def flops_per_sample(hidden=HIDDEN, inputs=784, classes=10) -> float:
    widths = (inputs, *hidden, classes)
    macs = sum(a * b for a, b in zip(widths, widths[1:]))
    return 6.0 * macs  # forward 2 flops per multiply-add, backward twice the forward


def matmul_peak(threads: int, sizes=(1024, 2048), repeats: int = 5,
                dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Best single matmul rate over a few square sizes, in GFLOP/s (the machine's ceiling)."""
    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a, b = (torch.rand(n, n, device=device).to(dtype) for _ in range(2))
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            if a.is_cuda:
                torch.cuda.synchronize()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def ray_figures(batch, data, data_ref, one, repeats, say, figures) -> None:
    """actor vs in-process, and two actors vs one after the other, at one batch size."""
    import ray

    from ensemble.actors import start_actor

    def actor(i):
        return start_actor("generalist", f"bench-{batch}-{i}", "bench", one, f"bench-{i}",
                           MODEL, train_cfg(batch), data_ref, i, 1)

    # the same 1-thread training in this process and in a 1-CPU actor, epochs alternating
    local = Trainer("local", MODEL, train_cfg(batch), data, seed=0, threads=1)
    remote = actor(0)
    inproc, in_actor = [], []
    for _ in range(repeats):
        inproc.append(local.train_epoch()["samples_per_s"])
        in_actor.append(ray.get(remote.train_epoch.remote())["samples_per_s"])
    say(f"batch {batch}, 1 thread: in a Ray actor {max(in_actor):,.0f} samples/s, "
        f"in-process {max(inproc):,.0f} samples/s")
    figures[f"actor_vs_inprocess_b{batch}"] = max(in_actor) / max(inproc)

    # two generalists: one after the other in this process, or side by side in two actors
    pair = [local, Trainer("local-1", MODEL, train_cfg(batch), data, seed=1, threads=1)]
    actors = [remote, actor(1)]
    ray.get([a.__ray_ready__.remote() for a in actors])  # constructed: time training only
    sequential, parallel = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for trainer in pair:
            trainer.train_epoch()
        sequential.append(time.perf_counter() - start)
        start = time.perf_counter()
        ray.get([a.train_epoch.remote() for a in actors])
        parallel.append(time.perf_counter() - start)
    for a in actors:
        ray.kill(a)
    say(f"two generalists, batch {batch}: two 1-CPU actors {min(parallel):.1f} s, one after "
        f"the other with 1 thread {min(sequential):.1f} s")
    figures[f"two_actors_vs_sequential_b{batch}"] = min(sequential) / min(parallel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20_000, help="samples per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats; each side's "
                        "best is kept, so both are judged at the machine's quietest")
    parser.add_argument("--out", default=str(ROOT / "results" / "throughput.md"))
    args = parser.parse_args()
    plain = load_plain_loop()
    data = splits(args.samples)
    threads = os.cpu_count() or 1
    figures, lines = {}, []

    def say(text):
        print(text, flush=True)
        lines.append(text)

    say(f"# Throughput, {platform.processor() or platform.machine()}, {threads} CPU threads, "
        f"torch {torch.__version__}, {args.samples:,} samples per measurement")
    peak = matmul_peak(threads)
    say(f"matmul peak (best square fp32 matmul, {threads} threads): {peak:.0f} GFLOP/s")
    for batch in (100, 512):
        ours, ref = [], []
        for r in range(args.repeats):  # alternate who goes first, keep each one's best
            trainer = Trainer("bench", MODEL, train_cfg(batch), data, seed=0, threads=threads)
            runs = [lambda: ours.append(trainer.train_epoch()["samples_per_s"]),
                    lambda: ref.append(plain.plain_loop_samples_per_s(
                        plain.paper_mlp(), trainer.x.flatten(1), trainer.y, batch,
                        samples=args.samples))]
            for run in runs[::1 if r % 2 else -1]:
                run()
        gflops = max(ours) * flops_per_sample() / 1e9
        say(f"batch {batch}: trainer {max(ours):,.0f} samples/s, plain loop {max(ref):,.0f} "
            f"samples/s; trainer {gflops:.0f} GFLOP/s = {gflops / peak:.0%} of the matmul peak")
        figures[f"trainer_vs_plain_b{batch}"] = max(ours) / max(ref)
        figures[f"trainer_peak_share_b{batch}"] = gflops / peak

    import ray

    from ensemble.config import ResourcesConfig

    one = ResourcesConfig(num_cpus=1)
    temp = tempfile.mkdtemp(prefix="ray-b")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="ERROR")
    try:
        data_ref = ray.put(data)
        for batch in (100, 512):
            ray_figures(batch, data, data_ref, one, args.repeats, say, figures)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    say(f"git commit {commit}")
    for name, value in figures.items():
        say(f"{name}: {value:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
