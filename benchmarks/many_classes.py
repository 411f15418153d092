"""Specialists on many classes (issue 22): the paper's Tables 3 and 4 in shape, from finished runs.

    python benchmarks/many_classes.py --run runs/many-short [--equal-compute RUN] [--diagnose]
                                      [--out results/many_classes_short.md]
    python benchmarks/many_classes.py --study runs/many-cap [--sizes NAME=W1,W2,... ...]
                                      [--out results/many_classes.md]
    python benchmarks/many_classes.py --study runs/many-cap --so-far
                                      [--out results/many_classes_so_far.md]

--study runs (or resumes: run it again after any stop) the whole study as `ensemble run`s in
DIR, each from configs/many_classes/short.yaml's data and recipes, then writes its results:
1. generalists of each size in SIZES (or --sizes), trained until validation stalls (UNTIL);
   the one with fewer validation errors is the generalist (`gen-narrower`, `gen-narrow`);
2. specialists from it at the first k in KS with the base config's recipe and each in RECIPES
   (`k8`, `k8-lr05`; a recipe of other keys, e.g. `k8-soft5-t2`), the recipe chosen by eq. 5's
   validation errors; then with that recipe for each other k (`k16` ...; its suffix if not the
   base's); k chosen likewise;
3. the equal-compute alternative: the generalist and as many more of its recipe (seeds from
   EQUAL_SEED) as the chosen k's specialists took its CPU time, averaged (`equal` trains the
   extra generalists only, none if the specialists took less than half its time);
4. one student of the generalist's size per teacher (the generalist; generalist + specialists
   at the chosen k, eq. 5) and temperature in TEMPERATURES; each teacher's T chosen on
   validation (`temperature`);
5. students of the generalist's size and of half its widths, SEEDS seeds each (none the seed
   of a trial in 4): hard labels, from the generalist, from generalist + specialists, at the
   chosen T (`students`); every student trains until validation stalls (UNTIL).
The `temperature` and `students` runs take the chosen k's subsets and specialists over
(specialists.from_run), as every run after the first takes the generalist (generalists.from_run).

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
import dataclasses
import json
import math
import statistics
from pathlib import Path

import yaml

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


def class_names(cfg) -> list[str]:
    """The characters of the data set's manifest, else the npz file's own names."""
    manifest = Path(cfg.data.npz).with_name("manifest.json")
    if manifest.is_file():
        return json.loads(manifest.read_text())["classes"]
    import numpy as np

    with np.load(cfg.data.npz) as found:
        return [str(c) for c in found["classes"]]


def spec_keys(spec, skip=()) -> str:
    """The specialists' clustering keys a reader needs, as `key = value`."""
    keys = ("k", "max_size", "overlap", "overlap_mass", "temperature", "top_n")
    return ", ".join(f"{key} = {getattr(spec, key)}" for key in keys if key not in skip)


def subsets_section(run: Path, classes: list[str]) -> list[str]:
    report = json.loads((run / "subsets.json").read_text())
    sizes = [len(s) for s in report["subsets"]]
    cover = [0] * len(classes)
    for members in report["subsets"]:
        for c in members:
            cover[c] += 1
    spread = ", ".join(f"{n}: {cover.count(n)}" for n in sorted(set(cover)))
    lines = [f"Subsets from the covariance of the generalist's predictions (no labels): "
             f"{len(sizes)}, sizes {min(sizes)} to {max(sizes)} (median "
             f"{statistics.median(sizes):g}); classes by the number of subsets holding them: "
             f"{spread}; the first few, with some of their classes:", ""]
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


MODELS = ["| model | epochs | best epoch | val errors | test errors | top-5 test errors | "
          "wall time |", "|---|---:|---:|---:|---:|---:|---:|"]


def model_rows(run: Path, names: list[str], label: str = "") -> list[str]:
    rows = []
    for name in names:
        s = summary(run, name)
        if s is not None:
            rows.append(f"| {label or name} | {s['epochs']} | {s['best_epoch']} | "
                        f"{s['val_errors']:,} | {s['test_errors']:,} | "
                        f"{s.get('test_errors_top5', 'n/a')} | {s['wall_seconds']:,.0f} s |")
    return rows


def equal_compute(run: Path, ens: dict, other: Path | None) -> str:
    if other is None:
        return "n/a (no --equal-compute run)"
    averaged = json.loads((other / "ensemble.json").read_text()) \
        if (other / "ensemble.json").is_file() else None
    if averaged is None:
        return "n/a (the --equal-compute run has no ensemble.json)"
    theirs = averaged["test"]["generalist_errors"]
    return f"{(theirs - ens['test']['ensemble_errors']) / theirs:.3f}"


