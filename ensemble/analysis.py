"""The paper's analysis of finished runs: `ensemble table RUN [RUN ...]` writes it as Markdown.

- §3's table: the teacher, then each student whose `paper` key names a row of it (hard labels,
  distilled, no 3s in the transfer set, 7s and 8s only), then every untagged student as a row
  of its own. The no-3s and 7s-and-8s students' bias shifts are chosen on the validation split,
  never on test (the paper chose its +3.5 and -7.6 on test).
- Seeds: students trained alike (the same recipe and, when distilled, the same teachers) in the
  first run and in the runs pooled with it, summarised over their seeds.
- The temperature x width study: the students tagged `grid`.
- With several generalists: their ensemble against a single one, and the share of its gain that
  each recipe's seeds keep (§4's claim).
- With specialists: eq. 5's errors and the paper's Table 4.

Every model is taken at its best epoch by validation; the runs are only read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ensemble import figures
from ensemble.config import ResourcesConfig, RunConfig, StudentConfig, augment_steps, to_dict
from ensemble.data import Splits, labels_to_device, load_splits, to_device
from ensemble.errors import ConfigError
from ensemble.models import load_model
from ensemble.rundir import RunDir, table4_section, uncreatable
from ensemble.train import predict_logits

SHIFTS = torch.arange(0.0, 15.01, 0.25)  # bias shifts tried, in logits
CPU = torch.device("cpu")


@dataclass
class Outputs:
    """One model's logits on the validation and test images, and its checkpoint's metadata."""
    val: torch.Tensor
    test: torch.Tensor
    meta: dict


@dataclass
class Labelled:
    """The splits a run's models are judged on, as tensors on the CPU."""
    splits: Splits

    def __post_init__(self):
        s = self.splits
        self.x_val, self.y_val = to_device(s.val_x, CPU), labels_to_device(s.val_y, CPU)
        self.x_test, self.y_test = to_device(s.test_x, CPU), labels_to_device(s.test_y, CPU)

    def outputs(self, run: RunDir, names: list[str] | None = None) -> dict[str, Outputs]:
        found = {}
        for name in run.models() if names is None else names:
            blob, meta = run.latest(name)
            model, _ = load_model(blob, CPU)
            found[name] = Outputs(predict_logits(model, self.x_val),
                                  predict_logits(model, self.x_test), meta)
        return found


def errors(logits: torch.Tensor, y: torch.Tensor) -> int:
    return int((logits.argmax(1) != y).sum())


def best_shift(val: torch.Tensor, y_val: torch.Tensor, classes: list[int], sign: float) -> float:
    """The shift of the given classes' logits (by sign * s) with the fewest validation errors."""
    scores = []
    for s in SHIFTS.tolist():
        scores.append((errors(shifted(val, classes, sign * s), y_val), s))
    return min(scores)[1]


def spread(values: list[float]) -> str:
    """'mean ± sd (min-max)' over seeds; the sd is the sample one (n - 1)."""
    if len(values) == 1:
        return f"{values[0]:g}"
    return (f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} "
            f"({min(values):g}–{max(values):g})")


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060,
        2.056, 2.052, 2.048, 2.045, 2.042)  # Student's t, 97.5 % quantile, 1 to 30 degrees
PAPER_ERRORS = {"hard": 146, "distilled": 74}  # §3's rows that count test errors


def interval(values: list[float]) -> tuple[float, float]:
    """The 95 % confidence interval of the mean over seeds (Student's t; two or more)."""
    n = len(values)
    z = 1.959964  # beyond the table: the normal quantile, corrected for the degrees of freedom
    t = T975[n - 2] if n <= 31 else z + (z ** 3 + z) / (4 * (n - 1))
    half = t * statistics.stdev(values) / n ** 0.5
    return statistics.mean(values) - half, statistics.mean(values) + half


