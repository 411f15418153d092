"""Typed run configuration: frozen dataclasses, YAML files, dotted overrides, one validation pass.

A config file is YAML whose keys mirror the dataclasses below; every key is optional (the
defaults are the paper's where it has one). Keys starting with `x-` are ignored: they hold YAML
anchors that other sections reuse (`<<: *student`). `--set students.distilled.temperature=8` overrides a
key. Everything is checked before any work starts: unknown keys (with a suggestion), wrong types
and values out of range each raise one `ConfigError` naming the dotted key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from ensemble.errors import ConfigError

NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}


FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  # "package.module:callable"


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")


AUGMENTATIONS = {  # train.augment's steps (ensemble.augment): each argument's name and range
    "flip": (),
    "translate": (("pixels", 1, 8),),
    "crop": (("padding", 1, 8),),
    "elastic": (("alpha", 0.01, 100), ("sigma", 0.5, 10)),
}


def augment_steps(specs) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """train.augment's steps ("name" or "name:ARG[:ARG]") as (name, arguments); ConfigError with
    the step's place for a bad one. elastic's sigma is 4 (Simard et al.'s) unless given."""
    steps = []
    for i, spec in enumerate(specs):
        name, *args = str(spec).split(":")
        wanted = AUGMENTATIONS.get(name)
        form = "one of flip, translate:P, crop:P, elastic:ALPHA[:SIGMA]"
        _require(wanted is not None, f"augment[{i}]", f"must be {form}", spec)
        if name == "elastic" and len(args) == 1:
            args.append("4")
        _require(len(args) == len(wanted), f"augment[{i}]", f"must be {form}", spec)
        values = []
        for text, (what, low, high) in zip(args, wanted):
            _require(_FLOAT.fullmatch(text) is not None and low <= float(text) <= high,
                     f"augment[{i}]", f"must give {what} as a number from {low:g} to {high:g}", spec)
            values.append(float(text))
        _require(name in ("elastic", "flip") or float(values[0]).is_integer(), f"augment[{i}]",
                 "must give pixels as a whole number", spec)
        steps.append((name, tuple(values)))
    return tuple(steps)


SOURCES = ("folder", "npz", "factory", "parquet")  # data of one's own (ensemble.sources)


@dataclass(frozen=True)
class DataConfig:
    name: Literal["mnist", "fashion-mnist", "cifar10", "cifar100"] = "mnist"
    val_size: int = 10_000  # the last 10,000 training images (MNIST's classic validation split); 0 = none
    train_size: int = 0  # 0 = every remaining training image; fewer for quick checks
    download: bool = True  # fetch through torchvision when no local copy is found (needs network)
    stream: str = ""  # Parquet files (folder, glob or URI) holding the training examples, streamed
    #   to the generalists through Ray Data instead of held in memory (the `data` extra): columns
    #   `image` (C*H*W uint8 bytes of `name`'s image shape) and `label`. Validation and test still
    #   come from `name`. Generalists only: students and specialists need an in-memory transfer set
    folder: str = ""  # your own images, torchvision's ImageFolder layout: ROOT/train/<class>/*,
    #   ROOT/test/<class>/*, optional ROOT/val/<class>/*; decoded once with Pillow
    npz: str = ""  # your own arrays: x_train, y_train, x_test, y_test (uint8 images N x H x W
    #   or N x H x W x C; integer labels), optional x_val, y_val and classes (names)
    factory: str = ""  # "package.module:callable" returning those arrays as a mapping
    parquet: str = ""  # your own Parquet (a folder or URI): ROOT/train/, ROOT/test/, optional
    #   ROOT/val/, as ensemble.streaming.write_parquet writes them (columns image and label,
    #   the image shape in the files' metadata); read into memory unless `stream` names ROOT/train
    kwargs: dict[str, Any] = field(default_factory=dict)  # the factory's keyword arguments
    mode: Literal["", "L", "RGB"] = ""  # folder: every image converted to this; "" = the mode
    #   most of them have (L for grey, RGB otherwise)
    image_size: int = 0  # folder: the shorter side resized to this, then the centre cropped to
    #   a square; 0 = keep the size, which every image must then share
    normalize: bool = False  # every model sees (pixel/255 - mean) / std per channel: the mean and
    #   std given below, else the training split's; part of the model (its checkpoints, exports)
    mean: tuple[float, ...] = ()  # per channel, of pixel/255 (CIFAR-100: 0.5071, 0.4865, 0.4409)
    std: tuple[float, ...] = ()  # per channel (CIFAR-100: 0.2673, 0.2564, 0.2762)

    def __post_init__(self):
        _require(self.val_size >= 0, "val_size", "must be >= 0", self.val_size)
        _require(self.train_size >= 0, "train_size", "must be >= 0", self.train_size)
        _require(len(self.mean) == len(self.std), "std", f"must have one value per mean "
                 f"({len(self.mean)})", list(self.std))
        _require(all(s > 0 for s in self.std), "std", "must be > 0", list(self.std))
        _require(not self.mean or self.normalize, "normalize", "must be true for mean and std "
                 "to be used", self.normalize)
        _require(not (self.normalize and self.stream) or bool(self.mean), "mean",
                 "must be given to normalise a streamed training set", list(self.mean))
        chosen = [k for k in SOURCES if getattr(self, k)]
        _require(len(chosen) <= 1, chosen[-1] if chosen else "folder",
                 f"is one source too many: choose one of {', '.join(chosen)}",
                 getattr(self, chosen[-1]) if chosen else "")
        _require(not self.stream or chosen in ([], ["parquet"]), "stream", "streams only beside a "
                 "named data set (data.name) or data.parquet", self.stream)
        _require(not self.factory or FACTORY.fullmatch(self.factory) is not None,
                 "factory", "must be 'package.module:callable'", self.factory)
        _require(bool(self.factory) or not self.kwargs, "kwargs", "belong to a factory",
                 self.kwargs)
        _require(self.image_size >= 0, "image_size", "must be >= 0", self.image_size)
        for key in ("mode", "image_size"):  # read by the folder loader alone
            _require(not getattr(self, key) or bool(self.folder), key, "applies to data.folder "
                     "alone (images of one's own); set data.folder or leave it out",
                     getattr(self, key))

    @property
    def source(self) -> str:
        """'folder', 'npz', 'factory' or 'parquet' for data of one's own, '' for a named set."""
        return next((k for k in SOURCES if getattr(self, k)), "")


@dataclass(frozen=True)
class ModelConfig:
    kind: Literal["mlp", "cnn", "resnet8x4", "resnet32x4", "resnet20", "resnet56", "wrn_16_2",
                  "wrn_40_2"] = "mlp"  # mlp: the paper's nets (§3); cnn: a small net for 32x32
    #   colour; resnet*, wrn_*: the CIFAR nets of the distillation literature (ensemble.zoo)
    hidden: tuple[int, ...] = (1200, 1200)  # §3 teacher: 784-1200-1200-10; for a cnn, channels per block
    dropout_in: float = 0.2  # Hinton et al. 2012: 20% input dropout on MNIST
    dropout_hidden: float = 0.5  # Hinton et al. 2012: 50% hidden dropout
    max_norm: float = 0.0  # bound on each unit's incoming weight norm (2012: squared length 15); 0 = off
    factory: str = ""  # your own model: "package.module:callable" returning an nn.Module, called
    #   with `kwargs`; it replaces kind, hidden and dropout (e.g. "torchvision.models:resnet18")
    kwargs: dict[str, Any] = field(default_factory=dict)  # the factory's keyword arguments
    head: str = ""  # the factory's classifier (a Linear), by its name in named_modules(); "" =
    #   the last Linear. Its outputs must be the data's classes; a specialist replaces it

    def __post_init__(self):
        _require(len(self.hidden) > 0 and all(h > 0 for h in self.hidden), "hidden",
                 "must be a non-empty list of positive widths", list(self.hidden))
        for key in ("dropout_in", "dropout_hidden"):
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, key, "must be in [0, 1)", value)
        _require(not self.factory or FACTORY.fullmatch(self.factory) is not None,
                 "factory", "must be 'package.module:callable'", self.factory)
        _require(bool(self.factory) or not (self.kwargs or self.head), "factory",
                 "is needed for kwargs and head (they belong to a factory's model)", self.factory)
        _require(self.max_norm >= 0, "max_norm", "must be >= 0 (0 turns it off)", self.max_norm)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 100  # the paper era's minibatch; larger ones train faster per sample
    #   (results/throughput.md)
    lr: float = 0.1  # SGD with momentum, as in Hinton et al. 2012
    momentum: float = 0.9
    weight_decay: float = 0.0  # dropout and max-norm regularise the paper's nets instead
    schedule: Literal["constant", "cosine", "exponential", "step"] = "cosine"  # per-epoch rule
    lr_decay: float = 0.95  # per-epoch factor of the exponential schedule (2012 used 0.998 over
    #   3000); the step schedule's factor at each milestone (CRD: 0.1)
    milestones: tuple[int, ...] = ()  # step schedule: 0-based epochs from which the rate is
    #   lr_decay times lower (CRD's CIFAR-100 recipe: 150, 180, 210 of 240)
    warmup_epochs: int = 0  # the rate rises linearly to lr over these first epochs
    optimizer: Literal["sgd", "adamw"] = "sgd"  # adamw: decoupled weight decay, betas 0.9/0.999
    nesterov: bool = False  # SGD with Nesterov momentum
    decay: Literal["all", "weights"] = "all"  # what weight_decay applies to: every parameter (as
    #   RepDistiller), or weights only: not biases and norms' scales (parameters of one dimension)
    label_smoothing: float = 0.0  # on the hard-label cross-entropy (Szegedy et al. 2016: 0.1)
    channels_last: bool = False  # convolutions in channels-last memory layout (faster on GPUs)
    tf32: bool = False  # on CUDA: TF32 for float32 matmuls and convolutions (Ampere and later)
    augment: tuple[str, ...] = ()  # each training batch, on its device, in this order: flip,
    #   translate:P (up to P pixels, zeros filling in; §3's teacher: translate:2), crop:P
    #   (padding P by reflection; CIFAR: crop:4), elastic:ALPHA[:SIGMA] (Simard et al.: 34:4)
    patience: int = 0  # early stopping: training ends once validation errors have not improved
    #   for this many epochs (the best epoch's weights are the model's, as always); 0 = off
    shuffle: bool = True  # a fresh order each epoch; false: the data set's order, every epoch
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast matmuls, weights and optimiser
    #   state stay fp32; for GPUs and AVX-512 BF16 / AMX CPUs (elsewhere torch emulates bf16:
    #   benchmarks/precision.py measures it, results/precision.md)
    compile: bool = False  # torch.compile the training forward pass; eager again, with one
    #   warning, if compiling fails (results/compile.md: what it gained on this CPU)

    def __post_init__(self):
        _require(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        _require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _require(self.lr > 0, "lr", "must be > 0", self.lr)
        _require(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)", self.momentum)
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _require(0.0 < self.lr_decay <= 1.0, "lr_decay", "must be in (0, 1]", self.lr_decay)
        _require((self.schedule == "step") == bool(self.milestones), "milestones",
                 "are needed by the step schedule and only by it", list(self.milestones))
        _require(list(self.milestones) == sorted(set(self.milestones)) and
                 all(0 < m < self.epochs for m in self.milestones), "milestones",
                 f"must be increasing epochs between 1 and {self.epochs - 1}",
                 list(self.milestones))
        _require(0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
                 f"must be between 0 and {self.epochs - 1} (epochs - 1)", self.warmup_epochs)
        _require(not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
                 "nesterov", "needs optimizer sgd with momentum > 0", self.nesterov)
        _require(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)",
                 self.label_smoothing)
        augment_steps(self.augment)
        _require(self.patience >= 0, "patience", "must be >= 0 (0 turns it off)", self.patience)


