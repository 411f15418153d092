"""What the Ray layer costs as the cluster grows, before anyone pays for GPUs.

    python benchmarks/scaling.py [--data-dir ../shared/data] [--out results/scaling.md]

For local clusters (`ray.cluster_utils.Cluster`) of 1, 2 and 4 simulated worker nodes sharing this
machine's cores (32 logical CPUs in all, so every actor below fits at once), with the paper's
2x1200 generalist on MNIST (10,000 training images, so that 32 actors fit in 24 GB):
- the Ray layer's overhead per model, in seconds: putting the data set into the object store
  (once per run), starting one model's actor until it is ready to train (worker process, torch,
  the data from the object store, the model), one round trip to the actor, and collecting one
  checkpoint from it;
- the time to place N = 1, 2, 4, 8, 16, 32 specialist actors (`ensemble.actors.start_actor`, as
  the pipeline does) until all are ready to train.
The nodes share 2 cores, so these are upper bounds for real nodes, which start in parallel.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from ensemble.actors import start_actor
from ensemble.config import DataConfig, ModelConfig, ResourcesConfig, SpecialistsConfig, TrainConfig
from ensemble.data import load_splits
from ensemble.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(hidden=(1200, 1200))
CPUS = 32
COUNTS = (1, 2, 4, 8, 16, 32)
TRAIN_SIZE = 10_000


def ready(actors) -> None:
    ray.get([a.__ray_ready__.remote() for a in actors])


def measure(nodes: int, splits, generalist: bytes, temp: str) -> dict:
    os.environ["RAY_TMPDIR"] = temp  # every node's files, and Ray's address file, go there
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(nodes):
        cluster.add_node(num_cpus=CPUS // nodes)
    ray.init(address=cluster.address, logging_level="ERROR")
    res = ResourcesConfig(num_cpus=1)
    out = {"nodes": nodes}
    try:
        t = time.perf_counter()
        data = ray.put(splits)
        out["put_s"] = time.perf_counter() - t

        t = time.perf_counter()
        actor = start_actor("generalist", "g", "bench", res, "g", MODEL, TrainConfig(), data, 0)
        ready([actor])
        out["start_s"] = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(20):
            ray.get(actor.__ray_call__.remote(lambda self: None))
        out["call_ms"] = (time.perf_counter() - t) / 20 * 1000
        t = time.perf_counter()
        blob = ray.get(actor.checkpoint.remote())
        out["collect_s"] = time.perf_counter() - t
        out["checkpoint_mb"] = len(blob) / 2**20
        ray.kill(actor)

        spec = SpecialistsConfig(k=2)
        gen_ref = ray.put(generalist)
        for n in COUNTS:
            t = time.perf_counter()
            actors = [start_actor("specialist", f"s{n}-{i}", "bench", res, f"s{n}-{i}", [0, 1],
                                  gen_ref, spec, data, i) for i in range(n)]
            ready(actors)
            out[f"place_{n}"] = time.perf_counter() - t
            for a in actors:
                ray.kill(a)
            time.sleep(2)  # let the killed workers exit before the next count
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "results" / "scaling.md"))
    parser.add_argument("--nodes", default="1,2,4")
    args = parser.parse_args()
    # 10,000 training images: 32 actors with the full 50,000 as float tensors would not fit in
    # this machine's 24 GB
    splits = load_splits(DataConfig(name="mnist", download=False, train_size=TRAIN_SIZE),
                         args.data_dir)
    generalist = Trainer("g", MODEL, TrainConfig(), splits, 0).checkpoint()
    rows = []
    started = time.time()
    for nodes in map(int, args.nodes.split(",")):
        temp = tempfile.mkdtemp(prefix="rs")
        try:
            rows.append(measure(nodes, splits, generalist, temp))
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = [
        "# Scaling: the Ray layer's cost per model and per actor placed",
        "",
        f"`python benchmarks/scaling.py` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores shared by every simulated node, MNIST "
        f"({len(splits.train_y):,} training images, {splits.train_x.nbytes / 2**20:.0f} MB as "
        f"uint8), 2x1200 generalist, git commit {commit}, {time.time() - started:.0f} s in all.",
        "",
        "Per model (seconds unless marked):",
        "",
        "| worker nodes | put data | start actor | round trip (ms) | collect checkpoint "
        "| checkpoint (MB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['nodes']} | {r['put_s']:.2f} | {r['start_s']:.2f} | "
                     f"{r['call_ms']:.1f} | {r['collect_s']:.2f} | {r['checkpoint_mb']:.1f} |")
    lines += ["", "Seconds until N specialist actors are ready to train:", "",
              "| worker nodes | " + " | ".join(f"N={n}" for n in COUNTS) + " |",
              "|---:|" + "---:|" * len(COUNTS)]
    for r in rows:
        lines.append(f"| {r['nodes']} | " + " | ".join(f"{r[f'place_{n}']:.1f}" for n in COUNTS)
                     + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
