"""benchmarks/many_classes.py's study, end to end on a tiny many-class set: every stage runs,
a rerun resumes instead of training again, and each choice follows validation."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ensemble import checkpoint
from ensemble.config import load_config
from ensemble.data import load_splits
from tests.conftest import synthetic_digits

ROOT = Path(__file__).resolve().parents[1]


def _study_module():
    spec = importlib.util.spec_from_file_location("many_classes",
                                                  ROOT / "benchmarks" / "many_classes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ray
@pytest.mark.slow
def test_the_study_runs_every_stage_and_chooses_on_validation(ray_session, tmp_path,
                                                              monkeypatch):
    study = _study_module()
    # the equal-compute stage trains as many more generalists as the specialists' CPU time
    # would have: timings, so fixed here at one
    monkeypatch.setattr(study, "more_generalists", lambda spent: 1)
    parts = {}
    for part, n, seed in (("train", 900, 0), ("val", 300, 1), ("test", 300, 2)):
        x, y = synthetic_digits(n, seed, size=8, classes=12)
        parts[f"x_{part}"], parts[f"y_{part}"] = x, y.astype(np.int64)
    np.savez(tmp_path / "glyphs.npz", **parts, classes=np.array([f"c{i}" for i in range(12)]))
    mlp = {"kind": "mlp", "hidden": [16], "dropout_in": 0.0, "dropout_hidden": 0.0}
    base = {"data": {"npz": str(tmp_path / "glyphs.npz")},
            "generalists": {"model": mlp, "train": {"epochs": 3, "batch_size": 50, "lr": 0.3,
                                                    "patience": 2}},
            "specialists": {"k": 2, "epoch": "subset", "top_n": 2,
                            "train": {"epochs": 1, "batch_size": 50, "lr": 0.1}},
            "students": {"generalists": {"model": mlp, "temperature": 2.0,
                                         "train": {"epochs": 1, "batch_size": 50, "lr": 0.3}}}}
    folder = tmp_path / "study"
    until = {"generalists": {"epochs": 4, "patience": 2}, "students": {"epochs": 1, "patience": 0}}
    soft = {"soft_weight": 0.5, "soft_temperature": 2.0}
    runs = study.plan_runs(folder, base, sizes={"small": [8], "large": [24]}, ks=(2, 3),
                           seeds=2, temperatures=(1.0, 3.0), until=until, recipes=(soft,))
    assert sorted(runs) == ["equal", "gen-large", "gen-small", "k2", "k3", "recipe-base",
                            "recipe-soft5-t2", "students", "temperature"]
    # the specialists' recipe: the base config's and §6's soft targets tried at the first k, the
    # one with fewer eq. 5 validation errors taken for the others
    trial = {n: study._json(runs[n], "ensemble.json")["val"]["ensemble_errors"]
             for n in ("recipe-base", "recipe-soft5-t2")}
    best = min(trial, key=trial.get)
    assert runs["recipe-soft5-t2"] == folder / "k2-soft5-t2" and runs["k2"] == runs[best]
    weight = 0.5 if best == "recipe-soft5-t2" else 0.0
    assert load_config(runs["k3"] / "config.yaml").specialists.soft_weight == weight
    meta = checkpoint.read_meta(checkpoint.load_latest(
        runs["recipe-soft5-t2"] / "checkpoints" / "specialist-0")[0])
    assert (meta["soft_weight"], meta["soft_temperature"]) == (0.5, 2.0)  # trained so
    val = {n: study.summary(runs[n], "generalist-0")["val_errors"] for n in ("gen-small",
                                                                           "gen-large")}
    chosen = chosen_gen = min(val, key=val.get)
    assert yaml.safe_load((folder / "gen-small.yaml").read_text())["generalists"]["train"][
        "epochs"] == 4  # the study's own length, not the base config's
    assert f"from_run: {runs[chosen]}" in (folder / "k2.yaml").read_text()
    report = study.study_report(runs, "")
    partial = study.so_far(folder, "")  # --so-far: every finished run, as it stands
    for name in {runs[n].name for n in ("recipe-base", "recipe-soft5-t2", "k3")}:
        e = study._json(folder / name, "ensemble.json")
        assert f"| {e['val']['generalist_errors']:,}, {e['val']['ensemble_errors']:,} | " \
            f"{e['test']['generalist_errors']:,}, {e['test']['ensemble_errors']:,} |" in \
            next(line for line in partial.splitlines() if line.startswith(f"| {name} ("))
    assert "| gen-small |" in partial and "| gen-large |" in partial
    ks = {k: study._json(runs[k], "ensemble.json")["val"]["ensemble_errors"]
          for k in ("k2", "k3")}
    assert f"Chosen on validation: k = {min(ks, key=ks.get)[1:]}." in report
    for name in ks:  # each k's subsets: how many, and how many classes each holds
        sizes = sorted(len(m) for m in study._json(runs[name], "subsets.json")["subsets"])
        assert f"| {name[1:]} | {len(sizes)} | {sizes[0]} to {sizes[-1]} (median " in report
    k = runs[min(ks, key=ks.get)]
    for later in ("temperature", "students"):  # the chosen k's specialists, taken over
        assert f"from_run: {k}" in (folder / f"{later}.yaml").read_text()
        theirs = sorted((k / "checkpoints" / "specialist-0").iterdir())[-1].read_bytes()
        mine = list((runs[later] / "checkpoints" / "specialist-0").iterdir())
        assert [p.read_bytes() for p in mine] == [theirs]
    found = "\n".join(study.diagnosis(k, "", probe=50))  # --diagnose, on the chosen k's run
    totals = re.search(r"\| all \| \| \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|", found)
    gen_all, gen_subset, _ = (int(v.replace(",", "")) for v in totals.groups())
    assert gen_subset <= gen_all  # among the subset's classes only: never more errors
    assert found.count("| 1 | yes |") == found.count("| 3 | no |") == 1
    # the same as rates, on validation (the totals above) and on training images spread over
    # the training split: as many, each counted once per subset holding its class
    rows = {part: re.search(rf"\| {part} \| ([\d,]+) \| ([\d.]+) % \| ([\d.]+) % \| "
                            r"([\d.]+) % \|", found).groups() for part in ("training", "validation")}
    images = int(rows["validation"][0].replace(",", ""))
    for rate, errors in zip(rows["validation"][1:], totals.groups()):
        assert abs(float(rate) - 100 * int(errors.replace(",", "")) / images) < 0.006
    cfg = load_config(k / "config.yaml")
    _, y = study.spread(load_splits(cfg.data, None), 300)
    members = study._json(k, "subsets.json")["subsets"]
    assert int(rows["training"][0].replace(",", "")) == sum(int(np.isin(y, m).sum())
                                                            for m in members)
    fit = {n: study.fit_errors(runs[n], "") for n in ("gen-small", "gen-large")}
    for n, e in fit.items():  # validation: the generalist's own count; training: other images
        assert e["images"] == 300
        assert abs(e["val"] - 100 * study.summary(runs[n], "generalist-0")["val_errors"] / 300) \
            < 1e-9
    assert f"gen-large {fit['gen-large']['train']:.2f} % and {fit['gen-large']['val']:.2f} %" \
        in report
    values = dict(line.split(": ", 1) for line in report.splitlines()[-5:])
    assert set(values) == {"specialists_test_error_reduction", "specialists_relative_accuracy_gain",
                           "table4_nondecreasing_share",
                           "student_ensemble_vs_generalists_error_reduction",
                           "specialists_vs_equal_compute_ensemble_error_reduction"}
    chosen = yaml.safe_load((folder / "students.yaml").read_text())["students"]
    for kind in ("generalists", "ensemble"):  # each teacher's T: the trial's best on validation
        val = {t: study.summary(runs["temperature"], f"student-{kind}-T{t:g}")["val_errors"]
               for t in (1.0, 3.0)}
        assert chosen[f"{kind}-s1"]["temperature"] == min(val, key=val.get)
    students = sorted(p.name for p in (runs["students"] / "checkpoints").iterdir()
                      if p.name.startswith("student-"))
    assert students == sorted(f"student-{kind}{tag}-s{i}" for kind in ("ensemble", "generalists",
                                                                     "hard")
                              for tag in ("", "-half") for i in range(2))

    def seeds(run):
        return {checkpoint.read_meta(checkpoint.load_latest(p)[0])["seed"]
                for p in (run / "checkpoints").iterdir() if p.name.startswith("student-")}
    assert not seeds(runs["temperature"]) & seeds(runs["students"])  # no trial trained again
    widths = [24] if chosen_gen == "gen-large" else [8]
    trials = yaml.safe_load((folder / "temperature.yaml").read_text())["students"]
    assert all(s["model"]["hidden"] == widths for s in trials.values())  # the generalist's
    # the equal-compute ensemble: the generalist and one more of its recipe at another seed
    extra = checkpoint.load_latest(runs["equal"] / "checkpoints" / "generalist-0")[0]
    assert checkpoint.read_meta(extra)["seed"] == study.EQUAL_SEED != 0
    assert not (runs["equal"] / "checkpoints" / "generalist-1").exists()
    both = study.averaged([runs[chosen_gen], runs["equal"]], "")
    assert f"the generalist and 1 more of its recipe (seeds 1 to 1), their probabilities " \
        f"averaged: {both['val']:,} validation and {both['test']:,} test errors" in report
    alone = study.study_report({n: r for n, r in runs.items() if n != "equal"}, "")
    assert "the ensemble of equal compute is the generalist alone" in alone
    assert "| ensemble | half | 2 |" in report and "| hard | generalist | 2 |" in report
    chosen_recipe = "lr 0.1, 1 epoch" + (", soft targets 0.5 at T = 2" if weight else "")
    assert f"Chosen on validation: {chosen_recipe}." in report
    before = {p: p.stat().st_mtime for p in folder.rglob("*.safetensors")}
    # run again: every stage resumes, none trains; with no extra generalist due, no equal stage
    monkeypatch.setattr(study, "more_generalists", lambda spent: 0)
    again = study.plan_runs(folder, base, sizes={"small": [8], "large": [24]}, ks=(2, 3), seeds=2,
                            temperatures=(1.0, 3.0), until=until, recipes=(soft,))
    assert "equal" not in again and set(again) == set(runs) - {"equal"}
    assert {p: p.stat().st_mtime for p in folder.rglob("*.safetensors")} == before


def test_sizes_on_the_command_line():
    study = _study_module()
    assert study.size_arg("narrow=16,32,64") == ("narrow", [16, 32, 64])
    assert dict(map(study.size_arg, study.size_text(study.SIZES))) == study.SIZES
    for bad in ("narrow", "narrow=16,x", "narrow=0,8", "a b=8", "=8"):
        with pytest.raises(Exception, match="is not NAME=W1,W2"):
            study.size_arg(bad)


def test_bad_command_lines_are_refused_in_one_sentence(tmp_path):
    """Before anything is read or written: no traceback, exit 2, no results file."""
    out = tmp_path / "out.md"
    for argv in ([], ["--so-far"], ["--study", str(tmp_path), "--so-far"],
                 ["--run", str(tmp_path)], ["--study", str(tmp_path), "--sizes", "a=8", "a=16"]):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "many_classes.py"),
                               *argv, "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr, argv
        assert done.stderr.strip().splitlines()[-1].startswith("many_classes.py: error: ")
        assert not out.exists()


def test_recipes_name_their_runs_and_change_only_their_keys(tmp_path):
    """A recipe's run: the base's specialists with its keys changed (lr in train), named by
    them; a run folder started from another config is refused, not resumed."""
    study = _study_module()
    base = {"data": {"npz": "x.npz"}, "specialists": {"k": 2, "top_n": 1,
                                                      "train": {"epochs": 3, "lr": 0.02}}}
    source = {"from_run": "runs/gen"}
    name, raw = study.specialists_stage(base, source, 8, {"lr": 0.005})
    assert name == "k8-lr005" and raw["specialists"]["train"] == {"epochs": 3, "lr": 0.005}
    name, raw = study.specialists_stage(base, source, 8, {"epochs": 30})
    assert name == "k8-ep30" and raw["specialists"]["train"] == {"epochs": 30, "lr": 0.02}
    assert raw["specialists"]["k"] == 8 and raw["generalists"] == source
    name, raw = study.specialists_stage(base, source, 16, {"soft_weight": 0.5,
                                                           "soft_temperature": 2.0})
    assert name == "k16-soft5-t2" and raw["specialists"]["soft_weight"] == 0.5
    assert raw["specialists"]["train"] == base["specialists"]["train"]
    assert study.specialists_stage(base, source, 8, {})[0] == "k8"
    (tmp_path / "k8.yaml").write_text(yaml.safe_dump({"name": "another"}))
    with pytest.raises(SystemExit, match="started from another config"):
        study.stage(tmp_path, "k8", study.specialists_stage(base, source, 8, {})[1])


def test_targets_say_met_or_by_how_much_they_were_missed():
    study = _study_module()
    ens = {"test": {"generalist_errors": 1000, "ensemble_errors": 950}}
    kinds = {"ensemble": [90, 92, 94], "generalists": [100, 100, 100]}
    within = {"training": [200, 20, 10, 12], "validation": [100, 20, 10, 8]}
    spent = {"specialists": 300.0, "generalist-0": 100.0}
    lines = study.targets(ens, "0.75", {"test": 940}, spent, kinds, within)
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    assert rows["specialists cut the generalist's test errors"].endswith(
        "| +5.0 % (1,000 -> 950) | missed by 5.0 points |")
    assert rows["gains do not fall with coverage (Table 4)"].endswith("| 0.75 | missed by 0.05 |")
    assert rows["ahead of the equal-compute ensemble"].endswith(
        "| 950 against 940 | missed by 11 errors |")
    assert rows["student of generalist + specialists ahead of the generalists' (3 seeds, the "
                "generalist's size)"].endswith("| 92.0 +- 2.0 against 100.0 +- 0.0 | met |")
    why = next(line for line in lines if line.startswith("Why"))
    assert "err on 6.00 % of training images (the generalist, among the same classes: 5.00 %) " \
        "and 8.00 % of validation's (10.00 %)" in why and "3.00 times" in why
    ens["test"]["ensemble_errors"] = 880
    met = "\n".join(study.targets(ens, "n/a (only 3 covered bins with >= 100 examples)",
                                  {"test": 881}, spent, kinds, {}))
    assert "| +12.0 % (1,000 -> 880) | met |" in met and "Why" not in met
    assert "| missed by too few bins |" in met and "| 880 against 881 | met |" in met