def against_paper(values: list[float], paper: int) -> str:
    """Matched: the paper's figure lies within our 95 % interval; beaten: the interval lies
    below it; behind: above it."""
    if statistics.stdev(values) == 0:  # seeds alike: no interval to judge by
        return f"– ({paper})"
    lo, hi = interval(values)
    verdict = "matched" if lo <= paper <= hi else "beaten" if hi < paper else "behind"
    return f"{verdict} ({paper})"


def seeds_label(names: list[str]) -> str:
    """What students trained alike have in common in their names (x-s0, x-s1: x), for display."""
    common = re.sub(r"-s?$", "", os.path.commonprefix(names))
    return common or names[0]


def teacher_label(cfg: RunConfig) -> str:
    """The table's teacher row: its layers and what regularised it (§3: dropout, max-norm,
    jitter)."""
    model, train = cfg.generalists.model, cfg.generalists.train
    layers = model.factory or model.kind if model.factory or model.kind != "mlp" else \
        f"784-{'-'.join(map(str, model.hidden))}-10"  # §3's notation for its MLPs
    parts = [f"teacher {layers}"]
    steps = {name for name, _ in augment_steps(train.augment)}
    parts += [what for what, on in (("dropout", model.dropout_in or model.dropout_hidden),
                                    ("max-norm", model.max_norm), ("flips", "flip" in steps),
                                    ("jitter", steps & {"translate", "crop"}),
                                    ("elastic distortion", "elastic" in steps)) if on]
    return ", ".join(parts)


def tagged(cfg: RunConfig, models: dict, *rows: str) -> list[str]:
    """The run's students (as model names, in the run's order) whose `paper` key is in rows."""
    return [m for m in models if m.startswith("student-")
            and cfg.students[m[len("student-"):]].paper in rows]


# ---------------------------------------------------------------- §3's table ---------------------
def row(models: dict, label: str, paper, name: str, ours, note: str = "") -> str:
    meta = models[name].meta
    return (f"| {label} | {paper} | {ours} | {meta['epoch']} | "
            f"{meta['summary']['wall_seconds']:.0f} s | {note} |")


SHIFTED = {"no3": ([3], +1.0), "only78": ([7, 8], -1.0)}  # rows judged after a bias shift


def paper_rows(cfg: RunConfig, run: RunDir, models: dict, data: Labelled) -> list[str]:
    """The table's rows: teacher, the tagged students of §3, then every untagged student."""
    y_test, y_val = data.y_test, data.y_val
    candidates: dict[str, list[str]] = {}
    for n in tagged(cfg, models, "hard", "distilled", "no3", "only78"):
        candidates.setdefault(cfg.students[n[len("student-"):]].paper, []).append(n)
    scores = {r: {n: val_errors(models[n], data, r) for n in names}
              for r, names in candidates.items()}
    by_row = {r: min(found, key=found.get) for r, found in scores.items()}  # first on a tie
    teacher = next(n for n in models if n.startswith("generalist-"))
    x_train = to_device(data.splits.train_x, CPU)
    own = errors(predict_logits(load_model(run.latest(teacher)[0], CPU)[0], x_train),
                 labels_to_device(data.splits.train_y, CPU))
    lines = [row(models, teacher_label(cfg), 67, teacher, errors(models[teacher].test, y_test),
                 f"paper: ~3000 epochs; {own} errors on its own {len(x_train):,} "
                 "(untranslated) training images")]
    if "hard" in by_row:
        lines.append(row(models, "student 784-800-800-10, hard labels", 146, by_row["hard"],
                         errors(models[by_row["hard"]].test, y_test),
                         picked(scores["hard"])))
    if "distilled" in by_row:
        who = "same student" if "hard" in by_row else "student 784-800-800-10"
        lines.append(row(models, f"{who} distilled at T=20", 74, by_row["distilled"],
                         errors(models[by_row["distilled"]].test, y_test),
                         picked(scores["distilled"])))
    for row_ in ("no3", "only78"):
        if row_ in by_row:
            lines += shifted_rows(models, by_row[row_], data, *SHIFTED[row_],
                                  picked(scores[row_]))
    for name in tagged(cfg, models, ""):  # a variant of the recipe (configs/paper/*.yaml)
        last = models[name].meta["history"][-1]
        lines.append(row(models, f"{name[len('student-'):]} (see the config)", "–", name,
                         errors(models[name].test, y_test),
                         f"{errors(models[name].val, y_val)} on validation; last epoch "
                         f"{last['test_errors']} ({last['val_errors']} on validation)"
                         + shifted_note(cfg.students[name[len("student-"):]], models[name],
                                        data)))
    return lines + specialists_row(cfg, run, models)


