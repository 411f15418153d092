"""What a run's jobs produce, kept where people look: checkpoints and metrics.json in the run
directory, a line per epoch in the terminal, scalars, hyperparameters and figures in TensorBoard,
and the driver's time by phase. The scheduler calls it; it never decides what runs."""
from __future__ import annotations

import contextlib
import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor

from ensemble import checkpoint, figures
from ensemble.config import RunConfig
from ensemble.data import Splits
from ensemble.rundir import RunDir
from ensemble.tracking import Tracker

PHASE_OF_ROLE = {"generalist": "generalists", "specialist": "specialists", "student": "students",
                 "stack": "students"}


class Recorder:
    def __init__(self, cfg: RunConfig, run: RunDir, splits: Splits, tracker: Tracker):
        self.cfg, self.run, self.splits, self.tracker = cfg, run, splits, tracker
        self.timings: dict[str, float] = {}  # driver wall seconds per phase (summary.md, TB)
        self._spans: dict[str, list[float]] = {}  # phase -> [first start, last end]
        self._classes: dict[str, list[int]] = {}  # specialist -> the classes of its subset
        # files are written on a thread of their own, in order, off the scheduler's path
        self._files = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-dir")
        self._writes: list[Future] = []
        self._saved: dict[str, tuple[bytes, dict] | None] = {}  # read once per model

    @contextlib.contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start

    def _span(self, phase: str, end: bool = False) -> None:
        """A phase's wall time runs from its first job's start to its last job's end (phases
        overlap: students taught by the generalists train while the specialists do)."""
        now = time.perf_counter()
        span = self._spans.setdefault(phase, [now, now])
        if end:
            span[1] = now
            self.timings[phase] = span[1] - span[0]

    def subsets_figures(self, report: dict) -> None:
        """The coordinator's covariance and subsets, in TensorBoard."""
        labels = list(self.splits.classes)
        self.tracker.image("run", "specialists/covariance", functools.partial(
            figures.covariance, report["covariance"], labels,
            "Covariance of predicted probabilities"))
        if report["subsets"]:  # none may reach specialists.min_size classes
            self.tracker.image("run", "specialists/subsets",
                               functools.partial(figures.subsets, report["subsets"], labels))

    def ensemble_figures(self, ensemble: dict) -> None:
        """Eq. 5's test confusion matrix, and a line comparing it with the generalists'."""
        test = ensemble["test"]
        if "ensemble_confusion" in test:
            self.tracker.image("ensemble", "confusion/test", functools.partial(
                figures.confusion, test["ensemble_confusion"], list(self.splits.classes),
                "generalists + specialists"))
        self.tracker.line(f"{'ensemble':<16} test errors: generalists {test['generalist_errors']}, "
                          f"with specialists {test['ensemble_errors']}")

    # ------------------------------------------------------------ what the scheduler reports ----
    def saved(self, name: str) -> tuple[bytes, dict] | None:
        """The newest readable checkpoint of model `name` in the run directory, if any (read
        from disk once: the recipe and the scheduler both ask before it trains)."""
        if name not in self._saved:
            self._saved[name] = self.run.latest(name)
        return self._saved[name]

    def line(self, text: str) -> None:
        self.tracker.line(text)

    def started(self, job) -> None:
        self._span(PHASE_OF_ROLE[job.spec.role])
        for one in job.members or [job]:
            self.tracker.started(one.name, job.epoch, job.spec.epochs)

    def started_task(self, job) -> None:
        self._span(job.name)

    def epoch(self, job, record: dict, blob: bytes | None) -> dict:
        """A model's epoch came back: its metrics shown, its checkpoint (if one came) saved;
        returns the model's summary as of its last checkpoint."""
        self.tracker.epoch(job.name, job.spec.epochs, record)
        if blob is None:
            return job.summary
        self._saved.pop(job.name, None)
        self._later(self._save, job.name, record["epoch"], blob)
        meta = checkpoint.read_meta(blob)
        if "members" in meta:  # a specialist's classes, for its figures
            self._classes[job.name] = meta["members"]
        return meta["summary"]

    def finished(self, job) -> None:
        """A job finished. A model trained in this session: TensorBoard's hyperparameters with its
        final numbers, and its test confusion matrix (a specialist's over its own classes and
        the dustbin)."""
        role = job.spec.role
        if role in ("task", "step"):
            if job.name in self._spans:
                self._span(job.name, end=True)
            return
        if not job.placed:  # finished in an earlier session
            return
        self._span(PHASE_OF_ROLE[role], end=True)
        self.tracker.done(job.name)
        self.tracker.finished(job.name, model_hparams(self.cfg, job.spec), job.summary)
        matrix = job.summary.get("test_confusion")
        if matrix:
            labels = list(self.splits.classes)
            if role == "specialist":
                labels = [labels[c] for c in self._classes[job.name]] + ["dustbin"]
            self.tracker.image(job.name, "confusion/test",
                               functools.partial(figures.confusion, matrix, labels, job.name),
                               job.epoch)

    def failed(self, job) -> None:
        if job.spec.role in PHASE_OF_ROLE and job.placed:
            self._span(PHASE_OF_ROLE[job.spec.role], end=True)
        self.tracker.done(job.name)
        self.tracker.line(f"{job.name:<16} failed: {job.error}")

    def write(self, scheduler) -> None:
        """metrics.json as it stands (the models begun so far: a queue of thousands costs
        nothing per epoch), mirrored to the run's URI if it has one."""
        self._later(self._metrics, self.results(scheduler, begun_only=True))

    # ------------------------------------------------------------ files, in the background ------
    def _save(self, name: str, epoch: int, blob: bytes) -> None:
        with self.timed("checkpoint writing"):
            checkpoint.save_epoch(self.run.checkpoints(name), epoch, blob)

    def _metrics(self, results: dict) -> None:
        self.run.write_metrics(results)
        self.run.sync()

    def _later(self, write, *args) -> None:
        """`write(*args)` on the files' thread, after those before it; a write that failed
        raises here, at the next one."""
        for done in [w for w in self._writes if w.done()]:
            self._writes.remove(done)
            done.result()
        self._writes.append(self._files.submit(write, *args))

    def flush(self) -> None:
        """Wait until every file is written; raise the first write that failed."""
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()

    def close(self) -> None:
        """Every file written (raising the first write that failed), the writer's thread gone."""
        try:
            self.flush()
        finally:
            self._files.shutdown()

    def results(self, scheduler, begun_only: bool = False) -> dict[str, dict]:
        """Every model (or those begun: started, trained or failed): its role, status, error,
        placement, summary and epochs (metrics.json)."""
        return {job.name: {"role": job.spec.role, "status": job.status(), "error": job.error,
                           "test_size": len(self.splits.test_y), "val_size": len(self.splits.val_y),
                           "placement": job.placement, "started_at": job.started_at,
                           "summary": job.summary,
                           "history": job.history}
                for job in scheduler.models()
                if not begun_only or job.started_at is not None or job.history or job.error}


