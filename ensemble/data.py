"""Data sets as uint8 arrays, their fixed splits and transfer-set filters (augmentation:
ensemble.augment).

A data set is read once, on the driver, into `Splits` (uint8 NumPy arrays, images as N x C x H x W):
that is what goes into Ray's object store (NumPy arrays are zero-copy there, torch tensors are
not). Each trainer then turns its arrays into float tensors on its own device once, and draws
batches by index.

Where data is looked for: ROOT is `--data-dir`, else `$ENSEMBLE_DATA`, else Debian's
`/usr/share/datasets` (then `~/.cache/ensemble/data`, where downloads go without a ROOT). Under
ROOT, MNIST and Fashion-MNIST are IDX files, gzipped or not, in `ROOT/<name>/` or where
torchvision leaves them (`ROOT/MNIST/raw/`, `ROOT/FashionMNIST/raw/`); CIFAR is its binary
release (`ROOT/cifar-10-batches-bin/`, `ROOT/cifar-100-binary/`).
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ensemble.config import NUM_CLASSES, DataConfig
from ensemble.errors import DataError

CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
}
KNOWN_GROUPS = {  # confusable groups known in advance, to judge the coordinator's subsets (never
    "fashion-mnist": {"garments": [0, 2, 3, 4, 6], "footwear": [5, 7, 9]},  # used to make them)
}
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_CIFAR_DIR = {"cifar10": "cifar-10-batches-bin", "cifar100": "cifar-100-binary"}
_CIFAR_URL = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
              "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"}


@dataclass(frozen=True)
class Splits:
    """Train / validation / test arrays of one data set: images uint8 (N,C,H,W), labels int64 (N,)."""
    name: str
    classes: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    mean: tuple[float, ...] | None = None  # per channel: every model normalises its input
    std: tuple[float, ...] | None = None   #   by these (data.normalize), else None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_train(self, keep: np.ndarray) -> "Splits":
        """The same splits with only the training examples where `keep` (bool mask) holds."""
        return dataclasses.replace(self, train_x=self.train_x[keep], train_y=self.train_y[keep])


# ---------------------------------------------------------------- IDX files ------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array; raise DataError if it is malformed."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read IDX file '{path}': {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"'{path}' is not an IDX file (wrong magic number)")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if ndim == 0 or len(raw) < head:
        raise DataError(f"'{path}' is not an IDX file (bad header)")
    shape = struct.unpack(f">{ndim}I", raw[4:head])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - head != expected:
        raise DataError(f"'{path}' is truncated or padded: header promises {expected} bytes of "
                        f"data for shape {shape}, file holds {len(raw) - head}")
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped if the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


# ---------------------------------------------------------------- finding and loading -------------

def data_roots(data_dir: str | Path | None = None) -> list[Path]:
    """Where to look, in order: the given ROOT, else $ENSEMBLE_DATA, else Debian's and the cache."""
    if data_dir:
        return [Path(data_dir).expanduser()]
    if os.environ.get("ENSEMBLE_DATA"):
        return [Path(os.environ["ENSEMBLE_DATA"]).expanduser()]
    return [Path("/usr/share/datasets"), Path("~/.cache/ensemble/data").expanduser()]


def _idx_candidates(name: str, root: Path) -> list[Path]:
    return [root / name, root / _TORCHVISION_DIR[name] / "raw"]


def _find_idx(folder: Path, stem: str) -> Path | None:
    for suffix in ("", ".gz"):
        for ndim in ("1", "3"):
            path = folder / f"{stem}-idx{ndim}-ubyte{suffix}"
            if path.is_file():
                return path
    return None


def _load_idx_set(name: str, roots: list[Path]) -> tuple[np.ndarray, ...] | None:
    for root in roots:
        for folder in _idx_candidates(name, root):
            files = [_find_idx(folder, f"{part}-{kind}") for part in ("train", "t10k")
                     for kind in ("images", "labels")]
            if all(files):
                arrays = [read_idx(f) for f in files]
                for images, labels, part in ((arrays[0], arrays[1], "train"),
                                             (arrays[2], arrays[3], "t10k")):
                    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                        raise DataError(f"{folder}: {part} images {images.shape} and labels "
                                        f"{labels.shape} do not match")
                return arrays[0][:, None], arrays[1], arrays[2][:, None], arrays[3]
    return None