def shifted(logits: torch.Tensor, classes: list[int], by: float) -> torch.Tensor:
    """`logits` with the given classes' biases moved by `by` (a copy)."""
    moved = logits.clone()
    moved[:, classes] += by
    return moved


def shifted_note(student: StudentConfig, out: Outputs, data: Labelled) -> str:
    """For a student whose transfer set kept or dropped classes: its errors after the shift of
    those classes' biases chosen on validation (lowered for kept, raised for dropped ones)."""
    classes, sign = ((list(student.keep_classes), -1.0) if student.keep_classes else
                     (list(student.drop_classes), +1.0))
    if not classes:
        return ""
    by = sign * best_shift(out.val, data.y_val, classes, sign)
    return (f"; biases of {classes} shifted by {by:+g} (chosen on validation): "
            f"{errors(shifted(out.val, classes, by), data.y_val)} on validation, "
            f"{errors(shifted(out.test, classes, by), data.y_test)} on test")


def val_errors(out: Outputs, data: Labelled, row_: str) -> int:
    """A candidate's validation errors for `row_`: after the shift validation picks, if any."""
    if row_ not in SHIFTED:
        return errors(out.val, data.y_val)
    classes, sign = SHIFTED[row_]
    by = sign * best_shift(out.val, data.y_val, classes, sign)
    return errors(shifted(out.val, classes, by), data.y_val)


def picked(scores: dict[str, int]) -> str:
    """How a row's student was picked, when it had rivals ({candidate: validation errors})."""
    if len(scores) == 1:
        return ""
    each = ", ".join(f"{n[len('student-'):]} {v}" for n, v in scores.items())
    return f"picked on validation errors from {len(scores)} candidates ({each})"


def shifted_rows(models: dict, name: str, data: Labelled, classes: list[int], sign: float,
                 note: str = ""):
    """A filtered-transfer-set student's row, and its row after the bias shift of `classes`
    that validation picks (raised for classes it never saw, lowered for the only ones it saw);
    `note`: how the student was picked."""
    val, test, y_test = models[name].val, models[name].test, data.y_test
    shift = best_shift(val, data.y_val, classes, sign)
    on_test = best_shift(test, y_test, classes, sign)  # reported beside, never used
    at_best, moved = shifted(test, classes, sign * on_test), shifted(test, classes, sign * shift)
    if sign > 0:  # no 3s: errors, and those on 3s
        threes = y_test == 3
        plain = f"{errors(test, y_test)} ({errors(test[threes], y_test[threes])} of " \
                f"{int(threes.sum())} 3s)"
        return [row(models, "distilled without any 3 in the transfer set",
                    "206 (133 of 1010 3s)", name, plain, note),
                row(models, "same, 3-bias raised", "109 (14 on 3s), +3.5 chosen on test", name,
                    f"{errors(moved, y_test)} ({errors(moved[threes], y_test[threes])} on 3s)",
                    f"+{shift:g} chosen on validation; the shift best on test, for comparison "
                    f"only: +{on_test:g} ({errors(at_best, y_test)})")]
    rate = lambda z: f"{100 * errors(z, y_test) / len(y_test):.1f} %"  # noqa: E731
    lines = [row(models, "transfer set of 7s and 8s only", "47.3 %", name, rate(test), note)]
    return lines + [row(models, "same, 7/8 biases lowered", "13.2 %, -7.6 chosen on test", name,
                        rate(moved), f"-{shift:g} chosen on validation; the shift best on test, "
                        f"for comparison only: -{on_test:g} ({rate(at_best)})")]


