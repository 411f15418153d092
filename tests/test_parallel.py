"""One model over several ranks (ensemble.parallel): the same steps as one process takes."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ensemble.config import DataConfig, ModelConfig, TrainConfig
from ensemble.data import load_splits
from ensemble.parallel import ParallelTrainer
from ensemble.train import Trainer

MODEL = ModelConfig(hidden=(32, 32), dropout_in=0.0, dropout_hidden=0.0, max_norm=2.0)
# 400 training examples in batches of 45, each split 23 + 22 (the last, of 40: 20 + 20)
TRAIN = TrainConfig(epochs=2, batch_size=45, lr=0.1, augment=("flip", "translate:1"))
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
