"""The paper's MNIST table (Hinton, Vinyals & Dean 2015, section 3) from one run of this project.

    python benchmarks/paper_mnist.py [--config configs/paper/mnist_quick.yaml] [--run-dir DIR]
                                     [--data-dir DIR] [--out results/paper_mnist.md]
                                     [--set KEY=VALUE ...] [--pool RUN ...]

Trains the config's teacher and students with `ensemble run` (or resumes the run directory, so a
finished run is only analysed), then writes a table of paper number vs ours, with epochs and
wall time per model, the hardware and the git commit. The bias shifts of the no-3s and 7s-and-8s
students are chosen on the validation split, never on the test set (the paper chose its +3.5 and
-7.6 on test). Students named w<width>-T<t> form the temperature x width study; with several
generalists, students named <group>-s<k> are seeds of one recipe, set against the generalists'
ensemble (the paper's claim that a distilled single model keeps 80 % of an ensemble's gain).
Students of one recipe (config and teachers) that differ only in seed, in this run and in the
runs named by --pool, are summarised over their seeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from ensemble import figures
from ensemble.config import ResourcesConfig, StudentConfig, load_config, to_dict
from ensemble.data import labels_to_device, load_splits, to_device
from ensemble.errors import EnsembleError
from ensemble.rundir import RunDir
from ensemble.models import load_model
from ensemble.train import predict_logits

ROOT = Path(__file__).resolve().parents[1]
SHIFTS = torch.arange(0.0, 15.01, 0.25)  # bias shifts tried, in logits
GRID = re.compile(r"student-w(\d+)-T([\d_]+)(?:-s\d+)?")  # the T x width study, seeds -s<k>
SEEDED = re.compile(r"student-(.+)-s\d+")  # seed k of a recipe: its group is the middle part


def teacher_label(cfg) -> str:
    """The table's teacher row: its layers and what regularised it (§3: dropout, max-norm,
    jitter)."""
    model, train = cfg.generalists.model, cfg.generalists.train
    parts = [f"teacher 784-{'-'.join(map(str, model.hidden))}-10"]
    parts += [what for what, on in (("dropout", model.dropout_in or model.dropout_hidden),
                                    ("max-norm", model.max_norm), ("jitter", train.jitter),
                                    ("elastic distortion", train.elastic)) if on]
    return ", ".join(parts)


def errors(logits: torch.Tensor, y: torch.Tensor) -> int:
    return int((logits.argmax(1) != y).sum())


def best_shift(val: torch.Tensor, y_val: torch.Tensor, classes: list[int], sign: float) -> float:
    """The shift of the given classes' logits (by sign * s) with the fewest validation errors."""
    scores = []
    for s in SHIFTS.tolist():
        z = val.clone()
        z[:, classes] += sign * s
        scores.append((errors(z, y_val), s))
    return min(scores)[1]


def spread(values: list[float]) -> str:
    """'mean ± sd (min-max)' over seeds; the sd is the sample one (n - 1)."""
    if len(values) == 1:
        return f"{values[0]:g}"
    return (f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} "
            f"({min(values):g}–{max(values):g})")


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


def recipe(cfg: StudentConfig) -> dict:
    """A student's recipe, less what cannot change what it learns: its resources, and with hard
    labels alone (alpha 0) everything about soft targets."""
    cfg = dataclasses.replace(cfg, resources=ResourcesConfig())
    if not cfg.uses_teacher:
        cfg = dataclasses.replace(cfg, temperature=1.0, teacher_mean="probs",
                                  soft_targets="generalists")
    return to_dict(cfg)


def test_logits(run: RunDir, x: torch.Tensor):
    """name -> that model's logits on x, from the run's latest checkpoint."""
    def logits(name: str) -> torch.Tensor:
        model, _ = load_model(run.latest(name)[0], x.device)
        return predict_logits(model, x)
    return logits


