"""Scenarios on a local multi-node Ray cluster (`ray.cluster_utils.Cluster`), each run as
`python -m tests.multinode SCENARIO CONFIG DATA RUN` in a process of its own (the test session's
Ray cannot share the interpreter); prints one JSON line for the test to check."""
import contextlib
import json
import os
import queue
import sys
import threading
from pathlib import Path

import psutil
import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ensemble.cli import main


def start_run(cluster, config, data, run, on_exit=None):
    """`ensemble run` against `cluster` in a thread; returns (thread, list for its exit code).
    `on_exit`: called in the thread once the run has ended."""
    result = []
    argv = ["run", str(config), "--data-dir", str(data), "--run-dir", str(run),
            "--address", cluster.address]

    def target():
        try:
            result.append(main(argv))
        finally:
            if on_exit:
                on_exit()
    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def pause_after_first_epoch(model: str):
    """Make the run's driver, in this process, stop as soon as metrics.json records `model`'s
    first epoch, until the scenario lets it go on: `model`'s actor then has at most its second
    epoch in hand (the driver asks for one epoch at a time), whatever this host's speed. Returns
    (a queue that receives the epochs and placement recorded then, the event that lets it go on).
    """
    from ensemble.recorder import Recorder

    reached, go_on = queue.Queue(), threading.Event()
    write = Recorder.write  # called by the scheduler after every epoch; the file is written later

    def write_then_pause(self, scheduler):
        write(self, scheduler)
        if go_on.is_set() or not self.results(scheduler).get(model, {}).get("history"):
            return
        self.flush()  # metrics.json on disk, with that epoch in it
        recorded = json.loads((self.run.path / "metrics.json").read_text())["models"][model]
        reached.put((len(recorded["history"]), recorded["placement"]))
        go_on.wait(timeout=300)  # the scenario's end lets it go on in any case
    Recorder.write = write_then_pause
    return reached, go_on


def kill_node(cluster, node) -> list[int]:
    """Remove `node` as a machine that dies would go: its Ray daemons and every process they
    started (workers, actors) SIGKILLed. Cluster.remove_node kills the daemons only; a worker
    would then go on answering its callers until it notices, a second or so later, that its
    raylet is gone. Returns the pids of the processes killed besides the daemons."""
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    started = psutil.Process(raylet.pid).children(recursive=True)
    cluster.remove_node(node, allow_graceful=False)
    for proc in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, left = psutil.wait_procs(started, timeout=60)  # gone, or zombies: they run no more
    assert all(proc.status() == psutil.STATUS_ZOMBIE for proc in left), left
    return [proc.pid for proc in started]


def node_removal(config, data, run) -> dict:
    """Two 2-CPU workers under a head that runs nothing; once metrics.json records specialist-0's
    first epoch, the node that epoch ran on is killed with all its processes while the driver
    waits; then the run goes on. What happened next is read from the run's metrics.json."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address)
    reached, go_on = pause_after_first_epoch("specialist-0")
    thread, result = start_run(cluster, config, data, run,
                               on_exit=lambda: reached.put((None, None)))
    try:
        epochs, placed = reached.get(timeout=300)
        if placed is None:
            return {"error": "specialist-0 never recorded an epoch", "exit": result}
        # the driver waits, so the actor is there to ask (it answers once its epoch in hand is
        # done): the process to see among those killed
        actor = ray.get_actor("specialist-0", namespace=f"ensemble-{run.name}")
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        killed = kill_node(cluster, next(n for n in workers if n.node_id == placed["node"]))
    finally:
        go_on.set()
        thread.join(timeout=500)
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    ray.shutdown()
    cluster.shutdown()
    return {"exit": result, "removed": placed["node"], "removed_after_epoch": epochs,
            "actor_killed": pid in killed, "alive": alive}


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
