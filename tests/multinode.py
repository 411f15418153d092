"""Scenarios on a local multi-node Ray cluster (`ray.cluster_utils.Cluster`), each run as
`python -m tests.multinode SCENARIO CONFIG DATA RUN` in a process of its own (the test session's
Ray cannot share the interpreter); prints one JSON line for the test to check."""
import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ensemble.cli import main


def start_run(cluster, config, data, run):
    """`ensemble run` against `cluster` in a thread; returns (thread, list for its exit code)."""
    result = []
    argv = ["run", str(config), "--data-dir", str(data), "--run-dir", str(run),
            "--address", cluster.address]
    thread = threading.Thread(target=lambda: result.append(main(argv)))
    thread.start()
    return thread, result


def node_of(actor, restarted: bool = False) -> str:
    """The node `actor` runs on; with `restarted`, that of its restarted instance (the old one
    may answer for a moment after its node was killed). Asked again while it is unreachable."""
    def where(self):
        context = ray.get_runtime_context()
        return context.get_node_id(), context.was_current_actor_reconstructed

    for _ in range(120):
        try:
            node, again = ray.get(actor.__ray_call__.remote(where), timeout=120)
            if again or not restarted:
                return node
        except ray.exceptions.ActorUnavailableError:
            pass
        time.sleep(1)
    raise TimeoutError("the actor was not restarted")


def node_removal(config, data, run) -> dict:
    """Two 2-CPU workers under a head that runs nothing; once specialist-0 has checkpointed an
    epoch, the node it trains on is killed (its processes SIGKILLed)."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address)
    thread, result = start_run(cluster, config, data, run)
    first = run / "checkpoints" / "specialist-0" / "epoch-0001.safetensors"
    deadline = time.time() + 240
    while not first.exists():
        if not thread.is_alive() or time.time() > deadline:
            return {"error": "specialist-0 never checkpointed", "exit": result}
        time.sleep(0.02)
    actor = ray.get_actor("specialist-0", namespace=f"ensemble-{run.name}")
    before = node_of(actor)
    cluster.remove_node(next(n for n in workers if n.node_id == before), allow_graceful=False)
    after = node_of(actor, restarted=True)
    thread.join(timeout=300)
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    ray.shutdown()
    cluster.shutdown()
    return {"exit": result, "removed": before, "after": after, "alive": alive}


def working_directory() -> str:
    return os.getcwd()


def placement(config, data, run) -> dict:
    """A head that runs nothing, a worker with one (fake) GPU and a CPU-only worker, each started
    in a working directory of its own (RUN/../node-gpu, node-cpu); torch sees no GPU, so the
    models train on CPU wherever Ray puts them."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {}
    for kind, gpus in (("gpu", 1), ("cpu", 0)):
        workdir = run.parent / f"node-{kind}"
        workdir.mkdir()
        here = os.getcwd()
        os.chdir(workdir)  # the node's raylet, and the workers it starts, begin there
        try:
            nodes[kind] = cluster.add_node(num_cpus=4, num_gpus=gpus)
        finally:
            os.chdir(here)
    ray.init(address=cluster.address)
    cwd = {kind: ray.get(ray.remote(working_directory).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote())
        for kind, node in nodes.items()}
    thread, result = start_run(cluster, config, data, run)
    thread.join(timeout=500)
    ray.shutdown()
    cluster.shutdown()
    return {"exit": result, "gpu_node": nodes["gpu"].node_id, "cpu_node": nodes["cpu"].node_id,
            "cwd": cwd}


FAKE_CUDA = """# Ray's workers believe two GPUs exist (tests/multinode.py, scenario fake_gpus)
import sys

if sys.argv and sys.argv[0].endswith("default_worker.py"):
    import torch

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 2
"""


def believes_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def fake_gpus(config, data, run) -> dict:
    """One node declared with two GPUs, whose Ray workers believe CUDA exists (a sitecustomize on
    their path patches torch.cuda.is_available and device_count); `ensemble run` reaches it as a
    cluster (--address), as a user's driver would. There is no GPU: a model put on one fails."""
    site = run.parent / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_CUDA)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site),
                                                             os.environ.get("PYTHONPATH")]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    result = main(["run", str(config), "--data-dir", str(data), "--run-dir", str(run),
                   "--address", cluster.address])
    ray.init(address=cluster.address)  # what a worker there believes, asked afterwards
    believes = ray.get(ray.remote(believes_cuda).remote())
    ray.shutdown()
    cluster.shutdown()
    return {"exit": [result], "believes_cuda": believes}


SCENARIOS = {"node_removal": node_removal, "placement": placement, "fake_gpus": fake_gpus}

if __name__ == "__main__":
    scenario, *paths = sys.argv[1:]
    print(json.dumps(SCENARIOS[scenario](*map(Path, paths))), flush=True)