def model_hparams(cfg: RunConfig, spec) -> dict:
    """What TensorBoard's HParams view shows of one model: its layers and training recipe."""
    model, train, extra = cfg.generalists.model, cfg.generalists.train, {}
    if spec.role == "specialist":
        spec_cfg = cfg.specialists
        train, extra = spec_cfg.train, {"fraction": spec_cfg.fraction,
                                        "soft_weight": spec_cfg.soft_weight,
                                        "soft_temperature": spec_cfg.soft_temperature}
    elif spec.role == "student":
        student = cfg.students[spec.key.split(".", 1)[1]]
        model, train = student.model, student.train
        extra = {"temperature": student.temperature, "alpha": student.alpha,
                 "soft_targets": student.soft_targets if student.uses_teacher else "none",
                 "transfer": ("without " + ",".join(map(str, student.drop_classes))
                              if student.drop_classes else
                              "only " + ",".join(map(str, student.keep_classes))
                              if student.keep_classes else "all"),
                 "transfer_size": student.transfer_size}
    return {"role": spec.role, "hidden": "x".join(map(str, model.hidden)), "kind": model.kind,
            "dropout_in": model.dropout_in, "dropout_hidden": model.dropout_hidden,
            "max_norm": model.max_norm, "epochs": train.epochs, "batch_size": train.batch_size,
            "lr": train.lr, "schedule": train.schedule, "augment": ",".join(train.augment),
            "precision": train.precision, **extra}
