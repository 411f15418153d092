"""Data parallelism: one model trained by `world` processes at once (`resources.workers`).

Every rank holds the whole training set and draws the same epoch permutation and the same
augmentation draws for each global batch of `train.batch_size` examples, from generators seeded
alike; rank r then augments and trains on its share alone, the r-th of `world` near-equal parts.
DistributedDataParallel averages the gradients over the ranks, and each rank weighs its loss by
its share's size, so the step is the global batch's mean gradient, as one process would take
it: the learning rate keeps its meaning, and without dropout the weights follow a one-process
run up to the rounding of the all-reduce. Dropout masks are each rank's own, drawn from a seed
of (model, epoch, rank), so a group restarted from a checkpoint trains on exactly as before.
Every rank evaluates (the weights are the same); rank 0's records and checkpoints are the
model's.

Pure PyTorch (`torch.distributed`, gloo on CPU, NCCL on CUDA): whoever starts the processes
(Ray Train, ensemble.workers) sets up the process group first.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ensemble.augment import augment
from ensemble.data import as_float
from ensemble.distill import Student
from ensemble.train import Trainer


class DataParallel:
    """A trainer's data-parallel rank: mixed in before Trainer or Student."""
    rank, world = 0, 1

    def join(self, rank: int, world: int) -> None:
        """Take part as `rank` of `world` in the process group set up already: the model is
        wrapped to all-reduce its gradients (the wrapper broadcasts rank 0's weights)."""
        self.rank, self.world = rank, world
        self.compiled = None  # compiling under DDP is not supported here: eager
        devices = [self.device.index] if self.device.type == "cuda" else None
        # gradients live in the all-reduce's buckets: one copy fewer per step (2x1200 on two
        # CPU workers: about 7 of the 20 ms a step's all-reduce adds)
        self.wrapped = DistributedDataParallel(self.model, device_ids=devices,
                                               gradient_as_bucket_view=True)

    def begin_epoch(self) -> float:
        """As one process, but dropout draws from a seed of (model, epoch, rank): each rank its
        own masks, and a group restarted from any checkpoint draws them again exactly."""
        lr = super().begin_epoch()
        torch.manual_seed((self.seed * 100_003 + self.epoch) * 1_009 + self.rank)
        return lr

    def share(self, size: int) -> slice:
        """This rank's rows of a global batch of `size` examples (parts differ by at most 1); a
        batch smaller than the world (say a last batch of one) is every rank's whole, as an
        empty part would give a loss of NaN."""
        if size < self.world:
            return slice(0, size)
        base, extra = divmod(size, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return slice(lo, lo + base + (self.rank < extra))

    def batch_loss(self, idx: torch.Tensor) -> torch.Tensor:
        """The mean loss of this rank's share of the global batch at `idx`, augmented alone but as
        in the whole batch (the draws one process would make)."""
        mine = self.share(len(idx))
        xb = augment(as_float(self.x[idx[mine]]), self.cfg, self.batches, (len(idx), mine))
        return self.loss_on(xb, idx[mine])

    def backward(self, loss: torch.Tensor, idx: torch.Tensor) -> None:
        """Gradients weighed by the share's size: DDP's average is then the batch's mean (a
        batch every rank takes whole: weight 1, the average of equal means)."""
        part = self.share(len(idx))
        weight = 1.0 if len(idx) < self.world else \
            (part.stop - part.start) * self.world / len(idx)
        (loss * weight).backward()

    def batch_size_of(self, idx: torch.Tensor) -> int:
        """The examples this rank counts in the epoch's loss (a batch every rank takes whole
        counts on rank 0)."""
        if len(idx) < self.world:
            return len(idx) if self.rank == 0 else 0
        part = self.share(len(idx))
        return part.stop - part.start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.wrapped(x)

    def end_epoch(self, lr, total, n, start, predicted=None) -> dict:
        """The epoch's loss summed over every rank's examples, then as one process."""
        both = torch.stack([total.detach().double(), torch.tensor(float(n), dtype=torch.float64,
                                                                  device=total.device)])
        dist.all_reduce(both)
        return super().end_epoch(lr, both[0], int(both[1]), start, predicted)


class ParallelTrainer(DataParallel, Trainer):
    """A generalist trained over several ranks."""


class ParallelStudent(DataParallel, Student):
    """A student trained over several ranks (its teacher runs on each rank's share)."""