def student_recipes(run: RunDir, cfg, logits) -> dict[str, str]:
    """student name -> a key equal for students trained alike, seeds aside (same recipe, and for
    distilled students the same teachers: generalists, and specialists where they are used,
    told apart by a hash of their test logits, `logits(name)`)."""
    models = run.models()
    gens = [n for n in models if n.startswith("generalist-")]
    specs = [n for n in models if n.startswith("specialist-")]
    prints = {}
    keys = {}
    for name, student in cfg.students.items():
        if f"student-{name}" not in models:
            continue
        teachers = ()
        if student.uses_teacher:
            teachers = tuple(gens + (specs if student.soft_targets == "ensemble" else []))
            if teachers not in prints:
                digest = hashlib.sha256()
                for teacher in teachers:
                    digest.update(logits(teacher).numpy().tobytes())
                prints[teachers] = digest.hexdigest()
        keys[f"student-{name}"] = json.dumps([recipe(student), prints.get(teachers)],
                                             sort_keys=True)
    return keys


def seeds_section(runs: list[tuple[str, dict[str, str], dict[str, tuple[int, int]]]]) \
        -> list[str]:
    """Students sharing a recipe key across runs (run label, {student: key}, {student: (val,
    test errors)}), two or more to a group: their errors over seeds."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for label, keys, _ in runs:
        for name, key in keys.items():
            groups.setdefault(key, []).append((label, name))
    found = {label: found for label, _, found in runs}
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return []
    lines = ["", "## Seeds of one recipe", "",
             "Students trained alike (the same config but for the seed, from the same teachers) "
             "in this run and in the runs pooled with it: errors as mean ± sd (min–max) over "
             "seeds; hard-label students need no teacher, so theirs pool whatever the run.", "",
             "| recipe | seeds | val errors | test errors | test errors per seed |",
             "|---|---:|---:|---:|---|"]
    for members in groups.values():
        val = [found[label][name][0] for label, name in members]
        test = [found[label][name][1] for label, name in members]
        each = ", ".join(f"{name[len('student-'):]} ({label}) {t}"
                         for (label, name), t in zip(members, test))
        label = re.sub(r"-s\d+$", "", members[0][1][len("student-"):])
        lines.append(f"| {label} | {len(members)} | {spread(val)} | "
                     f"{spread(test)} | {each} |")
    return lines


def grid_section(grid: dict[tuple[int, float], list[str]], models: dict, y_val: torch.Tensor,
                 y_test: torch.Tensor, out: Path) -> list[str]:
    """The temperature x width table (means over seeds), the T that validation picks per width
    for each seed, and a plot of mean validation errors by T (written next to `out`)."""
    widths = sorted({w for w, _ in grid})
    temps = sorted({t for _, t in grid})
    seeds = max(len(names) for names in grid.values())
    val = {k: [errors(models[n][0], y_val) for n in names] for k, names in grid.items()}
    test = {k: [errors(models[n][1], y_test) for n in names] for k, names in grid.items()}
    mean = statistics.mean
    what = "mean over seeds (± sd) " if seeds > 1 else ""
    lines = ["", f"## Temperature x width: test errors, {what}with validation errors in brackets; "
                 "the best T per width by validation in bold", "",
             "paper: students of 300 or more units did about equally well for any T > 8; "
             "30-unit students did best at T = 2.5-4.", "",
             "| width | " + " | ".join(f"T={t:g}" for t in temps) + " | epochs | seeds | "
             "T picked per seed |", "|---:|" + "---:|" * len(temps) + "---:|---:|---|"]
    for w in widths:
        here = [t for t in temps if (w, t) in grid]
        best = min(here, key=lambda t: mean(val[(w, t)]))
        cells = []
        for t in temps:
            if (w, t) not in grid:
                cells.append("–")
                continue
            sd = f" ± {statistics.stdev(test[(w, t)]):.0f}" if len(test[(w, t)]) > 1 else ""
            cell = f"{mean(test[(w, t)]):.0f}{sd} ({mean(val[(w, t)]):.0f})"
            cells.append(f"**{cell}**" if t == best else cell)
        picked = [min(here, key=lambda t: val[(w, t)][k]) for k in range(len(grid[(w, here[0])]))
                  if all(len(val[(w, t)]) > k for t in here)]
        epochs = models[grid[(w, here[0])][0]][2]["epoch"]
        lines.append(f"| {w} | " + " | ".join(cells) + f" | {epochs} | {len(grid[(w, here[0])])} "
                     f"| {', '.join(f'{t:g}' for t in picked)} |")
    figure = out.with_name(out.stem + "_temperature.png")
    figure.parent.mkdir(parents=True, exist_ok=True)
    figure.write_bytes(figures.temperature_grid({k: mean(v) for k, v in val.items()},
                                                "validation errors" + (f", mean of {seeds} seeds"
                                                                       if seeds > 1 else "")))
    return lines + ["", f"![validation errors by temperature and width]({figure.name})"]


def ensemble_section(models: dict, y_val: torch.Tensor, y_test: torch.Tensor) -> list[str]:
    """Single generalists (seeds of one recipe) vs their ensemble (mean probabilities) vs each
    group of seeded students (names <group>-s<k>): the share of the ensemble's gain over a single
    generalist that the students keep, on validation and on test."""
    gens = [n for n in models if n.startswith("generalist-")]
    groups: dict[str, list[str]] = {}
    for name in models:
        m = SEEDED.fullmatch(name)
        if m and not GRID.fullmatch(name):
            groups.setdefault(m.group(1), []).append(name)
    lines = ["", f"## An ensemble of {len(gens)} generalists and students distilled from it", "",
             "paper (section 4, speech): a single model distilled from an ensemble of 10 kept 80 % "
             "of the ensemble's gain over a single model. Here each generalist is one seed of "
             "the single model; errors are mean ± sd over seeds (min–max); gain kept = (single "
             "mean − student mean) / (single mean − ensemble).", "",
             "| model | seeds | val errors | test errors | gain kept (val) | gain kept (test) |",
             "|---|---:|---:|---:|---:|---:|"]
    cols = {}
    for split, i, y in (("val", 0, y_val), ("test", 1, y_test)):
        single = [errors(models[n][i], y) for n in gens]
        probs = torch.stack([models[n][i].softmax(1) for n in gens]).mean(0)
        cols[split] = (single, errors(probs, y))
    lines.append(f"| single generalist | {len(gens)} | {spread(cols['val'][0])} | "
                 f"{spread(cols['test'][0])} | – | – |")
    lines.append(f"| ensemble of the {len(gens)} (mean probabilities) | – | {cols['val'][1]} | "
                 f"{cols['test'][1]} | 100 % | 100 % |")
    for group, names in groups.items():
        cells = []
        kept = []
        for split, i, y in (("val", 0, y_val), ("test", 1, y_test)):
            ours = [errors(models[n][i], y) for n in names]
            cells.append(spread(ours))
            single, ens = statistics.mean(cols[split][0]), cols[split][1]
            kept.append("no gain to keep" if single <= ens else
                        f"{100 * (single - statistics.mean(ours)) / (single - ens):.0f} %")
        lines.append(f"| students {group} (see the config) | {len(names)} | {cells[0]} | "
                     f"{cells[1]} | {kept[0]} | {kept[1]} |")
    return lines


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
    if pools:  # checked before anything trains
        try:
            data = (RunDir(run_dir).load_config() if resumed else
                    load_config(args.config, args.set)).data
        except EnsembleError as e:
            sys.exit(str(e))
        for pool in pools:
            try:
                theirs = pool.load_config().data
            except EnsembleError as e:
                sys.exit(f"--pool {pool.path}: {e}")
            if theirs != data:
                sys.exit(f"--pool {pool.path}: its data ({theirs}) differ from this run's "
                         f"({data})")
    command = ["ensemble", "run", "--resume", str(run_dir)] if resumed else \
        ["ensemble", "run", args.config, "--run-dir", str(run_dir)]
    for override in args.set:  # on resume, only raising epoch counts is accepted
        command += ["--set", override]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    before = epochs_done(run_dir)
    if subprocess.run([sys.executable, "-m", "ensemble.cli", *command[1:]]).returncode != 0:
        sys.exit("the run did not finish; see its output above")

    run = RunDir(run_dir)
    cfg = run.load_config()
    splits = load_splits(cfg.data, args.data_dir)
    dev = torch.device("cpu")
    x_val, y_val = to_device(splits.val_x, dev), labels_to_device(splits.val_y, dev)
    x_test, y_test = to_device(splits.test_x, dev), labels_to_device(splits.test_y, dev)
    models = {}
    for name in run.models():
        blob, meta = run.latest(name)
        model, _ = load_model(blob, dev)
        models[name] = (predict_logits(model, x_val), predict_logits(model, x_test), meta)

    def row(label, paper, name, ours, note=""):
        meta = models[name][2]
        return (f"| {label} | {paper} | {ours} | {meta['epoch']} | "
                f"{meta['summary']['wall_seconds']:.0f} s | {note} |")

    def test_errors(name):
        return errors(models[name][1], y_test)

    threes = y_test == 3
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    lines = [f"# The paper's MNIST table from {args.config}", "",
             f"Run: `{' '.join(command[:-2] if args.data_dir else command)}` "
             f"({how_run(resumed, before, epochs_done(run_dir))} by "
             "`python benchmarks/paper_mnist.py`); hardware: "
             f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU, torch "
             f"{torch.__version__}; git commit "
             f"{commit}. Test errors out of {len(y_test):,}; every model at its best epoch by "
             f"validation; the training split holds {len(splits.train_y):,} images "
             f"({len(splits.val_y):,} held out for validation; the paper used all 60,000), of "
             "which a student filtered or subsampled by its config sees fewer. Wall time is each "
             "model's own training and evaluation time.", "",
             "| experiment | paper | ours | epochs | wall time | note |",
             "|---|---:|---:|---:|---:|---|"]
    teacher = next(n for n in models if n.startswith("generalist-"))
    teacher_model, _ = load_model(run.latest(teacher)[0], dev)
    x_train = to_device(splits.train_x, dev)
    own = errors(predict_logits(teacher_model, x_train), labels_to_device(splits.train_y, dev))
    lines.append(row(teacher_label(cfg), 67, teacher,
                     test_errors(teacher), f"paper: ~3000 epochs; {own} errors on its own "
                     f"{len(x_train):,} (untranslated) training images"))
    if "student-hard" in models:
        lines.append(row("student 784-800-800-10, hard labels", 146, "student-hard",
                         test_errors("student-hard")))
    if "student-distilled" in models:
        who = "same student" if "student-hard" in models else "student 784-800-800-10"
        lines.append(row(f"{who} distilled at T=20", 74, "student-distilled",
                         test_errors("student-distilled")))
    if "student-no3" in models:
        val, test, _ = models["student-no3"]
        plain = f"{errors(test, y_test)} ({errors(test[threes], y_test[threes])} of " \
                f"{int(threes.sum())} 3s)"
        lines.append(row("distilled without any 3 in the transfer set", "206 (133 of 1010 3s)",
                         "student-no3", plain))
        shift = best_shift(val, y_val, [3], +1.0)
        test = test.clone()
        test[:, 3] += shift
        lines.append(row("same, 3-bias raised", "109 (14 on 3s), +3.5 chosen on test",
                         "student-no3", f"{errors(test, y_test)} "
                         f"({errors(test[threes], y_test[threes])} on 3s)",
                         f"+{shift:g} chosen on validation"))
    if "student-only78" in models:
        val, test, _ = models["student-only78"]
        rate = lambda z: f"{100 * errors(z, y_test) / len(y_test):.1f} %"  # noqa: E731
        lines.append(row("transfer set of 7s and 8s only", "47.3 %", "student-only78",
                         rate(test)))
        shift = best_shift(val, y_val, [7, 8], -1.0)
        test = test.clone()
        test[:, [7, 8]] -= shift
        lines.append(row("same, 7/8 biases lowered", "13.2 %, -7.6 chosen on test",
                         "student-only78", rate(test), f"-{shift:g} chosen on validation"))

    known = {"student-hard", "student-distilled", "student-no3", "student-only78"}
    for name in models:  # any other student: a variant of the recipe (configs/paper/*.yaml)
        if name.startswith("student-") and name not in known and \
                not GRID.fullmatch(name):
            last = models[name][2]["history"][-1]
            lines.append(row(f"{name[len('student-'):]} (see the config)", "–", name,
                             test_errors(name), f"{errors(models[name][0], y_val)} on "
                             f"validation; last epoch {last['test_errors']} "
                             f"({last['val_errors']} on validation)"))

    combined = run.read_json("ensemble.json")
    specs = [n for n in models if n.startswith("specialist-")]
    if combined and specs:
        lines.append(f"| {teacher_label(cfg)} + {len(specs)} "
                     f"specialists, eq. 5 with top-{combined['top_n']} | – | "
                     f"{combined['test']['ensemble_errors']} | "
                     f"{models[specs[0]][2]['epoch']} | "
                     f"{sum(models[n][2]['summary']['wall_seconds'] for n in specs):.0f} s | "
                     f"{combined['val']['ensemble_errors']} on validation; the teacher alone "
                     f"{combined['test']['generalist_errors']} "
                     f"({combined['val']['generalist_errors']}); specialists' time summed |")

    keys = student_recipes(run, cfg, lambda name: models[name][1])
    found = {n: (errors(models[n][0], y_val), errors(models[n][1], y_test)) for n in keys}
    pooled = [(run.path.name, keys, found)]
    for pool in pools:
        other = pool.load_config()
        logits = test_logits(pool, x_test)
        theirs = {n: k for n, k in student_recipes(pool, other, logits).items()
                  if k in keys.values()}
        errs = {}
        for name in theirs:
            model, _ = load_model(pool.latest(name)[0], dev)
            errs[name] = (errors(predict_logits(model, x_val), y_val),
                          errors(predict_logits(model, x_test), y_test))
        pooled.append((pool.path.name, theirs, errs))
    lines += seeds_section(pooled)

    grid: dict[tuple[int, float], list[str]] = {}  # (width, T) -> its seeds' students
    for name in models:
        m = GRID.fullmatch(name)
        if m:
            grid.setdefault((int(m.group(1)), float(m.group(2).replace("_", "."))), []).append(name)
    if grid:
        lines += grid_section(grid, models, y_val, y_test, Path(args.out))
    generalists = [n for n in models if n.startswith("generalist-")]
    if len(generalists) > 1:
        lines += ensemble_section(models, y_val, y_test)
    histories = {"teacher" if len(generalists) == 1 else name: models[name][2]["history"]
                 for name in generalists}
    teacher_seconds = sum(r["seconds"] for h in histories.values() for r in h)
    specialist_seconds = sum(r["seconds"] for n in specs for r in models[n][2]["history"])
    offsets = {}
    for name in models:
        variant = name not in known and not GRID.fullmatch(name)  # as in the table's last rows
        if name in ("student-hard", "student-distilled") or \
                (name.startswith("student-") and variant) or \
                (len(generalists) > 1 and SEEDED.fullmatch(name)):
            histories[name] = models[name][2]["history"]
            student = cfg.students[name[len("student-"):]]
            if student.uses_teacher:  # it needs its teachers first
                offsets[name] = teacher_seconds + (specialist_seconds if
                                                   student.soft_targets == "ensemble" else 0)
    figure = Path(args.out).with_suffix(".png")
    figure.parent.mkdir(parents=True, exist_ok=True)
    figure.write_bytes(figures.errors_vs_time(histories, offsets))
    lines += ["", f"![test errors against CPU hours]({figure.name})", "",
              "Test errors per epoch against the CPU time spent so far (each model's own "
              "training and evaluation seconds, on one core each; a distilled student's line "
              "starts where its teachers' end: all of their seconds summed, specialists' too "
              "where they teach)."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
