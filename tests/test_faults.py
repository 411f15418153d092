"""Faults injected for real: on the shared local Ray, a training actor is SIGKILLed mid-run; a
process is SIGKILLed inside checkpoint.write_atomic."""
import os
import shutil
import signal
import tempfile
import threading
import time

import pytest
import torch

from ensemble import checkpoint
from ensemble.cli import main
from ensemble.errors import CheckpointError
from tests.conftest import write_mnist_like

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = """
name: fault
data: {val_size: 200, download: false}
generalists:
  count: 1
  model: {hidden: [256, 256], dropout_in: 0.1, dropout_hidden: 0.3, max_norm: 3.0}
  train: {epochs: 8, batch_size: 20, lr: 0.1, augment: [translate:1]}
  resources: {max_restarts: 2, max_task_retries: 2}
"""


def run_in_thread(argv):
    """Start `ensemble ARGV` in a thread; return (thread, list that receives its exit code)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(main(argv)))
    thread.start()
    return thread, result


def kill_after_first_checkpoint(ray, run, model, thread):
    """SIGKILL `model`'s actor once its first checkpoint exists (an event, not a timer); return
    the newest epoch checkpointed at the moment of the kill."""
    folder = run / "checkpoints" / model
    deadline = time.time() + 120
    while not (folder / "epoch-0001.safetensors").exists():
        assert time.time() < deadline and thread.is_alive(), "the run never checkpointed"
        time.sleep(0.01)
    actor = ray.get_actor(model, namespace=f"ensemble-{run.name}")
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    last = checkpoint.epochs_in(folder)[0][0]
    os.kill(pid, signal.SIGKILL)
    return last


def final_tensors(run):
    blob, meta = checkpoint.load_latest(run / "checkpoints" / "generalist-0")
    return checkpoint.loads(blob)[0], meta


def test_killed_actor_resumes_to_identical_weights(ray_session, tmp_path):
    data = write_mnist_like(tmp_path / "data", n_train=4000, n_test=200)
    config = tmp_path / "fault.yaml"
    config.write_text(CONFIG)
    argv = ["run", str(config), "--data-dir", str(data)]

    killed_run = tmp_path / "killed"
    thread, result = run_in_thread(argv + ["--run-dir", str(killed_run)])
    last = kill_after_first_checkpoint(ray_session, killed_run, "generalist-0", thread)
    thread.join(timeout=300)
    assert result == [0]
    assert last < 8  # the kill landed before the model finished, so Ray had to restart it

    straight_run = tmp_path / "straight"
    assert main(argv + ["--run-dir", str(straight_run)]) == 0
    killed, meta = final_tensors(killed_run)
    straight, _ = final_tensors(straight_run)
    assert meta["epoch"] == 8
    for key in straight:
        if key.startswith(("model.", "best.")):
            assert torch.equal(killed[key], straight[key]), key


NAN = """
name: nan
data: {val_size: 100, download: false}
generalists:
  count: 1
  model: {hidden: [32], dropout_in: 0.0, dropout_hidden: 0.0}
  train: {epochs: 1, batch_size: 50, lr: 0.3}
students:
  fine: {model: {hidden: [16]}, train: {epochs: 1, batch_size: 50, lr: 0.1}, alpha: 0.0}
  blows-up: {model: {hidden: [16]}, train: {epochs: 2, batch_size: 50, lr: 1.0e+12}, alpha: 0.0}
"""


def test_non_finite_loss_stops_only_that_model(ray_session, data_root, tmp_path, capsys):
    import json

    config = tmp_path / "nan.yaml"
    config.write_text(NAN)
    run = tmp_path / "run"
    assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir", str(run)]) == 5
    err = capsys.readouterr().err
    assert "student-blows-up" in err and "epoch 1" in err and "Traceback" not in err
    models = json.loads((run / "metrics.json").read_text())["models"]
    assert models["student-blows-up"]["status"] == "failed"
    assert models["student-fine"]["status"] == "finished"
    assert (run / "checkpoints" / "student-fine" / "epoch-0001.safetensors").exists()
    assert "Failed:" in (run / "summary.md").read_text()


WRITER = """
import os, signal, sys, torch
from ensemble import checkpoint