def specialists_row(cfg: RunConfig, run: RunDir, models: dict) -> list[str]:
    """The teacher with its specialists (eq. 5), from the run's ensemble.json."""
    combined = run.read_json("ensemble.json")
    specs = [n for n in models if n.startswith("specialist-")]
    if not (combined and specs):
        return []
    seconds = sum(models[n].meta["summary"]["wall_seconds"] for n in specs)
    return [f"| {teacher_label(cfg)} + {len(specs)} specialists, eq. 5 with "
            f"top-{combined['top_n']} | – | {combined['test']['ensemble_errors']} | "
            f"{models[specs[0]].meta['epoch']} | {seconds:.0f} s | "
            f"{combined['val']['ensemble_errors']} on validation; the teacher alone "
            f"{combined['test']['generalist_errors']} ({combined['val']['generalist_errors']}); "
            "specialists' time summed |"]


# ---------------------------------------------------------------- seeds of one recipe -------------
def recipe(cfg: StudentConfig) -> dict:
    """A student's recipe, less what cannot change what it learns: its resources, its `paper`
    tag, and with hard labels alone (alpha 0) everything about soft targets."""
    cfg = dataclasses.replace(cfg, resources=ResourcesConfig(), paper="")
    if not cfg.uses_teacher:
        cfg = dataclasses.replace(cfg, temperature=1.0, teacher_mean="probs",
                                  soft_targets="generalists")
    return to_dict(cfg)


def student_recipes(run: RunDir, cfg: RunConfig, logits) -> dict[str, str]:
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


def pooled(run: RunDir, cfg: RunConfig, models: dict, pools: list[RunDir], data: Labelled):
    """(run label, {student: recipe key}, {student: (val, test errors)}) for the run and, for
    the students of the pooled runs that share a key with one of its own, for each pool."""
    keys = student_recipes(run, cfg, lambda name: models[name].test)
    runs = [(run.name, keys, {n: (errors(models[n].val, data.y_val),
                                  errors(models[n].test, data.y_test)) for n in keys})]
    for pool in pools:
        teachers = {}

        def logits(name, pool=pool, teachers=teachers):
            if name not in teachers:
                teachers[name] = data.outputs(pool, [name])[name].test
            return teachers[name]
        theirs = {n: k for n, k in student_recipes(pool, pool.load_config(), logits).items()
                  if k in keys.values()}
        found = data.outputs(pool, list(theirs))
        runs.append((pool.name, theirs, {n: (errors(o.val, data.y_val),
                                             errors(o.test, data.y_test))
                                         for n, o in found.items()}))
    return runs


def seeds_section(runs: list[tuple[str, dict[str, str], dict[str, tuple[int, int]]]],
                  paper: dict[str, int] | None = None) -> list[str]:
    """Students sharing a recipe key across runs (run label, {student: key}, {student: (val,
    test errors)}), two or more to a group: their errors over seeds, the 95 % interval of the
    mean test errors, and where `paper` ({student of the first run: the paper's test errors})
    names a member, whether the paper's figure is matched, beaten or behind."""
    paper = paper or {}
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
             "seeds; hard-label students need no teacher, so theirs pool whatever the run. "
             "The interval is the 95 % one of the mean test errors (Student's t); the paper's "
             "figure is matched when it lies within it, beaten when the interval lies below.", "",
             "| recipe | seeds | val errors | test errors | 95 % interval | paper | "
             "test errors per seed |", "|---|---:|---:|---:|---:|---|---|"]
    for members in groups.values():
        val = [found[label][name][0] for label, name in members]
        test = [found[label][name][1] for label, name in members]
        each = ", ".join(f"{name[len('student-'):]} ({label}) {t}"
                         for (label, name), t in zip(members, test))
        label = seeds_label([name[len("student-"):] for _, name in members])
        lo, hi = interval(test)
        figure = next((paper[name] for label_, name in members if label_ == runs[0][0]
                       and name in paper), None)
        verdict = against_paper(test, figure) if figure is not None else "–"
        lines.append(f"| {label} | {len(members)} | {spread(val)} | {spread(test)} | "
                     f"{lo:.1f}–{hi:.1f} | {verdict} | {each} |")
    return lines


