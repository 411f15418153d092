"""How much of a whole run is not training: configs/quick.yaml end to end, its time taken apart.

    python benchmarks/overhead.py [--config configs/quick.yaml] [--data-dir ../shared/data]
                                  [--out results/overhead.md]

Runs the config with `ensemble run` into a fresh temporary run directory (local Ray, this
machine) and reads back its time breakdown (metrics.json: the driver's seconds per phase) and
every epoch's own seconds. Per stage, the model that took longest sets the stage's critical
path: its training seconds count as training, its evaluation as evaluation, and the rest of the
stage's wall time (starting actors, moving data and checkpoints, the driver's writing) as
overhead. Target (issue 8): everything but training <= 20 % of the wall time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"generalists": "generalist", "specialists": "specialist", "students": "student"}


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
    rows, training, evaluation = [], 0.0, 0.0
    for phase in ("ray start", "data placement", "coordinator", "combination"):
        if phase in timings:
            rows.append((phase, timings[phase], "overhead"))
    for stage, role in STAGES.items():
        if stage not in timings:
            continue
        members = [m["history"] for m in models.values() if m["role"] == role]
        longest = max(members, key=lambda h: sum(r["seconds"] for r in h))
        train = sum(r["train_seconds"] for r in longest)
        evaluate = sum(r["seconds"] - r["train_seconds"] for r in longest)
        training, evaluation = training + train, evaluation + evaluate
        rows += [(f"{stage}: training", train, "training"),
                 (f"{stage}: evaluation", evaluate, "evaluation"),
                 (f"{stage}: actors, transfers, checkpoints", timings[stage] - train - evaluate,
                  "overhead")]
    total = timings["total"]
    accounted = sum(seconds for _, seconds, _ in rows)
    rows.append(("driver, the rest (reading data, summary, shutting Ray down)",
                 wall - accounted, "overhead"))
    not_training = wall - training
    lines = ["# Where a whole run's time goes", "",
             f"`python benchmarks/overhead.py --config {Path(args.config).relative_to(ROOT)}`: "
             f"one `ensemble run` on this machine, {wall:.1f} s wall time as the command saw it "
             f"({total:.1f} s inside the pipeline). Per stage, the longest model's epochs "
             "set the critical path.", "",
             "| part | seconds | share | kind |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {seconds:.1f} | {seconds / wall:.0%} | {kind} |"
              for name, seconds, kind in rows]
    lines += [f"| all | {wall:.1f} | 100% | |", "",
              f"training_seconds: {training:.1f}", f"evaluation_seconds: {evaluation:.1f}",
              f"not_training_seconds: {not_training:.1f}",
              f"not_training_share: {not_training / wall:.2f} (target <= 0.20)", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
