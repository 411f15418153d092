"""The paper's MNIST table (Hinton, Vinyals & Dean 2015, section 3) from one run of this project.

    python benchmarks/paper_mnist.py [--config configs/paper/mnist_quick.yaml] [--run-dir DIR]
                                     [--data-dir DIR] [--out results/paper_mnist.md]
                                     [--set KEY=VALUE ...]

Trains the config's teacher and students with `ensemble run` (or resumes the run directory, so a
finished run is only analysed), then writes a table of paper number vs ours, with epochs and
wall time per model, the hardware and the git commit. The bias shifts of the no-3s and 7s-and-8s
students are chosen on the validation split, never on the test set (the paper chose its +3.5 and
-7.6 on test). Students named w<width>-T<t> form the temperature x width study.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from ensemble import figures
from ensemble.data import labels_to_device, load_splits, to_device
from ensemble.rundir import RunDir
from ensemble.train import model_from_checkpoint, predict_logits

ROOT = Path(__file__).resolve().parents[1]
SHIFTS = torch.arange(0.0, 15.01, 0.25)  # bias shifts tried, in logits


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/paper/mnist_quick.yaml")
    parser.add_argument("--run-dir")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default=str(ROOT / "results" / "paper_mnist.md"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for a new run, as for `ensemble run`")
    args = parser.parse_args()
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    command = ["ensemble", "run", args.config, "--run-dir", str(run_dir)]
    for override in args.set:
        command += ["--set", override]
    if run_dir.exists():
        command = ["ensemble", "run", "--resume", str(run_dir)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
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
        model, _ = model_from_checkpoint(blob, dev)
        models[name] = (predict_logits(model, x_val), predict_logits(model, x_test), meta)

    def row(label, paper, name, ours, note=""):
        meta = models[name][2]
        return (f"| {label} | {paper} | {ours} | {meta['epoch']} | "
                f"{meta['summary']['wall_seconds']:.0f} s | {note} |")

    def test_errors(name):
        return errors(models[name][1], y_test)

    threes = y_test == 3
    lines = [f"# The paper's MNIST table from {args.config}", "",
             f"Run: `ensemble run {args.config} --run-dir {run_dir}"
             f"{''.join(' --set ' + o for o in args.set)}` (then analysed by "
             f"`python benchmarks/paper_mnist.py`); hardware: "
             f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU, torch "
             f"{torch.__version__}; git commit "
             f"{subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=ROOT).stdout.strip()}. "
             f"Test errors out of {len(y_test):,}; every model at its best epoch by validation; "
             f"trained on {len(splits.train_y):,} images ({len(splits.val_y):,} held out for "
             "validation; the paper used all 60,000). Wall time is each model's own training "
             "and evaluation time.", "",
             "| experiment | paper | ours | epochs | wall time | note |",
             "|---|---:|---:|---:|---:|---|"]
    teacher = next(n for n in models if n.startswith("generalist-"))
    teacher_model, _ = model_from_checkpoint(run.latest(teacher)[0], dev)
    x_train = to_device(splits.train_x, dev)
    own = errors(predict_logits(teacher_model, x_train), labels_to_device(splits.train_y, dev))
    lines.append(row("teacher 784-1200-1200-10, dropout, max-norm, jitter", 67, teacher,
                     test_errors(teacher), f"paper: ~3000 epochs; {own} errors on its own "
                     f"{len(x_train):,} (untranslated) training images"))
    if "student-hard" in models:
        lines.append(row("student 784-800-800-10, hard labels", 146, "student-hard",
                         test_errors("student-hard")))
    if "student-distilled" in models:
        lines.append(row("same student distilled at T=20", 74, "student-distilled",
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
                not re.fullmatch(r"student-w\d+-T[\d_]+", name):
            last = models[name][2]["history"][-1]
            lines.append(row(f"{name[len('student-'):]} (see the config)", "–", name,
                             test_errors(name), f"{errors(models[name][0], y_val)} on "
                             f"validation; last epoch {last['test_errors']} "
                             f"({last['val_errors']} on validation)"))

    grid = {}
    for name in models:
        m = re.fullmatch(r"student-w(\d+)-T([\d_]+)", name)
        if m:
            grid[(int(m.group(1)), float(m.group(2).replace("_", ".")))] = name
    if grid:
        widths = sorted({w for w, _ in grid})
        temps = sorted({t for _, t in grid})
        lines += ["", "## Temperature x width (test errors; validation errors in brackets; "
                      "the best T per width by validation in bold)", "",
                  "paper: students of 300 or more units did about equally well for any T > 8; "
                  "30-unit students did best at T = 2.5-4.", "",
                  "| width | " + " | ".join(f"T={t:g}" for t in temps) + " | epochs |",
                  "|---:|" + "---:|" * len(temps) + "---:|"]
        for w in widths:
            cells, best = [], min((errors(models[grid[(w, t)]][0], y_val), t)
                                  for t in temps if (w, t) in grid)[1]
            for t in temps:
                if (w, t) not in grid:
                    cells.append("–")
                    continue
                val, test, _ = models[grid[(w, t)]]
                cell = f"{errors(test, y_test)} ({errors(val, y_val)})"
                cells.append(f"**{cell}**" if t == best else cell)
            epochs = models[grid[(w, temps[0])]][2]["epoch"]
            lines.append(f"| {w} | " + " | ".join(cells) + f" | {epochs} |")
    teacher_history = models[teacher][2]["history"]
    histories = {"teacher": teacher_history}
    offsets = {}
    for name in ("student-hard", "student-distilled"):
        if name in models:
            histories[name] = models[name][2]["history"]
            if name != "student-hard":  # a distilled student needs its teacher first
                offsets[name] = sum(r["seconds"] for r in teacher_history)
    figure = Path(args.out).with_suffix(".png")
    figure.parent.mkdir(parents=True, exist_ok=True)
    figure.write_bytes(figures.errors_vs_time(histories, offsets))
    lines += ["", f"![test errors against CPU hours]({figure.name})", "",
              "Test errors per epoch against the CPU time spent so far (each model's own "
              "training and evaluation seconds, on one core each; a distilled student's line "
              "starts where its teacher's ends)."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
