"""The training loop: SGD with momentum on index-drawn batches of on-device data, max-norm,
augmentation, evaluation each epoch, best-on-validation tracking, and checkpoints as bytes.

Pure PyTorch: a `Trainer` runs in any process; `ensemble.actors` makes it a Ray actor unchanged.
Resume is exact: a trainer restored from the checkpoint of epoch e and trained on gives the same
weights, bit for bit on CPU, as one that never stopped (same seed and thread count), because all
randomness (batch order, augmentation, dropout) comes from RNG states that the checkpoint carries.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ensemble import checkpoint
from ensemble.config import ModelConfig, TrainConfig, saved_as, to_dict
from ensemble.augment import augment
from ensemble.data import Splits, as_float, labels_to_device, to_pixels
from ensemble.errors import CheckpointError, TrainingError
from ensemble.models import apply_max_norm, build_model, count_parameters, normalized

EVAL_BATCH = 2000  # rows per forward pass when evaluating: large enough to be fast, small in memory
TOP5_FROM = 10  # more classes than this: top-5 test errors are recorded too
CONFUSION_UP_TO = 100  # classes up to which the best epoch's test confusion matrix is kept


def pick_device(name: str | torch.device = "auto",
                gpu_ids: Sequence[str] | None = None) -> torch.device:
    """The device to compute on. `gpu_ids`: the GPUs Ray assigned to this actor or task
    (`ray.get_gpu_ids()`), or None outside Ray (the driver: eval, export, report), where `auto`
    is torch's view: CUDA if it sees a GPU, else CPU.

    Inside Ray, `auto` is `cuda:0` when Ray assigned a GPU (it has narrowed CUDA_VISIBLE_DEVICES
    to it, so its torch index is 0, whatever its physical id) and `cpu` when it assigned none,
    whatever torch sees: Ray 2.58 leaves every GPU visible to a worker that asked for none, and a
    model there would train on a GPU that Ray believes free. A device already chosen is kept."""
    if isinstance(name, torch.device):
        return name
    under_ray = gpu_ids is not None
    if name == "cuda" and under_ray and not gpu_ids:
        raise TrainingError("device 'cuda' was asked for by a model that Ray assigned no GPU; "
                            "give it resources.num_gpus or use device 'auto'")
    if name == "cuda" and not torch.cuda.is_available():
        where = (f"Ray assigned GPU {', '.join(map(str, gpu_ids))}" if gpu_ids
                 else "it was asked for")
        raise TrainingError(f"device 'cuda': {where} but torch sees no GPU here")
    if name == "auto":
        assigned = bool(gpu_ids) if under_ray else True
        name = "cuda" if assigned and torch.cuda.is_available() else "cpu"
    return torch.device("cuda", 0) if name == "cuda" else torch.device(name)


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of the 0-based `epoch`: a linear warm-up over the first warmup_epochs,
    then the configured per-epoch schedule."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "exponential":
        return cfg.lr * cfg.lr_decay ** epoch
    if cfg.schedule == "step":
        return cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.milestones)
    return cfg.lr


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch: int = EVAL_BATCH) -> torch.Tensor:
    """Logits (N, C) of `model` in eval mode on inputs x (N, ...), in chunks."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(as_float(x[i:i + batch])) for i in range(0, len(x), batch)]) \
        if len(x) else \
        torch.empty(0)
    model.train(was_training)
    return out


def count_errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Misclassified examples of (x, y)."""
    if len(x) == 0:
        return 0
    return int((predict_logits(model, x).argmax(1) != y).sum())


def confusion_matrix(y: torch.Tensor, predicted: torch.Tensor, classes: int) -> list[list[int]]:
    """Counts [true class][predicted class] of labels y and predictions, both (N,)."""
    counts = torch.bincount(y * classes + predicted, minlength=classes * classes)
    return counts.view(classes, classes).tolist()


def optimizer(params, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """SGD with momentum (or AdamW) as `cfg` asks, fused: one pass over each parameter, its
    gradient and state per step instead of several: torch's update, rounded differently in the
    last bits (which training amplifies, as it does any rounding: runs differ from unfused
    ones). Stacked students feel it most: outside their matmuls a step is bound by memory. With
    decay 'weights', parameters of one dimension (biases, norms' scales) are not decayed."""
    params = list(params)
    groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    if cfg.decay == "weights" and cfg.weight_decay > 0:
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           fused=True)


