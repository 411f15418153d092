"""Shared fixtures: tiny synthetic data written as IDX files, and one local Ray per session."""
import shutil
import tempfile

import numpy as np
import pytest

from ensemble.data import write_idx


def synthetic_digits(n: int, seed: int, size: int = 8, classes: int = 10):
    """Learnable images: class c lights up its own block of pixels, plus noise. uint8 (n,size,size)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = rng.integers(0, 50, (n, size * size)).astype(np.uint8)
    block = size * size // classes
    for c in range(classes):
        images[labels == c, c * block:(c + 1) * block] += 200
    images = images.reshape(n, size, size)
    return images, labels


def write_mnist_like(root, name: str = "mnist", n_train: int = 600, n_test: int = 200,
                     gz: bool = True):
    """ROOT/<name>/{train,t10k}-{images,labels}-idx?-ubyte[.gz] of synthetic digits."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for part, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(folder / f"{part}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{part}-labels-idx1-ubyte{suffix}", labels)
    return root


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return write_mnist_like(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting one costs ~8 s and ~2.5 GB)."""
    import ray

    temp = tempfile.mkdtemp(prefix="ray-t")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, namespace="ensemble-tests",
             logging_level="ERROR")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


SPECIALISTS = """
name: tiny-specialists
data: {val_size: 100, download: false}
generalists:
  count: 1
  model: {hidden: [32, 32], dropout_in: 0.0, dropout_hidden: 0.1}
  train: {epochs: 2, batch_size: 50, lr: 0.3, augment: []}
specialists:
  k: 3
  train: {epochs: 1, batch_size: 50, lr: 0.1, augment: []}
students:
  all:
    model: {hidden: [16]}
    train: {epochs: 1, batch_size: 50, lr: 0.3}
    temperature: 2.0
    soft_targets: ensemble
  all-T4:               # the same but for T: with 'all', a temperature x width grid
    model: {hidden: [16]}
    train: {epochs: 1, batch_size: 50, lr: 0.3}
    temperature: 4.0
    soft_targets: ensemble
"""


@pytest.fixture(scope="session")
def specialists_run(ray_session, data_root, tmp_path_factory):
    """`ensemble run` of every stage (generalist, coordinator, specialists, students) on the tiny
    data: (the run directory, what it printed). Tests may add files to it, not change it."""
    import contextlib
    import io

    from ensemble.cli import main

    tmp = tmp_path_factory.mktemp("specialists")
    config = tmp / "spec.yaml"
    config.write_text(SPECIALISTS)
    run = tmp / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir", str(run)]) == 0
    return run, out.getvalue()


# ---------------------------------------------------------------- the reliability report ---------
# `ENSEMBLE_RELIABILITY=results/reliability.md pytest` writes the README's reliability figures
# from this test run's own outcomes.
_OUTCOMES: dict[str, bool] = {}
_GROUPS = {
    "faults injected and survived": ("tests/test_faults.py::", "tests/test_processes.py::",
                                     "tests/test_parallel.py::test_a_killed_worker"),
    "bad inputs refused cleanly": ("tests/test_cli.py::test_bad", "tests/test_config.py::test_bad",
                                   "tests/test_parallel.py::test_bad"),
    "resume equal to an uninterrupted run": (
        "tests/test_train.py::test_resume_is_bit_identical",
        "tests/test_specialize.py::test_specialist_trains_measures_and_resumes",
        "tests/test_faults.py::test_killed_actor_resumes_to_identical_weights",
        "tests/test_models.py::test_factory_model_resumes_bit_exactly",
        "tests/test_parallel.py::test_a_killed_worker"),
}


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _OUTCOMES[report.nodeid] = report.passed and _OUTCOMES.get(report.nodeid, True)


def pytest_terminal_summary(terminalreporter):
    import os
    from pathlib import Path

    target = os.environ.get("ENSEMBLE_RELIABILITY")
    if not target:
        return
    lines = ["| guarantee | passed |", "|---|---:|"]
    for label, prefixes in _GROUPS.items():
        hits = [ok for node, ok in _OUTCOMES.items() if node.startswith(prefixes)]
        if label.startswith("resume"):
            value = "yes" if hits and all(hits) else "no"
            value += f" ({sum(hits)}/{len(hits)} tests)"
        else:
            value = f"{sum(hits)}/{len(hits)}"
        lines.append(f"| {label} | {value} |")
    lines += ["", "## Bad inputs, one row per distinct case", "",
              "Each case: one sentence on stderr, a non-zero exit, no run directory made and any "
              "existing one byte for byte unchanged. The input is the test's parameter (for "
              "config values, the keys as `--set` would give them).", "",
              "| test | bad input | passed |", "|---|---|---|"]
    for node, ok in _OUTCOMES.items():
        if node.startswith(_GROUPS["bad inputs refused cleanly"]):
            test, _, case = node.split("::", 1)[1].partition("[")
            test = test.removeprefix("test_bad_").replace("_", " ")
            case, test = (case[:-1], test) if case else (test, "–")
            lines.append(f"| {test} | {case.replace('|', '/')} | {'yes' if ok else 'no'} |")
    Path(target).write_text("\n".join(lines) + "\n")