# SmallCNN widths kept small on purpose, so that capacity limits the generalist as compute
# limited the paper's JFT model (the study's report gives each generalist's error rate on its
# training images beside validation's). With --sizes small=32,64,128 large=48,96,192 the larger
# won and erred on 0.5 % of its training images against 3.8 % of validation
# (results/many_classes_study_k8_soft9_t2.md): its errors were a gap to unseen typefaces, not a
# failure to fit, and none of the specialists' recipes run on it helped
SIZES = {"narrower": [12, 24, 48], "narrow": [16, 32, 64]}
KS = (8, 16, 32, 64)
TEMPERATURES = (1.0, 2.0, 4.0)  # per teacher: eq. 5's q is already softer than the generalist's
SEEDS = 3  # p (each specialist's dustbin spreads its share), so one T need not suit both
EQUAL_SEED = 1  # the equal-compute generalists' first seed: the generalist itself has seed 0
# how long generalists and students train: until validation stalls for `patience` epochs (with
# the cosine schedule over `epochs`, validation still improves late: patience of a few epochs)
UNTIL = {"generalists": {"epochs": 30, "patience": 5}, "students": {"epochs": 15, "patience": 4}}
# the specialists' recipes tried at the first k besides the base config's, each the base with
# these keys changed. Earlier sittings of this study (same data, generalist and seeds; their
# runs/ did not survive) tried at k = 8, on validation (results/many_classes_so_far.md): lr
# 0.005 and 0.001 (gentler rates fit less: worse), §6's soft targets from the generalist at
# weights 0.5 and 0.9, T = 2 (worse), 30 epochs (better than the base, worse than lr 0.05) and lr
# 0.05 (the best of them; results/many_classes_so_far.md as of commit c5ac881). So a sitting
# of the study tries the base and lr 0.05 only: the base again checks that the earlier figures
# hold for this sitting's generalist
RECIPES = ({"lr": 0.05},)
TRAIN_KEYS = ("lr", "epochs")  # recipe keys of specialists.train; the others are the section's
SHORT = {"lr": "lr", "epochs": "ep", "soft_weight": "soft", "soft_temperature": "t"}  # run names


def recipe_tag(changes: dict) -> str:
    """A recipe's run-name suffix: {"lr": 0.005} -> "-lr005"; the base's ""."""
    return "".join(f"-{SHORT[key]}{f'{value:g}'.replace('0.', '')}"
                   for key, value in changes.items())


def recipe_text(spec) -> str:
    """A specialists section's recipe in words: "lr 0.02, 10 epochs, soft targets 0.5 at T = 2"."""
    soft = f", soft targets {spec.soft_weight:g} at T = {spec.soft_temperature:g}" \
        if spec.soft_weight else ""
    epochs = spec.train.epochs
    return f"lr {spec.train.lr:g}, {epochs} epoch{'s' * (epochs != 1)}{soft}"


def specialists_stage(base: dict, source: dict, k: int, changes: dict) -> tuple[str, dict]:
    """The run name and config of specialists at k from the generalist run `source`, with the
    base config's specialists recipe and `changes` (TRAIN_KEYS of its train, or keys of the
    section)."""
    spec = base["specialists"]
    train = {**spec["train"], **{key: v for key, v in changes.items() if key in TRAIN_KEYS}}
    rest = {key: v for key, v in changes.items() if key not in TRAIN_KEYS}
    name = f"k{k}{recipe_tag(changes)}"
    return name, {"name": f"many-{name}", "data": base["data"], "generalists": source,
                  "specialists": {**spec, **rest, "k": k, "train": train}}


def stage(folder: Path, name: str, raw: dict) -> Path:
    """The run `name` in `folder`: started from `raw` (a config mapping), or resumed if it
    exists (a finished one only says so); SystemExit if it fails or was started from another
    config. In this process: on the Ray it has started, if any (tests), else on a local Ray of
    the run's own."""
    from ensemble.cli import main as ensemble

    run, config = folder / name, folder / f"{name}.yaml"
    text = yaml.safe_dump(raw, sort_keys=False)
    if config.is_file() and config.read_text() != text:  # never resume another recipe's run
        raise SystemExit(f"the study's run {name} was started from another config than the "
                         f"study now asks for ({config}); move {run} and {config} away")
    if (run / "config.yaml").is_file():
        argv = ["run", "--resume", str(run)]
    else:
        config.write_text(text)
        argv = ["run", str(config), "--run-dir", str(run)]
    print(f"== {name}", flush=True)
    code = ensemble(argv)
    if code:
        raise SystemExit(f"the study's run {name} failed (exit {code}); run the study again "
                         "to resume it")
    return run