def _read_cifar_bin(files: list[Path], label_byte: int, record: int) -> tuple[np.ndarray, ...]:
    raw = b"".join(f.read_bytes() for f in files)
    if len(raw) % record:
        raise DataError(f"CIFAR file(s) {', '.join(map(str, files))} are truncated")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    head = record - 3072
    return rows[:, head:].reshape(-1, 3, 32, 32), rows[:, label_byte]


def _load_cifar(name: str, roots: list[Path]) -> tuple[np.ndarray, ...] | None:
    for root in roots:
        folder = root / _CIFAR_DIR[name]
        if name == "cifar10":
            train = [folder / f"data_batch_{i}.bin" for i in range(1, 6)]
            test = [folder / "test_batch.bin"]
            label_byte, record = 0, 3073
        else:
            train, test = [folder / "train.bin"], [folder / "test.bin"]
            label_byte, record = 1, 3074  # coarse label, fine label, pixels
        if all(f.is_file() for f in train + test):
            return (*_read_cifar_bin(train, label_byte, record),
                    *_read_cifar_bin(test, label_byte, record))
    return None


def _class_names(name: str, roots: list[Path]) -> tuple[str, ...]:
    if name in CLASS_NAMES:
        return CLASS_NAMES[name]
    for root in roots:
        names = root / _CIFAR_DIR[name] / "fine_label_names.txt"
        if names.is_file():
            return tuple(line for line in names.read_text().split() if line)
    return tuple(str(i) for i in range(NUM_CLASSES[name]))


def _download(name: str, root: Path) -> None:
    """Fetch a data set with torchvision into ROOT (network needed)."""
    import torchvision  # lazy: only a download needs it

    root.mkdir(parents=True, exist_ok=True)
    if name == "mnist":
        torchvision.datasets.MNIST(str(root), download=True)
    elif name == "fashion-mnist":
        torchvision.datasets.FashionMNIST(str(root), download=True)
    else:
        torchvision.datasets.utils.download_and_extract_archive(_CIFAR_URL[name], str(root))


def _places(name: str, roots: list[Path]) -> list[str]:
    if name in _CIFAR_DIR:
        return [str(r / _CIFAR_DIR[name]) for r in roots]
    return [str(p) for r in roots for p in _idx_candidates(name, r)]


def load_arrays(name: str, data_dir: str | Path | None = None, download: bool = True):
    """(train_x, train_y, test_x, test_y, class names) of a data set, downloading if allowed."""
    roots = data_roots(data_dir)
    loader = _load_cifar if name in _CIFAR_DIR else _load_idx_set
    arrays = loader(name, roots)
    failure = ""
    if arrays is None and download:
        target = roots[0] if (data_dir or os.environ.get("ENSEMBLE_DATA")) else roots[-1]
        try:
            _download(name, target)
            arrays = loader(name, [target])
        except Exception as err:  # no network, no permission: say so in one sentence below
            failure = f"; downloading into {target} failed ({type(err).__name__}: {err})"
    if arrays is None:
        suffix = failure if download else " (data.download is off)"
        raise DataError(f"data set '{name}' not found; looked in "
                        f"{', '.join(_places(name, roots))}{suffix}")
    return (*arrays, _class_names(name, roots))


def load_splits(cfg: DataConfig, data_dir: str | Path | None = None) -> Splits:
    """Read a data set, a named one or one's own (ensemble.sources), and carve its validation
    split: a named set's from the end of its training set (MNIST's classic split), one's own
    from a fixed shuffle of it (its files may be in class order), unless it brings its own."""
    from ensemble.sources import Arrays, read

    if cfg.source:
        arrays, name = read(cfg), f"{cfg.source} {getattr(cfg, cfg.source)}"
        if arrays.val_x is None:
            order = np.random.default_rng(0).permutation(len(arrays.train_y))
            arrays.train_x, arrays.train_y = arrays.train_x[order], arrays.train_y[order]
    else:
        train_x, train_y, test_x, test_y, classes = load_arrays(cfg.name, data_dir, cfg.download)
        train_y, test_y = train_y.astype(np.int64), test_y.astype(np.int64)
        for labels, part in ((train_y, "training"), (test_y, "test")):
            if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
                raise DataError(f"{cfg.name} {part} labels must lie in [0, {len(classes)}), "
                                f"found {labels.min()}..{labels.max()}")
        arrays, name = Arrays(train_x, train_y, test_x, test_y, tuple(classes)), cfg.name
    return _normalized(cfg, _carved(cfg, name, arrays))