folder, where = sys.argv[1], sys.argv[2]
builtin_open = open


def stop_here():  # tell the test where this process stands, then wait for its SIGKILL
    print("stopped", flush=True)
    while True:
        signal.pause()


class HalfWritten:  # the file write_atomic opens: half its data reaches the disk, then the kill
    def __init__(self, *args, **kwargs):
        self.file = builtin_open(*args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[:len(data) // 2])
        self.file.flush()
        os.fsync(self.file.fileno())
        stop_here()


if where == "mid-write":
    checkpoint.open = HalfWritten  # write_atomic's open() resolves to this module global
else:  # before the rename: the new file is complete, not yet in place
    checkpoint.os.replace = lambda *args: stop_here()
checkpoint.save_epoch(folder, 2, checkpoint.dumps({"w": torch.full((4096,), 2.0)}, {"epoch": 2}))
"""


@pytest.mark.parametrize("where", ["mid-write", "before-rename"])
def test_interrupted_write_leaves_previous_checkpoint(where, tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "ckpt"
    blob = checkpoint.dumps({"w": torch.ones(4096)}, {"epoch": 1})
    second = checkpoint.dumps({"w": torch.full((4096,), 2.0)}, {"epoch": 2})  # as WRITER's
    first = checkpoint.save_epoch(folder, 1, blob)
    # a process SIGKILLed inside write_atomic, while it saves epoch 2
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), where],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = writer.stdout.readline()  # blocks until the writer stands where it was told to
        assert line == "stopped\n", writer.stderr.read()  # else it ended: why
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.communicate()
    assert writer.returncode == -signal.SIGKILL
    # the kill landed inside the write: half the new checkpoint, or all of it, is on disk
    written = [p for p in folder.iterdir() if p != first]
    assert len(written) == 1, written
    data = written[0].read_bytes()
    if where == "mid-write":
        assert len(data) == len(second) // 2
        with pytest.raises(CheckpointError):
            checkpoint.loads(data)
    else:
        tensors, meta = checkpoint.loads(data)
        assert meta["epoch"] == 2 and torch.equal(tensors["w"], torch.full((4096,), 2.0))
    # ... and none of them is taken for a checkpoint: the previous one is the newest
    assert checkpoint.epochs_in(folder) == [(1, first)]
    saved, meta = checkpoint.load_latest(folder)
    assert meta["epoch"] == 1 and saved == blob
    # the next save of that epoch replaces what the killed one left
    checkpoint.save_epoch(folder, 2, second)
    assert checkpoint.load_latest(folder) == (second, checkpoint.read_meta(second))
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0001.safetensors",
                                                        "epoch-0002.safetensors"]


BUDGET = """
name: budget
data: {val_size: 200, download: false}
generalists:
  count: 2
  model: {hidden: [256, 256], dropout_in: 0.1, dropout_hidden: 0.3}
  train: {epochs: 6, batch_size: 20, lr: 0.1}
  resources: {max_restarts: 0, max_task_retries: 0}
"""


def test_actor_past_its_restart_budget_fails_alone(ray_session, tmp_path, capsys):
    import json

    data = write_mnist_like(tmp_path / "data", n_train=4000, n_test=200)
    config = tmp_path / "budget.yaml"
    config.write_text(BUDGET)
    run = tmp_path / "budget-run"
    thread, result = run_in_thread(["run", str(config), "--data-dir", str(data), "--run-dir",
                                    str(run)])
    kill_after_first_checkpoint(ray_session, run, "generalist-1", thread)
    started = time.time()
    thread.join(timeout=300)
    assert result == [5] and time.time() - started < 120
    err = capsys.readouterr().err
    assert "generalist-1" in err and "Traceback" not in err
    models = json.loads((run / "metrics.json").read_text())["models"]
    assert models["generalist-1"]["status"] == "failed"
    assert models["generalist-0"]["status"] == "finished"
    assert checkpoint.load_latest(run / "checkpoints" / "generalist-1") is not None  # kept


def test_killed_driver_resumes_without_retraining(ray_session, tmp_path):
    import subprocess
    import sys

    data = write_mnist_like(tmp_path / "data", n_train=4000, n_test=200)
    config = tmp_path / "fault.yaml"
    config.write_text(CONFIG.replace("epochs: 8", "epochs: 30"))
    run = tmp_path / "driver-killed"
    short = tempfile.mkdtemp(prefix="t")  # the killed driver's Ray leaves its temp dir here
    driver = subprocess.Popen([sys.executable, "-m", "ensemble.cli", "run", str(config),
                               "--data-dir", str(data), "--run-dir", str(run)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "TMPDIR": short})
    folder = run / "checkpoints" / "generalist-0"
    deadline = time.time() + 180
    while not (folder / "epoch-0002.safetensors").exists():
        assert time.time() < deadline and driver.poll() is None, "the run never checkpointed"
        time.sleep(0.01)
    driver.kill()  # SIGKILL: no cleanup runs
    driver.wait()
    shutil.rmtree(short, ignore_errors=True)
    done = checkpoint.epochs_in(folder)[0][0]
    assert 2 <= done < 30
    saved = (folder / f"epoch-{done:04d}.safetensors").read_bytes()
    assert main(["run", "--resume", str(run), "--data-dir", str(data)]) == 0
    history = final_tensors(run)[1]["history"]
    assert [r["epoch"] for r in history] == list(range(1, 31))
    # the resumed run started from the last checkpoint, not from scratch: its epochs up to
    # `done` are the ones the killed driver wrote
    assert checkpoint.loads(saved)[1]["history"] == history[:done]


def test_watchdog_turns_a_silent_wait_into_an_error(ray_session, tmp_path, capsys):
    data = write_mnist_like(tmp_path / "data", n_train=4000, n_test=200)
    config = tmp_path / "slow.yaml"
    config.write_text(CONFIG + "watchdog_s: 0.5\n")  # no epoch of this model is that quick
    run = tmp_path / "slow"
    started = time.time()
    assert main(["run", str(config), "--data-dir", str(data), "--run-dir", str(run)]) == 5
    assert time.time() - started < 60
    err = capsys.readouterr().err
    assert "no model finished an epoch in 0.5 s" in err and "generalist-0 (CPU 1" in err


def test_request_beyond_every_node_type_fails_at_once(ray_session, data_root, tmp_path, capsys):
    config = tmp_path / "big.yaml"
    config.write_text(NAN.split("students:")[0] + AUTOSCALER.format(scale_up_s=1))
    run = tmp_path / "run"
    started = time.time()
    assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir", str(run),
                 "--set", "generalists.resources.num_cpus=16"]) == 2
    assert time.time() - started < 30
    err = capsys.readouterr().err
    assert "generalist-0 asks for 16 CPU" in err and "autoscaler.node_types (at most 8)" in err
    assert not run.exists()


AUTOSCALER = """
autoscaler:
  node_types: [{{num_cpus: 8}}, {{num_cpus: 4, num_gpus: 1}}]
  scale_up_s: {scale_up_s}
"""


def test_waiting_for_a_new_node_has_its_own_bound(ray_session, data_root, tmp_path, capsys):
    # the session's Ray has no GPU, but the autoscaler could add a node with one: the run waits
    # for it scale_up_s (3 s), not watchdog_s (0.5 s), then stops naming the model
    config = tmp_path / "scale.yaml"
    config.write_text(NAN.split("students:")[0] + "watchdog_s: 0.5\n" +
                      AUTOSCALER.format(scale_up_s=3))
    run = tmp_path / "run"
    started = time.time()
    assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir", str(run),
                 "--set", "generalists.resources.num_gpus=1"]) == 5
    assert 3 <= time.time() - started < 60
    err = capsys.readouterr().err
    assert "waited 3 s (autoscaler.scale_up_s) for the autoscaler to add a node for " \
           "generalist-0 (CPU 1, GPU 1)" in err and "Traceback" not in err