def plan_runs(folder: Path, base: dict, sizes=SIZES, ks=KS, seeds=SEEDS,
              temperatures=TEMPERATURES, until=UNTIL, recipes=RECIPES) -> dict[str, Path]:
    """Run every stage of the study in turn (see the module's docstring) from `base` (a config
    mapping with data, generalists, specialists and a student 'generalists')."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = base["generalists"]
    runs = {}
    for size, widths in sizes.items():
        raw = {"name": f"many-gen-{size}", "data": base["data"], "generalists": {
            **gen, "model": {**gen["model"], "hidden": widths},
            "train": {**gen["train"], **until["generalists"]}}}
        runs[f"gen-{size}"] = stage(folder, f"gen-{size}", raw)
    best = min(sizes, key=lambda s: summary(runs[f"gen-{s}"], "generalist-0")["val_errors"])
    source = {"from_run": str(runs[f"gen-{best}"])}

    def specialists(k: int, changes: dict) -> Path:
        return stage(folder, *specialists_stage(base, source, k, changes))

    trials = [{}, *recipes]
    first = [specialists(ks[0], changes) for changes in trials]
    runs.update({f"recipe{recipe_tag(c) or '-base'}": run for c, run in zip(trials, first)})
    best_trial = min(range(len(trials)), key=lambda i: _json(first[i], "ensemble.json")["val"][
        "ensemble_errors"])
    for k in ks:
        runs[f"k{k}"] = first[best_trial] if k == ks[0] else specialists(k, trials[best_trial])
    k = min(ks, key=lambda k: _json(runs[f"k{k}"], "ensemble.json")["val"]["ensemble_errors"])
    extra = more_generalists(_cpu_seconds(runs[f"k{k}"]))
    if extra:  # the generalist itself is the first of the ensemble: not trained again
        chosen = yaml.safe_load((runs[f"gen-{best}"] / "config.yaml").read_text())["generalists"]
        runs["equal"] = stage(folder, "equal", {"name": "many-equal", "seed": EQUAL_SEED,
                                                "data": base["data"],
                                                "generalists": {**chosen, "count": extra}})
    recipe = base["students"]["generalists"]  # at the generalist's widths
    recipe = {**recipe, "model": {**recipe["model"], "hidden": sizes[best]},
              "train": {**recipe["train"], **until["students"]}}
    teachers = {"generalists": {}, "ensemble": {"soft_targets": "ensemble"}}
    trial = {f"{kind}-T{t:g}": {**recipe, **teach, "temperature": t}
             for kind, teach in teachers.items() for t in temperatures}
    chosen_k = {"from_run": str(runs[f"k{k}"])}  # its subsets and specialists, not retrained
    runs["temperature"] = stage(folder, "temperature", {
        "name": "many-temperature", "data": base["data"], "generalists": source,
        "specialists": chosen_k, "students": trial})
    chosen_t = {kind: min(temperatures, key=lambda t: summary(
        runs["temperature"], f"student-{kind}-T{t:g}")["val_errors"]) for kind in teachers}
    students = {}
    for i in range(seeds):  # the generalist's size, and half its widths
        for tag, widths in (("", sizes[best]), ("-half", [max(1, w // 2) for w in sizes[best]])):
            student = {**recipe, "model": {**recipe["model"], "hidden": widths}}
            students[f"hard{tag}-s{i}"] = {**student, "alpha": 0.0}
            for kind, teach in teachers.items():
                students[f"{kind}{tag}-s{i}"] = {**student, **teach,
                                                 "temperature": chosen_t[kind]}
    # student i of a run has seed `seed` + 1000 + i: past the temperature trials' seeds, so no
    # student here repeats the trial that chose its T
    runs["students"] = stage(folder, "students", {
        "name": "many-students", "seed": len(trial), "data": base["data"], "generalists": source,
        "specialists": chosen_k, "students": students})
    return runs


def more_generalists(spent: dict[str, float]) -> int:
    """How many more generalists the specialists' CPU-seconds would have trained (rounded, a
    half up)."""
    return math.floor(spent["specialists"] / spent["generalist-0"] + 0.5)


def spread(splits, n: int):
    """n training images and labels evenly spread over the training split (every typeface)."""
    import numpy as np

    pick = np.linspace(0, len(splits.train_x) - 1, min(n, len(splits.train_x))).astype(np.int64)
    return splits.train_x[pick], splits.train_y[pick]


def fit_errors(run: Path, data_dir: str) -> dict:
    """The run's generalist-0's error rates (%) on as many training images, spread over the
    split, as validation has ('train'), and on validation ('val'): whether it fails to fit the
    images it trained on, or mainly those of typefaces it never saw."""
    import torch

    from ensemble.data import load_splits, to_pixels
    from ensemble.teacher import load_teacher

    cpu = torch.device("cpu")
    splits = load_splits(load_config(run / "config.yaml").data, data_dir or None)
    teacher = load_teacher([checkpoint.load_latest(run / "checkpoints" / "generalist-0")[0]], cpu)
    out = {"images": len(splits.val_y)}
    for part, (x, y) in (("train", spread(splits, len(splits.val_y))),
                         ("val", (splits.val_x, splits.val_y))):
        with torch.no_grad():
            wrong = teacher.probs(to_pixels(x, cpu), 1.0).argmax(1).numpy() != y
        out[part] = 100 * float(wrong.mean())
    return out


def _json(run: Path, name: str) -> dict:
    return json.loads((run / name).read_text())


def _cpu_seconds(run: Path) -> dict[str, float]:
    """CPU-seconds each model of `run` trained (its wall time times the CPUs it held: the
    generalist may hold more than a specialist), the specialists summed."""
    cfg = load_config(run / "config.yaml")
    cpus = {"generalist": cfg.generalists.resources.num_cpus,
            "specialist": cfg.specialists.resources.num_cpus}
    spent = {p.name: summary(run, p.name)["wall_seconds"] * cpus.get(p.name.split("-")[0], 1)
             for p in (run / "checkpoints").iterdir()}
    spent["specialists"] = sum(v for n, v in spent.items() if n.startswith("specialist-"))
    if "generalist-0" not in spent:  # taken over: the source run's
        source = Path(cfg.generalists.from_run)
        spent["generalist-0"] = summary(source, "generalist-0")["wall_seconds"] * \
            load_config(source / "config.yaml").generalists.resources.num_cpus
    return spent


def averaged(runs: list[Path], data_dir: str) -> dict[str, int]:
    """Validation and test errors of the generalists of `runs` (the same data) with their
    probabilities averaged."""
    import torch

    from ensemble.data import load_splits, to_pixels
    from ensemble.teacher import load_teacher

    cfg = load_config(runs[0] / "config.yaml")
    splits = load_splits(cfg.data, data_dir or None)
    blobs = [checkpoint.load_latest(run / "checkpoints" / f"generalist-{i}")[0] for run in runs
             for i in range(load_config(run / "config.yaml").generalists.count)]
    teacher = load_teacher(blobs, torch.device("cpu"))
    out = {}
    for part, x, y in (("val", splits.val_x, splits.val_y), ("test", splits.test_x,
                                                              splits.test_y)):
        with torch.no_grad():
            probs = torch.cat([teacher.probs(to_pixels(x[i:i + 2000], torch.device("cpu")), 1.0)
                               for i in range(0, len(x), 2000)])
        out[part] = int((probs.argmax(1).numpy() != y).sum())
    return out


def study(folder: Path, args) -> None:
    runs = plan_runs(folder, yaml.safe_load(Path(args.base).read_text()), sizes=args.sizes)
    text = study_report(runs, args.data_dir)
    Path(args.out or ROOT / "results" / "many_classes.md").write_text(text)
    print(text)


def so_far(folder: Path, data_dir: str) -> str:
    """The study's finished runs in `folder`, while it goes on: each generalist (and its error
    rates on training images and validation) and each specialists run's eq. 5 errors."""
    lines = ["# Specialists on many classes: the study so far", "",
             f"`python benchmarks/many_classes.py --study {folder} --so-far`: the runs finished in "
             "that folder; the study goes on (run it again to resume). Choices on validation; "
             "test only reported.", "", "Generalists:", "", *MODELS]
    gens = [p for p in sorted(folder.glob("gen-*")) if p.is_dir() and
            (p / "metrics.json").is_file()]
    for run in gens:
        lines += model_rows(run, ["generalist-0"], label=run.name)
    lines += ["", "Error rates on training images spread over the training split and on "
              "validation: " + "; ".join(f"{run.name} {e['train']:.2f} % and {e['val']:.2f} %"
                                         for run in gens
                                         for e in [fit_errors(run, data_dir)]) + ".", "",
              "Specialists (eq. 5; the generalist each took over in parentheses):", "",
              "| run | k | recipe | subset sizes | val errors: generalist, with specialists | "
              "test errors: generalist, with specialists |", "|---|---:|---|---|---:|---:|"]
    for run in sorted((p for p in folder.glob("k*") if (p / "ensemble.json").is_file()),
                      key=lambda p: _natural(p.name.split("-")[0]) + (p.name,)):
        cfg = load_config(run / "config.yaml")
        e = _json(run, "ensemble.json")
        sizes = [len(m) for m in _json(run, "subsets.json")["subsets"]]
        lines.append(f"| {run.name} ({Path(cfg.generalists.from_run).name}) | "
                     f"{cfg.specialists.k} | {recipe_text(cfg.specialists)} | "
                     f"{min(sizes)} to {max(sizes)} | {e['val']['generalist_errors']:,}, "
                     f"{e['val']['ensemble_errors']:,} | {e['test']['generalist_errors']:,}, "
                     f"{e['test']['ensemble_errors']:,} |")
    return "\n".join(lines + [""])


