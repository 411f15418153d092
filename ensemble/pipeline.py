"""The stages in order, driven from one process: generalists -> coordinator and specialists
(when specialists.k > 0) -> students.

The driver reads the data once, puts it into Ray's object store once (uint8 NumPy arrays: one
zero-copy copy per node), starts one named actor per model, and asks each for one epoch at a
time. Every epoch's metrics and checkpoint come back through Ray; the driver alone writes the run
directory, so actors never see a file-system path and a cluster needs no shared disk.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorUnavailableError, RayError

from ensemble import checkpoint, figures
from ensemble.actors import WORKER_ENV, check_resources, placement, run_task, start_actor
from ensemble.config import ResourcesConfig, RunConfig
from ensemble.data import KNOWN_GROUPS, Splits
from ensemble.errors import ConfigError, TrainingError
from ensemble.report import temperature_grid
from ensemble.stacked import why_not_stackable
from ensemble.rundir import RunDir
from ensemble.tracking import Tracker
from specialists.clustering import pair_agreement

UNAVAILABLE_RETRIES = 60  # an unreachable actor's epoch is asked again this often, ...
UNAVAILABLE_PAUSE_S = 1.0  # ... this far apart (a dead node is noticed within seconds)
STUDENT_SEED_OFFSET = 1000  # students' seeds stay clear of the generalists' seed, seed+1, ...
SPECIALIST_SEED_OFFSET = 2000  # and so do the specialists'


@dataclass
class Job:
    """One model of the run: its actor, and where its training stands."""
    name: str
    role: str  # "generalist", "specialist" or "student"
    args: tuple
    resources: ResourcesConfig
    epochs: int
    epoch: int = 0
    blob: object = None  # latest checkpoint: bytes from disk, or the ObjectRef an epoch returned
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    actor: object = None
    error: str | None = None
    unavailable: int = 0  # epoch calls in a row that found the actor unreachable
    placement: dict | None = None  # node and GPU ids of its actor, as it last reported them
    remote: str = ""  # which trainer its actor runs (ensemble.actors.REMOTE), if not its role's
    placement_ref: object = None
    members: list = field(default_factory=list)  # a stack: the student jobs it trains at once
    kwargs: dict = field(default_factory=dict)  # its trainer's keyword arguments, beside device

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs

    def status(self) -> str:
        return "failed" if self.error else "finished" if self.finished else "training"


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
    try:
        # a local Ray on loopback (Ray swaps 127.0.0.1 for the routable address unless
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set before it was imported; the CLI does it),
        # whose workers import the trainers (torch) as they start, before any actor asks for
        # one: Ray starts a worker per CPU with the driver, so the first actors find one ready
        local = {} if address else {"_node_ip_address": "127.0.0.1", "_system_config": {
            "preload_python_modules": ["ensemble.actors"]}}
        # every worker of the run sees only the GPUs Ray assigned it (none: CUDA_VISIBLE_DEVICES
        # is empty); Ray merges these env_vars into a submitted job's own runtime_env, which
        # must not name them again (the driver has that job's env_vars)
        env = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
        context = ray.init(address=address, namespace=namespace, _temp_dir=temp,
                           logging_level=logging.WARNING,
                           runtime_env={"env_vars": env} if env else None, **local)
    except (ConnectionError, RuntimeError, ValueError) as err:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ConfigError(f"cannot start or reach {where}: {str(err).splitlines()[0]}") from None
    try:
        yield getattr(context, "dashboard_url", None)
    finally:
        ray.shutdown()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


class Pipeline:
    def __init__(self, cfg: RunConfig, run: RunDir, splits: Splits, tracker: Tracker):
        self.cfg, self.run, self.splits, self.tracker = cfg, run, splits, tracker
        self.namespace = "ensemble-" + re.sub(r"[^A-Za-z0-9_-]", "-", run.name)
        self.jobs: dict[str, Job] = {}
        self.subsets: dict | None = None  # the coordinator's report
        self.ensemble: dict | None = None  # generalists vs generalists + specialists
        self.scaling: set[str] = set()  # requests no live node holds: waiting for a new node
        self.placed: set[str] = set()  # models that finished an epoch in this session
        self.stream = None  # the Ray Data Dataset of data.stream, when the generalists stream
        self.timings: dict[str, float] = {}  # driver wall seconds per phase (summary.md, TB)

    @contextlib.contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------ the stages ---------------------
    def execute(self, data_ref) -> dict[str, Job]:
        cfg = self.cfg
        gen = cfg.generalists
        generalists = [self._job(f"generalist-{i}", "generalist", gen.resources, gen.train.epochs,
                                 (f"generalist-{i}", gen.model, gen.train, data_ref, cfg.seed + i,
                                  gen.resources.threads),
                                 {"stream": self.stream} if self.stream is not None else {})
                       for i in range(gen.count)]
        for job in generalists:
            job.remote = "streamed generalist" if self.stream is not None else ""
        with self.timed("generalists"):
            self._train(generalists)
        teachers = [job for job in generalists if job.finished and not job.error]
        complete = len(teachers) == gen.count
        with self.timed("data placement"):
            teacher_ref = ray.put([self._bytes(job.blob) for job in teachers]) if complete \
                else None
        specialist_ref = None
        if cfg.specialists.k > 0:
            specialist_ref = self._specialists(teacher_ref, data_ref) if complete else None
        students = []
        for k, (name, scfg) in enumerate(cfg.students.items()):
            why = None
            if scfg.uses_teacher and not complete:
                why = "its teacher (the generalists) did not finish"
            elif scfg.uses_teacher and scfg.soft_targets == "ensemble" and specialist_ref is None:
                why = "its teacher (the specialists) did not finish"
            if why:
                self.jobs[f"student-{name}"] = Job(f"student-{name}", "student", (),
                                                   scfg.resources, scfg.train.epochs,
                                                   error=f"not trained: {why}")
                continue
            students.append(self._job(
                f"student-{name}", "student", scfg.resources, scfg.train.epochs,
                (f"student-{name}", scfg, data_ref, teacher_ref if scfg.uses_teacher else [],
                 cfg.seed + STUDENT_SEED_OFFSET + k, scfg.resources.threads),
                {"specialists": specialist_ref if scfg.soft_targets == "ensemble" else [],
                 "specialists_cfg": cfg.specialists}))
        if cfg.stack_students:
            students = self._stacks(students, data_ref, teacher_ref, specialist_ref)
        with self.timed("students"):
            self._train(students)
        return self.jobs

    def _stacks(self, students: list[Job], data_ref, teacher_ref, specialist_ref) -> list[Job]:
        """Students that can train as one stacked model (ensemble.stacked), grouped into one job
        per group of two or more; the others stay alone. Members left at different epochs by an
        interrupted run train alone."""
        cfg, groups = self.cfg, []
        for job in students:
            scfg = cfg.students[job.name[len("student-"):]]
            for group in groups:
                first = cfg.students[group[0].name[len("student-"):]]
                if why_not_stackable([first, scfg]) is None and first.resources == scfg.resources \
                        and group[0].epoch == job.epoch:
                    group.append(job)
                    break
            else:
                groups.append([job])
        out = []
        for group in groups:
            if len(group) == 1 or all(j.finished for j in group):
                out += group
                continue
            names = [j.name for j in group]
            cfgs = [cfg.students[n[len("student-"):]] for n in names]
            seeds = [j.args[4] for j in group]
            first = cfgs[0]
            stack = Job(f"stack-{len([o for o in out if o.members])}", "stack",
                        (names, cfgs, data_ref, teacher_ref, seeds, first.resources.threads),
                        first.resources, first.train.epochs, group[0].epoch,
                        [j.blob for j in group], members=group, kwargs={
                            "specialists": specialist_ref if first.soft_targets == "ensemble"
                            else [], "specialists_cfg": cfg.specialists})
            self.tracker.line(f"{stack.name:<16} trains {', '.join(names)} as one model")
            out.append(stack)
        return out

    def _specialists(self, teacher_ref, data_ref):
        """The coordinator, then one specialist per subset in parallel, then eq. 5 on val and
        test. Returns an ObjectRef of the specialists' checkpoints, or None if one failed."""
        cfg, spec = self.cfg, self.cfg.specialists
        self.subsets = self.run.read_json("subsets.json")  # a resumed run keeps its subsets
        if self.subsets is None:
            with self.timed("coordinator"):
                self.subsets = run_task("coordinate", self.cfg.generalists.resources, spec,
                                        teacher_ref, data_ref, device=cfg.device)
            groups = KNOWN_GROUPS.get(self.splits.name)
            if groups:  # how the subsets found compare with the groups known in advance
                self.subsets.update(known_groups=groups, agreement=pair_agreement(
                    self.subsets["subsets"], list(groups.values())))
            self.run.write_json("subsets.json", self.subsets)
            labels = list(self.splits.classes)
            self.tracker.image("run", "specialists/covariance", functools.partial(
                figures.covariance, self.subsets["covariance"], labels,
                "Covariance of predicted probabilities"))
            self.tracker.image("run", "specialists/subsets",
                               functools.partial(figures.subsets, self.subsets["subsets"], labels))
        for i, names in enumerate(self.subsets["names"]):
            self.tracker.line(f"specialist-{i:<5} covers {', '.join(names)}")
        generalist_ref = ray.put(ray.get(teacher_ref)[0])  # specialists start from generalist-0
        jobs = [self._job(f"specialist-{i}", "specialist", spec.resources, spec.train.epochs,
                          (f"specialist-{i}", members, generalist_ref, spec, data_ref,
                           cfg.seed + SPECIALIST_SEED_OFFSET + i, spec.resources.threads))
                for i, members in enumerate(self.subsets["subsets"])]
        with self.timed("specialists"):
            self._train(jobs)
        if any(job.error or not job.finished for job in jobs):
            return None
        with self.timed("data placement"):
            specialist_ref = ray.put([self._bytes(job.blob) for job in jobs])
        with self.timed("combination"):
            self.ensemble = run_task("evaluate_ensemble", spec.resources, teacher_ref,
                                     specialist_ref, spec, data_ref, device=cfg.device)
        self.ensemble["top_n"] = spec.top_n
        self.run.write_json("ensemble.json", self.ensemble)
        self.tracker.image("ensemble", "confusion/test", functools.partial(
            figures.confusion, self.ensemble["test"]["ensemble_confusion"],
            list(self.splits.classes), "generalists + specialists"))
        test = self.ensemble["test"]
        self.tracker.line(f"{'ensemble':<16} test errors: generalists {test['generalist_errors']}, "
                          f"with specialists {test['ensemble_errors']}")
        return specialist_ref

    def _job(self, name, role, resources, epochs, args, kwargs=None) -> Job:
        job = Job(name, role, args, resources, epochs, kwargs=kwargs or {})
        saved = self.run.latest(name)
        if saved is not None:
            job.blob, meta = saved
            job.epoch, job.history, job.summary = meta["epoch"], meta["history"], meta["summary"]
        self.jobs[name] = job
        return job

    # ------------------------------------------------------------ training -----------------------
    def _train(self, jobs: list[Job]) -> None:
        """Train `jobs` in parallel, one epoch per call, until each is finished or failed."""
        active = {}
        try:
            for job in jobs:
                if job.finished:
                    self.tracker.line(f"{job.name:<16} finished earlier ({job.epoch} epochs)")
                    continue
                job.actor = start_actor(job.remote or job.role, job.name, self.namespace,
                                        job.resources, *job.args, device=self.cfg.device,
                                        **job.kwargs)
                for member in job.members or [job]:
                    self.tracker.started(member.name, job.epoch, job.epochs)
                self._submit(job, active)
            while active:
                jobs_waiting = [job for job, _ in active.values()]
                scaling = [j for j in jobs_waiting if self._scaling(j)]
                bound = self.cfg.autoscaler.scale_up_s if scaling else self.cfg.watchdog_s
                ready, _ = ray.wait(list(active), num_returns=1, timeout=bound or None)
                if not ready:
                    raise TrainingError(self._watchdog_message(bound, scaling, jobs_waiting))
                ready = ready[0]
                job, blob_ref = active.pop(ready)
                try:
                    record = ray.get(ready)
                    blob = ray.get(blob_ref)
                except RayError as err:
                    if isinstance(err, ActorUnavailableError) and \
                            job.unavailable < UNAVAILABLE_RETRIES:
                        # its node died or it is restarting, and Ray gave up on the call before
                        # it noticed: the actor comes back (max_restarts); ask for the epoch again
                        job.unavailable += 1
                        time.sleep(UNAVAILABLE_PAUSE_S)
                        self._submit(job, active)
                        continue
                    job.error = _reason(err)
                    for failed in job.members or [job]:
                        failed.error = job.error
                        self.tracker.done(failed.name)
                    self.tracker.line(f"{job.name:<16} failed: {job.error}")
                    self._stop(job)
                    self._write()
                    continue
                job.blob, job.unavailable = blob_ref, 0
                with contextlib.suppress(RayError):  # lost in a restart: asked again next epoch
                    job.placement = ray.get(job.placement_ref)
                self.placed.add(job.name)
                job.epoch = (record[0] if job.members else record)["epoch"]
                if not job.finished:  # the actor trains on while the driver writes
                    self._submit(job, active)
                if job.members:  # a stack: a record and a checkpoint per member
                    for member, rec, member_blob in zip(job.members, record, blob):
                        member.placement = job.placement
                        self._epoch_done(member, rec, member_blob)
                else:
                    self._epoch_done(job, record, blob)
                    job.blob = blob_ref
                with self.timed("checkpoint writing"):
                    self._write()
                if job.finished:
                    self._stop(job)
                    for done in job.members or [job]:
                        self.tracker.done(done.name)
                        self._finished(done)
        finally:
            for job in jobs:
                self._stop(job)

    def _epoch_done(self, job: Job, record: dict, blob: bytes) -> None:
        """A model's epoch came back: its checkpoint saved, its metrics kept and shown."""
        with self.timed("checkpoint writing"):
            checkpoint.save_epoch(self.run.checkpoints(job.name), record["epoch"], blob)
        job.epoch, job.blob = record["epoch"], blob
        job.history.append(record)
        job.summary = checkpoint.read_meta(blob)["summary"]
        self.tracker.epoch(job.name, job.epochs, record)

    def _finished(self, job: Job) -> None:
        """TensorBoard: the model's hyperparameters with its final numbers, and its test confusion
        matrix (a specialist's over its own classes and the dustbin)."""
        self.tracker.finished(job.name, model_hparams(self.cfg, job.name, job.role), job.summary)
        matrix = job.summary.get("test_confusion")
        if matrix:
            labels = list(self.splits.classes)
            if job.role == "specialist":
                members = self.subsets["subsets"][int(job.name.rsplit("-", 1)[1])]
                labels = [labels[c] for c in members] + ["dustbin"]
            self.tracker.image(job.name, "confusion/test",
                               functools.partial(figures.confusion, matrix, labels, job.name),
                               job.epoch)

    def _scaling(self, job: Job) -> bool:
        """Whether `job` waits for a node the autoscaler has yet to add."""
        key = "specialists" if job.role == "specialist" else job.name
        return key in self.scaling and job.name not in self.placed

    def _watchdog_message(self, bound: float, scaling: list[Job], active) -> str:
        def named(jobs):
            return ", ".join(f"{j.name} (CPU {j.resources.num_cpus:g}, GPU "
                             f"{j.resources.num_gpus:g})" for j in jobs)
        if scaling:
            return (f"waited {bound:g} s (autoscaler.scale_up_s) for the autoscaler to add a node "
                    f"for {named(scaling)}; see 'ray status' for why it did not, or lower the "
                    f"request")
        return (f"no model finished an epoch in {bound:g} s (watchdog_s); still waiting: "
                f"{named(active)}. If the cluster cannot place these requests, lower them; if "
                f"epochs are this slow, raise watchdog_s")

    @staticmethod
    def _submit(job: Job, active: dict) -> None:
        """Ask `job`'s actor where it runs and for its next epoch from its last checkpoint;
        `active` maps the record's ref to the job and the ref of the checkpoint it returns."""
        job.placement_ref = placement(job.actor)
        record_ref, blob_ref = job.actor.run_epoch.options(num_returns=2).remote(
            job.epoch + 1, job.blob)
        active[record_ref] = job, blob_ref

    @staticmethod
    def _stop(job: Job) -> None:
        if job.actor is not None:
            ray.kill(job.actor, no_restart=True)
            job.actor = None

    @staticmethod
    def _bytes(blob) -> bytes:
        return blob if isinstance(blob, bytes) else ray.get(blob)

    # ------------------------------------------------------------ results ------------------------
    def results(self) -> dict[str, dict]:
        return {job.name: {"role": job.role, "status": job.status(), "error": job.error,
                           "test_size": len(self.splits.test_y), "val_size": len(self.splits.val_y),
                           "placement": job.placement, "summary": job.summary,
                           "history": job.history}
                for job in self.jobs.values()}

    def _write(self) -> None:
        self.run.write_metrics(self.results())
        self.run.sync()


