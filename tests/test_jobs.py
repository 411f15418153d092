"""`ray job submit --working-dir . -- python -m ensemble.cli run CONFIG` against a head started
for this test alone (`ray start --head` on 127.0.0.1 with its own temporary directory); the head
is stopped by the process ids it started, never by a bare `ray stop`. Run alone with
`pytest -m jobs`."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import write_mnist_like

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.jobs]

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
CONFIG = """
name: submitted
data: {val_size: 200, download: false}
generalists:
  model: {hidden: [32], dropout_in: 0.0, dropout_hidden: 0.0}
  train: {epochs: 2, batch_size: 50, lr: 0.3}
students:
  small: {model: {hidden: [16]}, train: {epochs: 2, batch_size: 50, lr: 0.3}, temperature: 4.0}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def started_by(marker: str) -> list[psutil.Process]:
    """The processes whose command line names `marker` (the head's temporary directory), and
    everything they started (workers rename themselves)."""
    roots = [p for p in psutil.process_iter(["cmdline"])
             if marker in " ".join(p.info["cmdline"] or [])]
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    return list(found.values())


def stop(procs: list[psutil.Process]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        procs = alive
    assert not procs, f"could not stop {procs}"


def test_ray_job_submit_runs_ensemble(tmp_path):
    scratch = Path(tempfile.mkdtemp(prefix="j"))  # short: Ray's socket paths are limited
    env = {**os.environ, "TMPDIR": str(scratch), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # as if
    # the project's environment were activated, so the job's `python` is its python
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    head = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port",
            str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port",
            str(dashboard), "--num-cpus", "2", "--temp-dir", str(scratch / "ray"),
            "--disable-usage-stats"]
    # every port Ray would otherwise take from its fixed defaults, which another Ray on this
    # machine (the test session's) may hold: a dashboard agent that cannot bind its port
    # leaves the head with "no available agent to submit job"
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port"):
        head += [flag, str(free_port())]
    env.update(AUTOSCALER_METRIC_PORT=str(free_port()), DASHBOARD_METRIC_PORT=str(free_port()))
    data = write_mnist_like(tmp_path / "data", n_train=1000, n_test=200)
    config = tmp_path / "submitted.yaml"
    config.write_text(CONFIG)
    run = tmp_path / "run"
    started = []
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        started = started_by(str(scratch / "ray"))
        assert started, "ray start left no process to stop"
        address = f"http://127.0.0.1:{dashboard}"
        for _ in range(60):  # the job API answers a little after `ray start` returns
            if subprocess.run([RAY, "job", "list", "--address", address], env=env,
                              capture_output=True).returncode == 0:
                break
            time.sleep(1)
        for _ in range(15):  # the head's job agent may still be starting: it says so
            job = subprocess.run(
                [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                 "python", "-m", "ensemble.cli", "run", str(config), "--data-dir", str(data),
                 "--run-dir", str(run)], env=env, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in job.stderr + job.stdout:
                break
            time.sleep(2)
        started = started_by(str(scratch / "ray"))  # the job's own processes too
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + \
            job.stderr[-3000:]
    finally:
        stop(started)
        shutil.rmtree(scratch, ignore_errors=True)
    # the job connected to the head (RAY_ADDRESS) instead of starting a Ray of its own, and its
    # driver wrote the run directory
    assert "ray: the cluster at " in job.stdout and "student-small" in job.stdout
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.json", "summary.md"}
    assert (run / "checkpoints" / "student-small" / "epoch-0002.safetensors").exists()
