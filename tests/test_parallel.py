"""One model over several ranks (ensemble.parallel): the same steps as one process takes."""
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ensemble import checkpoint
from ensemble.cli import main
from ensemble.config import DataConfig, ModelConfig, TrainConfig
from ensemble.data import load_splits
from ensemble.parallel import ParallelTrainer
from ensemble.train import Trainer
from tests.conftest import write_mnist_like
from tests.test_faults import run_in_thread

MODEL = ModelConfig(hidden=(32, 32), dropout_in=0.0, dropout_hidden=0.0, max_norm=2.0)
# 400 training examples in batches of 57, each split 29 + 28; the last holds one example, fewer
# than the ranks: each takes it whole (an empty share's loss would be NaN)
TRAIN = TrainConfig(epochs=2, batch_size=57, lr=0.1, augment=("flip", "translate:1"))
TOLERANCE = 1e-5  # the all-reduce sums two halves where one process sums the whole batch


def _rank(rank: int, world: int, splits, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        trainer = ParallelTrainer("g", MODEL, TRAIN, splits, seed=7, device="cpu")
        trainer.join(rank, world)
        records = [trainer.train_epoch() for _ in range(TRAIN.epochs)]
        if rank == 0:
            torch.save({"state": trainer.model.state_dict(), "records": records}, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_train_the_weights_of_one_process(data_root, tmp_path):
    splits = load_splits(DataConfig(val_size=200, download=False), data_root)
    out = tmp_path / "ranks.pt"
    mp.spawn(_rank, args=(2, splits, str(tmp_path / "store"), str(out)), nprocs=2)
    two = torch.load(out)
    torch.set_num_threads(1)
    one = Trainer("g", MODEL, TRAIN, splits, seed=7, device="cpu")
    records = [one.train_epoch() for _ in range(TRAIN.epochs)]
    for key, value in one.model.state_dict().items():
        torch.testing.assert_close(two["state"][key], value, rtol=0, atol=TOLERANCE)
    start = Trainer("g", MODEL, TRAIN, splits, seed=7, device="cpu").model.state_dict()
    assert all(not torch.equal(start[k], v) for k, v in one.model.state_dict().items())
    for a, b in zip(two["records"], records):  # the epoch's loss is over every rank's examples
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["val_errors"] == b["val_errors"] and a["test_errors"] == b["test_errors"]


def test_a_ranks_share_of_a_batch():
    t = ParallelTrainer.__new__(ParallelTrainer)
    t.world = 3
    parts = []
    for rank in range(3):
        t.rank = rank
        parts.append(t.share(8))
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 8)]
    for rank in range(3):  # fewer examples than ranks: each rank's share is the whole batch
        t.rank = rank
        assert (t.share(2).start, t.share(2).stop) == (0, 2)


CONFIG = """
name: parallel
data: {val_size: 200, download: false}
generalists:
  model: {hidden: [64, 64], dropout_in: 0.0, dropout_hidden: 0.0, max_norm: 3.0}
  train: {epochs: 2, batch_size: 64, lr: 0.1, augment: [flip, translate:1]}
  resources: {workers: WORKERS}
"""


def model_weights(run, name="generalist-0"):
    blob, meta = checkpoint.load_latest(run / "checkpoints" / name)
    tensors = checkpoint.loads(blob)[0]
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "best."))}, meta


def one_and_two_workers(template: str, data_root, tmp_path) -> dict[int, object]:
    """Run directories of `template` with WORKERS 1 and 2, each run through `ensemble run`."""
    runs = {}
    for workers in (1, 2):
        config = tmp_path / f"w{workers}.yaml"
        config.write_text(template.replace("WORKERS", str(workers)))
        runs[workers] = tmp_path / f"run{workers}"
        assert main(["run", str(config), "--data-dir", str(data_root),
                     "--run-dir", str(runs[workers])]) == 0
    return runs


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_workers_train_the_model_one_actor_would(ray_session, data_root, tmp_path):
    """`resources.workers: 2` through `ensemble run`: Ray Train's two gloo workers leave the
    checkpoint one actor leaves, up to the all-reduce's rounding, in the same format; a run of
    one epoch, resumed for a second, ends where the two-epoch run did."""
    runs = one_and_two_workers(CONFIG, data_root, tmp_path)
    one, meta_one = model_weights(runs[1])
    two, meta_two = model_weights(runs[2])
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=TOLERANCE)
    assert [r["epoch"] for r in meta_two["history"]] == [1, 2]
    assert meta_two["summary"]["test_errors"] == meta_one["summary"]["test_errors"]

    resumed = tmp_path / "resumed"
    assert main(["run", str(tmp_path / "w2.yaml"), "--data-dir", str(data_root), "--run-dir",
                 str(resumed), "--set", "generalists.train.epochs=1"]) == 0
    assert main(["run", "--resume", str(resumed), "--data-dir", str(data_root),
                 "--set", "generalists.train.epochs=2"]) == 0
    weights, meta = model_weights(resumed)
    assert [r["epoch"] for r in meta["history"]] == [1, 2]
    for key, value in two.items():
        assert torch.equal(weights[key], value), key