def run_pipeline(cfg: RunConfig, run: RunDir, splits: Splits, address: str | None,
                 resume: bool, tracker: Tracker, adopted: dict[str, bytes] | None = None
                 ) -> dict[str, dict]:
    """Train every model of `cfg` into `run`; raise TrainingError if any failed (after writing
    the results of all the others). `adopted`: checkpoints of finished models taken over from
    another run (generalists.from_run), saved into this one before anything trains."""
    pipe = Pipeline(cfg, run, splits, tracker)
    started = time.perf_counter()
    with ray_session(address, pipe.namespace) as dashboard:
        pipe.timings["ray start"] = time.perf_counter() - started
        requests = {f"generalist-{i}": cfg.generalists.resources
                    for i in range(cfg.generalists.count)}
        requests.update({f"student-{n}": s.resources for n, s in cfg.students.items()})
        if cfg.specialists.k:
            requests["specialists"] = cfg.specialists.resources
        total = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        tracker.line(f"ray: {f'the cluster at {address}' if address else 'a local Ray'}, "
                     f"{nodes} node(s), {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU"
                     + (f"; dashboard http://{dashboard}" if dashboard else ""))
        pipe.scaling = check_resources(requests, cfg.autoscaler.node_types)
        if cfg.data.stream:
            from ensemble.streaming import open_stream

            pipe.stream = open_stream(cfg.data.stream)
        if not resume:
            run.create(cfg)
            tracker.text("run", "config", "    " + run.config_path.read_text().replace(
                "\n", "\n    "))  # indented: TensorBoard shows it as code
            for name, blob in (adopted or {}).items():
                checkpoint.save_epoch(run.checkpoints(name), checkpoint.read_meta(blob)["epoch"],
                                      blob)
                tracker.line(f"{name:<16} taken over from {cfg.generalists.from_run}")
        with pipe.timed("data placement"):
            data_ref = ray.put(splits)
        pipe.execute(data_ref)
    pipe.timings["total"] = time.perf_counter() - started
    results = pipe.results()
    run.write_metrics(results, pipe.timings)
    tracker.timings(pipe.timings)
    grid = temperature_grid(cfg, results)
    if grid:
        tracker.image("run", "students/temperature_x_width", functools.partial(
            figures.temperature_grid, {key: cell[1] for key, cell in grid.items()},
            "validation errors"))
    tracker.line("\n" + run.write_summary(cfg.name, results, pipe.subsets, pipe.ensemble,
                                          pipe.timings))
    failed = [f"{name} ({m['error']})" for name, m in results.items() if m["error"]]
    if failed:
        raise TrainingError(f"{len(failed)} model(s) failed: {'; '.join(failed)}; the others' "
                            f"results are in {run.location}")
    return results