# ---------------------------------------------------------------- temperature x width ------------
def grid_section(grid: dict[tuple[int, float], list[str]], models: dict, data: Labelled,
                 out: Path) -> list[str]:
    """The temperature x width table (means over seeds), the T that validation picks per width
    for each seed, and a plot of mean validation errors by T (written next to `out`)."""
    widths = sorted({w for w, _ in grid})
    temps = sorted({t for _, t in grid})
    seeds = max(len(names) for names in grid.values())
    val = {k: [errors(models[n].val, data.y_val) for n in names] for k, names in grid.items()}
    test = {k: [errors(models[n].test, data.y_test) for n in names] for k, names in grid.items()}
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
        epochs = models[grid[(w, here[0])][0]].meta["epoch"]
        lines.append(f"| {w} | " + " | ".join(cells) + f" | {epochs} | {len(grid[(w, here[0])])} "
                     f"| {', '.join(f'{t:g}' for t in picked)} |")
    figure = out.with_name(out.stem + "_temperature.png")
    figure.write_bytes(figures.temperature_grid({k: mean(v) for k, v in val.items()},
                                                "validation errors" + (f", mean of {seeds} seeds"
                                                                       if seeds > 1 else "")))
    return lines + ["", f"![validation errors by temperature and width]({figure.name})"]


# ---------------------------------------------------------------- §4: the ensemble's gain --------
def ensemble_section(models: dict, groups: list[list[str]], data: Labelled) -> list[str]:
    """Single generalists (seeds of one recipe) vs their ensemble (mean probabilities) vs each
    group of students trained alike: the share of the ensemble's gain over a single generalist
    that the students keep, on validation and on test."""
    gens = [n for n in models if n.startswith("generalist-")]
    lines = ["", f"## An ensemble of {len(gens)} generalists and students distilled from it", "",
             "paper (section 4, speech): a single model distilled from an ensemble of 10 kept 80 % "
             "of the ensemble's gain over a single model. Here each generalist is one seed of "
             "the single model; errors are mean ± sd over seeds (min–max); gain kept = (single "
             "mean − student mean) / (single mean − ensemble).", "",
             "| model | seeds | val errors | test errors | gain kept (val) | gain kept (test) |",
             "|---|---:|---:|---:|---:|---:|"]
    splits = (("val", data.y_val), ("test", data.y_test))
    cols = {}
    for split, y in splits:
        single = [errors(getattr(models[n], split), y) for n in gens]
        probs = torch.stack([getattr(models[n], split).softmax(1) for n in gens]).mean(0)
        cols[split] = (single, errors(probs, y))
    lines.append(f"| single generalist | {len(gens)} | {spread(cols['val'][0])} | "
                 f"{spread(cols['test'][0])} | – | – |")
    lines.append(f"| ensemble of the {len(gens)} (mean probabilities) | – | {cols['val'][1]} | "
                 f"{cols['test'][1]} | 100 % | 100 % |")
    for names in groups:
        cells, kept = [], []
        for split, y in splits:
            ours = [errors(getattr(models[n], split), y) for n in names]
            cells.append(spread(ours))
            single, ens = statistics.mean(cols[split][0]), cols[split][1]
            kept.append("no gain to keep" if single <= ens else
                        f"{100 * (single - statistics.mean(ours)) / (single - ens):.0f} %")
        label = seeds_label([n[len("student-"):] for n in names])
        lines.append(f"| students {label} (see the config) | {len(names)} | {cells[0]} | "
                     f"{cells[1]} | {kept[0]} | {kept[1]} |")
    notes = []
    for names in groups:
        if len(gens) < 2 or len(names) < 2:
            continue
        lo, hi, none = kept_interval([models[n].test for n in gens],
                                     [models[n].test for n in names], data.y_test)
        label = seeds_label([n[len("student-"):] for n in names])
        half = (hi - lo) / 2
        note = f"students {label}: {lo:.0f} % to {hi:.0f} % (±{half:.0f} points)"
        if none >= 0.005:
            note += f", {100 * none:.0f} % of resamples with no gain to keep left out"
        if half > 20:
            need = math.ceil(max(len(gens), len(names)) * (half / 20) ** 2)
            note += f"; ±20 points would take about {need} seeds of each"
        notes.append(note)
    if notes:
        lines += ["", f"Gain kept on test, 95 % bootstrap interval ({BOOTSTRAP:,} resamples of "
                      "the generalists' seeds, the students' seeds and the test images; the "
                      "ensemble is the one above; seeds needed scale the half-width as "
                      "1/sqrt(seeds), an estimate): " + "; ".join(notes) + "."]
    return lines


