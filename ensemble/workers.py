"""One model over many workers (`resources.workers`): Ray Train runs its data-parallel ranks.

The scheduler sees one actor per model, as always: here a `Group`, owned by the driver, named
after the model and holding no CPU. Its first epoch call starts Ray Train's TorchTrainer (gloo on
CPU, NCCL on GPUs) in a thread; every worker builds the model's trainer (ensemble.parallel) on
the device Ray Train gave it and trains epoch after epoch, and after each one rank 0 hands the
epoch's record and checkpoint bytes to the Group, where the scheduler's epoch calls collect them.
Nothing is reported to Ray Train (its storage_path keeps its default and gets no checkpoint):
the driver alone writes the run directory, as for every model, so no shared disk is needed.

A worker that dies: FailureConfig(max_failures=resources.max_restarts) restarts the whole
group, whose ranks resume from the last checkpoint the Group holds (the epochs after it are
trained again; the scheduler sees each epoch once). Stopping the Group ends Ray Train's
controller and workers with it: they are its own. In the Ray dashboard the model's workers are
Ray Train's run named `<namespace>.<model>`, and `Group.where` lists each rank's process.
"""
from __future__ import annotations

import os
import threading

import ray

from ensemble.errors import TrainingError
from ensemble.parallel import ParallelStudent, ParallelTrainer
from ensemble.train import pick_device

PARALLEL = {"parallel generalist": ParallelTrainer, "parallel student": ParallelStudent}
TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # no spot-instance watcher to start
             "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # a dead worker is noticed at once
             "RAY_CHDIR_TO_TRIAL_DIR": "0"}  # workers stay where the job runs (imports of
#                                             a model's factory resolve as in any actor)


class Group:
    """The driver-side actor of a model trained by `res.workers` Ray Train workers: it starts
    them and holds what rank 0 reports (each epoch's record and checkpoint)."""

    def __init__(self, role: str, name: str, namespace: str, res, args: tuple, kwargs: dict,
                 device: str = "auto"):
        self.role, self.name, self.namespace, self.res = role, name, namespace, res
        self.args, self.kwargs, self.device_asked = args, kwargs, device
        self.device = f"{res.workers} workers on {'cuda' if res.num_gpus else 'cpu'}"
        self.ready = threading.Condition()
        self.records: dict[int, tuple[dict, bytes]] = {}  # epoch -> reported, not yet collected
        self.last: tuple[int, bytes | None] = (0, None)  # where a (re)started group begins
        self.ranks: dict[int, dict] = {}  # rank -> its process, as it registered
        self.error: str | None = None
        self.ended = False
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------ the scheduler's side -----------
    def run_epoch(self, epoch: int, last: bytes | None = None, keep: bool = True):
        """The record of `epoch` (and its checkpoint if `keep`) once rank 0 has reported it; the
        first call starts the workers, from `last` (the checkpoint of epoch - 1) if given. A
        group that lost its state (this actor restarted) answers (None, None) until sent one."""
        with self.ready:
            if self.thread is None:
                if epoch > 1 and last is None:
                    return None, None
                self.last = (epoch - 1, last)
                self.thread = threading.Thread(target=self._fit, name=f"fit {self.name}",
                                               daemon=True)
                self.thread.start()
            self.ready.wait_for(lambda: epoch in self.records or self.error or self.ended)
            if epoch not in self.records:
                raise TrainingError(self.error or f"{self.name}: its workers ended before "
                                    f"epoch {epoch}")
            record, blob = self.records.pop(epoch)
        return record, blob if keep or record["stopped"] else None

    def finish(self, timeout: float = 60.0) -> None:
        """Wait for Ray Train to end its run (after the last epoch), so that its workers and
        their reserved resources are released before this actor goes."""
        if self.thread is not None:
            self.thread.join(timeout)

    def where(self) -> dict:
        """Each rank's process: node, pid, the GPU ids Ray Train gave it."""
        return dict(self.ranks)

    # ------------------------------------------------------------ the workers' side --------------
    def resume_point(self) -> tuple[int, bytes | None]:
        return self.last

    def joined(self, rank: int, where: dict) -> None:
        self.ranks[rank] = where

    def report(self, record: dict, blob: bytes) -> None:
        with self.ready:
            self.records[record["epoch"]] = record, blob
            self.last = record["epoch"], blob
            self.ready.notify_all()

    def _fit(self) -> None:
        from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        os.environ.update(TRAIN_ENV)  # the controller and workers inherit them
        gpu = self.res.num_gpus > 0
        each = {"CPU": self.res.num_cpus, **({"GPU": self.res.num_gpus} if gpu else {})}
        trainer = TorchTrainer(
            rank_loop, torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            train_loop_config={"group": self.name, "namespace": self.namespace,
                               "role": self.role, "args": self.args, "kwargs": self.kwargs,
                               "device": self.device_asked},
            scaling_config=ScalingConfig(num_workers=self.res.workers, use_gpu=gpu,
                                         resources_per_worker=each),
            run_config=RunConfig(
                name=f"{self.namespace}.{self.name}",
                failure_config=FailureConfig(max_failures=self.res.max_restarts),
                logging_config=LoggingConfig(log_level="WARNING")))  # the terminal is the run's
        error = None
        try:
            trainer.fit()
        except Exception as err:  # Ray Train's errors wrap the workers' own
            error = f"{self.name}: its workers failed: {_last_line(err)}"
        with self.ready:
            self.error, self.ended = error, True
            self.ready.notify_all()


def rank_loop(cfg: dict) -> None:
    """One Ray Train worker: the model's trainer as this rank, from the group's resume point,
    every remaining epoch; rank 0 reports each to the group."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    group = ray.get_actor(cfg["group"], namespace=cfg["namespace"])
    args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in cfg["args"]]
    kwargs = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v
              for k, v in cfg["kwargs"].items()}
    device = pick_device(cfg["device"], [str(g) for g in ray.get_gpu_ids()])
    trainer = PARALLEL[cfg["role"]](*args, device=device, **kwargs)
    epoch, blob = ray.get(group.resume_point.remote())
    if blob is not None:
        trainer.ready_for(epoch + 1, blob)
    trainer.join(rank, world)
    group.joined.remote(rank, {"node": ray.get_runtime_context().get_node_id(),
                               "pid": os.getpid(), "device": str(trainer.device)})
    while trainer.epoch < trainer.cfg.epochs:
        record = trainer.train_epoch()
        if rank == 0:  # waits: the group holds at most the epochs not yet collected
            ray.get(group.report.remote(record, trainer.checkpoint()))
        if record["stopped"]:  # every rank decides alike: the same validation errors
            break


def _last_line(err: Exception) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__
