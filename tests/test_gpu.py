"""What needs a real GPU: skipped where torch sees none (CI here); run on a machine that has one."""
import pytest
import torch

from ensemble import checkpoint
from ensemble.config import DataConfig, ModelConfig, TrainConfig
from ensemble.data import load_splits
from ensemble.train import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no GPU")

MODEL = ModelConfig(hidden=(32, 32), dropout_in=0.1, dropout_hidden=0.3)
JITTER = TrainConfig(epochs=3, batch_size=50, lr=0.3, augment=("translate:1", "elastic:10"))


def test_checkpoint_moves_between_cpu_and_cuda(data_root):
    splits = load_splits(DataConfig(val_size=100, download=False), data_root)
    on_cpu = Trainer("g", MODEL, JITTER, splits, seed=3, device="cpu")
    on_cpu.train_epoch()
    after_cpu, _ = checkpoint.loads(on_cpu.checkpoint())
    on_gpu = Trainer("g", MODEL, JITTER, splits, seed=3, device="cuda")
    record, blob = on_gpu.run_epoch(2, on_cpu.checkpoint())  # CPU -> CUDA
    assert on_gpu.device == torch.device("cuda", 0) and record["epoch"] == 2
    assert all(p.is_cuda for p in on_gpu.model.parameters())
    after_gpu, _ = checkpoint.loads(blob)
    assert {"rng.batches.cuda", "rng.cuda", "rng.batches.cpu"} <= set(after_gpu)
    assert torch.equal(after_gpu["rng.batches.cpu"], after_cpu["rng.batches.cpu"])
    back = Trainer("g", MODEL, JITTER, splits, seed=3, device="cpu")
    record, blob = back.run_epoch(3, blob)  # CUDA -> CPU: its own batch stream goes on
    assert record["epoch"] == 3 and record["loss"] < on_cpu.history[0]["loss"]
    assert torch.equal(checkpoint.loads(blob)[0]["rng.cuda"], after_gpu["rng.cuda"])
