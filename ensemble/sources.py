"""Data sets of one's own, read into the same uint8 arrays as the named sets (ensemble.data):

- `data.folder`: torchvision's ImageFolder layout (ROOT/train/<class>/*, ROOT/test/<class>/*,
  optional ROOT/val/<class>/*), decoded once on the driver, in worker processes, with Pillow;
  every image converted to one mode (L or RGB) and, with `image_size`, its shorter side resized
  to it and the centre cropped to a square. Class names are the train folders'.
- `data.npz`: x_train, y_train, x_test, y_test (uint8 N x H x W or N x H x W x C; integer
  labels), optional x_val, y_val, and classes (names).
- `data.factory`: "package.module:callable" returning those arrays as a mapping.
- `data.parquet`: ROOT/train, ROOT/test and optional ROOT/val, Parquet files as
  ensemble.streaming.write_parquet writes them (the training split can stream instead).

Bad data is refused in one sentence that names the file or key (DataError).
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble.errors import ConfigError, DataError

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
GREY = {"1", "L", "LA", "I", "I;16", "F", "P"}  # modes read as one channel (P: see _mode)
STORE_SHARE = 0.3  # of the machine's memory: Ray's default object store size
CHUNK = 1024  # files a worker decodes at a time


@dataclass
class Arrays:
    """A data set's images (uint8 N,C,H,W) and labels (int64 N), validation if it has its own."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None


def read(cfg) -> Arrays:
    """The arrays of `cfg` (a DataConfig naming a folder, an npz file or a factory)."""
    if cfg.folder:
        return read_folder(Path(cfg.folder).expanduser(), cfg.mode, cfg.image_size)
    if cfg.parquet:
        return read_parquet(cfg.parquet, with_train=not cfg.stream)
    if cfg.npz:
        path = Path(cfg.npz).expanduser()
        if not path.is_file():
            raise DataError(f"data.npz: there is no file {path}")
        try:
            with np.load(path, allow_pickle=False) as found:
                mapping = {k: found[k] for k in found.files}
        except (OSError, ValueError) as err:
            raise DataError(f"data.npz: {path} is not a readable .npz ({_first(err)})") from None
        return from_mapping(mapping, f"data.npz {path}")
    return from_mapping(_call(cfg.factory, cfg.kwargs), f"data.factory {cfg.factory}")


def _call(path: str, kwargs: dict):
    from ensemble.models import factory

    try:
        made = factory(path)
    except ConfigError as err:
        raise DataError(f"data.factory: {err}") from None
    try:
        return made(**kwargs)
    except Exception as err:  # the user's code: whatever it raises, one sentence
        raise DataError(f"data.factory {path} raised {type(err).__name__}: {_first(err)}") \
            from None


def _first(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


# ---------------------------------------------------------------- arrays --------------------------
def from_mapping(found, what: str) -> Arrays:
    """Arrays from a mapping of x_train, y_train, x_test, y_test (+ x_val, y_val, classes)."""
    if not hasattr(found, "keys"):
        raise DataError(f"{what} gave a {type(found).__name__}, not a mapping of arrays")
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in found]
    if missing:
        raise DataError(f"{what} lacks {', '.join(missing)}")
    parts = ["train", "test"] + (["val"] if "x_val" in found or "y_val" in found else [])
    xs = {p: _images(found.get(f"x_{p}"), f"{what}: x_{p}") for p in parts}
    ys = {p: _labels(found.get(f"y_{p}"), len(xs[p]), f"{what}: y_{p}") for p in parts}
    shapes = {p: x.shape[1:] for p, x in xs.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{what}: the images' shapes differ between splits ({shapes})")
    top = max(int(y.max()) for y in ys.values() if len(y)) + 1 if any(map(len, ys.values())) \
        else 0
    names = found.get("classes")
    classes = tuple(str(c) for c in names) if names is not None else \
        tuple(str(c) for c in range(top))
    for p, y in ys.items():
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"{what}: y_{p} must lie in [0, {len(classes)}), found "
                            f"{y.min()}..{y.max()}")
    return Arrays(xs["train"], ys["train"], xs["test"], ys["test"], classes, xs.get("val"),
                  ys.get("val"))


