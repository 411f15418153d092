"""The Ray layer's edge: the core trainers made remote, and the checks Ray does not make.

Nothing here trains: `Trainer` and `Student` run unchanged inside the actors. Ray places them
(CPU and GPU shares from config), names them after their model, and restarts them after a crash;
a restarted actor resumes from the checkpoint the driver hands it (`Trainer.run_epoch`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import tempfile
import threading

import ray

from ensemble.config import NodeType, ResourcesConfig
from ensemble.distill import Student
from ensemble.errors import ConfigError, terminate_as_interrupt
from ensemble.stacked import StackedStudents
from ensemble.streaming import StreamStudent, StreamTrainer
from ensemble.teacher import evaluate_ensemble, teacher_outputs
from ensemble.train import Trainer, pick_device
from ensemble.workers import Group
from specialists.coordinator import coordinate
from specialists.trainer import SpecialistTrainer

# What every worker of a run gets in its environment (ray_session): Ray 2.58 narrows
# CUDA_VISIBLE_DEVICES to a worker's GPUs only when it was assigned some; with this it is set to ""
# for a worker assigned none, so torch there sees no GPU either (ray/_private/utils.py,
# set_visible_accelerator_ids).
WORKER_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}

METRICS = {  # Ray metric (Prometheus: ray_<name>) -> key of an epoch record
    "ensemble_epoch": ("epoch", "epochs trained so far"),
    "ensemble_loss": ("loss", "mean training loss of the last epoch"),
    "ensemble_samples_per_s": ("samples_per_s", "training examples per second, last epoch"),
    "ensemble_val_errors": ("val_errors", "validation errors after the last epoch"),
    "ensemble_test_errors": ("test_errors", "test errors after the last epoch"),
}


def assigned_device(device: str):
    """The device of `device` (auto, cpu, cuda) for this actor or task: what Ray assigned it."""
    return pick_device(device, [str(g) for g in ray.get_gpu_ids()])


class Gauged:
    """A model's actor whose epochs are also Ray metrics tagged with the model and its role, for
    the Ray dashboard's metrics view (through Prometheus and Grafana) and any Prometheus
    scraper."""
    role = ""

    def run_epoch(self, epoch: int, last: bytes | None = None, keep: bool = True):
        record, blob = super().run_epoch(epoch, last, keep)
        if record is None:  # it needs its checkpoint first
            return record, blob
        if not hasattr(self, "_gauges"):
            from ray.util.metrics import Gauge

            self._gauges = {key: Gauge(name, description=about, tag_keys=("model", "role"))
                            for name, (key, about) in METRICS.items()}
        stack = getattr(self, "members", None)  # a stack reports each member
        for name, one in zip([m.name for m in stack] if stack else [self.name],
                             record if stack else [record]):
            for key, gauge in self._gauges.items():
                gauge.set(float(one[key]), tags={"model": name, "role": self.role})
        return record, blob


class Metered(Gauged):
    """A trainer on the device Ray assigned it, its epochs published as metrics."""

    def __init__(self, *args, device: str = "auto", **kwargs):
        super().__init__(*args, device=assigned_device(device), **kwargs)


def _remote(cls, role: str):
    """`cls` as a Ray actor class that also publishes its epochs as metrics (a Group: its
    workers' epochs)."""
    return ray.remote(type(cls.__name__, (Gauged if cls is Group else Metered, cls),
                           {"role": "student" if role == "stack" else role.split()[-1]}))


REMOTE = {role: _remote(cls, role) for role, cls in (
    ("generalist", Trainer), ("specialist", SpecialistTrainer), ("student", Student),
    ("streamed generalist", StreamTrainer), ("streamed student", StreamStudent),
    ("stack", StackedStudents), ("parallel generalist", Group), ("parallel student", Group))}
GROUP_CALLS = 8  # a Group answers epoch calls while its workers report (a threaded actor)


def _on_assigned_device(task):
    """`task` as a Ray task that computes on the device Ray assigned it."""
    @functools.wraps(task)
    def run(*args, device: str = "auto"):
        return task(*args, device=assigned_device(device))
    return ray.remote(run)


TASKS = {"coordinate": _on_assigned_device(coordinate),
         "evaluate_ensemble": _on_assigned_device(evaluate_ensemble),
         "teacher_outputs": _on_assigned_device(teacher_outputs)}


def start_actor(role: str, name: str, namespace: str, res: ResourcesConfig, *args, **kwargs):
    """Start the trainer of `role` as the named actor `name` with the resources `res` asks for,
    spread over the nodes (Ray's default would fill one node first); its `device` (a keyword:
    auto, cpu or cuda) becomes the one Ray assigned it. A model over several workers starts as
    its Group (ensemble.workers), which holds no resources: its workers hold them."""
    if res.workers > 1:
        device = kwargs.pop("device", "auto")
        return REMOTE[role].options(
            name=name, namespace=namespace, num_cpus=0, max_concurrency=GROUP_CALLS,
            max_restarts=res.max_restarts, max_task_retries=res.max_task_retries,
        ).remote(role, name, namespace, res, args, kwargs, device=device)
    return REMOTE[role].options(
        name=name, namespace=namespace, num_cpus=res.num_cpus, num_gpus=res.num_gpus,
        max_restarts=res.max_restarts, max_task_retries=res.max_task_retries,
        scheduling_strategy="SPREAD",
    ).remote(*args, **kwargs)


def placement(actor):
    """A ref to where `actor` runs: its node, the GPU ids Ray gave it, the device it trains on
    and the GPUs its process can see (answered in turn with its epochs, so after a restart it
    names the new place)."""
    def where(self):
        context = ray.get_runtime_context()
        return {"node": context.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "device": str(self.device),
                "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    return actor.__ray_call__.remote(where)


def submit_task(task: str, res: ResourcesConfig, *args, device: str = "auto"):
    """Start the pure function `task` on the cluster with the resources of `res`, on the device
    Ray assigns it; return the ref of its result."""
    return TASKS[task].options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                               max_retries=res.max_task_retries).remote(*args, device=device)


def live_nodes() -> list[dict]:
    """The resources of each live node of the cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def fits_a_live_node(res: ResourcesConfig, nodes: list[dict] | None = None) -> bool:
    """Whether some live node (of `nodes`, or asked now) holds `res`; else only a new node
    would."""
    return _holds(live_nodes() if nodes is None else nodes,
                  {"CPU": res.num_cpus, "GPU": res.num_gpus})


def local_node() -> dict | None:
    """What a local Ray started on this machine would offer: the CPUs and GPUs it detects
    (asked of Ray's own detection, before starting it); None if that cannot be asked."""
    try:
        return _detected()
    except Exception:  # Ray's private detection moved or failed: Ray itself will say
        return None


def _detected() -> dict:
    from ray._private import accelerators
    from ray._private.utils import get_num_cpus

    gpus = 0
    for manager in accelerators.get_all_accelerator_managers():
        if manager.get_resource_name() != "GPU":
            continue
        visible = manager.get_current_process_visible_accelerator_ids()
        gpus += len(visible) if visible is not None else \
            manager.get_current_node_num_accelerators()
    return {"CPU": get_num_cpus(), "GPU": gpus}


def check_resources(requests: dict[str, ResourcesConfig],
                    node_types: tuple[NodeType, ...] = (),
                    live: list[dict] | None = None) -> set[str]:
    """Refuse at once a request that no live node (`live`, else the cluster's now), nor any node
    the autoscaler may add, can hold (Ray would wait for it forever); return the names of those
    that must wait for a new node."""
    live = live_nodes() if live is None else live
    future = [{"CPU": t.num_cpus, "GPU": t.num_gpus} for t in node_types]
    waiting = set()
    for name, res in requests.items():
        want = {"CPU": res.num_cpus, "GPU": res.num_gpus}
        _check_group(name, res, live, future)
        if _holds(live, want):
            continue
        if _holds(future, want):
            waiting.add(name)
            continue
        short = [k for k, v in want.items() if v > _most(live + future, k)]
        if not short:
            raise ConfigError(f"{name} asks for {res.num_cpus:g} CPU and {res.num_gpus:g} GPU "
                              f"but no single node holds both; lower its resources")
        key = short[0]
        added = (f", nor has any node type in autoscaler.node_types (at most "
                 f"{_most(future, key):g})") if future else ""
        raise ConfigError(f"{name} asks for {want[key]:g} {key} but no live node of this Ray "
                          f"cluster has more than {_most(live, key):g}{added}; lower its "
                          f"resources.num_{key.lower()}s or add a node that has them")
    return waiting


def _check_group(name: str, res: ResourcesConfig, live: list[dict], future: list[dict]) -> None:
    """Refuse workers (resources.workers) that the live cluster could never hold all at once,
    when no autoscaler may add nodes (Ray Train would wait for them forever)."""
    for key, need in (("CPU", res.cpus), ("GPU", res.gpus)):
        have = sum(node.get(key, 0) for node in live)
        if res.workers > 1 and not future and need > have + 1e-9:
            raise ConfigError(f"{name} asks for {res.workers} workers with {need:g} {key} in "
                              f"all, but this Ray cluster has {have:g}; lower "
                              f"resources.workers or resources.num_{key.lower()}s")


def _holds(nodes: list[dict], want: dict[str, float]) -> bool:
    return any(all(node.get(k, 0) >= v for k, v in want.items() if v > 0) for node in nodes)


def _most(nodes: list[dict], key: str) -> float:
    return max((node.get(key, 0) for node in nodes), default=0)


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """`env` added to this process's environment for the duration (processes started then
    inherit it)."""
    os.environ.update(env)
    try:
        yield
    finally:
        for key in env:
            os.environ.pop(key, None)


@contextlib.contextmanager
def ray_session(address: str | None, namespace: str):
    """Connect to `address`, or start a local Ray with a temporary directory of its own; reuse a
    Ray this process already started (tests; its own runtime_env then stands). Everything
    started here is stopped on exit.
    Yields the dashboard's address, if the Ray has one."""
    if ray.is_initialized():
        yield None
        return
    temp = None if address else tempfile.mkdtemp(prefix="ray-")  # short: socket paths are limited
    original = signal.getsignal(signal.SIGTERM)  # ray.init replaces it (sys.exit) at its start
    try:
        # a local Ray on loopback (Ray swaps 127.0.0.1 for the routable address unless
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set before it was imported; the CLI does it),
        # whose workers import the trainers (torch) as they start, before any actor asks for
        # one: Ray starts a worker per CPU with the driver, so the first actors find one ready
        local = {} if address else {"_node_ip_address": "127.0.0.1", "_system_config": {
            "preload_python_modules": ["ensemble.actors"]}}
        # every worker of the run sees only the GPUs Ray assigned it (none: CUDA_VISIBLE_DEVICES
        # is empty). A local Ray's processes inherit this process's environment, so the variable
        # is set while they start: a runtime_env would keep the workers Ray starts with it from
        # the actors (about 2 s more per actor here). A cluster's workers get it through the
        # job's runtime_env; Ray merges it into a submitted job's own, which must not name it
        # again (the driver has that job's env_vars)
        env = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
        with _environment(env if not address else {}):
            context = ray.init(address=address, namespace=namespace, _temp_dir=temp,
                               logging_level=logging.WARNING,
                               runtime_env={"env_vars": env} if env and address else None,
                               **local)
        terminate_as_interrupt()
    except (ConnectionError, RuntimeError, ValueError) as err:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ConfigError(f"cannot start or reach {where}: {str(err).splitlines()[0]}") from None
    except BaseException:  # SIGTERM or Ctrl-C while Ray starts
        ray.shutdown()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    try:
        yield getattr(context, "dashboard_url", None)
    finally:
        ray.shutdown()
        if original is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, original)
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