class Trainer:
    """Trains one named model on `data` and reports each epoch's metrics.

    Subclasses change what a batch costs by overriding `batch_loss` (distillation does), and
    where batches come from by overriding `epoch_batches` (ensemble.streaming does).
    """
    streams = False  # True: the training examples come from epoch_batches, not from `data`
    kind = "generalist"  # what its checkpoints hold (ensemble.models.checkpoint_kind)

    def __init__(self, name: str, model_cfg: ModelConfig, train_cfg: TrainConfig, data: Splits,
                 seed: int, threads: int = 1, device: str = "auto"):
        torch.set_num_threads(threads)
        self.name, self.model_cfg, self.cfg, self.seed = name, model_cfg, train_cfg, seed
        self.device = pick_device(device)
        self.classes, self.image_shape = data.num_classes, data.image_shape
        self.class_names = list(data.classes)
        self.normalize = {"mean": list(data.mean), "std": list(data.std)} if data.mean else None
        torch.manual_seed(seed)
        self.model = self.make_model(data).to(self.device)
        if train_cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if train_cfg.tf32 and self.device.type == "cuda":  # this actor's process only
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.compiled = None
        if train_cfg.compile:  # compiled on the first batch
            import torch._inductor.config as inductor

            inductor.fallback_random = True  # dropout draws as in eager: same seeds, same masks
            self.compiled = torch.compile(self.model)
        # images stay uint8 on the device (a quarter of float32's memory), float per batch
        self.x, self.y = to_pixels(data.train_x, self.device), labels_to_device(data.train_y,
                                                                                self.device)
        self.val = (to_pixels(data.val_x, self.device), labels_to_device(data.val_y, self.device))
        self.test = (to_pixels(data.test_x, self.device),
                     labels_to_device(data.test_y, self.device))
        if len(self.x) == 0 and not self.streams:
            raise TrainingError(f"{name} has no training examples")
        self.opt = optimizer(self.model.parameters(), train_cfg)
        # batch order and augmentation draw from their own generator; dropout from the global one,
        # whose state this trainer keeps and restores around each epoch
        self.batches = torch.Generator(self.device).manual_seed(seed + 1)
        self.rng_cpu = torch.get_rng_state()
        self.rng_cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" \
            else None
        self.rng_elsewhere: dict[str, torch.Tensor] = {}  # a checkpoint's RNG states of another
        #   device type, kept so that a model resumed on CPU, then CUDA, then CPU goes on exactly
        self.epoch = 0
        self.history: list[dict] = []
        self.best_epoch, self.best_val_errors = 0, None
        self.best_state = self._state_copy()
        self.best_confusion: list[list[int]] | None = None  # on test, at the best epoch

    # ------------------------------------------------------------ what subclasses change ---------
    def make_model(self, data: Splits) -> nn.Module:
        """The network to train (a specialist starts from its generalist instead)."""
        return normalized(build_model(self.model_cfg, data.image_shape, data.num_classes),
                          data.mean, data.std)

    def epoch_batches(self):
        """Index tensors of one epoch's batches: a fresh permutation, sliced."""
        n, size = len(self.x), self.cfg.batch_size
        perm = torch.randperm(n, device=self.device, generator=self.batches) if self.cfg.shuffle \
            else torch.arange(n, device=self.device)
        return (perm[lo:lo + size] for lo in range(0, n, size))

    def autocast(self):
        """bf16 autocast on this trainer's device when its config asks for it (else a no-op)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.precision == "bf16")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on a training batch: compiled (train.compile) or eager. A compile that
        fails (no C++ compiler, an unsupported operation) leaves this trainer eager."""
        if self.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as err:  # torch.compile raises many types; eager always works
                self.compiled = None
                warnings.warn(f"{self.name}: torch.compile failed, training eagerly "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})")
        return self.model(x)

    @staticmethod
    def batch_size_of(batch) -> int:
        """How many examples `batch` (what epoch_batches yields) holds."""
        return len(batch)

    def extra_meta(self) -> dict:
        """What a subclass adds to its checkpoint's metadata to rebuild its model."""
        return {}

    # ------------------------------------------------------------ one epoch ----------------------
    def batch_loss(self, idx: torch.Tensor) -> torch.Tensor:
        """Mean loss of the training examples at `idx` (B,) -> ()."""
        return self.loss_on(augment(as_float(self.x[idx]), self.cfg, self.batches), idx)

    def loss_on(self, xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Mean loss of the model on images xb (B,C,H,W: the examples at idx, augmented)."""
        return F.cross_entropy(self.forward(xb), self.y[idx],
                               label_smoothing=self.cfg.label_smoothing)

    def backward(self, loss: torch.Tensor, batch) -> None:
        """The gradients of a batch's loss (a data-parallel rank weighs its share)."""
        loss.backward()

    def train_epoch(self) -> dict:
        """Train one epoch, evaluate, track the best model; return the epoch's metrics."""
        lr = self.begin_epoch()
        model, opt = self.model, self.opt
        n = 0
        total = torch.zeros((), device=self.device)
        start = time.perf_counter()
        for idx in self.epoch_batches():
            with self.autocast():
                loss = self.batch_loss(idx)
            opt.zero_grad(set_to_none=True)
            self.backward(loss, idx)
            opt.step()
            if self.model_cfg.max_norm > 0:
                apply_max_norm(model, self.model_cfg.max_norm)
            size = self.batch_size_of(idx)
            total += loss.detach() * size
            n += size
        return self.end_epoch(lr, total, n, start)

    def begin_epoch(self) -> float:
        """Set the epoch's learning rate and this trainer's RNG state; return the rate."""
        lr = learning_rate(self.cfg, self.epoch)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self._restore_rng()
        self.model.train()
        return lr

    def end_epoch(self, lr: float, total: torch.Tensor, n: int, start: float,
                  predicted: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """After an epoch's steps (`total`: summed loss over its `n` examples, training since
        `start`): evaluate, track the best model, and return the epoch's metrics. `predicted`:
        the classes the model now predicts on validation and test, if already known."""
        if n == 0:
            raise TrainingError(f"{self.name} got no training examples in epoch {self.epoch + 1}")
        mean_loss = float(total) / n  # the epoch's one host sync
        train_seconds = time.perf_counter() - start
        self._save_rng()
        self.epoch += 1
        if not math.isfinite(mean_loss):
            raise TrainingError(f"{self.name}: the loss became {mean_loss} in epoch {self.epoch}; "
                                "lower the learning rate")
        test_x, test_y = self.test  # reported, never used to choose
        top5 = {}
        if predicted is None:
            with self.autocast():
                val_errors = count_errors(self.model, *self.val)
                logits = predict_logits(self.model, test_x) if len(test_x) else None
            test_pred = logits.argmax(1) if logits is not None else test_y
            if logits is not None and self.classes > TOP5_FROM:  # many classes: top-5 too
                hit = (logits.topk(5, dim=1).indices == test_y[:, None]).any(1)
                top5 = {"test_errors_top5": int((~hit).sum())}
        else:
            val_errors, test_pred = int((predicted[0] != self.val[1]).sum()), predicted[1]
        test_errors = int((test_pred != test_y).sum())
        if self.best_val_errors is None or len(self.val[0]) == 0 or \
                val_errors < self.best_val_errors:
            self.best_epoch, self.best_val_errors = self.epoch, val_errors
            self.best_state = self._state_copy()
            self.best_confusion = confusion_matrix(test_y, test_pred, self.classes) \
                if self.classes <= CONFUSION_UP_TO else None
        record = {
            "epoch": self.epoch, "loss": mean_loss, "lr": lr,
            "val_errors": val_errors, "test_errors": test_errors,
            "samples_per_s": n / train_seconds, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - start, "finished_at": time.time(),
            "best_epoch": self.best_epoch, "best_val_errors": self.best_val_errors, **top5,
            "stopped": 0 < self.cfg.patience <= self.epoch - self.best_epoch and  # early stop
                       self.epoch < self.cfg.epochs,
        }
        self.history.append(record)
        return record

    def adopt(self, state: dict[str, torch.Tensor], source: str) -> dict:
        """Take weights trained elsewhere as this model's one and finished epoch: evaluated on
        validation and test, nothing trained (the record's loss is NaN); RuntimeError if they do
        not fit the model."""
        self.model.load_state_dict(state)
        record = self.end_epoch(0.0, torch.zeros(()), 1, time.perf_counter())
        record.update(loss=float("nan"), samples_per_s=0.0, train_seconds=0.0, weights=source)
        return record

    def run_epoch(self, epoch: int, last: bytes | None = None,
                  keep: bool = True) -> tuple[dict | None, bytes | None]:
        """Train the 1-based `epoch` and return (its metrics, the checkpoint after it, or None
        unless `keep`).

        A trainer keeps its state between epochs, so the driver sends no checkpoint. One that is
        not at `epoch - 1` (Ray restarted its actor, or a run is resumed) first restores `last`,
        the checkpoint written after `epoch - 1`; given none, it trains nothing and returns
        (None, None), and the driver asks again with the checkpoint.
        """
        if self.epoch != epoch - 1 and last is None:
            return None, None
        self.ready_for(epoch, last)
        record = self.train_epoch()
        return record, self.checkpoint() if keep or record["stopped"] else None

    def ready_for(self, epoch: int, last: bytes | None) -> None:
        """Be at `epoch - 1`, restoring `last` (the checkpoint of that epoch) if need be."""
        if self.epoch != epoch - 1:
            if last is None:
                raise CheckpointError(f"{self.name} is at epoch {self.epoch} and was asked for "
                                      f"epoch {epoch} without a checkpoint to resume from")
            self.load(last)
            if self.epoch != epoch - 1:
                raise CheckpointError(f"{self.name}: the checkpoint to resume from is of epoch "
                                      f"{self.epoch}, not {epoch - 1}")

    def _restore_rng(self) -> None:
        torch.set_rng_state(self.rng_cpu)
        if self.rng_cuda is not None:
            torch.cuda.set_rng_state(self.rng_cuda, self.device)

    def _save_rng(self) -> None:
        self.rng_cpu = torch.get_rng_state()
        if self.rng_cuda is not None:
            self.rng_cuda = torch.cuda.get_rng_state(self.device)

    def _state_copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------ results ------------------------
    def summary(self) -> dict:
        """Parameters, the best epoch by validation, and its errors."""
        best = next((r for r in self.history if r["epoch"] == self.best_epoch), {})
        return {"name": self.name, "parameters": count_parameters(self.model),
                "epochs": self.epoch, "best_epoch": self.best_epoch,
                "val_errors": best.get("val_errors"), "test_errors": best.get("test_errors"),
                **({"test_errors_top5": best["test_errors_top5"]} if "test_errors_top5" in best
                   else {}),
                "wall_seconds": sum(r["seconds"] for r in self.history),
                "test_confusion": self.best_confusion}

    # ------------------------------------------------------------ checkpoints --------------------
    def checkpoint(self) -> bytes:
        """Weights, best weights, optimiser state and RNG states as one safetensors blob."""
        optim = {f"{i}.{k}": v for i, state in self.opt.state_dict()["state"].items()
                 for k, v in state.items() if torch.is_tensor(v)}
        rng = {**self.rng_elsewhere, "cpu": self.rng_cpu,
               f"batches.{self.device.type}": self.batches.get_state()}
        if self.rng_cuda is not None:
            rng["cuda"] = self.rng_cuda
        meta = {"name": self.name, "kind": self.kind, "epoch": self.epoch, "seed": self.seed,
                "model": to_dict(self.model_cfg), "train": to_dict(self.cfg),
                "classes": self.classes, "image_shape": list(self.image_shape),
                "class_names": self.class_names,
                "best_epoch": self.best_epoch,
                "best_val_errors": self.best_val_errors, "history": self.history,
                "summary": self.summary(), **self.extra_meta(),
                **({"normalize": self.normalize} if self.normalize else {})}
        return checkpoint.dumps_state(checkpoint.TrainingState(
            self.model.state_dict(), self.best_state, optim, rng, meta))

    def load(self, blob: bytes) -> None:
        """Restore everything `checkpoint()` saved; refuse a checkpoint of another model."""
        state = checkpoint.loads_state(blob)
        meta = state.meta
        if not saved_as(ModelConfig, meta.get("model"), self.model_cfg) or \
                meta.get("classes") != self.classes:
            raise CheckpointError(f"checkpoint of '{meta.get('name')}' was saved for another "
                                  f"architecture than {self.name}'s")
        try:
            self.model.load_state_dict(state.model)
            self.best_state = {k: v.to(self.device) for k, v in state.best.items()}
        except RuntimeError:
            raise CheckpointError(f"checkpoint of '{meta.get('name')}' does not fit "
                                  f"{self.name}'s layers") from None
        saved: dict[int, dict] = {}
        for key, value in state.optim.items():
            i, name = key.split(".", 1)
            saved.setdefault(int(i), {})[name] = value
        self.opt.load_state_dict({"state": saved,
                                  "param_groups": self.opt.state_dict()["param_groups"]})
        self._load_rng(state.rng)
        self.epoch, self.history = meta["epoch"], meta["history"]
        self.best_epoch, self.best_val_errors = meta["best_epoch"], meta["best_val_errors"]
        self.best_confusion = meta.get("summary", {}).get("test_confusion")

    def _load_rng(self, rng: dict[str, torch.Tensor]) -> None:
        """Restore the RNG states of this trainer's device type; keep those of another (a
        checkpoint written on CUDA and resumed on CPU, or back). A state of another device type
        cannot seed this one: batch order and dropout then start from this trainer's own seeds."""
        kind = self.device.type
        mine = {"cpu", f"batches.{kind}"} | ({"cuda"} if kind == "cuda" else set())
        self.rng_elsewhere = {k: v for k, v in rng.items() if k not in mine}
        self.rng_cpu = rng["cpu"]
        if f"batches.{kind}" in rng:
            self.batches.set_state(rng[f"batches.{kind}"])
        if kind == "cuda" and "cuda" in rng:
            self.rng_cuda = rng["cuda"]

    def best_model(self) -> nn.Module:
        """The model with its best-on-validation weights loaded (a copy; training is untouched)."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.best_state)
        return model.eval()