def study_report(runs: dict[str, Path], data_dir: str) -> str:
    sizes = [n for n in runs if n.startswith("gen-")]
    best = min(sizes, key=lambda n: summary(runs[n], "generalist-0")["val_errors"])
    ks = {n: _json(runs[n], "ensemble.json") for n in runs if n[0] == "k" and n[1:].isdigit()}
    k = min(ks, key=lambda n: ks[n]["val"]["ensemble_errors"])
    ens = ks[k]
    test_n = sum(r["examples"] for r in ens["table4"])
    cfg = load_config(runs[best] / "config.yaml")
    lines = ["# Specialists on many classes", "",
             f"`python benchmarks/many_classes.py --study {runs[best].parent}`: every run in that "
             "folder. Choices on validation; test only reported.", "",
             *data_section(cfg, runs[best], test_n), "Generalists (each up to "
             f"{cfg.generalists.train.epochs} epochs of a cosine schedule, stopped early once "
             f"validation had not improved for {cfg.generalists.train.patience}; the epochs each "
             "ran and its best):", ""]
    lines += MODELS
    for n in sizes:
        lines += model_rows(runs[n], ["generalist-0"], label=n)
    fit = {n: fit_errors(runs[n], data_dir) for n in sizes}
    lines += ["", f"Error rates on {next(iter(fit.values()))['images']:,} training images "
              "spread over the training split (typefaces they trained on, no augmentation) and "
              "on validation: " + "; ".join(f"{n} {e['train']:.2f} % and {e['val']:.2f} %"
                                            for n, e in fit.items()) + "."]
    spec = load_config(runs[k] / "config.yaml").specialists
    trials = {n: _json(runs[n], "ensemble.json") for n in runs if n.startswith("recipe-")}
    alone = next(iter(trials.values()))  # every trial has the same generalist
    first = load_config(runs[next(iter(trials))] / "config.yaml").specialists.k
    lines += ["", f"Chosen on validation: {best}.", "", f"The specialists' recipe, tried "
              f"at k = {first} (eq. 5's errors; the generalist alone: "
              f"{alone['val']['generalist_errors']:,} validation, "
              f"{alone['test']['generalist_errors']:,} test):", "",
              "| recipe | val errors | test errors |", "|---|---:|---:|"]
    lines += [f"| {recipe_text(load_config(runs[n] / 'config.yaml').specialists)} | "
              f"{e['val']['ensemble_errors']:,} | {e['test']['ensemble_errors']:,} |"
              for n, e in trials.items()]
    lines += ["", "(Earlier sittings of the study tried more recipes from the same generalist: "
              "RECIPES' comment in benchmarks/many_classes.py.)"]
    lines += ["", f"Chosen on validation: {recipe_text(spec)}.", "", "Specialists per k (eq. 5; "
              f"{spec_keys(spec, skip=('k',))}):", "", "| k | subsets | classes per subset | "
              "val errors: generalist, with specialists | test errors: generalist, with "
              "specialists | relative test accuracy gain |", "|---:|---:|---|---:|---:|---:|"]
    for n, e in ks.items():
        acc_g, acc_e = (1 - e["test"][w] / test_n for w in ("generalist_errors",
                                                              "ensemble_errors"))
        sizes = [len(m) for m in _json(runs[n], "subsets.json")["subsets"]]
        lines.append(f"| {n[1:]} | {len(sizes)} | {min(sizes)} to {max(sizes)} (median "
                     f"{statistics.median(sizes):g}) | {e['val']['generalist_errors']:,}, "
                     f"{e['val']['ensemble_errors']:,} | {e['test']['generalist_errors']:,}, "
                     f"{e['test']['ensemble_errors']:,} | {100 * (acc_e - acc_g) / acc_g:+.1f} % |")
    t3, reduction, gain = table3(ens, test_n)
    t4, share = table4(ens)
    within = {}
    lines += ["", f"Chosen on validation: k = {k[1:]}.", "",
              *subsets_section(runs[k], class_names(cfg)), *t3, *t4,
              *diagnosis(runs[k], data_dir, facts=within), ""]
    spent = _cpu_seconds(runs[k])
    more = [runs["equal"]] if "equal" in runs else []
    equal = averaged([runs[best], *more], data_dir)
    n = sum(load_config(r / "config.yaml").generalists.count for r in more)
    lines += [f"The same compute on more generalists: the chosen k's specialists trained "
              f"{spent['specialists']:,.0f} CPU-seconds, the generalist "
              f"{spent['generalist-0']:,.0f} ({spent['specialists'] / spent['generalist-0']:.2f} "
              "times as many), so the ensemble of equal compute is the generalist "
              + (f"and {n} more of its recipe (seeds {EQUAL_SEED} to {EQUAL_SEED + n - 1}), "
                 "their probabilities averaged" if n else
                 "alone (the specialists took less than half its time)")
              + f": {equal['val']:,} validation and {equal['test']:,} test errors, against "
              f"{ens['val']['ensemble_errors']:,} and {ens['test']['ensemble_errors']:,} with "
              "the specialists.", ""]
    trial = sorted(p.name for p in (runs["temperature"] / "checkpoints").iterdir()
                   if p.name.startswith("student-"))
    lines += ["Students' temperature, one seed each (chosen on validation per teacher):", "",
              *MODELS, *model_rows(runs["temperature"], trial), ""]
    kinds = {}
    for name in sorted((p.name for p in (runs["students"] / "checkpoints").iterdir()),
                       key=_natural):
        if name.startswith("student-"):
            kind = name[len("student-"):].rsplit("-s", 1)[0]
            kinds.setdefault(kind, []).append(summary(runs["students"], name)["test_errors"])
    lines += ["Students (test errors over seeds, mean +- sd; half: half the generalist's widths):",
              "", "| taught by | size | seeds | test errors | each seed |",
              "|---|---|---:|---:|---|"]
    lines += [f"| {kind.split('-')[0]} | {'half' if kind.endswith('-half') else 'generalist'} | "
              f"{len(v)} | {statistics.mean(v):,.1f} +- "
              f"{statistics.stdev(v) if len(v) > 1 else 0:.1f} | "
              f"{', '.join(f'{e:,}' for e in v)} |" for kind, v in kinds.items()]
    student = (statistics.mean(kinds["generalists"]) - statistics.mean(kinds["ensemble"])) / \
        statistics.mean(kinds["generalists"])
    lines += ["", *targets(ens, share, equal, spent, kinds, within),
              f"specialists_test_error_reduction: {reduction:.3f}",
              f"specialists_relative_accuracy_gain: {gain:.3f}",
              f"table4_nondecreasing_share: {share}",
              f"student_ensemble_vs_generalists_error_reduction: {student:.3f}",
              "specialists_vs_equal_compute_ensemble_error_reduction: "
              f"{(equal['test'] - ens['test']['ensemble_errors']) / equal['test']:.3f}", ""]
    return "\n".join(lines)


