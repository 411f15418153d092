"""Which way of comparing covariance columns recovers known confusable groups?

    python benchmarks/clustering_choice.py RUN [--data-dir DIR]

Takes the generalist(s) of a finished run, computes the covariance of their predicted
probabilities on the validation split (no labels), clusters it for every combination of
`compare` (correlation / offdiag), temperature and k, and scores each clustering against the
data set's known groups (Fashion-MNIST: garments vs footwear) by pair recall and precision.
Writes results/clustering_<data set>.md.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ensemble.rundir import RunDir
from ensemble.data import KNOWN_GROUPS, load_splits
from specialists.clustering import pair_agreement
from specialists.coordinator import coordinate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    run = RunDir(args.run)
    cfg = run.load_config()
    if cfg.data.name not in KNOWN_GROUPS:
        raise SystemExit(f"no known groups for {cfg.data.name}")
    splits = load_splits(cfg.data, args.data_dir)
    generalists = [run.latest(m)[0] for m in run.models() if m.startswith("generalist-")]
    groups = KNOWN_GROUPS[cfg.data.name]
    lines = [f"# Clustering choices on {cfg.data.name} (generalists of {run.path.name}, "
             f"validation split, no labels)", "",
             f"Known groups: {groups}", "",
             "| compare | T | k | pair recall | pair precision | subsets |",
             "|---|---:|---:|---:|---:|---|"]
    for compare in ("correlation", "offdiag"):
        for temperature in (1.0, 2.0, 4.0):
            for k in (2, 3, 4):
                spec = replace(cfg.specialists, k=k, temperature=temperature, compare=compare)
                report = coordinate(spec, generalists, splits, cfg.device)
                a = pair_agreement(report["subsets"], list(groups.values()))
                lines.append(f"| {compare} | {temperature:g} | {k} | {a['pair_recall']:.2f} | "
                             f"{a['pair_precision']:.2f} | {report['subsets']} |")
                print(lines[-1], flush=True)
    out = ROOT / "results" / f"clustering_{cfg.data.name}.md"
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
