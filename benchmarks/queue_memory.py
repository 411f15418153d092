"""The driver's memory with a long queue: `ensemble run` of 2 generalists against one of
100,000 (a typo a user makes once) on a local Ray of this machine's CPUs, the driver's RSS
sampled every 3 s for --seconds, then Ctrl-C; how long the driver took to stop.

    python benchmarks/queue_memory.py [--counts 2 100000] [--seconds 24]
                                      [--out results/queue_memory.md]

The models are small MLPs on synthetic digits, long enough (100,000 epochs) that none ends
while it is sampled: what differs between the runs is only how many models wait.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import write_mnist_like  # noqa: E402

CONFIG = """name: queue
data: {val_size: 100, download: false}
generalists: {count: COUNT, model: {hidden: [16]}, train: {epochs: 100000, batch_size: 50}}
"""


def sample(count: int, seconds: float, work: Path) -> tuple[list[int], float, int]:
    """(driver RSS in MiB every 3 s, seconds from Ctrl-C to the driver's exit, exit code)."""
    config = work / f"queue{count}.yaml"
    config.write_text(CONFIG.replace("COUNT", str(count)))
    driver = subprocess.Popen(
        [sys.executable, "-m", "ensemble.cli", "run", str(config), "--data-dir",
         str(work / "data"), "--run-dir", str(work / f"run{count}")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc, rss, start = psutil.Process(driver.pid), [], time.time()
    while time.time() - start < seconds:
        time.sleep(3)
        rss.append(proc.memory_info().rss >> 20)
    os.killpg(driver.pid, signal.SIGINT)
    sent = time.time()
    try:
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    return rss, time.time() - sent, driver.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 100_000])
    parser.add_argument("--seconds", type=float, default=24.0)
    parser.add_argument("--out", default=str(ROOT / "results" / "queue_memory.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="queue-"))
    write_mnist_like(work / "data", n_train=600, n_test=100)
    rows, peaks = [], {}
    try:
        for count in args.counts:
            rss, stop, code = sample(count, args.seconds, work)
            peaks[count] = max(rss)
            rows.append(f"| {count:,} | {' '.join(map(str, rss))} | {max(rss)} | {stop:.1f} s "
                        f"| {code} |")
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    low, high = min(args.counts), max(args.counts)
    lines = ["# The driver's memory with models queued", "",
             f"`python benchmarks/queue_memory.py --counts {' '.join(map(str, args.counts))} "
             f"--seconds {args.seconds:g}`; {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"git commit {commit}. The driver's RSS (MiB) every 3 s of each run, then Ctrl-C.",
             "", "| generalists | RSS every 3 s (MiB) | peak | Ctrl-C to exit | exit code |",
             "|---:|---|---:|---:|---:|", *rows, "",
             f"peak_mib_{low}: {peaks[low]}", f"peak_mib_{high}: {peaks[high]}",
             f"extra_kib_per_queued_model: "
             f"{(peaks[high] - peaks[low]) * 1024 / max(1, high - low):.2f}", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