def targets(ens: dict, share: str, equal: dict, spent: dict, kinds: dict,
            within: dict) -> list[str]:
    """Issue 22's targets on test, each met or missed by how much, and the figures above that
    say why."""
    def spread_of(v):
        return f"{statistics.mean(v):,.1f} +- {statistics.stdev(v) if len(v) > 1 else 0:.1f}"

    with_spec, gen = ens["test"]["ensemble_errors"], ens["test"]["generalist_errors"]
    reduction = (gen - with_spec) / gen
    shared = share.startswith("n/a")
    student = [statistics.mean(kinds[k]) for k in ("ensemble", "generalists")]
    rows = [("specialists cut the generalist's test errors", ">= 10 % relative",
             f"{100 * reduction:+.1f} % ({gen:,} -> {with_spec:,})",
             reduction >= 0.10, f"{100 * (0.10 - reduction):.1f} points"),
            ("gains do not fall with coverage (Table 4)", "share >= 0.8 over >= 4 bins",
             share, not shared and float(share) >= 0.8,
             "too few bins" if shared else f"{0.8 - float(share):.2f}"),
            ("ahead of the equal-compute ensemble", "fewer test errors",
             f"{with_spec:,} against {equal['test']:,}", with_spec < equal["test"],
             f"{with_spec - equal['test'] + 1:,} errors"),
            ("student of generalist + specialists ahead of the generalists' (3 seeds, the "
             "generalist's size)", "fewer test errors (mean)",
             f"{spread_of(kinds['ensemble'])} against {spread_of(kinds['generalists'])}",
             student[0] < student[1], f"{student[0] - student[1] + 1:,.1f} errors")]
    lines = ["Targets (test):", "", "| target | wanted | measured | |", "|---|---|---|---|"]
    lines += [f"| {name} | {want} | {got} | {'met' if ok else 'missed by ' + gap} |"
              for name, want, got, ok, gap in rows]
    if within:  # why, from the within-subset table above
        (n_t, _, g_t, s_t), (n_v, _, g_v, s_v) = within["training"], within["validation"]
        lines += ["", "Why, in the figures above: among their own classes the specialists err on "
                  f"{100 * s_t / max(n_t, 1):.2f} % of training images (the generalist, among the "
                  f"same classes: {100 * g_t / max(n_t, 1):.2f} %) and "
                  f"{100 * s_v / max(n_v, 1):.2f} % of validation's "
                  f"({100 * g_v / max(n_v, 1):.2f} %); the specialists took "
                  f"{spent['specialists'] / spent['generalist-0']:.2f} times the generalist's "
                  "CPU time."]
    return lines + [""]