def _images(x, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim not in (3, 4):
        kind = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else \
            type(x).__name__
        raise DataError(f"{what} must be uint8 images N x H x W or N x H x W x C, got {kind}")
    if x.ndim == 3:
        return x[:, None]
    if x.shape[3] not in (1, 3, 4):
        raise DataError(f"{what} has {x.shape[3]} channels in its last axis (1, 3 or 4 "
                        "expected: N x H x W x C)")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _labels(y, n: int, what: str) -> np.ndarray:
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what} must be a 1-D array of integer labels")
    if len(y) != n:
        raise DataError(f"{what} holds {len(y)} labels for {n} images")
    return y.astype(np.int64)


# ---------------------------------------------------------------- Parquet -------------------------
def read_parquet(root: str, with_train: bool = True) -> Arrays:
    """ROOT/train, ROOT/test and optional ROOT/val as ensemble.streaming.write_parquet writes
    them, by path or URI; without the training split when it streams (data.stream)."""
    import json

    found, shapes, names = {}, set(), None
    for part in ("train", "val", "test"):
        if part == "train" and not with_train:
            continue
        location = f"{str(root).rstrip('/')}/{part}"
        table, meta = _parquet_table(location, required=part != "val")
        if table is None:
            continue
        if b"image_shape" not in meta:
            raise DataError(f"data.parquet: {location} has no image_shape in its metadata "
                            "(write it with ensemble.streaming.write_parquet)")
        shape = tuple(int(d) for d in meta[b"image_shape"].decode().split(","))
        shapes.add(shape)
        names = names or (json.loads(meta[b"classes"]) if b"classes" in meta else None)
        pixels = np.frombuffer(b"".join(table.column("image").to_pylist()), np.uint8)
        found[f"x_{part}"] = pixels.reshape(-1, *shape).transpose(0, 2, 3, 1) \
            if len(shape) == 3 else pixels.reshape(-1, *shape)
        found[f"y_{part}"] = table.column("label").to_numpy()
    if len(shapes) > 1:
        raise DataError(f"data.parquet: {root}'s splits hold images of different shapes "
                        f"{sorted(shapes)}")
    if not with_train and "x_val" not in found:
        raise DataError(f"data.parquet: {root} needs a val/ split when its training split "
                        "streams (data.stream): none can be held out of a stream")
    if not with_train:  # the images stream: only their shape is needed here
        found["x_train"] = np.zeros((0, *next(iter(shapes))), np.uint8).transpose(0, 2, 3, 1)
        found["y_train"] = np.zeros(0, np.int64)
    if names is not None:
        found["classes"] = np.array(names)
    return from_mapping(found, f"data.parquet {root}")


def _parquet_table(location: str, required: bool):
    """(table of image and label, schema metadata) of the Parquet files at `location`."""
    import pyarrow.dataset as pads

    try:
        ds = pads.dataset(location, format="parquet")
        table = ds.to_table(columns=["image", "label"])
    except (FileNotFoundError, OSError) as err:
        if not required:
            return None, {}
        raise DataError(f"data.parquet: cannot read {location} ({_first(err)})") from None
    except Exception as err:  # pyarrow raises several types for files it cannot use
        raise DataError(f"data.parquet: cannot read {location} ({_first(err)})") from None
    return table, ds.schema.metadata or {}