@dataclass(frozen=True)
class ResourcesConfig:
    num_cpus: float = 1  # one torch thread per whole CPU: two 1-thread actors beat one 2-thread one
    num_gpus: float = 0  # a share of one GPU (0.25 packs four models on one); the model trains
    #   on the GPU Ray assigns it, and on CPU when it asks for none
    max_restarts: int = 3  # Ray restarts a crashed actor this often; it resumes from its checkpoint
    max_task_retries: int = 3  # an epoch interrupted by a crash is retried on the restarted actor
    workers: int = 1  # data-parallel processes training this one model (Ray Train, DDP), each
    #   with num_cpus and num_gpus above; train.batch_size stays the global batch. Generalists
    #   and students; a worker's crash restarts the group from its last epoch (max_restarts)

    def __post_init__(self):
        _require(self.num_cpus > 0, "num_cpus", "must be > 0", self.num_cpus)
        _require(self.num_gpus >= 0, "num_gpus", "must be >= 0", self.num_gpus)
        _require(self.num_gpus <= 1, "num_gpus", "must be at most 1: one model trains on one "
                 "device (a share of a GPU packs several models on one)", self.num_gpus)
        _require(0 <= self.max_restarts <= 10_000, "max_restarts", "must be from 0 to 10000",
                 self.max_restarts)
        _require(0 <= self.max_task_retries <= 10_000, "max_task_retries",
                 "must be from 0 to 10000", self.max_task_retries)
        _require(self.workers >= 1, "workers", "must be >= 1", self.workers)

    @property
    def cpus(self) -> float:
        """CPUs the model holds: every worker's."""
        return self.num_cpus * self.workers

    @property
    def gpus(self) -> float:
        return self.num_gpus * self.workers

    @property
    def threads(self) -> int:
        """Torch threads for a model with this share: one per whole CPU, at least one."""
        return max(1, int(self.num_cpus))


