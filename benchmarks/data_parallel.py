"""One model over several workers (resources.workers, Ray Train) against one process.

    python benchmarks/data_parallel.py [--data-dir ../shared/data] [--epochs 3]
                                       [--out results/data_parallel.md]
    python benchmarks/data_parallel.py --gpus 1,2,4,8 [--address auto]   # on a GPU cluster

The paper's 2x1200 teacher (dropout, max-norm, +-2-pixel translation) on MNIST's 50,000
training images at a global batch of 512, each run a whole `ensemble run` of its own (a fresh
local Ray, or the cluster at --address). Throughput is the training examples per second of the
model's epochs (the median over epochs after the first; startup is left out), as its checkpoint
records them; on CPU the settings take turns for --rounds rounds and each reports its median.
On CPU: 2 workers x 1 thread (gloo all-reduce) against 1 worker x 1 thread
(`data_parallel_2x1_vs_1x1`, target >= 1.5), against 1 worker x 2 threads
(`data_parallel_2x1_vs_1x2`, reported) and against two separate 1 x 1 models trained side by
side, their rates summed (`data_parallel_2x1_vs_two_apart`: the same work without the
all-reduce, so the share of this machine's two-process ceiling the workers reach). Then the
first and third without Ray: the same model, data and trainer (ensemble.train, ensemble.parallel
in a gloo group) in spawned processes (`without_ray_2x1_vs_1x1`: what the Ray layer costs the
workers). Beside them, the same three settings bare, with neither Ray nor this project: the
fixed reference loop (../shared/bench/plain_loop.py, imported) on the reference 2x1200 MLP, one
process at batch 512, two processes at 256 each with the model wrapped in
DistributedDataParallel (gloo), and two separate processes at 512 (`bare_ddp_2x1_vs_1x1`: what
gloo's all-reduce leaves on this machine before anything of ours runs). With --gpus: N workers
x 1 GPU (NCCL) against one GPU, scaling efficiency = ratio / N (target >= 0.85 up to 8).
`name: value` lines end the results file.
"""
from __future__ import annotations

import argparse
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ensemble import checkpoint
from throughput import load_plain_loop  # benchmarks/throughput.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
name: data-parallel-{tag}
data: {{val_size: 10000, train_size: {train_size}, download: false}}
generalists:
  count: {count}
  model: {{hidden: [1200, 1200], dropout_in: 0.2, dropout_hidden: 0.5, max_norm: 3.9}}
  train: {{epochs: {epochs}, batch_size: 512, lr: 0.1, augment: [translate:2]}}
  resources: {{workers: {workers}, num_cpus: {cpus}, num_gpus: {gpus}}}
"""


def throughput(tag: str, workers: int, cpus: float, gpus: float, epochs: int, args,
               work: Path, count: int = 1) -> float:
    """Training examples per second of `count` generalists trained as asked side by side (one
    `ensemble run`), summed."""
    config = work / f"{tag}.yaml"
    config.write_text(CONFIG.format(tag=tag, epochs=epochs, workers=workers, cpus=cpus, gpus=gpus,
                                     train_size=args.train_size, count=count))
    run = work / tag
    argv = [sys.executable, "-m", "ensemble.cli", "run", str(config), "--run-dir", str(run),
            "--data-dir", args.data_dir] + (["--address", args.address] if args.address else [])
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    total = 0.0
    for i in range(count):
        _, meta = checkpoint.load_latest(run / "checkpoints" / f"generalist-{i}")
        total += statistics.median(r["samples_per_s"] for r in meta["history"][1:])
    print(f"{tag}: {total:,.0f} examples/s", flush=True)
    return total


def cpu_table(args, work: Path) -> tuple[list[str], list[str]]:
    settings = {"1x1": (1, 1, 1), "1x2": (1, 2, 1), "2x1": (2, 1, 1),  # workers, CPUs each,
                "apart": (1, 1, 2)}  # models: two models of 1 x 1 side by side, no all-reduce
    rates = {tag: [] for tag in settings}
    for round_ in range(args.rounds):  # settings take turns: a slow moment hits each alike
        for tag, (workers, cpus, count) in settings.items():
            rates[tag].append(throughput(f"{tag}-{round_}", workers, cpus, 0, args.epochs, args,
                                         work, count))
    one, two_threads, two_workers, apart = (statistics.median(rates[t]) for t in settings)
    rows = [f"| 1 worker x 1 thread | {one:,.0f} | 1.00 |",
            f"| 1 worker x 2 threads | {two_threads:,.0f} | {two_threads / one:.2f} |",
            f"| 2 workers x 1 thread (gloo) | {two_workers:,.0f} | {two_workers / one:.2f} |",
            f"| 2 separate models x 1 thread, side by side (summed; no all-reduce: the most two "
            f"workers could reach) | {apart:,.0f} | {apart / one:.2f} |"]
    lines = [f"data_parallel_2x1_vs_1x1: {two_workers / one:.2f}",
             f"data_parallel_2x1_vs_1x2: {two_workers / two_threads:.2f}",
             f"data_parallel_2x1_vs_two_apart: {two_workers / apart:.2f}"]
    return rows, lines


def _bare_rank(rank: int, world: int, batch: int, samples: int, store: str, out) -> None:
    """One process of the bare settings: the reference loop, in a gloo group if `store`."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    plain = load_plain_loop()
    torch.manual_seed(0)
    x, y = torch.rand(60_000, 784), torch.randint(0, 10, (60_000,))
    model = plain.paper_mlp()
    if store:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world)
        model = DistributedDataParallel(model)
    out.put(plain.plain_loop_samples_per_s(model, x, y, batch, samples=samples))
    if store:
        dist.destroy_process_group()


