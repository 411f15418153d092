"""Speed and accuracy of the batched eq. 5 combination (specialists/combine.py) on this CPU.

    python benchmarks/combine.py [--inputs 20000] [--out results/combine.md]

For 10 and 100 classes with 2-20 overlapping specialists on random probabilities (top-1
activation, as in the paper): test inputs per second of `combine` in float32 with its default
tolerance and step limit (target >= 50,000/s at 10 classes), and the mean gap of its objective
to the optimum, found by the same fixed point run to 1e-13 in float64 (target <= 1e-4 nats).
The last lines are `name: value`, one figure each.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from specialists.combine import active_specialists, combine, objective, spread

ROOT = Path(__file__).resolve().parents[1]


def dirichlet(shape, g, concentration=0.3):
    x = torch._standard_gamma(torch.full(shape, concentration), generator=g)
    return x / x.sum(-1, keepdim=True)


def problem(inputs: int, classes: int, specialists: int, seed: int = 0):
    """Random generalist and specialist outputs; each specialist covers a random subset of
    2..classes/2 classes, so subsets overlap."""
    g = torch.Generator().manual_seed(seed)
    members = []
    for _ in range(specialists):
        size = int(torch.randint(2, max(3, classes // 2 + 1), (1,), generator=g))
        members.append(torch.randperm(classes, generator=g)[:size].sort().values)
    pg = dirichlet((inputs, classes), g)
    probs = [dirichlet((inputs, len(m) + 1), g) for m in members]
    P, d, S = spread(probs, members, classes)
    return pg, P, d, S, active_specialists(pg, S, top_n=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=20_000, help="test inputs per problem")
    parser.add_argument("--exact", type=int, default=500, help="inputs solved exactly for the gap")
    parser.add_argument("--out", default=str(ROOT / "results" / "combine.md"))
    args = parser.parse_args()
    lines, figures = [], {}

    def say(text):
        print(text, flush=True)
        lines.append(text)

    say(f"# eq. 5 combination, {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {args.inputs:,} inputs per problem, float32")
    say("| classes | specialists | mean active | inputs/s | steps cap | mean gap (nats) |")
    say("|---:|---:|---:|---:|---:|---:|")
    for classes in (10, 100):
        for m in (2, 5, 10, 20):
            pg, P, d, S, active = problem(args.inputs, classes, m, seed=classes + m)
            combine(pg[:100], P[:100], d[:100], S, active[:100])  # warm-up
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                q = combine(pg, P, d, S, active)
                best = min(best, time.perf_counter() - start)
            rate = args.inputs / best
            k = args.exact
            exact = combine(pg[:k].double(), P[:k].double(), d[:k].double(), S, active[:k],
                            tol=1e-13, max_steps=100_000)
            args64 = (pg[:k].double(), P[:k].double(), d[:k].double(), S, active[:k])
            gap = (objective(q[:k].double(), *args64) - objective(exact, *args64)).mean().item()
            say(f"| {classes} | {m} | {active.float().sum(1).mean():.2f} | {rate:,.0f} | 500 | "
                f"{gap:.2e} |")
            figures[f"combine_inputs_per_s_c{classes}_m{m}"] = rate
            figures[f"combine_gap_nats_c{classes}_m{m}"] = gap
    figures["combine_min_inputs_per_s_c10"] = min(v for n, v in figures.items()
                                                  if n.startswith("combine_inputs_per_s_c10_"))
    figures["combine_max_gap_nats"] = max(v for n, v in figures.items() if "gap" in n)
    for name, value in figures.items():
        say(f"{name}: {value:.3g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