@dataclass(frozen=True)
class NodeType:
    num_cpus: float = 0
    num_gpus: float = 0

    def __post_init__(self):
        _require(self.num_cpus >= 0, "num_cpus", "must be >= 0", self.num_cpus)
        _require(self.num_gpus >= 0, "num_gpus", "must be >= 0", self.num_gpus)


@dataclass(frozen=True)
class AutoscalerConfig:
    """What the cluster's autoscaler may add, so a request no node will ever hold fails at once
    and one waiting for a new node gets its own, longer bound."""
    node_types: tuple[NodeType, ...] = ()  # resources of each of its available_node_types
    scale_up_s: float = 1800.0  # a model still waiting for such a node after this long stops the
    #   run, with the model named; 0 = wait forever

    def __post_init__(self):
        _require(self.scale_up_s >= 0, "scale_up_s", "must be >= 0 (0 waits forever)",
                 self.scale_up_s)


@dataclass(frozen=True)
class GeneralistsConfig:
    count: int = 1  # models of the same recipe with seeds seed, seed+1, ...; trained in parallel
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(augment=("translate:2",)))
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    from_run: str = ""  # a finished run whose generalists (recipe and checkpoints) are taken over,
    #                     not trained again; its data split must be this run's
    weights: tuple[str, ...] = ()  # generalists trained elsewhere, one state dict each (a path or
    #   URI; safetensors, or a torch file read with weights_only=True) of `model`: evaluated and
    #   used as finished generalists, not trained; count follows their number

    def __post_init__(self):
        _require(self.count >= 1, "count", "must be >= 1", self.count)
        if self.weights and self.count == 1:
            object.__setattr__(self, "count", len(self.weights))  # frozen: set once, here
        _require(not self.weights or self.count == len(self.weights), "count",
                 f"must be the number of weights ({len(self.weights)})", self.count)
        _require(not (self.weights and self.from_run), "weights",
                 "cannot be combined with from_run (both give finished generalists)",
                 list(self.weights))


