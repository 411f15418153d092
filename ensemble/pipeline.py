"""The recipe: the paper's pipeline as jobs (ensemble.scheduler), each started once what it
needs exists.

    generalists, in parallel ─→ "generalists" (their checkpoints, shared) ─→ coordinator
      ─→ one specialist per subset ─→ "specialists" (shared) ─→ eq. 5 evaluated ("combination")
    students: on hard labels at once; taught by the generalists once "generalists" exists
      (beside the specialists); taught by generalists + specialists once "specialists" exists;
      on an unaugmented transfer set, from the teacher's outputs computed once for all of them
      ("soft targets", "soft targets (ensemble)")

The driver reads the data once and puts it into Ray's object store once (uint8 NumPy arrays: one
zero-copy copy per node); every epoch's metrics and checkpoint come back through Ray, and the
driver alone writes the run directory (ensemble.recorder), so actors never see a file-system
path and a cluster needs no shared disk.
"""
from __future__ import annotations

import functools
import re
import time
from dataclasses import replace

import ray

from ensemble import checkpoint, figures
from ensemble.actors import check_resources, ray_session, submit_task
from ensemble.config import RunConfig
from ensemble.data import KNOWN_GROUPS, Splits
from ensemble.distill import unaugmented
from ensemble.errors import TrainingError
from ensemble.recorder import Recorder
from ensemble.report import temperature_grid
from ensemble.rundir import RunDir
from ensemble.scheduler import Job, JobSpec, Scheduler
from ensemble.stacked import why_not_stackable
from ensemble.tracking import Tracker
from specialists.clustering import pair_agreement

STUDENT_SEED_OFFSET = 1000  # students' seeds stay clear of the generalists' seed, seed+1, ...
SPECIALIST_SEED_OFFSET = 2000  # and so do the specialists'
GENERALISTS = "generalist-0..N"  # every generalist, as the jobs that follow wait for them


