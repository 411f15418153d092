"""What a run leaves on the machine, checked on runs of their own (subprocesses): a local Ray
listens on loopback only, and after a normal end, an error or Ctrl-C no process it started is
left; a node of a multi-node cluster dies under a specialist and the run still completes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import write_mnist_like

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = """
name: procs
data: {val_size: 200, download: false}
generalists:
  count: 1
  model: {hidden: [256, 256], dropout_in: 0.1, dropout_hidden: 0.3}
  train: {epochs: EPOCHS, batch_size: 20, lr: 0.1, augment: [translate:1]}
"""
BLOWS_UP = """
students:
  blows-up: {model: {hidden: [16]}, train: {epochs: 2, batch_size: 50, lr: 1.0e+12}, alpha: 0.0}
"""
LOOPBACK = ("127.", "::1", "::ffff:127.")


@pytest.fixture
def scratch():
    """A short temporary folder (Ray's socket paths are limited) that every Ray started from a
    test's subprocess uses as TMPDIR, so nothing lands in /tmp/ray."""
    path = Path(tempfile.mkdtemp(prefix="p"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def listening(procs):
    """(address, process name) of every listening inet socket of `procs`."""
    out = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.Error:  # it ended meanwhile
            continue
        out += [(f"{c.laddr.ip}:{c.laddr.port}", name) for c in conns
                if c.status == psutil.CONN_LISTEN]
    return out


def default_sigint():
    """As in a terminal: a test run started in the background (`pytest &`) inherits SIGINT
    ignored, and Python keeps an inherited SIG_IGN, so Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(path: Path, proc: subprocess.Popen, limit: float = 180):
    deadline = time.time() + limit
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared"
        assert time.time() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def ctrl_c(driver: subprocess.Popen) -> tuple[str, float]:
    """Ctrl-C as a terminal sends it (to the driver's process group): (its stderr, seconds
    until it ended); SIGKILL if it never does."""
    os.killpg(driver.pid, signal.SIGINT)
    sent = time.time()
    try:
        err = driver.communicate(timeout=120)[1]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    return err, time.time() - sent


def started_when(path: Path, driver: subprocess.Popen) -> list:
    """The processes the driver has started once `path` exists (the driver killed if it never
    does)."""
    try:
        wait_for(path, driver)
        return psutil.Process(driver.pid).children(recursive=True)
    except BaseException:
        os.killpg(driver.pid, signal.SIGKILL)
        raise


def left_behind(started: list, limit: float = 30) -> list:
    """Those of `started` still running after up to `limit` seconds."""
    deadline = time.time() + limit
    while any(p.is_running() for p in started) and time.time() < deadline:
        time.sleep(0.2)
    return [p for p in started if p.is_running()]


@pytest.mark.parametrize("end", ["normal", "error", "interrupt", "terminate"])
def test_local_run_listens_on_loopback_and_leaves_nothing(end, tmp_path, scratch):
    """... and SIGTERM (`kill`, `timeout`, `ray job stop`) to the driver alone stops it as
    Ctrl-C does: exit 143, the line to resume, no stack dump from Ray's signal handler."""
    data = write_mnist_like(tmp_path / "data", n_train=4000, n_test=200)
    config = tmp_path / "c.yaml"
    epochs = 2000 if end in ("interrupt", "terminate") else 4  # stopped long before its end
    config.write_text(CONFIG.replace("EPOCHS", str(epochs)) + (BLOWS_UP if end == "error" else ""))
    run = tmp_path / "run"
    driver = subprocess.Popen(
        [sys.executable, "-m", "ensemble.cli", "run", str(config), "--data-dir", str(data),
         "--run-dir", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(scratch)}, start_new_session=True,
        preexec_fn=default_sigint)
    try:
        wait_for(run / "checkpoints" / "generalist-0" / "epoch-0001.safetensors", driver)
        started = psutil.Process(driver.pid).children(recursive=True)
        sockets = listening([psutil.Process(driver.pid), *started])
        if end == "interrupt":
            os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        if end == "terminate":
            os.kill(driver.pid, signal.SIGTERM)
        err = driver.communicate(timeout=180)[1]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert len(started) >= 3  # Ray's servers and the actor's worker were running
    assert sockets and all(addr.startswith(LOOPBACK) for addr, _ in sockets), sockets
    assert driver.returncode == {"normal": 0, "error": 5, "interrupt": 130,
                                 "terminate": 143}[end], err
    if end in ("interrupt", "terminate"):
        how = "interrupted" if end == "interrupt" else "terminated"
        assert f"{how}; continue with: ensemble run --resume {run}" in err, err
        assert "SIGTERM received" not in err, err
    if end == "error":  # the failed epoch's two results both read: no "Unhandled error" dump
        assert "student-blows-up" in err and "Unhandled error" not in err, err
    if end == "normal":  # a local Ray's workers inherit the setting that hides unassigned GPUs
        placed = json.loads((run / "metrics.json").read_text())["models"]["generalist-0"]
        assert placed["placement"]["device"] == "cpu"
        assert placed["placement"]["visible_devices"] == ""
    deadline = time.time() + 30
    while any(p.is_running() for p in started) and time.time() < deadline:
        time.sleep(0.2)
    left = [f"{p.pid} {p.name()}" for p in started if p.is_running()]
    assert not left, f"processes left behind: {left}"
    assert not list(scratch.glob("ray*")), "Ray's temporary directory was left behind"


SPECIALISTS = """
name: nodes
data: {val_size: 200, download: false}
generalists:
  model: {hidden: [64], dropout_in: 0.0, dropout_hidden: 0.1}
  train: {epochs: 2, batch_size: 50, lr: 0.3, augment: []}
specialists:
  k: 2
  train: {epochs: 8, batch_size: 20, lr: 0.1, augment: []}
  resources: {max_restarts: 2, max_task_retries: 2}
"""


def run_scenario(name, config_text, tmp_path, scratch, cwd=None):
    """Run tests/multinode.py's scenario `name` on a fresh cluster; return its report."""
    data = write_mnist_like(tmp_path / "data", n_train=4000, n_test=200)
    config = tmp_path / "c.yaml"
    config.write_text(config_text)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tests.multinode", name, str(config),
                           str(data), str(run)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(scratch),
                               "PYTHONPATH": str(Path(__file__).parents[1])}, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["exit"] == [0], report
    return report, json.loads((run / "metrics.json").read_text())["models"]


def test_node_removed_under_a_specialist(tmp_path, scratch):
    # the run waits while the node goes, so specialist-0 has at least 6 of its 8 epochs ahead
    report, models = run_scenario("node_removal", SPECIALISTS, tmp_path, scratch)
    assert report["removed_after_epoch"] == 1
    assert report["removed"] not in report["alive"]  # the node is gone, its actor with it ...
    assert report["actor_killed"]
    assert all(m["status"] == "finished" for m in models.values()), models
    assert [r["epoch"] for r in models["specialist-0"]["history"]] == list(range(1, 9))
    # ... and the restarted actor trained the epochs after it elsewhere, on a live node
    after = models["specialist-0"]["placement"]["node"]
    assert after != report["removed"] and after in report["alive"]


PLACEMENT = """
name: placed
data: {val_size: 200, download: false}
generalists:
  count: 2
  model: {hidden: [32], dropout_in: 0.0, dropout_hidden: 0.0}
  train: {epochs: 2, batch_size: 50, lr: 0.3}
x-student: &student
  model: {hidden: [16]}
  train: {epochs: 2, batch_size: 50, lr: 0.3}
  resources: {num_cpus: 1, num_gpus: 0.25}
students: {s0: *student, s1: *student, s2: *student, s3: *student}
"""


def test_placement_spreads_and_packs_fractional_gpus(tmp_path, scratch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    report, models = run_scenario("placement", PLACEMENT, tmp_path, scratch, cwd=workdir)
    assert all(m["status"] == "finished" for m in models.values()), models
    # the two generalists ask for one CPU each: spread over the two workers
    assert {models[f"generalist-{i}"]["placement"]["node"] for i in (0, 1)} == \
        {report["gpu_node"], report["cpu_node"]}
    assert all(models[f"generalist-{i}"]["placement"]["gpu_ids"] == [] for i in (0, 1))
    # four students at 0.25 GPU: all on the one (fake) GPU, which they fill exactly
    students = [models[f"student-s{i}"]["placement"] for i in range(4)]
    assert all(p["node"] == report["gpu_node"] and p["gpu_ids"] == ["0"] for p in students)
    # the driver wrote every artefact into the run directory; nothing else was written
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == \
        ["checkpoints", "config.yaml", "metrics.json", "summary.md", "tb"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == \
        sorted(models)
    assert not list(workdir.iterdir())
    # each worker node ran in a working directory of its own, and no actor wrote there
    for kind in ("gpu", "cpu"):
        assert report["cwd"][kind] == str(tmp_path / f"node-{kind}")
        assert not list((tmp_path / f"node-{kind}").iterdir())


ENSEMBLE_RUN = """
name: cpus
data: {val_size: 200, download: false}
generalists:
  model: {hidden: [32], dropout_in: 0.0, dropout_hidden: 0.0}
  train: {epochs: 2, batch_size: 50, lr: 0.3, augment: []}
specialists:
  k: 2
  train: {epochs: EPOCHS, batch_size: 50, lr: 0.1, augment: []}
students:
  from-ensemble: {model: {hidden: [16]}, train: {epochs: EPOCHS, batch_size: 50},
                  temperature: 2.0, soft_targets: ensemble}
"""  # generalist, coordinator, specialists, then a student of the ensemble
NO_GPU_ASKED = ENSEMBLE_RUN.replace("EPOCHS", "1")


def test_models_that_ask_for_no_gpu_stay_on_cpu_where_cuda_seems_present(tmp_path, scratch):
    # Ray 2.58 leaves every GPU visible to a worker assigned none: these models would train on
    # cuda:0 (here, fail: there is no GPU) if the device followed torch's view, not Ray's
    report, models = run_scenario("fake_gpus", NO_GPU_ASKED, tmp_path, scratch)
    assert report["believes_cuda"] is True  # the workers were fooled: the check below can fail
    assert {name.rsplit("-", 1)[0] for name in models} == {"generalist", "specialist",
                                                           "student-from"}
    for name, model in models.items():
        assert model["status"] == "finished", (name, model["error"])
        assert model["placement"]["gpu_ids"] == [], name
        assert model["placement"]["device"] == "cpu", name
        assert model["placement"]["visible_devices"] == "", name  # CUDA hidden from it too
    run = tmp_path / "run"
    for task in ("subsets.json", "ensemble.json"):  # the coordinator and eq. 5's evaluation
        assert json.loads((run / task).read_text())["device"] == "cpu", task


MANY = CONFIG.replace("count: 1", "count: 40").replace("EPOCHS", "2000")  # 40 for 2 CPUs


def test_ctrl_c_while_models_queue_stops_at_once_and_leaves_nothing(tmp_path, scratch):
    # 40 models for 2 CPUs: the driver starts the actors there is room for and queues the rest;
    # Ctrl-C as the first actors start ends the run within seconds, leaving no process
    data = write_mnist_like(tmp_path / "data", n_train=4000, n_test=200)
    config = tmp_path / "c.yaml"
    config.write_text(MANY)
    run = tmp_path / "run"
    driver = subprocess.Popen(
        [sys.executable, "-m", "ensemble.cli", "run", str(config), "--data-dir", str(data),
         "--run-dir", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(scratch)}, start_new_session=True,
        preexec_fn=default_sigint)
    started = started_when(run / "config.yaml", driver)  # just before the first actors start
    err, took = ctrl_c(driver)
    assert driver.returncode == 130, err
    assert f"interrupted; continue with: ensemble run --resume {run}" in err, err
    assert took < 30, took
    assert not left_behind(started), "processes left behind"
    assert not list(scratch.glob("ray*")), "Ray's temporary directory was left behind"


@pytest.mark.parametrize("stage, marker", [
    ("specialists being started", "subsets.json"),
    ("specialists training", "checkpoints/specialist-0/epoch-0001.safetensors"),
    ("a student of the ensemble training",
     "checkpoints/student-from-ensemble/epoch-0001.safetensors"),
])
def test_ctrl_c_at_each_stage_stops_and_resumes_to_the_end(stage, marker, tmp_path, scratch):
    """Ctrl-C once `marker` appears: exit 130 within seconds, no process of the run left; then
    --resume finishes every model."""
    data = write_mnist_like(tmp_path / "data", n_train=2000, n_test=200)
    config = tmp_path / "c.yaml"
    config.write_text(ENSEMBLE_RUN.replace("EPOCHS", "60"))  # many epochs left at the signal
    run = tmp_path / "run"
    command = [sys.executable, "-m", "ensemble.cli", "run", "--data-dir", str(data)]
    env = {**os.environ, "TMPDIR": str(scratch)}
    driver = subprocess.Popen(command + [str(config), "--run-dir", str(run)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env, start_new_session=True, preexec_fn=default_sigint)
    started = started_when(run / marker, driver)
    err, took = ctrl_c(driver)
    assert driver.returncode == 130, err
    assert took < 30, (stage, took)
    assert not left_behind(started), f"processes left behind ({stage})"
    resumed = subprocess.run(command + ["--resume", str(run)], capture_output=True, text=True,
                             env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    models = json.loads((run / "metrics.json").read_text())["models"]
    assert {m["status"] for m in models.values()} == {"finished"}, stage
    assert {"generalist-0", "student-from-ensemble"} <= set(models) and \
        any(n.startswith("specialist-") for n in models)