@dataclass(frozen=True)
class SpecialistsConfig:
    k: int = 0  # clusters of confusable classes, one specialist each; 0 = no specialists
    from_run: str = ""  # a finished run whose subsets and specialists (and their recipe) are
    #   taken over; it must have taken its generalists from where this run takes them
    #   (generalists.from_run). The rest of this section is left out: theirs holds
    covariance_on: Literal["val", "transfer"] = "val"  # held-out inputs to cluster on; no labels
    temperature: float = 1.0  # > 1 shows the confusions a confident generalist hides
    compare: Literal["correlation", "offdiag"] = "offdiag"  # columns without the diagonal; offdiag
    #   recovered Fashion-MNIST's garments and footwear best (results/clustering_fashion-mnist.md)
    iterations: int = 100  # online k-means passes over the columns
    seed: int = 0  # k-means seed (with 10 restarts; the tightest clustering wins)
    overlap: int = 0  # each class also joins its r nearest other clusters (the paper's overlapped)
    overlap_mass: float = 0.0  # > 0: ... only those (up to r, most first) that take at least this
    #   share of its probability (at `temperature`) on the inputs the generalist calls it:
    #   coverage varies by class
    min_tie: float = -1.0  # a class less tied than this to every cluster stays with the generalist
    min_size: int = 2  # smaller subsets get no specialist
    max_size: float = 0.0  # a subset's core holds at most this x classes / k classes (before
    #   overlap); 0 = no bound. Many classes: k-means alone leaves one cluster of most of them
    fraction: float = 0.5  # §5.1: half of each batch from the subset, half from the rest
    epoch: Literal["training set", "subset"] = "training set"  # a specialist's epoch: as many
    #   examples as the training set, or as show each subset example about once (many classes:
    #   a subset is a small share of the set, and its specialist starts from the generalist)
    top_n: int = 1  # §5.3: specialists covering the generalist's top-n classes are consulted
    soft_weight: float = 0.0  # §6, left untried there: > 0 also trains each specialist on its
    #   generalist's soft targets (its logits collapsed to the subset and a dustbin, the rest's
    #   log-sum-exp, moved to the batches' prior) with this weight, the hard labels with 1 - this:
    #   kept near what the generalist knows
    soft_temperature: float = 1.0  # ... softened at this temperature (the soft term times T^2, as
    #   §2's); 1: the generalist's probabilities at the batches' prior, nearest §6's proposal
    dustbin_correction: bool = True  # in eq. 5, each dustbin logit raised for the subset's
    #   oversampling (§5.1); off: as trained. On 12-pixel fonts, designs no model saw, the
    #   raised dustbins outvoted the generalist (`benchmarks/many_classes.py --diagnose`)
    combine_tol: float = 1e-7  # stop the eq. 5 solver when q moves less than this
    combine_steps: int = 500  # ... or after this many steps
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, lr=0.02, augment=("translate:2",)))
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self):
        _require(self.k != 1, "k", "must be 0 (no specialists) or at least 2: one subset of "
                 "every class leaves a specialist's dustbin nothing to learn", self.k)
        _require(self.k >= 0, "k", "must be >= 0", self.k)
        _require(abs(self.seed) < 2 ** 62, "seed", "must lie within ±2**62", self.seed)
        _require(self.k == 0 or self.overlap < self.k - 1, "overlap",
                 f"must be below k - 1 ({self.k - 1}): a class joining every other cluster puts "
                 "every class in every subset, leaving the dustbins nothing", self.overlap)
        _require(self.temperature >= 0.01, "temperature", "must be >= 0.01 (logits divided by "
                 "less overflow)", self.temperature)
        _require(self.iterations >= 1, "iterations", "must be >= 1", self.iterations)
        _require(self.overlap >= 0, "overlap", "must be >= 0", self.overlap)
        _require(0.0 <= self.overlap_mass < 1.0, "overlap_mass", "must be in [0, 1)",
                 self.overlap_mass)
        _require(self.overlap_mass == 0 or self.overlap >= 1, "overlap_mass", "needs "
                 "specialists.overlap >= 1 (the most subsets a class may join besides its own)",
                 self.overlap_mass)
        _require(-1.0 <= self.min_tie <= 1.0, "min_tie", "must be in [-1, 1]", self.min_tie)
        _require(self.min_size >= 2, "min_size", "must be >= 2", self.min_size)
        _require(self.max_size == 0 or self.max_size >= 1, "max_size", "must be 0 (no bound) or "
                 ">= 1 (k subsets of fewer than classes / k cannot hold every class)",
                 self.max_size)
        _require(0.0 < self.fraction < 1.0, "fraction", "must be in (0, 1)", self.fraction)
        _require(self.top_n >= 1, "top_n", "must be >= 1", self.top_n)
        _require(0.0 <= self.soft_weight <= 1.0, "soft_weight", "must be in [0, 1]",
                 self.soft_weight)
        _require(self.soft_temperature >= 0.01, "soft_temperature", "must be >= 0.01 (logits "
                 "divided by less overflow)", self.soft_temperature)
        _require(self.combine_tol > 0, "combine_tol", "must be > 0", self.combine_tol)
        _require(self.combine_steps >= 1, "combine_steps", "must be >= 1", self.combine_steps)


