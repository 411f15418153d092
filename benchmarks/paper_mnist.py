"""The paper's MNIST table (Hinton, Vinyals & Dean 2015, section 3) from one run of this project.

    python benchmarks/paper_mnist.py [--config configs/paper/mnist_quick.yaml] [--run-dir DIR]
                                     [--data-dir DIR] [--out results/paper_mnist.md]
                                     [--set KEY=VALUE ...] [--pool RUN ...]

Trains the config's teacher and students with `ensemble run` (or resumes the run directory, so a
finished run is only analysed), then writes `ensemble table`'s analysis (ensemble/analysis.py:
the students' `paper` keys name their rows; bias shifts chosen on validation) headed by how the
run came about, the hardware and the git commit.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ensemble.analysis import check_pools, tables
from ensemble.cli import main as ensemble
from ensemble.config import load_config
from ensemble.errors import EnsembleError
from ensemble.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def epochs_done(run_dir: Path) -> dict[str, int]:
    """model -> epochs in the run's metrics.json (empty for a new run)."""
    metrics = RunDir(run_dir).read_json("metrics.json") if run_dir.exists() else None
    return {n: len(m["history"]) for n, m in (metrics or {}).get("models", {}).items()}


def how_run(resumed: bool, before: dict[str, int], after: dict[str, int]) -> str:
    """How the table's run came about, for its header."""
    if not resumed:
        return "then analysed"
    if before == after:
        return "a finished run, which this call trained no further, only analysed"
    return "an earlier run resumed, what had finished kept; then analysed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/paper/mnist_quick.yaml")
    parser.add_argument("--run-dir")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default=str(ROOT / "results" / "paper_mnist.md"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, as for `ensemble run` (on resume: raised epochs)")
    parser.add_argument("--pool", action="append", default=[], metavar="RUN",
                        help="another run on the same data whose students join this run's seeds "
                             "of the same recipe and teachers")
    args = parser.parse_args()
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    resumed = run_dir.exists()
    pools = [RunDir(Path(p)) for p in args.pool]
    try:  # checked before anything trains
        check_pools(RunDir(run_dir).load_config() if resumed else
                    load_config(args.config, args.set), pools)
    except EnsembleError as e:
        sys.exit(str(e))
    command = ["ensemble", "run", "--resume", str(run_dir)] if resumed else \
        ["ensemble", "run", args.config, "--run-dir", str(run_dir)]
    for override in args.set:  # on resume, only raising epoch counts is accepted
        command += ["--set", override]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    before = epochs_done(run_dir)
    code = ensemble(command[1:])  # in this process: a SIGTERM or Ctrl-C stops the run itself
    if code:
        print("the run did not finish; see its output above", file=sys.stderr)
        sys.exit(code)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    how = (f"Run: `{' '.join(command[:-2] if args.data_dir else command)}` "
           f"({how_run(resumed, before, epochs_done(run_dir))} by "
           f"`python benchmarks/paper_mnist.py`); hardware: {platform.machine()}, "
           f"{os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}; git commit {commit}. ")
    text = tables([RunDir(run_dir), *pools], Path(args.out), args.data_dir,
                  f"The paper's MNIST table from {args.config}", how)
    print(text)


if __name__ == "__main__":
    main()
