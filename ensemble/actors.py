"""The Ray layer's edge: the core trainers made remote, and the checks Ray does not make.

Nothing here trains: `Trainer` and `Student` run unchanged inside the actors. Ray places them
(CPU and GPU shares from config), names them after their model, and restarts them after a crash;
a restarted actor resumes from the checkpoint the driver hands it (`Trainer.run_epoch`).
"""
from __future__ import annotations

import ray

from ensemble.config import ResourcesConfig
from ensemble.distill import Student
from ensemble.errors import ConfigError
from ensemble.specialize import SpecialistTrainer, coordinate, evaluate_ensemble
from ensemble.train import Trainer

REMOTE = {"generalist": ray.remote(Trainer), "specialist": ray.remote(SpecialistTrainer),
          "student": ray.remote(Student)}
TASKS = {"coordinate": ray.remote(coordinate), "evaluate_ensemble": ray.remote(evaluate_ensemble)}


def start_actor(role: str, name: str, namespace: str, res: ResourcesConfig, *args):
    """Start the trainer of `role` as the named actor `name` with the resources `res` asks for."""
    return REMOTE[role].options(
        name=name, namespace=namespace, num_cpus=res.num_cpus, num_gpus=res.num_gpus,
        max_restarts=res.max_restarts, max_task_retries=res.max_task_retries,
    ).remote(*args)


def run_task(task: str, res: ResourcesConfig, *args):
    """Run the pure function `task` on the cluster with the resources of `res`; return its result."""
    return ray.get(TASKS[task].options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                       max_retries=res.max_task_retries).remote(*args))


def check_resources(requests: dict[str, ResourcesConfig]) -> None:
    """Refuse at once a request no live node can hold (Ray would wait for it forever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for name, res in requests.items():
        for key, amount in (("CPU", res.num_cpus), ("GPU", res.num_gpus)):
            if amount > 0 and not any(node.get(key, 0) >= amount for node in nodes):
                most = max((node.get(key, 0) for node in nodes), default=0)
                raise ConfigError(f"{name} asks for {amount:g} {key} but no node of this Ray "
                                  f"cluster has more than {most:g}; lower its resources.num_"
                                  f"{key.lower()}s or add a node that has them")