@dataclass(frozen=True)
class StudentConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        hidden=(800, 800), dropout_in=0.0, dropout_hidden=0.0))  # §3: 784-800-800-10, no regulariser
    train: TrainConfig = field(default_factory=TrainConfig)  # §3: the untranslated training set
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    temperature: float = 20.0  # §3: 2x800 students did equally well for any T above 8
    alpha: float = 0.9  # weight of the soft targets; §2: a much lower weight on hard labels is best
    teacher_mean: Literal["probs", "logits"] = "probs"  # average the generalists' probabilities or logits
    drop_classes: tuple[int, ...] = ()  # transfer-set filter: classes never shown (§3: no 3s)
    keep_classes: tuple[int, ...] = ()  # transfer-set filter: only these classes (§3: 7s and 8s)
    transfer_size: int = 0  # 0: the whole filtered transfer set; else this many of its examples,
    #                         one fixed random draw shared by every student (3 %: 1800 on MNIST)
    soft_targets: Literal["generalists", "ensemble"] = "generalists"  # ensemble: eq. 5's q with
    #                                                    the specialists (needs specialists.k > 0)
    paper: Literal["", "hard", "distilled", "no3", "only78", "grid"] = ""  # the row of the
    #   paper's MNIST table (§3) this student fills in `ensemble table`: hard (alpha 0),
    #   distilled, no3 (drop_classes [3]), only78 (keep_classes [7, 8]), grid (the temperature x
    #   width study: its temperature and first hidden width); "" = a row of its own. Students
    #   naming one row are candidates for it: the row shows the one with the fewest validation
    #   errors (for no3 and only78, after the bias shift chosen on validation)

    def __post_init__(self):
        _require(self.temperature >= 0.01, "temperature", "must be >= 0.01 (logits divided by "
                 "less overflow)", self.temperature)
        _require(0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]", self.alpha)
        _require(self.transfer_size >= 0, "transfer_size", "must be >= 0", self.transfer_size)
        _require(not (self.drop_classes and self.keep_classes), "keep_classes",
                 "cannot be combined with drop_classes", list(self.keep_classes))

    @property
    def uses_teacher(self) -> bool:
        return self.alpha > 0


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"  # names the run directory: runs/<name>-<timestamp>
    seed: int = 0  # generalist i uses seed + i; students use seed + 1000 + their index
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: on the cluster, the GPU Ray assigned a
    #   model (resources.num_gpus > 0), else CPU; on the driver (eval, export), CUDA where torch
    #   sees a GPU. cuda: every model must ask for a GPU
    watchdog_s: float = 3600.0  # no epoch finished by any model for this long: stop with the
    #   models still waiting named (Ray waits silently for resources it cannot place); 0 = off
    autoscaler: AutoscalerConfig = field(default_factory=AutoscalerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generalists: GeneralistsConfig = field(default_factory=GeneralistsConfig)
    specialists: SpecialistsConfig = field(default_factory=SpecialistsConfig)
    students: dict[str, StudentConfig] = field(default_factory=dict)  # name -> recipe; may be empty
    checkpoint_every: int = 1  # epochs between the checkpoints an actor sends back and the run
    #   directory keeps (the last epoch always); more for long runs of fast epochs: a restarted
    #   actor then redoes the epochs since its last checkpoint
    stack_students: bool = False  # students differing only in seed, temperature and alpha (no
    #   dropout or jitter, same resources) train as one stacked model in one actor
    #   (ensemble.stacked): faster, equal within rounding (results/stacked.md)

    def __post_init__(self):
        _require(abs(self.seed) < 2 ** 62, "seed", "must lie within ±2**62 (each model adds "
                 "its index to it)", self.seed)
        _require(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None, "name",
                 "must use only letters, digits, '.', '_' and '-'", self.name)
        _require(self.watchdog_s >= 0, "watchdog_s", "must be >= 0 (0 turns it off)",
                 self.watchdog_s)
        _require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1",
                 self.checkpoint_every)
        _require(not (self.stack_students and self.data.normalize), "stack_students",
                 "cannot be combined with data.normalize (a stack runs its members' layers on "
                 "raw pixels)", self.stack_students)
        for key, res in self.model_resources():
            if self.device == "cuda" and res.num_gpus == 0:
                raise ConfigError(f"device 'cuda' needs a GPU for every model, but "
                                  f"{key}.num_gpus is 0 (it would train on a GPU that Ray "
                                  f"believes free); give it a share of a GPU or use device 'auto'")
        if not self.data.source:  # a named set: its classes are known before it is read
            self.check_classes(NUM_CLASSES[self.data.name])
        _require(not self.specialists.from_run or self.generalists.from_run,
                 "specialists.from_run", "needs generalists.from_run too: specialists start from "
                 "and are combined with the generalists of the run they came from",
                 self.specialists.from_run)
        _require(not self.data.stream or (self.specialists.k == 0 and
                                          not self.specialists.from_run), "data.stream",
                 "gives specialists no in-memory training set to draw their subsets from: set "
                 "specialists.k to 0", self.data.stream)
        _require(not (self.data.stream and self.stack_students), "stack_students",
                 "cannot stack streamed students", self.stack_students)
        _check_workers(self)
        for name, student in self.students.items():
            _require(student.soft_targets == "generalists" or self.specialists.k > 0 or
                     self.specialists.from_run, f"students.{name}.soft_targets", "can be "
                     "'ensemble' only with specialists (specialists.k > 0 or "
                     "specialists.from_run)", student.soft_targets)
            _require(re.fullmatch(r"[A-Za-z0-9_-]+", name) is not None, f"students.{name}",
                     "must be named with letters, digits, '_' and '-' only", name)
            _check_paper_row(name, student)
            _require(not self.data.stream or not (student.drop_classes or student.keep_classes
                                                  or student.transfer_size),
                     f"students.{name}", "cannot filter or subsample a streamed transfer set "
                     "(drop_classes, keep_classes, transfer_size)", name)

    def check_subsets(self, classes: int) -> None:
        """Specialists the classes can fill: each class joins 1 + overlap subsets, each subset
        needs min_size (checked for new runs only, so older runs still load)."""
        spec = self.specialists
        most = classes * (1 + spec.overlap) // spec.min_size
        _require(spec.k <= most, "specialists.k", f"must be at most {most}: {classes} classes, "
                 f"each in 1 + overlap ({spec.overlap}) subsets, fill at most {most} subsets of "
                 f"specialists.min_size ({spec.min_size}) classes", spec.k)

    def check_classes(self, classes: int) -> None:
        """The keys that depend on the data's number of classes (a data set of one's own is
        checked once read, before anything starts)."""
        _require(self.specialists.k <= classes, "specialists.k",
                 f"must be at most the number of classes ({classes})", self.specialists.k)
        _require(self.specialists.top_n <= classes, "specialists.top_n",
                 f"must be at most the number of classes ({classes})", self.specialists.top_n)
        for name, student in self.students.items():
            for key in ("drop_classes", "keep_classes"):
                chosen = getattr(student, key)
                _require(all(0 <= c < classes for c in chosen), f"students.{name}.{key}",
                         f"must hold class indices in [0, {classes})", list(chosen))
            kept = (set(student.keep_classes) if student.keep_classes
                    else set(range(classes)) - set(student.drop_classes))
            _require(bool(kept), f"students.{name}.drop_classes",
                     "must leave at least one class in the transfer set", list(student.drop_classes))

    def model_resources(self):
        """(dotted key, resources) of every kind of model this run trains."""
        yield "generalists.resources", self.generalists.resources
        if self.specialists.k > 0:
            yield "specialists.resources", self.specialists.resources
        for name, student in self.students.items():
            yield f"students.{name}.resources", student.resources