@pytest.mark.ray
@pytest.mark.slow
def test_bad_workers_the_cluster_cannot_hold_are_refused_at_once(ray_session, data_root,
                                                                 tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.replace("WORKERS", "3").replace("batch_size: 64", "batch_size: 60"))
    run = tmp_path / "run"
    assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "generalist-0 asks for 3 workers with 3 CPU in all, but this Ray cluster has 2" in err
    assert err.count("\n") == 1 and not run.exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(ray_session, tmp_path):
    """SIGKILL rank 1 once the first checkpoint exists: Ray Train restarts the group, its ranks
    resume from the checkpoint the Group actor holds, and the run ends with every epoch once
    and the weights of a run never interrupted (dropout included: its masks are seeded)."""
    data = write_mnist_like(tmp_path / "data", n_train=3000, n_test=200)
    config = tmp_path / "kill.yaml"
    config.write_text(CONFIG.replace("WORKERS", "2").replace("epochs: 2", "epochs: 6")
                      .replace("dropout_hidden: 0.0", "dropout_hidden: 0.2")
                      .replace("batch_size: 64", "batch_size: 20"))
    argv = ["run", str(config), "--data-dir", str(data)]
    killed = tmp_path / "killed"
    thread, result = run_in_thread(argv + ["--run-dir", str(killed)])
    folder = killed / "checkpoints" / "generalist-0"
    deadline = time.time() + 180
    while not (folder / "epoch-0001.safetensors").exists():
        assert time.time() < deadline and thread.is_alive(), "the run never checkpointed"
        time.sleep(0.01)
    group = ray_session.get_actor("generalist-0", namespace=f"ensemble-{killed.name}")
    ranks = ray_session.get(group.where.remote())
    while len(ranks) < 2:  # each rank registers itself; wait for the fact, not a time
        assert time.time() < deadline, "rank 1 never registered"
        ranks = ray_session.get(group.where.remote())
    last = checkpoint.epochs_in(folder)[0][0]
    os.kill(ranks[1]["pid"], signal.SIGKILL)
    thread.join(timeout=300)
    assert result == [0] and last < 6
    weights, meta = model_weights(killed)
    assert [r["epoch"] for r in meta["history"]] == [1, 2, 3, 4, 5, 6]
    straight = tmp_path / "straight"
    assert main(argv + ["--run-dir", str(straight)]) == 0
    for key, value in model_weights(straight)[0].items():
        assert torch.equal(weights[key], value), key


STUDENTS = CONFIG.replace("WORKERS", "1") + """
students:
  s:
    model: {hidden: [32], dropout_in: 0.0, dropout_hidden: 0.0}
    train: {epochs: 2, batch_size: 64, lr: 0.1, augment: [translate:1]}
    temperature: 4.0
    resources: {workers: WORKERS}
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_student_over_two_workers_learns_what_one_actor_learns(ray_session, data_root,
                                                                 tmp_path):
    """A distilled student on an augmented transfer set (its teacher asked per batch, on each
    rank's share) over two workers ends within the all-reduce's rounding of one actor."""
    runs = one_and_two_workers(STUDENTS, data_root, tmp_path)
    one, _ = model_weights(runs[1], "student-s")
    two, meta = model_weights(runs[2], "student-s")
    assert meta["targets_from"] == "per batch" and [r["epoch"] for r in meta["history"]] == [1, 2]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=TOLERANCE)