BOOTSTRAP = 2000


def kept_interval(single: list[torch.Tensor], students: list[torch.Tensor], y: torch.Tensor,
                  resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float, float]:
    """The 95 % percentile-bootstrap interval (in %) of the share of the ensemble's gain over a
    single model that students keep: seeds of each and test images resampled together; the
    ensemble (mean probabilities of every single model) held fixed. Resamples in which the
    ensemble gains nothing have no share to keep: left out, their fraction returned third."""
    wrong_single = torch.stack([(z.argmax(1) != y).double() for z in single])  # (G, N)
    wrong_students = torch.stack([(z.argmax(1) != y).double() for z in students])  # (S, N)
    probs = torch.stack([z.softmax(1) for z in single]).mean(0)
    wrong_ens = (probs.argmax(1) != y).double()
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    shares = []
    for _ in range(resamples):
        weights = torch.bincount(torch.randint(n, (n,), generator=gen), minlength=n).double()
        g = torch.randint(len(single), (len(single),), generator=gen)
        s = torch.randint(len(students), (len(students),), generator=gen)
        one = (wrong_single[g] @ weights).mean()
        ens = wrong_ens @ weights
        if one > ens:  # a resample where the ensemble gains nothing has no share to keep
            shares.append(float(100 * (one - (wrong_students[s] @ weights).mean()) / (one - ens)))
    if not shares:
        return float("nan"), float("nan"), 1.0
    shares.sort()
    k = len(shares)
    return shares[int(0.025 * k)], shares[max(0, math.ceil(0.975 * k) - 1)], 1 - k / resamples


# ---------------------------------------------------------------- the whole analysis -------------
def check_pools(cfg: RunConfig, pools: list[RunDir]) -> None:
    """Runs pooled with a run must hold their models on its data split."""
    for pool in pools:
        try:
            theirs = pool.load_config().data
        except ConfigError as e:
            raise ConfigError(f"pooled run {pool.location}: {e}") from None
        if theirs != cfg.data:
            raise ConfigError(f"pooled run {pool.location}: its data ({theirs}) differ from "
                              f"{cfg.data}")


