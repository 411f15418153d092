"""How much of a whole run is not training: configs/quick.yaml end to end, its time taken apart.

    python benchmarks/overhead.py [--config configs/quick.yaml] [--data-dir ../shared/data]
                                  [--out results/overhead.md]

Runs the config with `ensemble run` into a fresh temporary run directory (local Ray, this
machine) and reads back every epoch's own seconds and end time (metrics.json). Models train side
by side, so time is counted once: wherever some model was training counts as training, where
some evaluated and none trained as evaluation, and the rest after Ray started (actors
starting, data and checkpoints moving, the driver's own work) as overhead. Target (issue 8):
everything but training <= 20 % of the wall time.

Then Ray's own costs, measured here in this process, which no change to the pipeline removes:
starting a local Ray (as the CLI does, and without its dashboard), two actors on the workers Ray
starts with it, two more once those have ended (a new stage: fresh worker processes, each
importing torch), and stopping Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"generalists": "generalist", "specialists": "specialist", "students": "student"}


def ray_costs() -> dict[str, float]:
    """Seconds of Ray's own steps on this machine: a local Ray started as `ensemble run` starts
    one (with its dashboard) and without the dashboard, actors on prestarted and on fresh
    workers, and stopping Ray."""
    import logging

    import ray

    @ray.remote(num_cpus=1)
    class Idle:
        def ready(self):
            return True

    def start(dashboard: bool) -> tuple[float, str]:
        temp = tempfile.mkdtemp(prefix="ray-")
        begin = time.perf_counter()
        ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=dashboard,
                 logging_level=logging.WARNING, _node_ip_address="127.0.0.1",
                 _system_config={"preload_python_modules": ["ensemble.actors"]})
        return time.perf_counter() - begin, temp

    def actors() -> float:
        begin = time.perf_counter()
        pair = [Idle.remote() for _ in range(2)]
        ray.get([a.ready.remote() for a in pair])
        seconds = time.perf_counter() - begin
        for actor in pair:
            ray.kill(actor, no_restart=True)
        return seconds

    def stop(temp) -> float:
        begin = time.perf_counter()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        return time.perf_counter() - begin

    costs = {}
    costs["ray start, with the dashboard"], temp = start(True)
    time.sleep(5)  # the workers Ray starts with it import torch
    costs["two actors on the workers Ray started"] = actors()
    time.sleep(2)
    costs["two actors after those ended (fresh workers)"] = actors()
    costs["ray stop"] = stop(temp)
    costs["ray start, without the dashboard"], temp = start(False)
    stop(temp)
    return costs


def union(intervals: list[tuple[float, float]]) -> float:
    """The length of time covered by at least one of `intervals` (start, end)."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def cpu_note() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return (f"{os.cpu_count()} CPU cores, " +
            ("AVX-512 BF16" if "avx512_bf16" in flags else "no AVX-512 BF16"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quick.yaml"))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "results" / "overhead.md"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="overhead-"))
    try:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "ensemble.cli", "run", args.config,
                               "--data-dir", args.data_dir, "--run-dir", str(scratch / "run")],
                              stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        if done.returncode:
            sys.exit("the run failed; run it by hand to see why")
        metrics = json.loads((scratch / "run" / "metrics.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    timings, models = metrics["timings"], metrics["models"]
    epochs = [r for m in models.values() for r in m["history"]]
    busy = union([(r["finished_at"] - r["seconds"], r["finished_at"]) for r in epochs])
    training = union([(r["finished_at"] - r["seconds"],
                       r["finished_at"] - r["seconds"] + r["train_seconds"]) for r in epochs])
    evaluation = busy - training
    idle = wall - timings["ray start"] - busy
    rows = [("ray start", timings["ray start"], "overhead"),
            ("some model training", training, "training"),
            ("some model evaluating, none training", evaluation, "evaluation"),
            ("no model working, after Ray started (actors starting, data and checkpoints "
             "moving, the driver's own work, Ray shutting down)", idle, "overhead")]
    not_training = wall - training
    lines = ["# Where a whole run's time goes", "",
             f"`python benchmarks/overhead.py --config {Path(args.config).relative_to(ROOT)}`: "
             f"one `ensemble run` on this machine ({cpu_note()}), {wall:.1f} s wall time as the "
             f"command saw it ({timings['total']:.1f} s inside the pipeline). Models train side "
             "by side, so time is counted once: while any model trains, it is training.", "",
             "| part | seconds | share | kind |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {seconds:.1f} | {seconds / wall:.0%} | {kind} |"
              for name, seconds, kind in rows]
    lines += [f"| all | {wall:.1f} | 100% | |", "",
              "The driver's phases (summary.md; they overlap):", "",
              "| phase | seconds |", "|---|---:|"]
    lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in timings.items()]
    # the accounting of earlier versions of this script, for comparison: per role, the model
    # that trained longest, summed over the roles (as if they ran one after the other)
    longest = sum(max(sum(r["train_seconds"] for r in m["history"]) for m in models.values()
                      if m["role"] == role)
                  for role in STAGES.values() if any(m["role"] == role for m in models.values()))
    lines += ["", f"training_seconds: {training:.1f}", f"evaluation_seconds: {evaluation:.1f}",
              f"not_training_seconds: {not_training:.1f}",
              f"not_training_share: {not_training / wall:.2f} (target <= 0.20)",
              f"longest_per_stage_training_seconds: {longest:.1f} (the earlier accounting: "
              f"not training {(wall - longest) / wall:.2f} of the wall time)", ""]
    costs = ray_costs()
    stages = [stage for stage in STAGES if stage in timings]
    floor = (costs["ray start, with the dashboard"] + costs["ray stop"]
             + costs["two actors after those ended (fresh workers)"] * (len(stages) - 1))
    lines += ["## Ray's own costs on this machine", "",
              "Measured after the run, in this process (actors that do nothing; 2 CPUs):", "",
              "| step | seconds |", "|---|---:|"]
    lines += [f"| {step} | {seconds:.1f} |" for step, seconds in costs.items()]
    lines += ["", f"Starting Ray with its dashboard, fresh actors for each stage after the first "
              f"({len(stages)} stages here) and stopping Ray take {floor:.1f} s whatever the "
              f"pipeline does: {floor / wall:.0%} of this run's wall time, before any evaluation, "
              "data or checkpoint moves.", "", f"ray_floor_seconds: {floor:.1f}",
              f"ray_floor_share: {floor / wall:.2f}", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