def _core_rank(rank: int, world: int, data_dir: str, epochs: int, train_size: int, store: str,
               out) -> None:
    """One process of the settings without Ray: this project's trainer of the runs' model and
    data (ensemble.parallel's rank in a gloo group if `store`, else ensemble.train's)."""
    import torch.distributed as dist

    from ensemble.config import RunConfig, parse, read_yaml
    from ensemble.data import load_splits
    from ensemble.parallel import ParallelTrainer
    from ensemble.train import Trainer

    cfg = parse(RunConfig, read_yaml(CONFIG.format(tag="core", epochs=epochs, workers=world,
                                                   cpus=1, gpus=0, train_size=train_size,
                                                   count=1)))
    splits = load_splits(cfg.data, data_dir)
    model, train, seed = cfg.generalists.model, cfg.generalists.train, cfg.seed  # generalist-0
    if store:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world)
        trainer = ParallelTrainer("g", model, train, splits, seed, threads=1, device="cpu")
        trainer.join(rank, world)
    else:
        trainer = Trainer("g", model, train, splits, seed, threads=1, device="cpu")
    rates = [trainer.train_epoch()["samples_per_s"] for _ in range(epochs)]
    out.put(statistics.median(rates[1:]))  # the model's rate (a rank's record counts all ranks)
    if store:
        dist.destroy_process_group()