def errors_figure(cfg: RunConfig, models: dict, out: Path) -> list[str]:
    """Test errors per epoch against CPU time: the generalists, and the students of §3's main
    rows and of their own rows, each distilled one from where its teachers' time ends."""
    gens = [n for n in models if n.startswith("generalist-")]
    specs = [n for n in models if n.startswith("specialist-")]
    histories = {"teacher" if len(gens) == 1 else n: models[n].meta["history"] for n in gens}
    teacher_seconds = sum(r["seconds"] for h in histories.values() for r in h)
    specialist_seconds = sum(r["seconds"] for n in specs for r in models[n].meta["history"])
    offsets = {}
    for name in tagged(cfg, models, "hard", "distilled", ""):
        histories[name] = models[name].meta["history"]
        student = cfg.students[name[len("student-"):]]
        if student.uses_teacher:  # it needs its teachers first
            offsets[name] = teacher_seconds + (specialist_seconds if
                                               student.soft_targets == "ensemble" else 0)
    figure = out.with_suffix(".png")
    figure.write_bytes(figures.errors_vs_time(histories, offsets))
    return ["", f"![test errors against CPU hours]({figure.name})", "",
            "Test errors per epoch against the CPU time spent so far (each model's own "
            "training and evaluation seconds, on one core each; a distilled student's line "
            "starts where its teachers' end: all of their seconds summed, specialists' too "
            "where they teach)."]


def header(cfg: RunConfig, data: Labelled, title: str, how: str) -> list[str]:
    splits = data.splits
    return [f"# {title}", "",
            f"{how}Test errors out of {len(data.y_test):,}; every model at its best epoch by "
            f"validation; the training split holds {len(splits.train_y):,} images "
            f"({len(splits.val_y):,} held out for validation; the paper used all 60,000), of "
            "which a student filtered or subsampled by its config sees fewer. Wall time is each "
            "model's own training and evaluation time.", "",
            "| experiment | paper | ours | epochs | wall time | note |",
            "|---|---:|---:|---:|---:|---|"]


def tables(runs: list[RunDir], out: Path, data_dir: str | None = None, title: str = "",
           how: str = "") -> str:
    """The analysis of runs[0] (its students pooled with those of runs[1:]) as Markdown, written
    to `out` with its figures beside it; `title` and `how` head it."""
    run, pools = runs[0], runs[1:]
    why = "it is a folder; name a file" if out.is_dir() else uncreatable(out)
    if why:
        raise ConfigError(f"cannot write the table to {out}: {why}")
    cfg = run.load_config()
    if not any(n.startswith("generalist-") and run.latest(n) for n in run.models()):
        raise ConfigError(f"{run.location} holds no generalist checkpoint: nothing to analyse")
    check_pools(cfg, pools)
    data = Labelled(load_splits(cfg.data, data_dir))
    models = data.outputs(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = header(cfg, data, title or f"The paper's tables from run {run.name}", how)
    lines += paper_rows(cfg, run, models, data)
    recipes = pooled(run, cfg, models, pools, data)
    lines += seeds_section(recipes, {n: PAPER_ERRORS[cfg.students[n[len("student-"):]].paper]
                                     for n in tagged(cfg, models, *PAPER_ERRORS)})
    grid: dict[tuple[int, float], list[str]] = {}  # (width, T) -> its seeds' students
    for name in tagged(cfg, models, "grid"):
        student = cfg.students[name[len("student-"):]]
        grid.setdefault((student.model.hidden[0], student.temperature), []).append(name)
    if grid:
        lines += grid_section(grid, models, data, out)
    if sum(n.startswith("generalist-") for n in models) > 1:
        groups: dict[str, list[str]] = {}
        for name, key in recipes[0][1].items():
            if name not in grid_members(grid):
                groups.setdefault(key, []).append(name)
        lines += ensemble_section(models, [g for g in groups.values() if len(g) > 1], data)
    combined = run.read_json("ensemble.json")
    if combined and combined.get("table4"):
        lines += ["", "## Specialists: test examples by the number of specialists covering "
                      "their true class (the paper's Table 4)", "", *table4_section(combined)]
    lines += errors_figure(cfg, models, out)
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def grid_members(grid: dict) -> set[str]:
    return {n for names in grid.values() for n in names}