class Recipe:
    """Plans every job of a run on `sched`; the jobs' callbacks add what follows them."""

    def __init__(self, cfg: RunConfig, sched: Scheduler, recorder: Recorder, data_ref,
                 stream=None):
        self.cfg, self.sched, self.recorder, self.data = cfg, sched, recorder, data_ref
        self.stream = stream  # the Ray Data Dataset of data.stream, when the generalists stream
        self.teachers = self.generalist = self.specialists = None  # ObjectRefs once they exist
        self.outputs: dict[str, object] = {}  # teacher -> ref of its outputs on the transfer set
        self.subsets: dict | None = None  # the coordinator's report
        self.ensemble: dict | None = None  # generalists vs generalists + specialists

    def plan(self) -> None:
        cfg, gen = self.cfg, self.cfg.generalists
        def add(i: int) -> Job:
            name = f"generalist-{i}"
            return self.sched.train(JobSpec(
                name, "generalist", "generalists", cfg.seed + i, gen.resources,
                1 if gen.weights else gen.train.epochs,  # weights: one evaluation, done
                critical=True, trainer="streamed generalist" if self.stream is not None else
                "parallel generalist" if gen.resources.workers > 1 else ""),
                functools.partial(self._generalist_args, name, cfg.seed + i))

        self.sched.train_series(GENERALISTS, gen.count, add)
        self.sched.step(JobSpec("generalists", "step", waits_for=(GENERALISTS,), critical=True),
                        self._share_generalists)
        if cfg.specialists.k > 0:
            coordinator = JobSpec("coordinator", "task", "specialists", resources=gen.resources,
                                  waits_for=("generalists",), critical=True)
            saved = self.recorder.run.read_json("subsets.json")  # a resumed run keeps its own
            if saved is None:
                self.sched.task(coordinator, self._coordinate,
                                lambda job: self._coordinated(job.result, new=True))
            else:
                self.sched.step(replace(coordinator, role="step"),
                                lambda job: self._coordinated(saved, new=False))
        self._students()

    def _students(self) -> None:
        """Each student waits for its teacher; with stack_students, those that can train as one
        stacked model (ensemble.stacked) do."""
        cfg, specs = self.cfg, []
        teacher_of = {name: "specialists" if scfg.soft_targets == "ensemble" else "generalists"
                      for name, scfg in cfg.students.items()
                      if scfg.uses_teacher and unaugmented(scfg) and self.stream is None}
        for k, (name, scfg) in enumerate(cfg.students.items()):
            teacher = ("specialists",) if scfg.soft_targets == "ensemble" else ("generalists",)
            if list(teacher_of.values()).count(teacher_of.get(name)) > 1:  # outputs shared
                teacher += (self._outputs_of(teacher[0]),)
            specs.append(JobSpec(f"student-{name}", "student", f"students.{name}",
                                 cfg.seed + STUDENT_SEED_OFFSET + k, scfg.resources,
                                 scfg.train.epochs, teacher if scfg.uses_teacher else (),
                                 trainer="streamed student" if self.stream is not None else
                                 "parallel student" if scfg.resources.workers > 1 else ""))
        stacks = 0
        for group in self._stacks(specs) if cfg.stack_students else [[s] for s in specs]:
            if len(group) == 1:
                self.sched.train(group[0], functools.partial(self._student_args, group[0]))
                continue
            stack = JobSpec(f"stack-{stacks}", "stack", group[0].key, resources=group[0].resources,
                            epochs=group[0].epochs, waits_for=group[0].waits_for,
                            members=tuple(group))
            self.recorder.line(f"{stack.name:<16} trains {', '.join(s.name for s in group)} "
                               "as one model")
            self.sched.train(stack, functools.partial(self._stack_args, stack))
            stacks += 1

    # ------------------------------------------------------------ what each job is given ---------
    def _generalist_args(self, name: str, seed: int):
        gen = self.cfg.generalists
        return ((name, gen.model, gen.train, self.data, seed, gen.resources.threads),
                {"stream": self.stream} if self.stream is not None else {})

    def _specialist_args(self, name: str, members: list[int], seed: int):
        spec = self.cfg.specialists
        return (name, members, self.generalist, spec, self.data, seed, spec.resources.threads), {}

    def _student_args(self, spec: JobSpec):
        scfg = self.cfg.students[spec.key.split(".", 1)[1]]
        kwargs = self._specialists_kwargs(scfg)
        if self.stream is not None:
            kwargs = {**kwargs, "outputs": None, "stream": self.stream}
        return ((spec.name, scfg, self.data, self.teachers if scfg.uses_teacher else [], spec.seed,
                 scfg.resources.threads), kwargs)

    def _stack_args(self, stack: JobSpec):
        cfgs = [self.cfg.students[m.key.split(".", 1)[1]] for m in stack.members]
        return (([m.name for m in stack.members], cfgs, self.data, self.teachers or [],
                 [m.seed for m in stack.members], cfgs[0].resources.threads),
                self._specialists_kwargs(cfgs[0]))

    def _specialists_kwargs(self, scfg) -> dict:
        teacher = "specialists" if scfg.soft_targets == "ensemble" else "generalists"
        return {"specialists": self.specialists if teacher == "specialists" else [],
                "specialists_cfg": self.cfg.specialists,
                "outputs": self.outputs.get(teacher) if unaugmented(scfg) else None}

    def _outputs_of(self, teacher: str) -> str:
        """The task that computes `teacher`'s outputs on the transfer set once for the students
        that share them (two or more: one alone computes its own), added the first time one
        asks; its name."""
        name = "soft targets" + (" (ensemble)" if teacher == "specialists" else "")
        if name not in self.sched.jobs:
            gen = self.cfg.generalists
            self.sched.task(JobSpec(name, "task", "students", resources=gen.resources,
                                    waits_for=(teacher,)),
                            functools.partial(self._teacher_outputs, teacher),
                            lambda job: self.outputs.update({teacher: ray.put(job.result)}))
        return name

    def _teacher_outputs(self, teacher: str):
        gen = self.cfg.generalists
        return submit_task("teacher_outputs", gen.resources, self.teachers, self.data,
                           gen.resources.threads,
                           self.specialists if teacher == "specialists" else None,
                           self.cfg.specialists, device=self.cfg.device)

    # ------------------------------------------------------------ when jobs finish ---------------
    def _share_generalists(self, _job: Job) -> None:
        """The generalists' checkpoints into the object store once, for every teacher."""
        with self.recorder.timed("data placement"):
            blobs = [_bytes(job.blob) for job in self.sched.members(GENERALISTS)]
            self.teachers = ray.put(blobs)
            if self.cfg.specialists.k > 0:  # specialists start from generalist-0
                self.generalist = ray.put(blobs[0])

    def _coordinate(self):
        return submit_task("coordinate", self.cfg.generalists.resources, self.cfg.specialists,
                           self.teachers, self.data, device=self.cfg.device)

    def _coordinated(self, report: dict, new: bool) -> None:
        """The subsets found: recorded, and one specialist job per subset added, then the shared
        checkpoints and the combination after them."""
        cfg, spec, run = self.cfg, self.cfg.specialists, self.recorder.run
        self.subsets = report
        if new:
            groups = KNOWN_GROUPS.get(self.recorder.splits.name)
            if groups:  # how the subsets found compare with the groups known in advance
                report.update(known_groups=groups, agreement=pair_agreement(
                    report["subsets"], list(groups.values())))
            run.write_json("subsets.json", report)
            self.recorder.subsets_figures(report)
        names = []
        for i, (members, labels) in enumerate(zip(report["subsets"], report["names"])):
            name, seed = f"specialist-{i}", cfg.seed + SPECIALIST_SEED_OFFSET + i
            self.recorder.line(f"{name:<16} covers {', '.join(labels)}")
            self.sched.train(JobSpec(name, "specialist", "specialists", seed, spec.resources,
                                     spec.train.epochs, critical=True),
                             functools.partial(self._specialist_args, name, members, seed))
            names.append(name)
        self.sched.step(JobSpec("specialists", "step", waits_for=tuple(names), critical=True),
                        self._share_specialists)
        self.sched.task(JobSpec("combination", "task", "specialists", resources=spec.resources,
                                waits_for=("specialists",)), self._combine, self._combined)

    def _share_specialists(self, _job: Job) -> None:
        with self.recorder.timed("data placement"):
            self.specialists = ray.put([_bytes(self.sched.jobs[name].blob)
                                        for name in self.sched.jobs["specialists"].spec.waits_for])

    def _combine(self):
        spec = self.cfg.specialists
        return submit_task("evaluate_ensemble", spec.resources, self.teachers, self.specialists,
                           spec, self.data, device=self.cfg.device)

    def _combined(self, job: Job) -> None:
        self.ensemble = {**job.result, "top_n": self.cfg.specialists.top_n}
        self.recorder.run.write_json("ensemble.json", self.ensemble)
        self.recorder.ensemble_figures(self.ensemble)

    def _stacks(self, specs: list[JobSpec]) -> list[list[JobSpec]]:
        """Students that can train as one stacked model grouped (same recipe but for seed, T and
        alpha, same resources and teacher); members left at different epochs by an interrupted
        run, and groups whose members all finished, train alone."""
        saved = {s.name: (self.recorder.saved(s.name) or (None, {"epoch": 0}))[1]["epoch"]
                 for s in specs}
        cfg_of = {s.name: self.cfg.students[s.key.split(".", 1)[1]] for s in specs}
        groups: list[list[JobSpec]] = []
        for spec in specs:
            for group in groups:
                first = group[0]
                if why_not_stackable([cfg_of[first.name], cfg_of[spec.name]]) is None and \
                        (first.resources, first.waits_for, saved[first.name]) == \
                        (spec.resources, spec.waits_for, saved[spec.name]):
                    group.append(spec)
                    break
            else:
                groups.append([spec])
        out = []
        for group in groups:
            if len(group) > 1 and any(saved[s.name] < s.epochs for s in group):
                out.append(group)
            else:
                out += [[s] for s in group]
        return out