def diagnosis(run: Path, data_dir: str, probe: int = 2000,
              facts: dict | None = None) -> list[str]:
    """Why specialists help or not, from the run's checkpoints: on each subset's validation
    images, the generalist's errors (over all classes, and among the subset's classes only)
    against the specialist's among them, and the same on as many training images (typefaces
    they trained on: does a specialist fit its classes better than the generalist, and does that
    carry to typefaces never seen?); eq. 5's validation errors by top_n and dustbin correction;
    and how soft the students' teachers are on `probe` training images (mean entropy in nats
    and top probability, at T = 1 and 4). `facts`, if given, gets the within-subset totals:
    per split, [images, generalist's errors, among the subset's classes, specialists']."""
    import torch

    from ensemble.data import load_splits, to_pixels
    from ensemble.teacher import load_teacher

    cfg = load_config(run / "config.yaml")
    cpu = torch.device("cpu")
    splits = load_splits(cfg.data, data_dir or None)
    gens = [checkpoint.load_latest(run / "checkpoints" / "generalist-0")[0]]
    subsets = _json(run, "subsets.json")["subsets"]
    specs = [checkpoint.load_latest(run / "checkpoints" / f"specialist-{i}")[0]
             for i in range(len(subsets))]
    teacher = load_teacher(gens, cpu)
    models = [load_teacher([blob], cpu) for blob in specs]  # own probabilities, dustbin last

    def within(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
        """The generalist's probabilities on x, and per subset: its images, the generalist's
        errors over all classes and among the subset's only, the specialist's among them."""
        with torch.no_grad():
            pg = teacher.probs(x, 1.0)
        rows = []
        for members, model in zip(subsets, models):
            m = torch.tensor(members)
            inside = torch.isin(y, m)
            with torch.no_grad():
                ps = model.probs(x[inside], 1.0)
            rows.append([int(inside.sum()), int((pg[inside].argmax(1) != y[inside]).sum()),
                         int((m[pg[inside][:, m].argmax(1)] != y[inside]).sum()),
                         int((m[ps[:, :-1].argmax(1)] != y[inside]).sum())])
        return pg, rows

    x, y = to_pixels(splits.val_x, cpu), torch.as_tensor(splits.val_y)
    pg, rows = within(x, y)
    lines = ["Within each subset, on validation images of its classes: errors of the generalist "
             "over all classes, of the generalist among the subset's classes only, and of the "
             "specialist among them (its dustbin left out):", "",
             "| specialist | classes | images | generalist | generalist, subset only | "
             "specialist, subset only |", "|---|---:|---:|---:|---:|---:|"]
    for i, (members, row) in enumerate(zip(subsets, rows)):
        lines.append(f"| specialist-{i} | {len(members)} | " + " | ".join(f"{v:,}" for v in row)
                     + " |")
    totals = [sum(col) for col in zip(*rows)][1:]
    lines += [f"| all | | | {' | '.join(f'{v:,}' for v in totals)} |", ""]
    xt, yt = spread(splits, len(x))
    xt, yt = to_pixels(xt, cpu), torch.as_tensor(yt)
    pt, seen = within(xt, yt)
    share = [sum(col) for col in zip(*seen)]
    if facts is not None:
        facts.update(training=share, validation=[sum(r[0] for r in rows), *totals])
    lines += [f"The same on {len(yt):,} training images spread over the training split "
              "(typefaces the models trained on, without augmentation) against validation "
              "(typefaces never seen), summed over the subsets (an image counts once for each "
              "subset holding its class), as error rates:", "",
              "| images | in subsets | generalist, all classes | generalist, subset only | "
              "specialist, subset only |", "|---|---:|---:|---:|---:|",
              "| training | " + " | ".join([f"{share[0]:,}"] + [
                  f"{100 * v / max(share[0], 1):.2f} %" for v in share[1:]]) + " |",
              "| validation | " + " | ".join([f"{sum(r[0] for r in rows):,}"] + [
                  f"{100 * v / max(sum(r[0] for r in rows), 1):.2f} %" for v in totals]) + " |",
              "", f"The generalist over all {len(pt[0]):,} classes errs on "
              f"{100 * float((pt.argmax(1) != yt).float().mean()):.2f} % of these training "
              f"images and {100 * float((pg.argmax(1) != y).float().mean()):.2f} % of the "
              "validation images.", ""]
    lines += ["Eq. 5 on validation by how many of the generalist's top classes call specialists "
              "and whether the dustbins are corrected for oversampling (errors; the generalist "
              f"alone {int((pg.argmax(1) != y).sum()):,}):", "",
              "| top_n | dustbin corrected | specialists consulted per image | errors |",
              "|---:|---|---:|---:|"]
    for top in (1, 3):
        for corrected in (True, False):
            spec = dataclasses.replace(cfg.specialists, top_n=top, dustbin_correction=corrected)
            _, q, active = load_teacher(gens, cpu, specialists=specs,
                                        specialists_cfg=spec).predict(x)
            lines.append(f"| {top} | {'yes' if corrected else 'no'} | "
                         f"{float(active.float().sum(1).mean()):.1f} | "
                         f"{int((q.argmax(1) != y).sum()):,} |")
    lines.append("")
    ens = load_teacher(gens, cpu, specialists=specs, specialists_cfg=cfg.specialists)
    xt = to_pixels(splits.train_x[:probe], cpu)
    lines += [f"How soft the teachers are on {probe:,} training images:", "",
              "| teacher | T | mean entropy (nats) | mean top probability |",
              "|---|---:|---:|---:|"]
    for name, source in (("generalist", teacher), ("generalist + specialists (eq. 5)", ens)):
        for t in (1.0, 4.0):
            with torch.no_grad():
                q = source.probs(xt, t).clamp_min(1e-30)
            lines.append(f"| {name} | {t:g} | {float(-(q * q.log()).sum(1).mean()):.2f} | "
                         f"{float(q.max(1).values.mean()):.3f} |")
    return lines + [""]


def _natural(name: str) -> tuple[str, int]:
    """specialist-2 before specialist-10."""
    stem = name.rstrip("0123456789")
    return stem, int("0" + name[len(stem):])


def size_arg(text: str) -> tuple[str, list[int]]:
    """NAME=W1,W2,... (a generalist size for --sizes) as (name, widths)."""
    name, _, widths = text.partition("=")
    try:
        values = [int(w) for w in widths.split(",")]
    except ValueError:
        values = []
    if not name.replace("-", "").isalnum() or not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=W1,W2,... (a name of letters, "
                                         "digits and dashes; positive widths)")
    return name, values


def size_text(sizes: dict) -> list[str]:
    return [f"{name}={','.join(map(str, widths))}" for name, widths in sizes.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="")
    parser.add_argument("--study", default="")
    parser.add_argument("--equal-compute", default="")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--base", default=str(ROOT / "configs" / "many_classes" / "short.yaml"))
    parser.add_argument("--out", default="")
    parser.add_argument("--sizes", nargs="+", type=size_arg, default=list(SIZES.items()),
                        metavar="NAME=W1,W2,...", help="--study: the generalists' sizes tried "
                        f"(SmallCNN widths; default {' '.join(size_text(SIZES))})")
    parser.add_argument("--so-far", action="store_true",
                        help="--study: report the runs finished so far; start none")
    parser.add_argument("--diagnose", action="store_true",
                        help="--run: add why specialists helped or not (loads the data)")
    args = parser.parse_args()
    if len({name for name, _ in args.sizes}) < len(args.sizes):
        parser.error("--sizes names each size once")
    args.sizes = dict(args.sizes)
    if bool(args.run) == bool(args.study):
        parser.error("give one of --run RUN and --study DIR")
    if args.so_far and not (args.study and list(Path(args.study).glob("gen-*/metrics.json"))):
        parser.error("--so-far reports a study's finished runs: give --study DIR, a folder "
                     "where a study has finished a generalist")
    if args.run and not (Path(args.run) / "ensemble.json").is_file():
        parser.error(f"{args.run} is not a finished run with specialists (no ensemble.json)")
    if args.study and args.so_far:
        text = so_far(Path(args.study), args.data_dir)
        Path(args.out or ROOT / "results" / "many_classes_so_far.md").write_text(text)
        print(text)
        return
    if args.study:
        study(Path(args.study), args)
        return
    run = Path(args.run)
    args.out = args.out or str(ROOT / "results" / "many_classes_short.md")
    cfg = load_config(run / "config.yaml")
    ens = json.loads((run / "ensemble.json").read_text())
    test_n = sum(r["examples"] for r in ens["table4"])
    classes = class_names(cfg)
    names = sorted((p.name for p in (run / "checkpoints").iterdir()), key=_natural)
    t3, reduction, gain = table3(ens, test_n)
    t4, share = table4(ens)
    walls = {n: (summary(run, n) or {}).get("wall_seconds", 0) for n in names}
    spec_s = sum(v for n, v in walls.items() if n.startswith("specialist-"))
    students = [summary(run, f"student-{n}") for n in ("generalists", "ensemble")]
    student = "n/a (no students generalists and ensemble)" if None in students else \
        f"{1 - students[1]['test_errors'] / students[0]['test_errors']:.3f}"
    text = ["# Specialists on many classes", "",
            f"Run `{run}` of `{cfg.name}` ({spec_keys(cfg.specialists)}; "
            f"{recipe_text(cfg.specialists)}; fixed in advance, not "
            "chosen on validation). `python benchmarks/many_classes.py --run " + str(run)
            + (" --diagnose" if args.diagnose else "") + "`. The generalist: "
            f"{cfg.generalists.model.kind}, widths {tuple(cfg.generalists.model.hidden)}"
            + (f", taken over from `{cfg.generalists.from_run}`" if cfg.generalists.from_run
               else "") + ".",
            "", *data_section(cfg, run, test_n), *MODELS, *model_rows(run, names), "",
            f"The run took {_json(run, 'metrics.json')['timings']['total']:,.0f} s end to end "
            "(its summary.md says where). "
            f"Training time: the generalist {walls.get('generalist-0', 0):,.0f} s; the "
            f"{cfg.specialists.k} specialists {spec_s:,.0f} s together (one actor each, "
            "in parallel as CPUs allow).", "", *subsets_section(run, classes), *t3, *t4,
            *(diagnosis(run, args.data_dir) if args.diagnose else []),
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
