"""The scheduler's queue, without Ray: a series of models alike (the generalists) is made into
jobs one at a time as the queue reaches them, so the driver's memory does not grow with the
number of models waiting."""
import functools

from ensemble.scheduler import JobSpec, Scheduler


class Recorder:
    """What the scheduler asks of a recorder before anything runs: saved checkpoints."""

    def __init__(self, finished: int = 0):
        self.finished = finished  # generalist-0 .. finished-1 finished in an earlier session

    def saved(self, name):
        done = {f"generalist-{i}" for i in range(self.finished)}
        if name not in done:
            return None
        return b"blob", {"epoch": 2, "history": [{"epoch": 1}, {"epoch": 2}], "summary": {}}

    def line(self, text):
        pass


def plan(count: int, finished: int = 0) -> Scheduler:
    sched = Scheduler(Recorder(finished), "ns", "cpu", watchdog_s=0, scale_up_s=0)

    def add(i):
        return sched.train(JobSpec(f"generalist-{i}", "generalist", "generalists", i, epochs=2,
                                   critical=True), functools.partial(tuple))

    sched.train_series("generalists", count, add)
    sched.step(JobSpec("after", "step", waits_for=("generalists",)), lambda job: None)
    return sched


def test_a_series_holds_one_waiting_model_however_many_are_queued():
    sched = plan(100_000)
    assert list(sched.jobs) == ["generalist-0", "after"]
    sched.jobs["generalist-0"].actor = object()  # started: the next one joins the queue
    sched._extend()
    assert [j.name for j in sched.members("generalists")] == ["generalist-0", "generalist-1"]
    sched._extend()  # generalist-1 still waits: nothing more
    assert len(sched.members("generalists")) == 2
    sched.jobs["generalist-1"].error = "failed"  # a failed one makes room as well
    sched._extend()
    assert len(sched.members("generalists")) == 3
    assert sched._failed(("generalists",)) == ["generalist-1"]
    assert not sched._ok("generalists")


def test_a_resumed_series_adds_its_finished_models_and_the_first_left_to_train():
    sched = plan(5, finished=3)
    assert [j.name for j in sched.members("generalists")] == [f"generalist-{i}" for i in range(4)]
    assert [j.finished for j in sched.members("generalists")] == [True, True, True, False]
    assert not sched._ok("generalists")  # two are not even queued yet
    finished = plan(2, finished=2)
    assert finished._ok("generalists")
    assert [j.name for j in finished.models()] == ["generalist-0", "generalist-1"]


def test_models_keep_the_order_planned_though_a_series_grows_later():
    sched = plan(3)
    sched.train(JobSpec("student-s", "student", "students.s", epochs=2), functools.partial(tuple))
    for i in range(3):
        sched.jobs[f"generalist-{i}"].actor = object()
        sched._extend()
    assert list(sched.jobs)[-1] == "generalist-2"  # added last ...
    assert [j.name for j in sched.models()] == ["generalist-0", "generalist-1", "generalist-2",
                                                "student-s"]  # ... listed where planned


def test_generalists_queued_one_at_a_time_still_start_before_other_jobs(monkeypatch):
    """Critical jobs first: with room for two, the second generalist (added only once the first
    started) must start before a student that waits for nothing."""
    from ensemble import scheduler as module

    monkeypatch.setattr(module.ray, "cluster_resources", lambda: {"CPU": 2})
    monkeypatch.setattr(module, "live_nodes", lambda: [{"CPU": 2}])
    monkeypatch.setattr(module, "fits_a_live_node", lambda res, nodes=None: True)
    sched = plan(3)
    sched.train(JobSpec("student-hard", "student", "students.hard", epochs=2),
                functools.partial(tuple))
    started = []

    def start(job, cluster):
        started.append(job.name)
        job.actor = object()
        sched.active[object()] = job, None

    monkeypatch.setattr(sched, "_start", start)
    sched._start_ready()
    assert started == ["generalist-0", "generalist-1"]
