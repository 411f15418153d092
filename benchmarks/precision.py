"""bf16 against fp32 on this machine's device: matmul speed, the trainer in bf16 against the plain
fp32 loop (issue 8: >= 1.5x), and, with --parity, accuracy over seeds in each precision.

    python benchmarks/precision.py [--samples 2000] [--batch 100] [--device auto]
        [--parity [--config configs/quick.yaml] [--seeds 3] [--data-dir DIR]]
        [--out results/precision.md]

1. What the device offers: on a CPU, whether it has the AVX-512 BF16 or AMX instructions that
   make bf16 matmuls fast (without them torch emulates bf16); the best square matmul rate in
   each precision.
2. The trainer (`train.precision: bf16`: autocast, fp32 weights and optimiser state) on the
   paper's 2x1200 MLP against the fixed reference loop (../shared/bench/plain_loop.py, fp32), on
   the same tensors, alternating, the best of `--repeats` each.
3. --parity: `ensemble run CONFIG` once per seed and precision (every model of the config in
   that precision; seeds 0.. via --set seed), and each model's test and validation errors as
   mean +- sd over the seeds. It refuses to start where a bf16 matmul is slower than an fp32 one
   (a run would take many times the fp32 one) unless --force.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ensemble.config import RunConfig, load_config
from ensemble.errors import ConfigError
from ensemble.train import Trainer, pick_device
from throughput import MODEL, flops_per_sample, load_plain_loop, matmul_peak, splits, train_cfg

ROOT = Path(__file__).resolve().parents[1]


def cpu_bf16_support() -> str:
    """The CPU's bf16 matmul instructions, from /proc/cpuinfo (Linux)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    found = sorted(f for f in ("avx512_bf16", "amx_bf16", "avx512f") if f in flags)
    return ", ".join(found) if found else "none of avx512f, avx512_bf16, amx_bf16"


def precision_sets(cfg: RunConfig, precision: str) -> list[str]:
    """`--set` overrides that put every model of `cfg` in `precision`."""
    sets = [f"generalists.train.precision={precision}"] + [
        f"students.{name}.train.precision={precision}" for name in cfg.students]
    if cfg.specialists.k:
        sets.append(f"specialists.train.precision={precision}")
    return sets


def parity(config: str, seeds: int, data_dir: str | None, precision: str) -> dict:
    """{model: [(val errors, test errors), ...] over seeds} for runs of `config` in `precision`,
    and the runs' wall seconds."""
    sets = precision_sets(load_config(config), precision)
    results, seconds = {}, []
    for seed in range(seeds):
        scratch = Path(tempfile.mkdtemp(prefix="precision-"))
        try:
            command = [sys.executable, "-m", "ensemble.cli", "run", config, "--run-dir",
                       str(scratch / "run"), "--set", f"seed={seed}"]
            for item in sets:
                command += ["--set", item]
            if data_dir:
                command += ["--data-dir", data_dir]
            start = time.perf_counter()
            if subprocess.run(command, stdout=subprocess.DEVNULL).returncode:
                sys.exit(f"the {precision} run of seed {seed} failed; run it by hand to see why")
            seconds.append(time.perf_counter() - start)
            models = json.loads((scratch / "run" / "metrics.json").read_text())["models"]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        for name, model in models.items():
            summary = model["summary"]
            results.setdefault(name, []).append((summary["val_errors"], summary["test_errors"]))
    return {"models": results, "seconds": seconds}


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:g}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="samples per speed measurement")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parity", action="store_true", help="also the accuracy runs")
    parser.add_argument("--force", action="store_true", help="run --parity even where bf16 is slow")
    parser.add_argument("--config", default=str(ROOT / "configs" / "quick.yaml"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(ROOT / "results" / "precision.md"))
    args = parser.parse_args()
    if args.parity:
        try:  # a bad config: one sentence now, not a traceback after the speed measurements
            load_config(args.config)
        except ConfigError as err:
            sys.exit(str(err))
    device = pick_device(args.device)
    lines, figures = [], {}

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads; bf16 instructions: " \
        f"{cpu_bf16_support()}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    say("# bf16 against fp32")
    say()
    flags = (" --parity" if args.parity else "") + (" --force" if args.force else "")
    say(f"`python benchmarks/precision.py{flags}`; {where}; torch "
        f"{torch.__version__}; git commit {commit}.")
    say()
    fp32, bf16 = (matmul_peak(torch.get_num_threads(), (1024,), dtype=dtype,
                              device=str(device)) for dtype in (torch.float32, torch.bfloat16))
    say(f"1024 x 1024 matmul: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s "
        f"({bf16 / fp32:.2f}x)")
    figures["bf16_vs_fp32_matmul"] = bf16 / fp32

    plain = load_plain_loop()
    data = splits(args.samples)
    cfg = train_cfg(args.batch)
    ours, ref = [], []
    for r in range(args.repeats):  # alternating, each side's best kept
        trainer = Trainer("bench", MODEL, dataclasses.replace(cfg, precision="bf16"), data,
                          seed=0, threads=torch.get_num_threads(), device=str(device))
        runs = [lambda: ours.append(trainer.train_epoch()["samples_per_s"]),
                lambda: ref.append(plain.plain_loop_samples_per_s(
                    plain.paper_mlp().to(device), trainer.x.flatten(1), trainer.y, args.batch,
                    samples=args.samples))]
        for run in runs[::1 if r % 2 else -1]:
            run()
    say(f"2x1200 MLP, batch {args.batch}, {args.samples:,} samples: trainer in bf16 "
        f"{max(ours):,.0f} samples/s ({max(ours) * flops_per_sample() / 1e9:.1f} GFLOP/s), plain "
        f"fp32 loop {max(ref):,.0f} samples/s")
    figures["bf16_trainer_vs_plain_fp32"] = max(ours) / max(ref)
    say()

    if args.parity and bf16 < fp32 and not args.force:
        say(f"Parity: not run: a bf16 matmul runs at {bf16 / fp32:.2f}x an fp32 one here, so a "
            "bf16 run would take many times the fp32 one; run --parity where bf16 is fast (a "
            "GPU, a CPU with AVX-512 BF16 or AMX), or pass --force.")
    elif args.parity:
        runs = {p: parity(args.config, args.seeds, args.data_dir, p) for p in ("fp32", "bf16")}
        shown = Path(args.config).resolve()
        shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
        say(f"Parity: `ensemble run {shown}` with seeds "
            f"0-{args.seeds - 1} in each precision (every model in it); errors at each model's "
            "best epoch by validation, mean ± sd over the seeds.")
        say()
        say("| model | fp32 val | bf16 val | fp32 test | bf16 test |")
        say("|---|---:|---:|---:|---:|")
        for name in runs["fp32"]["models"]:
            cells = [spread([r[i] for r in runs[p]["models"].get(name, [])])
                     for i in (0, 1) for p in ("fp32", "bf16")]
            say(f"| {name} | {' | '.join(cells)} |")
        say()
        say(f"Run wall time, mean over seeds: fp32 {statistics.mean(runs['fp32']['seconds']):.0f}"
            f" s, bf16 {statistics.mean(runs['bf16']['seconds']):.0f} s.")
        say()
    for name, value in figures.items():
        say(f"{name}: {value:.2f}")
    say("(targets: bf16 trainer >= 1.5x the plain fp32 loop, with the same errors within noise)")
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