# ---------------------------------------------------------------- image folders ------------------
def read_folder(root: Path, mode: str, size: int, workers: int | None = None) -> Arrays:
    """An ImageFolder tree decoded into arrays (see the module's docstring): chunks of files
    decoded by forked worker processes (Pillow holds the GIL), small trees in this one."""
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(f"data.folder {root} needs train/ and test/ folders "
                        "(ROOT/train/<class>/*, ROOT/test/<class>/*)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    parts = ["train", "test"] + (["val"] if (root / "val").is_dir() else [])
    files = {part: _listing(root / part, classes) for part in parts}
    everything = [f for part in parts for f, _ in files[part]]
    mode = mode or _mode(everything)
    shape = decode(everything[0], mode, size).shape  # (C, H, W): every image's, or refused
    _check_fits(root, len(everything), shape)
    workers = workers or os.cpu_count() or 1
    pool = None
    if workers > 1 and len(everything) >= 2 * CHUNK:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    decoded = {}
    try:
        for part in parts:
            paths = [f for f, _ in files[part]]
            chunks = [(paths[lo:lo + CHUNK], mode, size, shape, everything[0])
                      for lo in range(0, len(paths), CHUNK)]
            done = pool.map(_chunk, chunks) if pool else map(_chunk, chunks)
            decoded[part] = (np.concatenate(list(done)),
                             np.array([label for _, label in files[part]], np.int64))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    val = decoded.get("val", (None, None))
    return Arrays(*decoded["train"], *decoded["test"], tuple(classes), *val)


def _chunk(job) -> np.ndarray:
    """Decode files of one shape into one array (N, C, H, W); DataError for another shape."""
    paths, mode, size, shape, first = job
    out = np.empty((len(paths), *shape), np.uint8)
    for i, path in enumerate(paths):
        image = decode(path, mode, size)
        if image.shape != shape:
            raise DataError(f"data.folder: {path} is {image.shape[2]}x{image.shape[1]} but "
                            f"{first} is {shape[2]}x{shape[1]}; set data.image_size to resize "
                            "them")
        out[i] = image
    return out


def _listing(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(image file, class index) under folder/<class>/, each class folder holding some."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if found != classes:
        raise DataError(f"data.folder: {folder} has classes {found[:5]}... unlike train/ "
                        f"({classes[:5]}...): every split needs the same class folders"
                        if len(classes) > 5 else
                        f"data.folder: {folder} has classes {found}, train/ has {classes}")
    listing = []
    for label, name in enumerate(classes):
        with os.scandir(folder / name) as entries:  # names from the directory, no stat each
            images = sorted(e.path for e in entries
                            if os.path.splitext(e.name)[1].lower() in SUFFIXES and e.is_file())
        if not images:
            raise DataError(f"data.folder: {folder / name} holds no images")
        listing += [(path, label) for path in images]
    return listing


def _mode(paths: list[Path], sample: int = 500) -> str:
    """L if most images are grey, else RGB (read from the headers of an even sample)."""
    from PIL import Image

    chosen = paths[::max(1, len(paths) // sample)]
    grey = 0
    for path in chosen:
        try:
            with Image.open(path) as img:
                grey += img.mode in GREY and img.mode != "P"
        except OSError as err:
            raise DataError(f"cannot read image {path} ({_first(err)})") from None
    return "L" if 2 * grey > len(chosen) else "RGB"


def decode(path: Path, mode: str, size: int) -> np.ndarray:
    """One image as uint8 C x H x W in `mode` (L: C = 1, RGB: C = 3), with `size` its shorter
    side resized to it and the centre cropped to a square."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode != mode:
                img = img.convert(mode)
            if size:
                scale = size / min(img.size)
                img = img.resize((max(size, round(img.width * scale)),
                                  max(size, round(img.height * scale))), Image.BILINEAR)
                left, top = (img.width - size) // 2, (img.height - size) // 2
                img = img.crop((left, top, left + size, top + size))
            pixels = np.array(img, dtype=np.uint8)  # a copy: writable
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path} ({_first(err)})") from None
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _check_fits(root: Path, count: int, shape: tuple[int, int, int]) -> None:
    """Refuse a folder whose arrays would not fit Ray's object store (its default size)."""
    need = count * shape[0] * shape[1] * shape[2]
    shape = shape[1], shape[2], shape[0]  # H, W, C for the message
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > STORE_SHARE * memory:
        raise DataError(f"data.folder {root}: {count:,} images of {shape[1]}x{shape[0]}x"
                        f"{shape[2]} need {need / 2**30:.1f} GiB, more than Ray's object store "
                        f"holds here ({STORE_SHARE * memory / 2**30:.1f} GiB); stream them "
                        "instead (ray.data.read_images) or set a smaller data.image_size")