def spawned(target, world: int, args: tuple, group: bool, work: Path) -> list[float]:
    """The rates that `world` processes of target(rank, world, *args, store, out) report: in
    one gloo group if `group` (a file store in `work`), else each alone."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out, store = ctx.Queue(), str(work / f"store-{os.urandom(4).hex()}") if group else ""
    procs = [ctx.Process(target=target, args=(r, world, *args, store, out))
             for r in range(world)]
    for proc in procs:
        proc.start()
    rates = []
    while len(rates) < world:  # a process that dies would leave a bare get() waiting forever
        try:
            rates.append(out.get(timeout=5))
        except queue.Empty:
            dead = [proc.exitcode for proc in procs if proc.exitcode not in (None, 0)]
            if dead:
                for proc in procs:
                    proc.kill()
                    proc.join()
                raise SystemExit(f"a spawned process exited with code {dead[0]} before every "
                                 "one had reported its rate") from None
    for proc in procs:
        proc.join()
    return rates


def bare(world: int, batch: int, group: bool, work: Path, samples: int = 40_000) -> float:
    """Examples per second of `world` bare processes: one model in a group (its rate: the
    slowest rank's times the world), or separate models (their rates summed)."""
    rates = spawned(_bare_rank, world, (batch, samples), group, work)
    return min(rates) * world if group else sum(rates)


def bare_table(args, work: Path) -> tuple[list[str], list[str]]:
    settings = {"1x1": (1, 512, False), "2x1": (2, 256, True), "apart": (2, 512, False)}
    rates = {tag: [] for tag in settings}
    for _ in range(args.rounds):
        for tag, (world, batch, group) in settings.items():
            rates[tag].append(bare(world, batch, group, work))
    one, two, apart = (statistics.median(rates[t]) for t in settings)
    rows = [f"| bare: 1 process x 1 thread | {one:,.0f} | 1.00 |",
            f"| bare: 2 DDP processes x 1 thread (gloo) | {two:,.0f} | {two / one:.2f} |",
            f"| bare: 2 separate processes x 1 thread (summed) | {apart:,.0f} | "
            f"{apart / one:.2f} |"]
    return rows, [f"bare_ddp_2x1_vs_1x1: {two / one:.2f}",
                  f"bare_ddp_2x1_vs_two_apart: {two / apart:.2f}"]


def core_table(args, work: Path) -> tuple[list[str], list[str]]:
    """The runs' model, data and trainer in spawned processes, without Ray: what the Ray layer
    (Ray Train, Ray's own processes on the same cores) costs the workers."""
    settings = {"1x1": 1, "2x1": 2}
    rates = {tag: [] for tag in settings}
    for _ in range(args.rounds):
        for tag, world in settings.items():
            # each rank's record counts every rank's examples: the model's rate is the slower's
            rates[tag].append(min(spawned(_core_rank, world, (args.data_dir, args.epochs,
                                                          args.train_size), world > 1, work)))
    one, two = (statistics.median(rates[t]) for t in settings)
    rows = [f"| without Ray: 1 process x 1 thread (ensemble.train) | {one:,.0f} | 1.00 |",
            f"| without Ray: 2 gloo processes x 1 thread (ensemble.parallel) | {two:,.0f} | "
            f"{two / one:.2f} |"]
    return rows, [f"without_ray_2x1_vs_1x1: {two / one:.2f}"]


def gpu_table(args, work: Path) -> tuple[list[str], list[str]]:
    """N workers x 1 GPU for each N of --gpus; a setting whose run fails (more GPUs than the
    cluster has: refused before it trains) gets a row saying so, and the others go on."""
    rates: dict[int, float] = {}
    for n in args.gpus:
        try:
            rates[n] = throughput(f"{n}gpu", n, 1, 1, args.epochs, args, work)
        except subprocess.CalledProcessError:
            if not rates:
                raise SystemExit(f"the first setting ({n} worker(s) x 1 GPU) failed: nothing "
                                 "to compare the others against") from None
            print(f"{n}gpu: the run failed (its sentence is above); the others go on", flush=True)
    base = rates[args.gpus[0]] / args.gpus[0]
    rows = [f"| {n} worker(s) x 1 GPU (NCCL) | {rates[n]:,.0f} | {rates[n] / base:.2f} |"
            if n in rates else f"| {n} worker(s) x 1 GPU (NCCL) | the run failed | |"
            for n in args.gpus]
    lines = [f"data_parallel_scaling_{n}gpu: {rate / base / n:.2f}" for n, rate in rates.items()]
    return rows, lines


def gpu_counts(text: str) -> list[int]:
    """--gpus: GPU workers per setting, comma-separated, each at least 1."""
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of GPU counts "
                                         "of at least 1, such as 1,2,4,8")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--epochs", type=int, default=3, help="per run, at least 2 (the "
                        "first is left out of the rates)")
    parser.add_argument("--rounds", type=int, default=3, help="CPU: runs of each setting")
    parser.add_argument("--train-size", type=int, default=0, help="0: all 50,000 (a try: fewer)")
    parser.add_argument("--gpus", type=gpu_counts, default=[],
                        help="e.g. 1,2,4,8: GPU workers per setting")
    parser.add_argument("--address", default="", help="a Ray cluster (else a local Ray each)")
    parser.add_argument("--out", default=str(ROOT / "results" / "data_parallel.md"))
    args = parser.parse_args()
    if args.epochs < 2 or args.rounds < 1:
        parser.error("--epochs must be at least 2 (the first is left out of the rates) and "
                     "--rounds at least 1")
    with tempfile.TemporaryDirectory(prefix="ensemble-dp-") as work:
        rows, lines = (gpu_table if args.gpus else cpu_table)(args, Path(work))
        if not args.gpus:
            for table in (core_table, bare_table):
                more_rows, more_lines = table(args, Path(work))
                rows, lines = rows + more_rows, lines + more_lines
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                      capture_output=True, text=True).stdout.strip():
        commit += " with uncommitted changes"
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    cpu = "AVX-512 BF16" if "avx512_bf16" in flags else "no AVX-512 BF16"
    asked = f" --gpus {','.join(map(str, args.gpus))}" if args.gpus else ""
    text = ["# One model over several workers", "",
            f"`python benchmarks/data_parallel.py{asked}`; "
            f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores ({cpu}), "
            f"git commit {commit}. The paper's 2x1200 teacher, MNIST's "
            f"{args.train_size or 50_000:,} training images, "
            f"global batch 512, {args.epochs} epochs per run; throughput is the median over the "
            "epochs after the first, as the model's checkpoint records it"
            + ("" if args.gpus else f", then the median of {args.rounds} runs per setting "
               "(the settings taking turns). The without-Ray rows: the same model, data and "
               "trainer in spawned processes, measured alike. The bare rows: the reference "
               "loop on random tensors, 40,000 examples per process, the median of as many "
               "runs") + ".", "",
            "| setting | training examples/s | vs the first |", "|---|---:|---:|",
            *rows, "", *lines]
    Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