PAPER_ROWS = {"hard": "alpha 0", "distilled": "alpha > 0", "no3": "drop_classes [3] and alpha > 0",
              "only78": "keep_classes [7, 8] and alpha > 0"}  # what each row of §3 is


def _check_workers(cfg: RunConfig) -> None:
    """resources.workers: for generalists and students trained in memory, with a global batch
    that the workers share evenly."""
    _require(cfg.specialists.resources.workers == 1, "specialists.resources.workers",
             "must be 1: a specialist trains in one process", cfg.specialists.resources.workers)
    roles = [("generalists", cfg.generalists.train, cfg.generalists.resources)] + \
        [(f"students.{n}", s.train, s.resources) for n, s in cfg.students.items()]
    for key, train, res in roles:
        if res.workers == 1:
            continue
        _require(train.batch_size % res.workers == 0, f"{key}.resources.workers",
                 f"must divide train.batch_size ({train.batch_size}), the global batch they "
                 "share", res.workers)
        _require(not cfg.data.stream, f"{key}.resources.workers",
                 "must be 1 with data.stream (a streamed model trains in one process)",
                 res.workers)
        _require(not train.compile, f"{key}.train.compile",
                 "cannot be combined with resources.workers > 1", train.compile)


def _check_paper_row(name: str, student: StudentConfig) -> None:
    """A student's `paper` row must be the experiment it names (several students naming one
    row are its candidates: the table verb fills it with the one validation picks)."""
    row = student.paper
    if not row or row == "grid":
        return
    fits = {"hard": not student.uses_teacher, "distilled": student.uses_teacher,
            "no3": student.drop_classes == (3,) and student.uses_teacher,
            "only78": student.keep_classes == (7, 8) and student.uses_teacher}[row]
    _require(fits, f"students.{name}.paper", f"is the paper's '{row}' experiment, which needs "
             f"{PAPER_ROWS[row]}", row)