def model_hparams(cfg: RunConfig, name: str, role: str) -> dict:
    """What TensorBoard's HParams view shows of one model: its layers and training recipe."""
    model, train, extra = cfg.generalists.model, cfg.generalists.train, {}
    if role == "specialist":
        train, extra = cfg.specialists.train, {"fraction": cfg.specialists.fraction}
    elif role == "student":
        student = cfg.students[name[len("student-"):]]
        model, train = student.model, student.train
        extra = {"temperature": student.temperature, "alpha": student.alpha,
                 "soft_targets": student.soft_targets if student.uses_teacher else "none",
                 "transfer": ("without " + ",".join(map(str, student.drop_classes))
                              if student.drop_classes else
                              "only " + ",".join(map(str, student.keep_classes))
                              if student.keep_classes else "all"),
                 "transfer_size": student.transfer_size}
    return {"role": role, "hidden": "x".join(map(str, model.hidden)), "kind": model.kind,
            "dropout_in": model.dropout_in, "dropout_hidden": model.dropout_hidden,
            "max_norm": model.max_norm, "epochs": train.epochs, "batch_size": train.batch_size,
            "lr": train.lr, "schedule": train.schedule, "jitter": train.jitter,
            "elastic": train.elastic, "precision": train.precision, **extra}


def _reason(err: RayError) -> str:
    """One line for why a remote call failed: the trainer's own message where there is one."""
    cause = getattr(err, "cause", None)
    if cause is not None and str(cause):
        return str(cause).strip().splitlines()[-1]
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
