"""Students stacked into one model train as they would one by one (pure PyTorch, no Ray)."""
import dataclasses

import pytest
import torch

from ensemble.config import DataConfig, ModelConfig, StudentConfig, TrainConfig
from ensemble.data import load_splits
from ensemble.distill import Student
from ensemble.errors import ConfigError
from ensemble.stacked import StackedStudents
from ensemble.models import load_model
from ensemble.train import Trainer

TOLERANCE = 1e-4  # max |weight difference| after 3 epochs: batched vs plain matmul rounding


@pytest.fixture(scope="module")
def setup(data_root):
    splits = load_splits(DataConfig(val_size=100, download=False), data_root)
    teacher = Trainer("generalist-0", ModelConfig(hidden=(32, 32)),
                      TrainConfig(epochs=1, batch_size=50, lr=0.3), splits, 0)
    teacher.run_epoch(1)
    base = StudentConfig(model=ModelConfig(hidden=(16, 16), dropout_in=0.0, dropout_hidden=0.0,
                                           max_norm=2.0),
                         train=TrainConfig(epochs=3, batch_size=40, lr=0.1))
    cfgs = [dataclasses.replace(base, temperature=t, alpha=a)
            for t, a in ((1.0, 0.9), (4.0, 0.9), (20.0, 0.5), (2.0, 0.0))]  # the last: hard
    return splits, [teacher.checkpoint()], cfgs


def test_stacked_students_match_one_by_one(setup):
    splits, teachers, cfgs = setup
    names, seeds = [f"student-{i}" for i in range(len(cfgs))], [7, 8, 9, 10]
    stacked = StackedStudents(names, cfgs, splits, teachers, seeds)
    alone = [Student(n, c, splits, teachers if c.uses_teacher else [], s)
             for n, c, s in zip(names, cfgs, seeds)]
    for epoch in (1, 2, 3):
        records, blobs = stacked.run_epoch(epoch)
        for member, one, record in zip(stacked.members, alone, records):
            expected = one.train_epoch()
            assert record["loss"] == pytest.approx(expected["loss"], rel=1e-4)
            assert abs(record["val_errors"] - expected["val_errors"]) <= 1
            for a, b in zip(member.model.parameters(), one.model.parameters()):
                assert (a - b).abs().max() < TOLERANCE
    # the students differ (their seeds and temperatures), and each checkpoint is a student's
    first, second = (dict(m.model.named_parameters()) for m in stacked.members[:2])
    assert (first["output.weight"] - second["output.weight"]).abs().max() > 0.01
    model, meta = load_model(blobs[1], torch.device("cpu"))
    assert meta["name"] == "student-1" and meta["epoch"] == 3
    # resumed from those checkpoints, a new stack goes on exactly as the old one
    more = StackedStudents(names, cfgs, splits, teachers, seeds)
    more_records, _ = more.run_epoch(4, blobs)
    old_records, _ = stacked.run_epoch(4)
    assert [r["loss"] for r in more_records] == [r["loss"] for r in old_records]


@pytest.mark.parametrize("change, message", [
    ({"model": ModelConfig(hidden=(16, 16), dropout_in=0.1)}, "without dropout"),
    ({"model": ModelConfig(hidden=(8, 8), dropout_in=0.0, dropout_hidden=0.0)}, "one model shape"),
    ({"train": TrainConfig(epochs=3, batch_size=40, lr=0.1, augment=("translate:1",))},
     "without augmentation"),
    ({"train": TrainConfig(epochs=5, batch_size=40, lr=0.1)}, "one training recipe"),
    ({"drop_classes": (3,)}, "one transfer set"),
])
def test_unstackable_students_are_refused(setup, change, message):
    splits, teachers, cfgs = setup
    odd = dataclasses.replace(cfgs[0], **change)
    with pytest.raises(ConfigError, match=message):
        StackedStudents(["a", "b"], [cfgs[0], odd], splits, teachers, [0, 1])
