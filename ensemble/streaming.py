"""Training examples streamed through Ray Data (`data.stream`), for data sets larger than memory.

The driver opens the Parquet files lazily (`open_stream`) and hands the Dataset to each
generalist's and student's actor; `StreamTrainer` and `StreamStudent` pull one epoch's batches
from it, decoding each batch's images to the same float tensors the in-memory path uses (a
streamed student asks its teacher for each batch's soft targets); Ray Data reads PREFETCH
batches ahead, and on CUDA a batch goes from pinned memory without blocking. With
`train.shuffle: false` both paths see the same batches in the same order and train to the
same weights (tested); with shuffling on, each epoch draws a seeded order from a shuffle
buffer as the rows stream past.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ensemble.augment import augment
from ensemble.data import as_float
from ensemble.distill import Student, distillation_loss
from ensemble.errors import DataError
from ensemble.train import Trainer

SHUFFLE_BUFFER = 20_000  # rows; a window of the stream, not a global shuffle
PREFETCH = 2  # batches Ray Data reads ahead while the model trains on the current one


def open_stream(source: str):
    """The Ray Data Dataset of the Parquet files at `source` (read lazily, by the actors); a
    DataError, in one sentence, if there are none or they are not what data.stream trains on."""
    try:
        import ray.data
    except ImportError:
        raise DataError("data.stream needs Ray Data: pip install -e '.[data]'") from None
    try:
        # read tasks ask for no CPU: they are I/O and must not wait behind the actors that
        # hold every CPU of a small cluster while they consume the stream
        ds = ray.data.read_parquet(source, ray_remote_args={"num_cpus": 0})
        schema = ds.schema()  # from the files' footers, before anything trains
        columns = list(schema.names) if schema is not None else []
    except FileNotFoundError:
        raise DataError(f"data.stream={source}: no such file or folder") from None
    except Exception as err:  # Ray Data and pyarrow raise many types for a source they cannot use
        raise DataError(f"cannot read the Parquet files at data.stream={source}: "
                        f"{_first_sentence(err)}") from None
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise DataError(f"the Parquet files at data.stream={source} have no column "
                        f"{' or '.join(missing)} (they have {', '.join(columns) or 'none'})")
    ds = ds.select_columns(["image", "label"])
    # the files' order, whichever read task ends first: epochs are then reproducible, and a
    # restarted actor repeats the epoch it lost
    ds.context.execution_options.preserve_order = True
    return ds


def _first_sentence(err: Exception) -> str:
    """The first sentence of an error's message, without its full stop."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text.split(". ", 1)[0].rstrip(".")


class Streamed:
    """Training examples from a Ray Data Dataset (`self.stream`), one batch at a time."""
    streams = True
    stream = None

    def epoch_batches(self):
        shuffle = {"local_shuffle_buffer_size": SHUFFLE_BUFFER,
                   "local_shuffle_seed": self.seed + self.epoch} if self.cfg.shuffle else {}
        shape = (-1, *self.image_shape)
        cuda = self.device.type == "cuda"  # pinned host memory, copies beside the compute
        for batch in self.stream.iter_batches(batch_size=self.cfg.batch_size,
                                              batch_format="numpy", prefetch_batches=PREFETCH,
                                              **shuffle):
            pixels = np.frombuffer(bytearray(b"".join(batch["image"])), np.uint8)  # writable
            if pixels.size != len(batch["label"]) * int(np.prod(self.image_shape)):
                raise DataError(f"{self.name}: the streamed images are not of shape "
                                f"{self.image_shape} (uint8)")
            x = torch.from_numpy(pixels.reshape(shape))
            y = torch.tensor(batch["label"], dtype=torch.int64)  # a copy: Ray's is read-only
            if cuda:
                x, y = x.pin_memory(), y.pin_memory()
            yield (as_float(x.to(self.device, non_blocking=cuda)),
                   y.to(self.device, non_blocking=cuda))

    @staticmethod
    def batch_size_of(batch) -> int:
        return len(batch[1])


class StreamTrainer(Streamed, Trainer):
    """A generalist trained on a stream."""

    def __init__(self, name, model_cfg, train_cfg, data, seed, threads=1, device="auto",
                 stream=None):
        super().__init__(name, model_cfg, train_cfg, data, seed, threads, device)
        self.stream = stream

    def batch_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.forward(augment(x, self.cfg, self.batches)), y,
                               label_smoothing=self.cfg.label_smoothing)


class StreamStudent(Streamed, Student):
    """A student whose transfer set is a stream: its teacher gives each batch's soft targets
    (the batch as augmented, when it is)."""

    def __init__(self, name, cfg, data, teachers, seed, threads=1, device="auto",
                 specialists=(), specialists_cfg=None, outputs=None, stream=None):
        super().__init__(name, cfg, data, teachers, seed, threads, device, specialists,
                         specialists_cfg)
        self.stream = stream

    def batch_loss(self, batch) -> torch.Tensor:
        x, y = batch
        xb = augment(x, self.cfg, self.batches)
        logits = self.forward(xb)
        if self.teacher is None:  # hard labels only
            return F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        return distillation_loss(logits, self.teacher.probs(xb, self.temperature), y,
                                 self.temperature, self.alpha, self.cfg.label_smoothing)


def write_parquet(path, images: np.ndarray, labels: np.ndarray, rows_per_file: int = 0,
                  classes=None) -> None:
    """Write uint8 images (N,C,H,W) and labels as the Parquet files `data.stream` and
    `data.parquet` read: one file, or one per `rows_per_file` rows, in the folder `path`; the
    image shape (and the class names, if given) in each file's metadata."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from pathlib import Path

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    step = rows_per_file or len(images)
    for i, lo in enumerate(range(0, len(images), step)):
        chunk = images[lo:lo + step]
        table = pa.table({"image": [row.tobytes() for row in chunk],
                          "label": labels[lo:lo + step].astype(np.int64)})
        meta = {"image_shape": ",".join(map(str, images.shape[1:]))}
        if classes is not None:
            meta["classes"] = json.dumps([str(c) for c in classes])
        table = table.replace_schema_metadata(meta)
        pq.write_table(table, folder / f"part-{i:05d}.parquet")
