"""Specialists on many classes (issue 22): the paper's Tables 3 and 4 in shape, from finished runs.

    python benchmarks/many_classes.py --run runs/many-short [--equal-compute RUN]
                                      [--out results/many_classes.md]

--run: a run with specialists and, optionally, the students `generalists` (taught by the
generalists) and `ensemble` (by generalists + specialists, eq. 5), e.g. of
configs/many_classes/short.yaml. --equal-compute: a run whose generalists, averaged, are the
alternative that spends the specialists' compute on more generalists. The data set's manifest
(manifest.json beside data.npz) gives the families of each split. Every figure is read from the
runs' own files (checkpoints' summaries, subsets.json, ensemble.json); nothing is chosen on test.
`name: value` lines end the results file; a figure a run cannot give is `n/a` with the reason.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ensemble import checkpoint
from ensemble.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN_MIN = 100  # examples a coverage bin needs to count in table4_nondecreasing_share
BINS_MIN = 4  # ... and bins the share needs


def summary(run: Path, name: str) -> dict | None:
    folder = run / "checkpoints" / name
    if not folder.is_dir():
        return None
    return checkpoint.load_latest(folder)[1]["summary"]


def data_section(cfg, run: Path, test_n: int) -> list[str]:
    manifest = Path(cfg.data.npz).with_name("manifest.json")
    if not manifest.is_file():
        return [f"Data: {cfg.data.npz} (no manifest beside it).", ""]
    found = json.loads(manifest.read_text())
    lines = [f"Data: {len(found['classes'])} classes (`{cfg.data.npz}`, sha256 "
             f"`{found['npz_sha256'][:16]}...`), {test_n:,} test images; families by split:", ""]
    splits = {}
    for family, split in sorted(found["families"].items()):
        splits.setdefault(split, []).append(family)
    lines += [f"- {split}: {', '.join(names)}" for split, names in sorted(splits.items())]
    return lines + [""]


def subsets_section(run: Path, classes: list[str]) -> list[str]:
    report = json.loads((run / "subsets.json").read_text())
    sizes = [len(s) for s in report["subsets"]]
    lines = [f"Subsets from the covariance of the generalist's predictions (no labels): "
             f"{len(sizes)}, sizes {min(sizes)} to {max(sizes)} (median "
             f"{statistics.median(sizes):g}); the first few, with some of their classes:", ""]
    for i, members in enumerate(report["subsets"][:4]):
        lines.append(f"- specialist-{i}: {' '.join(classes[c] for c in members[:24])}"
                     + (" ..." if len(members) > 24 else ""))
    return lines + [""]


def table3(ens: dict, test_n: int) -> tuple[list[str], float, float]:
    g, e = ens["test"]["generalist_errors"], ens["test"]["ensemble_errors"]
    acc_g, acc_e = 1 - g / test_n, 1 - e / test_n
    lines = ["Table 3 in shape (test; the paper's JFT: 25.0 % -> 26.1 %, +4.4 % relative):", "",
             "| | val errors | test errors | test accuracy | relative gain |",
             "|---|---:|---:|---:|---:|",
             f"| generalist alone | {ens['val']['generalist_errors']:,} | {g:,} | "
             f"{100 * acc_g:.2f} % | |",
             f"| with specialists (eq. 5, top {ens.get('top_n', 1)}) | "
             f"{ens['val']['ensemble_errors']:,} | {e:,} | {100 * acc_e:.2f} % | "
             f"{100 * (acc_e - acc_g) / acc_g:+.1f} % |", ""]
    return lines, (g - e) / g, (acc_e - acc_g) / acc_g


def table4(ens: dict) -> tuple[list[str], str]:
    rows = ens["table4"]
    lines = ["Table 4 in shape: test examples by the number of specialists covering the true "
             "class:", "", "| specialists | examples | correct before | after | relative gain |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['specialists']} | {r['examples']:,} | {r['generalist_correct']:,} | "
              f"{r['ensemble_correct']:,} | {100 * r['relative']:+.1f} % |" for r in rows]
    kept = [r["relative"] for r in rows if r["examples"] >= BIN_MIN and r["specialists"] > 0]
    if len(kept) < BINS_MIN:
        share = f"n/a (only {len(kept)} covered bins with >= {BIN_MIN} examples)"
    else:
        steps = [b >= a for a, b in zip(kept, kept[1:])]
        share = f"{sum(steps) / len(steps):.2f}"
    return lines + [""], share


def models_section(run: Path, names: list[str]) -> list[str]:
    lines = ["| model | epochs | best epoch | val errors | test errors | top-5 test errors | "
             "wall time |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        s = summary(run, name)
        if s is not None:
            lines.append(f"| {name} | {s['epochs']} | {s['best_epoch']} | {s['val_errors']:,} | "
                         f"{s['test_errors']:,} | {s.get('test_errors_top5', 'n/a')} | "
                         f"{s['wall_seconds']:,.0f} s |")
    return lines + [""]


def equal_compute(run: Path, ens: dict, other: Path | None) -> str:
    if other is None:
        return "n/a (no --equal-compute run)"
    averaged = json.loads((other / "ensemble.json").read_text()) \
        if (other / "ensemble.json").is_file() else None
    if averaged is None:
        return "n/a (the --equal-compute run has no ensemble.json)"
    theirs = averaged["test"]["generalist_errors"]
    return f"{(theirs - ens['test']['ensemble_errors']) / theirs:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--equal-compute", default="")
    parser.add_argument("--out", default=str(ROOT / "results" / "many_classes.md"))
    args = parser.parse_args()
    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    ens = json.loads((run / "ensemble.json").read_text())
    test_n = sum(r["examples"] for r in ens["table4"])
    found = json.loads(Path(cfg.data.npz).with_name("manifest.json").read_text())
    classes = found["classes"]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    t3, reduction, gain = table3(ens, test_n)
    t4, share = table4(ens)
    walls = {n: (summary(run, n) or {}).get("wall_seconds", 0) for n in names}
    spec_s = sum(v for n, v in walls.items() if n.startswith("specialist-"))
    students = [summary(run, f"student-{n}") for n in ("generalists", "ensemble")]
    student = "n/a (no students generalists and ensemble)" if None in students else \
        f"{(students[0]['test_errors'] - students[1]['test_errors']) / students[0]['test_errors']:.3f}"
    text = ["# Specialists on many classes", "",
            f"Run `{run}` of `{cfg.name}` (k = {cfg.specialists.k}, overlap "
            f"{cfg.specialists.overlap}, top {cfg.specialists.top_n}; fixed in advance, not "
            "chosen on validation). `python benchmarks/many_classes.py --run " + str(run) + "`.",
            "", *data_section(cfg, run, test_n), *models_section(run, names),
            f"Training time: the generalist {walls.get('generalist-0', 0):,.0f} s; the "
            f"{cfg.specialists.k} specialists {spec_s:,.0f} s together (one actor each, "
            "in parallel as CPUs allow).", "", *subsets_section(run, classes), *t3, *t4,
            f"specialists_test_error_reduction: {reduction:.3f}",
            f"specialists_relative_accuracy_gain: {gain:.3f}",
            f"table4_nondecreasing_share: {share}",
            f"student_ensemble_vs_generalists_error_reduction: {student}",
            "specialists_vs_equal_compute_ensemble_error_reduction: "
            f"{equal_compute(run, ens, Path(args.equal_compute) if args.equal_compute else None)}",
            ""]
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