def _bytes(blob) -> bytes:
    return blob if isinstance(blob, bytes) else ray.get(blob)


def _check_cluster(cfg: RunConfig, tracker: Tracker, address: str | None, dashboard) -> None:
    """Say which Ray the run is on; refuse at once a request that no node can ever hold."""
    total = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    tracker.line(f"ray: {f'the cluster at {address}' if address else 'a local Ray'}, "
                 f"{nodes} node(s), {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU"
                 + (f"; dashboard http://{dashboard}" if dashboard else ""))
    check_resources(model_requests(cfg), cfg.autoscaler.node_types)


def model_requests(cfg: RunConfig) -> dict:
    """What each kind of model asks the cluster for, by a name for messages."""
    requests = {"generalist-0": cfg.generalists.resources}  # every generalist asks alike
    requests.update({f"student-{n}": s.resources for n, s in cfg.students.items()})
    if cfg.specialists.k:
        requests["specialists"] = cfg.specialists.resources
    return requests


def run_pipeline(cfg: RunConfig, run: RunDir, splits: Splits, address: str | None,
                 resume: bool, tracker: Tracker, adopted: dict[str, bytes | dict] | None = None
                 ) -> dict[str, dict]:
    """Train every model of `cfg` into `run`; raise TrainingError if any failed (after writing
    the results of all the others). `adopted`: checkpoints of finished models taken over from
    other runs (generalists.from_run, specialists.from_run; and the subsets, a dict), saved into
    this one before anything trains."""
    recorder = Recorder(cfg, run, splits, tracker)
    namespace = "ensemble-" + re.sub(r"[^A-Za-z0-9_-]", "-", run.name)
    started = time.perf_counter()
    with ray_session(address, namespace) as dashboard:
        recorder.timings["ray start"] = time.perf_counter() - started
        _check_cluster(cfg, tracker, address, dashboard)
        stream = None
        if cfg.data.stream:
            from ensemble.streaming import open_stream

            stream = open_stream(cfg.data.stream)
        if not resume:
            run.create(cfg)
            tracker.text("run", "config", "    " + run.config_path.read_text().replace(
                "\n", "\n    "))  # indented: TensorBoard shows it as code
            for name, blob in (adopted or {}).items():
                if isinstance(blob, dict):  # a report: the subsets the specialists cover
                    run.write_json(name, blob)
                    continue
                checkpoint.save_epoch(run.checkpoints(name), checkpoint.read_meta(blob)["epoch"],
                                      blob)
                source = checkpoint.read_meta(blob)["history"][-1].get("weights") or (
                    cfg.specialists.from_run if name.startswith("specialist-") else
                    cfg.generalists.from_run)
                tracker.line(f"{name:<16} taken over from {source}")
        with recorder.timed("data placement"):
            data_ref = ray.put(splits)
        sched = Scheduler(recorder, namespace, cfg.device, cfg.watchdog_s,
                          cfg.autoscaler.scale_up_s, cfg.checkpoint_every)
        recipe = Recipe(cfg, sched, recorder, data_ref, stream)
        try:
            recipe.plan()
            sched.run()
        finally:
            recorder.close()  # what came back is on disk, whatever stopped the run
    recorder.timings["total"] = time.perf_counter() - started
    results = recorder.results(sched)
    run.write_metrics(results, recorder.timings)
    tracker.timings(recorder.timings)
    grid = temperature_grid(cfg, results)
    if grid:
        tracker.image("run", "students/temperature_x_width", functools.partial(
            figures.temperature_grid, {key: cell[1] for key, cell in grid.items()},
            "validation errors"))
    tracker.line("\n" + run.write_summary(cfg.name, results, recipe.subsets, recipe.ensemble,
                                          recorder.timings))
    failed = [f"{name} ({m['error']})" for name, m in results.items() if m["error"]]
    failed += [f"{job.name} ({job.error})" for job in sched.failed_tasks()]
    if failed:
        raise TrainingError(f"{len(failed)} model(s) failed: {'; '.join(failed)}; the others' "
                            f"results are in {run.location}")
    return results