def _carved(cfg: DataConfig, name: str, a) -> Splits:
    """Splits of arrays `a`: validation its own, else the last val_size training images."""
    if a.val_x is not None:
        train_x, train_y, val_x, val_y = a.train_x, a.train_y, a.val_x, a.val_y
    else:
        if cfg.val_size >= len(a.train_x):
            raise DataError(f"data.val_size={cfg.val_size} leaves no training data: {name} has "
                            f"{len(a.train_x)} training images")
        cut = len(a.train_x) - cfg.val_size
        train_x, train_y = a.train_x[:cut], a.train_y[:cut]
        val_x, val_y = a.train_x[cut:], a.train_y[cut:]
    keep = min(len(train_y), cfg.train_size) if cfg.train_size else len(train_y)
    if cfg.stream:
        keep = 0  # the training examples stream from cfg.stream (ensemble.streaming)
    return Splits(name, a.classes, train_x[:keep], train_y[:keep], val_x, val_y, a.test_x,
                  a.test_y)


def _normalized(cfg: DataConfig, splits: Splits) -> Splits:
    """`splits` with the per-channel statistics every model normalises by (data.normalize)."""
    if not cfg.normalize:
        return splits
    channels = splits.image_shape[0]
    mean, std = (cfg.mean, cfg.std) if cfg.mean else channel_stats(splits.train_x)
    if len(mean) not in (1, channels):
        raise DataError(f"data.mean and data.std have {len(mean)} values; {splits.name}'s "
                        f"images have {channels} channel(s)")
    return dataclasses.replace(splits, mean=tuple(mean) * (channels // len(mean)),
                               std=tuple(std) * (channels // len(std)))


def transfer_mask(labels: np.ndarray, drop: tuple[int, ...] = (), keep: tuple[int, ...] = (),
                  size: int = 0) -> np.ndarray:
    """Boolean mask of a transfer set: all classes but `drop`, or only `keep`; then, if `size`,
    that many of those examples drawn at random, one fixed draw (every student with the same
    filters and size gets the same examples)."""
    mask = np.isin(labels, keep) if keep else ~np.isin(labels, drop)
    if 0 < size < mask.sum():
        chosen = np.random.default_rng(0).permutation(np.flatnonzero(mask))[:size]
        mask = np.zeros_like(mask)
        mask[chosen] = True
    return mask


# ---------------------------------------------------------------- on the device -------------------

def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N,C,H,W) array -> float32 tensor in [0, 1] on `device` (the array is never written)."""
    with warnings.catch_warnings():  # Ray's zero-copy arrays are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(np.ascontiguousarray(images))
    return pixels.to(device).float().div_(255.0)


def to_pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N,C,H,W) array -> the same uint8 tensor on `device`: a quarter of float32's
    memory, made float a batch at a time by `as_float` (the values `to_device` would give)."""
    with warnings.catch_warnings():  # Ray's zero-copy arrays are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(images)).to(device)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Pixels (uint8) as float32 in [0, 1]; a float tensor as it is."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def labels_to_device(labels: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.tensor(labels, dtype=torch.int64, device=device)  # small: a copy is cheap


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], ...]:
    """(mean, std) per channel of pixel/255 over uint8 images (N,C,H,W), in float64 chunks."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for i in range(0, len(images), chunk):
        part = images[i:i + chunk].astype(np.float64) / 255.0
        total += part.sum(axis=(0, 2, 3))
        squares += (part ** 2).sum(axis=(0, 2, 3))
    count = len(images) * images.shape[2] * images.shape[3]
    mean = total / count
    return tuple(mean.tolist()), tuple(np.sqrt(np.maximum(squares / count - mean ** 2,
                                                          1e-12)).tolist())
