"""Typed jobs on Ray, started as soon as what they wait for exists.

A job is a `JobSpec` (its name, role, config key, seed, resources, epochs and the jobs it waits
for) and one of three kinds:
- a model trained epoch by epoch on an actor (generalist, specialist, student), or several
  students trained as one stacked model (a stack: one actor, a record and a checkpoint per
  member);
- a task: one Ray call whose result the recipe needs (the coordinator, eq. 5's evaluation);
- a step on the driver (putting finished checkpoints into the object store).
The scheduler owns `ray.wait`, the epoch calls, retries of unreachable actors, the watchdog and
the checkpoints coming back; what happens to them (files, TensorBoard, the terminal) is the
`Recorder`'s, and what runs when is the recipe's (ensemble.pipeline). Jobs on the critical path
(`critical`: generalists -> coordinator -> specialists) take free resources first; the others
fill what is left; a job that fits no live node is started at once, so the autoscaler sees it.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorUnavailableError, RayError

from ensemble.actors import fits_a_live_node, live_nodes, placement, start_actor
from ensemble.config import ResourcesConfig
from ensemble.errors import TrainingError

UNAVAILABLE_RETRIES = 60  # an unreachable actor's epoch is asked again this often, ...
UNAVAILABLE_PAUSE_S = 1.0  # ... this far apart (a dead node is noticed within seconds)
GROUP_FINISH_S = 60.0  # a finished data-parallel model's Ray Train run is given this to end


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a job is and what it needs, by name: never a tuple read back by position."""
    name: str  # its actor's name and its checkpoints' folder
    role: str  # generalist, specialist, student or stack; task or step for the rest
    key: str = ""  # its section of the config: generalists, specialists, students.<name>
    seed: int = 0
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    epochs: int = 0
    waits_for: tuple[str, ...] = ()  # jobs that must have finished before this one starts
    critical: bool = False  # on the critical path: started before the others
    trainer: str = ""  # which remote trainer (ensemble.actors.REMOTE), if not its role's
    members: tuple[JobSpec, ...] = ()  # a stack: the students it trains as one model


@dataclass(slots=True)
class Job:
    """A job and where it stands."""
    spec: JobSpec
    make: Callable[[], tuple[tuple, dict]] | None = None  # its trainer's arguments, at start
    call: Callable[[], object] | None = None  # a task: starts its one call, returns the ref
    then: Callable[[Job], None] | None = None  # run once it has finished
    epoch: int = 0
    blob: object = None  # latest checkpoint: bytes, or the ObjectRef an epoch returned
    saved_epoch: int = 0  # the epoch that checkpoint is of
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    result: object = None  # a task's result
    error: str | None = None
    done: bool = False
    actor: object = None
    placement: dict | None = None  # node, GPU ids and device of its actor, as last reported
    placement_ref: object = None
    unavailable: int = 0  # epoch calls in a row that found the actor unreachable
    new_node: bool = False  # fits no live node: waits for the autoscaler (scale_up_s)
    placed: bool = False  # finished an epoch in this session
    started_at: float | None = None  # when its actor or call was started (time.time())
    members: list[Job] = field(default_factory=list)  # a stack's students

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def finished(self) -> bool:
        if self.spec.role in ("task", "step"):
            return self.done
        return self.epoch >= self.spec.epochs or bool(self.history and  # or stopped early
                                                      self.history[-1].get("stopped"))

    def status(self) -> str:
        return "failed" if self.error else "finished" if self.finished else "training"


@dataclass(slots=True)
class Series:
    """`count` models alike but for their index, added one at a time (`add(i)` adds the i-th)
    as the queue reaches them: however many wait, the driver holds one waiting job of them."""
    count: int
    add: Callable[[int], Job]
    after: int  # jobs added before the series: its models' place among them in results
    jobs: list[Job] = field(default_factory=list)  # those added so far

    def next_due(self) -> bool:
        """Whether the next one is to be added: none of those added waits unstarted."""
        last = self.jobs[-1] if self.jobs else None
        return len(self.jobs) < self.count and (
            last is None or bool(last.error) or last.finished or last.actor is not None)