# ---------------------------------------------------------------- building from YAML -------------

def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        inner = get_args(tp)[0]
        plural = {int: "integers", float: "numbers", bool: "true or false values",
                  str: "strings"}.get(inner)
        return f"a list of {plural}" if plural else f"a list, each {_describe(inner)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp))


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(tp: Any, value: Any, key: str, base: Any = None) -> Any:
    origin = get_origin(tp)
    wrong = ConfigError(f"{key} must be {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, key, base)
    if origin is Literal:
        if value not in get_args(tp):
            raise wrong
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        return tuple(_coerce(get_args(tp)[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        inner = get_args(tp)[1]
        return {str(k): _coerce(inner, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:  # plain data handed on as it is (a factory's kwargs): it must fit in JSON
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be plain data (numbers, strings, lists, mappings), "
                              f"got {value!r}") from None
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise TypeError(f"unsupported config type {tp}")  # a bug in this file, not user input


def parse(cls: type, raw: Any, path: str = "", base: Any = None) -> Any:
    """Build and validate config dataclass `cls` from plain data (a mapping; `path`: its dotted
    key, for messages; `base`: the defaults it overrides); ConfigError if bad."""
    where = path or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {raw!r}")
    names = [f.name for f in fields(cls)]
    raw = {k: v for k, v in raw.items() if not str(k).startswith("x-")}  # anchors for YAML reuse
    if cls is TrainConfig:
        raw = _legacy_augment(raw, base if base is not None else cls())
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{_join(path, close[0])}'?" if close else \
                f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{_join(path, key)}'{hint}")
    hints = get_type_hints(cls)
    base = base if base is not None else cls()
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], _join(path, name),
                                   base=getattr(base, name))
        else:
            kwargs[name] = getattr(base, name)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if path and not str(err).startswith(path):
            raise ConfigError(f"{path}.{err}") from None
        raise


_LEGACY = {"flip": False, "jitter": 0, "elastic": 0.0, "elastic_sigma": 4.0}  # train's keys
#   before train.augment, still read (the config.yaml of older runs): flip, jitter, elastic


def _legacy_augment(raw: dict, base: TrainConfig) -> dict:
    """A train mapping with the old keys as one with `augment`: the keys override the matching
    steps of `base`'s list, applied in the old order (flip, translation, elastic distortion)."""
    if not any(key in raw for key in _LEGACY):
        return raw
    if "augment" in raw:
        raise ConfigError("train.augment replaces the keys flip, jitter and elastic; give "
                          "augment alone")
    old = dict(_LEGACY)
    for name, args in augment_steps(base.augment):
        old.update({"flip": {"flip": True}, "translate": {"jitter": args and args[0]},
                    "elastic": {"elastic": args[0], "elastic_sigma": args[-1]}}.get(name, {}))
    old.update({k: v for k, v in raw.items() if k in _LEGACY})
    old = {k: f"{v:g}" if isinstance(v, (int, float)) else v for k, v in old.items()}
    steps = ["flip"] * (old["flip"] not in (False, "0")) + \
        [f"translate:{old['jitter']}"] * (old["jitter"] != "0")
    steps += [f"elastic:{old['elastic']}:{old['elastic_sigma']}"] * (old["elastic"] != "0")
    return {**{k: v for k, v in raw.items() if k not in _LEGACY}, "augment": steps}


def saved_as(cls: type, raw: Any, expected: Any) -> bool:
    """Whether config `raw`, saved earlier (a checkpoint's), is `expected`: compared as parsed
    configs, so keys added since it was saved take their defaults."""
    try:
        return parse(cls, raw) == expected
    except ConfigError:
        return False


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


class _Loader(yaml.SafeLoader):
    """YAML as yaml.safe_load reads it, but a key given twice in one mapping is refused (the
    last would silently win); keys merged in with `<<` may still be overridden. Checked on the
    composed tree, before merges rewrite any mapping."""

    def construct_document(self, node):
        seen_nodes, todo = set(), [node]
        while todo:
            current = todo.pop()
            if id(current) in seen_nodes:
                continue
            seen_nodes.add(id(current))
            if isinstance(current, yaml.MappingNode):
                keys = set()
                for key_node, value_node in current.value:
                    todo += [key_node, value_node]
                    if key_node.tag == "tag:yaml.org,2002:merge" or \
                            not isinstance(key_node, yaml.ScalarNode):
                        continue
                    key = (key_node.tag, key_node.value)  # tags are resolved when composed
                    if key in keys:
                        raise ConfigError(f"key '{key_node.value}' is given twice in one mapping "
                                          f"(line {key_node.start_mark.line + 1})")
                    keys.add(key)
            elif isinstance(current, yaml.SequenceNode):
                todo += current.value
        return super().construct_document(node)


def read_yaml(text: str) -> Any:
    """The data YAML `text` holds (safe tags only), refusing a key given twice in a mapping and
    nesting too deep to read (ConfigError)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except RecursionError:
        raise ConfigError("nested too deeply to read") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a raw config mapping."""
    raw = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{item}'")
        try:
            value = read_yaml(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: '{text}' is not a valid YAML value") from None
        except ConfigError as err:
            raise ConfigError(f"--set {key}: {err}") from None
        node = raw
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[:depth + 1])}' is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply overrides, validate everything; raise ConfigError on any fault."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder; name a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        raw = read_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
    except ConfigError as err:
        raise ConfigError(f"config file '{path}': {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values at its "
                          f"top level, not a {type(raw).__name__}")
    return parse(RunConfig, apply_overrides(raw if raw is not None else {}, list(overrides)))


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, _join(prefix, k)))
        return out or {prefix: {}}
    return {prefix: data}


def resume_conflicts(saved: RunConfig, new: RunConfig) -> list[str]:
    """Dotted keys whose change forbids resuming a run; raising an epoch count is allowed, and so
    is changing the bounds on waiting and checkpoint_every (they do not change what is
    trained)."""
    old, cur = _flatten(to_dict(saved)), _flatten(to_dict(new))
    bad = []
    for key in sorted(set(old) | set(cur)):
        if old.get(key) == cur.get(key) or key.startswith(("watchdog_s", "autoscaler.",
                                                             "checkpoint_every")):
            continue
        if key.endswith("train.epochs") and key in old and key in cur and cur[key] >= old[key]:
            continue
        bad.append(key)
    return bad