class Scheduler:
    """Runs jobs on the Ray this process is connected to; `recorder` keeps what they produce."""

    def __init__(self, recorder, namespace: str, device: str, watchdog_s: float,
                 scale_up_s: float, checkpoint_every: int = 1):
        self.recorder, self.namespace, self.device = recorder, namespace, device
        self.watchdog_s, self.scale_up_s = watchdog_s, scale_up_s
        self.checkpoint_every = checkpoint_every
        self.jobs: dict[str, Job] = {}  # every job, in the order it was added
        self.active: dict[object, tuple[Job, object]] = {}  # ref -> (job, its checkpoint's ref)
        self.in_stacks: set[str] = set()  # models trained as members of a stack
        self.series: dict[str, Series] = {}  # name -> models added as the queue reaches them

    # ------------------------------------------------------------ adding jobs --------------------
    def train(self, spec: JobSpec, make: Callable[[], tuple[tuple, dict]],
              then: Callable[[Job], None] | None = None) -> Job:
        """A model (or a stack) trained epoch by epoch; `make()` gives its trainer's positional
        and keyword arguments (device aside) when it starts. A model with saved epochs goes on
        from the last one."""
        job = self._add(Job(spec, make=make, then=then))
        for one in [job] + [self._add(Job(m)) for m in spec.members]:
            saved = self.recorder.saved(one.name)
            if saved is not None:
                one.blob, meta = saved
                one.epoch, one.history, one.summary = meta["epoch"], meta["history"], \
                    meta["summary"]
                one.saved_epoch = one.epoch
        if spec.members:
            self.in_stacks.update(m.name for m in spec.members)
            job.members = [self.jobs[m.name] for m in spec.members]
            job.epoch = job.saved_epoch = job.members[0].epoch
            job.blob = [m.blob for m in job.members]
        if job.finished:  # in an earlier session
            for one in job.members or [job]:
                self.recorder.line(f"{one.name:<16} finished earlier ({one.epoch} epochs)")
        return job

    def train_series(self, name: str, count: int, add: Callable[[int], Job]) -> None:
        """`count` models alike but for their index; `add(i)` adds the i-th (with `train`) once
        the queue reaches it, so a typo such as 100,000 generalists costs the driver nothing per
        model waiting. Other jobs wait for all of them by `name`."""
        self.series[name] = Series(count, add, len(self.jobs))
        self._extend()

    def members(self, name: str) -> list[Job]:
        """The jobs `name` stands for: a series' models added so far, else the one job."""
        return self.series[name].jobs if name in self.series else [self.jobs[name]]

    def task(self, spec: JobSpec, call: Callable[[], object],
             then: Callable[[Job], None] | None = None) -> Job:
        """One Ray call (`call()` starts it and returns its ref); `then(job)` sees job.result."""
        return self._add(Job(spec, call=call, then=then))

    def step(self, spec: JobSpec, then: Callable[[Job], None]) -> Job:
        """Work on the driver, done once what it waits for has finished."""
        return self._add(Job(spec, then=then))

    def _add(self, job: Job) -> Job:
        if job.name in self.jobs:
            raise ValueError(f"two jobs are named {job.name}")
        self.jobs[job.name] = job
        return job

    # ------------------------------------------------------------ running ------------------------
    def run(self) -> None:
        """Start what can start, wait for the next result, repeat until nothing is left; a job
        whose inputs never came is failed with the reason. Every actor is stopped on the way out."""
        try:
            while True:
                self._start_ready()
                if not self.active:
                    break
                self._next()
        finally:
            for job in self.jobs.values():
                self._stop(job)
        for job in self._pending():
            missing = [n for n in job.spec.waits_for if not self._ok(n)]
            self._fail(job, f"not trained: {', '.join(missing)} did not finish")

    def _pending(self) -> list[Job]:
        """Jobs not started, not finished and not failed: critical ones first, then by age."""
        running = {id(job) for job, _ in self.active.values()}
        waiting = [j for j in self.jobs.values() if not j.error and not j.finished
                   and id(j) not in running and j.name not in self.in_stacks]
        return sorted(waiting, key=lambda j: not j.spec.critical)

    def _ok(self, name: str) -> bool:
        series = self.series.get(name)
        if series is not None:
            return len(series.jobs) == series.count and all(self._ok(j.name) for j in series.jobs)
        job = self.jobs.get(name)
        return job is not None and job.finished and not job.error

    def _failed(self, names: tuple[str, ...]) -> list[str]:
        """Those of the jobs `names` stand for (a series: its models) that failed."""
        return [j.name for n in names if n in self.jobs or n in self.series
                for j in self.members(n) if j.error]

    def _extend(self) -> None:
        """Each series' next model added once none of it waits unstarted."""
        for series in self.series.values():
            while series.next_due():
                series.jobs.append(series.add(len(series.jobs)))

    def _start_ready(self) -> None:
        total: dict | None = None  # the cluster's resources, asked once per round
        changed = True
        while changed:  # a step that finishes, or a job that fails, may free others
            changed = False
            self._extend()
            for job in self._pending():
                failed = self._failed(job.spec.waits_for)
                if failed:
                    self._fail(job, f"not trained: {', '.join(failed)} did not finish")
                    changed = True
                    continue
                if not all(self._ok(n) for n in job.spec.waits_for):
                    continue
                if total is None and job.spec.role != "step":
                    total = {"resources": ray.cluster_resources(), "nodes": live_nodes()}
                if self._room_for(job, total):
                    self._start(job, total)
                    changed = True
                    if job.spec.critical:  # a series' next model may now join the queue ahead
                        break              # of the others: extend it and look again

    def _room_for(self, job: Job, cluster: dict | None) -> bool:
        """Whether `job` may start now: it fits what the cluster's resources have left after
        this run's running jobs, or nothing of this run runs, or no live node can ever hold it
        (`cluster`: its resources and live nodes, asked once per round)."""
        if job.spec.role == "step" or not self.active:
            return True
        res, total = job.spec.resources, cluster["resources"]
        held_cpu = sum(j.spec.resources.cpus for j, _ in self.active.values())
        held_gpu = sum(j.spec.resources.gpus for j, _ in self.active.values())
        return (held_cpu + res.cpus <= total.get("CPU", 0) + 1e-9
                and held_gpu + res.gpus <= total.get("GPU", 0) + 1e-9) \
            or not fits_a_live_node(res, cluster["nodes"])

    def _start(self, job: Job, cluster: dict | None) -> None:
        spec = job.spec
        if spec.role == "step":
            job.done = True
            self._finish(job)
            return
        job.new_node = not fits_a_live_node(spec.resources, cluster["nodes"])
        job.started_at = time.time()
        for member in job.members:
            member.started_at = job.started_at
        if spec.role == "task":
            self.recorder.started_task(job)
            self.active[job.call()] = job, None
            return
        args, kwargs = job.make()
        job.actor = start_actor(spec.trainer or spec.role, job.name, self.namespace,
                                spec.resources, *args, device=self.device, **kwargs)
        self.recorder.started(job)
        self._submit(job, send_checkpoint=job.epoch > 0)  # a resumed model starts from it

    def _submit(self, job: Job, send_checkpoint: bool = False) -> None:
        """Ask `job`'s actor where it runs and for its next epoch: the actor keeps its state, so
        its last checkpoint travels only to an actor that lost it. The epoch sends a checkpoint
        back every `checkpoint_every` epochs and after the last."""
        epoch = job.epoch + 1
        keep = epoch % self.checkpoint_every == 0 or epoch >= job.spec.epochs
        job.placement_ref = placement(job.actor)
        record_ref, blob_ref = job.actor.run_epoch.options(num_returns=2).remote(
            epoch, job.blob if send_checkpoint else None, keep)
        self.active[record_ref] = job, blob_ref

    def _resend(self, job: Job) -> None:
        """Its actor restarted without its state: back to the last checkpoint (the epochs after
        it are trained again), which travels with the next call."""
        for one in [job] + job.members:
            one.epoch = job.saved_epoch
            one.history = [r for r in one.history if r["epoch"] <= job.saved_epoch]
        self._submit(job, send_checkpoint=True)

    def _next(self) -> None:
        """Wait for one result (an epoch or a task) and act on it."""
        waiting = [job for job, _ in self.active.values()]
        scaling = [j for j in waiting if j.new_node and not j.placed]
        bound = self.scale_up_s if scaling else self.watchdog_s
        ready, _ = ray.wait(list(self.active), num_returns=1, timeout=bound or None)
        if not ready:
            raise TrainingError(_watchdog_message(bound, scaling, waiting))
        job, blob_ref = self.active.pop(ready[0])
        try:
            result = ray.get(ready[0])
            blob = ray.get(blob_ref) if blob_ref is not None else None
        except RayError as err:
            if blob_ref is not None:  # the epoch's second result holds the same error: read
                with contextlib.suppress(RayError):  # it, or Ray prints it as unhandled
                    ray.get(blob_ref, timeout=10)
            if isinstance(err, ActorUnavailableError) and job.unavailable < UNAVAILABLE_RETRIES:
                # its node died or it is restarting, and Ray gave up on the call before it
                # noticed: the actor comes back (max_restarts); ask for the epoch again
                job.unavailable += 1
                time.sleep(UNAVAILABLE_PAUSE_S)
                self._resend(job)
                return
            self._fail(job, _reason(err))
            return
        if job.spec.role == "task":
            job.result, job.done = result, True
            self._finish(job)
            return
        if result is None:  # an actor Ray restarted in the call: it needs its checkpoint
            self._resend(job)
            return
        self._epoch(job, result, blob_ref, blob)

    def _epoch(self, job: Job, record, blob_ref, blob) -> None:
        """An epoch came back: the actor trains on at once while it is recorded."""
        job.unavailable, job.placed = 0, True
        with contextlib.suppress(RayError):  # lost in a restart: asked again next epoch
            job.placement = ray.get(job.placement_ref)
        job.epoch = (record[0] if job.members else record)["epoch"]
        if blob is not None:  # a checkpoint came with it: the ref travels on, if need be
            job.blob, job.saved_epoch = blob_ref, job.epoch
        stopped = not job.members and record.get("stopped")  # early: validation stalled
        if not job.finished and not stopped:
            self._submit(job)
        if job.members:  # a stack: a record and a checkpoint per member
            for member, one, member_blob in zip(job.members, record, blob or [None] * len(record)):
                member.placement, member.placed = job.placement, True
                self._record_epoch(member, one, member_blob)
        else:
            self._record_epoch(job, record, blob)
        self.recorder.write(self)
        if job.finished:
            self._stop(job)
            self._finish(job)

    def _record_epoch(self, job: Job, record: dict, blob: bytes | None) -> None:
        job.epoch = record["epoch"]
        job.history.append(record)
        job.summary = self.recorder.epoch(job, record, blob)

    def _finish(self, job: Job) -> None:
        for one in job.members or [job]:
            self.recorder.finished(one)
        if job.then is not None:
            job.then(job)

    def _fail(self, job: Job, reason: str) -> None:
        self._stop(job)
        for one in [job] + job.members:
            one.error = reason
        for one in job.members or [job]:
            self.recorder.failed(one)
        self.recorder.write(self)

    def _stop(self, job: Job) -> None:
        if job.actor is not None:
            if job.finished and job.spec.resources.workers > 1:  # its workers release theirs
                with contextlib.suppress(RayError):
                    ray.get(job.actor.finish.remote(), timeout=GROUP_FINISH_S)
            ray.kill(job.actor, no_restart=True)
            job.actor = None

    # ------------------------------------------------------------ results ------------------------
    def failed_tasks(self) -> list[Job]:
        """Tasks (the coordinator, the combination) that failed or never ran."""
        return [j for j in self.jobs.values() if j.spec.role == "task" and j.error]

    def models(self) -> list[Job]:
        """Every model of the run (a stack's members, not the stack), in the order planned: a
        series' models where the series was added."""
        serial = {id(j): (s.after, 0, i) for s in self.series.values()
                  for i, j in enumerate(s.jobs)}
        place, k = {}, 0
        for job in self.jobs.values():
            if id(job) not in serial:
                place[id(job)] = (k, 1, 0)
                k += 1
        models = [j for j in self.jobs.values() if j.spec.role not in ("task", "step", "stack")]
        return sorted(models, key=lambda j: serial.get(id(j)) or place[id(j)])


def _watchdog_message(bound: float, scaling: list[Job], waiting: list[Job]) -> str:
    def named(jobs):
        return ", ".join(f"{j.name} (CPU {j.spec.resources.num_cpus:g}, GPU "
                         f"{j.spec.resources.num_gpus:g})" for j in jobs)
    if scaling:
        return (f"waited {bound:g} s (autoscaler.scale_up_s) for the autoscaler to add a node "
                f"for {named(scaling)}; see 'ray status' for why it did not, or lower the "
                f"request")
    return (f"no model finished an epoch in {bound:g} s (watchdog_s); still waiting: "
            f"{named(waiting)}. If the cluster cannot place these requests, lower them; if "
            f"epochs are this slow, raise watchdog_s")


def _reason(err: RayError) -> str:
    """One line for why a remote call failed: the trainer's own message where there is one."""
    cause = getattr(err, "cause", None)
    if cause is not None and str(cause):
        return str(cause).strip().splitlines()[-1]
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
