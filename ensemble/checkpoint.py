"""Checkpoints: one safetensors blob of tensors (weights, optimiser state, RNG states) whose
metadata holds everything else as JSON (config, epoch, metrics) and a sha256 of the tensors.

Trainers make and read blobs (bytes) and never touch the file system, so a checkpoint can travel
through Ray to the driver; only the driver writes files, atomically (temporary file, fsync,
rename, directory fsync), keeping the last two. Nothing here goes through pickle; weights
trained elsewhere are read from safetensors or with torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ensemble.errors import CheckpointError, ConfigError

FORMAT = "ensemble/1"
KEEP = 2  # checkpoints kept per model: the newest, and one to fall back on if it is damaged
_NAME = re.compile(r"epoch-(\d+)\.safetensors")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        t = tensors[key].contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def dumps(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """Serialise tensors (moved to CPU) and JSON-ready metadata into one safetensors blob."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(cpu, metadata={"format": FORMAT, "sha256": _digest(cpu),
                                  "meta": json.dumps(meta)})


def read_meta(blob: bytes) -> dict:
    """The metadata of a blob, without loading its tensors."""
    try:
        (size,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + size])
        extra = header["__metadata__"]
        if extra.get("format") != FORMAT:
            raise ValueError("not an ensemble checkpoint")
        return json.loads(extra["meta"])
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError("not a checkpoint of this project (unreadable safetensors "
                              "header or metadata)") from None


def loads(blob: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors on CPU, metadata) of a blob; raise CheckpointError if damaged or foreign."""
    meta = read_meta(blob)
    try:
        tensors = st_load(blob)
        (size,) = struct.unpack("<Q", blob[:8])
        expected = json.loads(blob[8:8 + size])["__metadata__"]["sha256"]
    except Exception:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError("checkpoint is damaged (its tensors cannot be read)") from None
    if _digest(tensors) != expected:
        raise CheckpointError("checkpoint is damaged (sha256 of its tensors does not match)")
    return tensors, meta


@dataclass
class TrainingState:
    """Everything a trainer needs to go on exactly where it stopped, as one blob holds it."""
    model: dict[str, torch.Tensor]  # the weights now (a state_dict)
    best: dict[str, torch.Tensor]  # the weights of the best epoch by validation
    optim: dict[str, torch.Tensor]  # the optimiser's state: "<parameter index>.<name>"
    rng: dict[str, torch.Tensor]  # RNG states by name: cpu, cuda, batches.<device type>
    meta: dict  # config, epoch, history, summary: JSON


def dumps_state(state: TrainingState) -> bytes:
    """One blob of a trainer's state (`loads_state` reads it back)."""
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    tensors.update({f"best.{k}": v for k, v in state.best.items()})
    tensors.update({f"optim.{k}": v for k, v in state.optim.items()})
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    return dumps(tensors, state.meta)


def loads_state(blob: bytes) -> TrainingState:
    """A trainer's state from its blob; raise CheckpointError if damaged or foreign. A blob
    written before RNG states were kept per device type names its batch order's state
    'batches': a CPU generator's."""
    tensors, meta = loads(blob)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    rng = part("rng.")
    if "batches" in rng:
        rng["batches.cpu"] = rng.pop("batches")
    return TrainingState(part("model."), part("best."), part("optim."), rng, meta)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def epochs_in(folder: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of the checkpoints in a folder, newest first."""
    if not Path(folder).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found, reverse=True)


def save_epoch(folder: Path, epoch: int, blob: bytes, keep: int = KEEP) -> Path:
    """Write the checkpoint of `epoch` into `folder` and drop all but the newest `keep`."""
    path = Path(folder) / f"epoch-{epoch:04d}.safetensors"
    write_atomic(path, blob)
    for _, old in epochs_in(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_latest(folder: Path) -> tuple[bytes, dict] | None:
    """(blob, metadata) of the newest readable checkpoint in `folder`, falling back to older
    ones when the newest is damaged; None if the folder holds none; CheckpointError if all are
    damaged."""
    found = epochs_in(folder)
    problems = []
    for _, path in found:
        blob = path.read_bytes()
        try:
            _, meta = loads(blob)
            return blob, meta
        except CheckpointError as err:
            problems.append(f"{path.name}: {err}")
    if problems:
        raise CheckpointError(f"no readable checkpoint in {folder} ({'; '.join(problems)})")
    return None


def read_state_dict(location: str) -> dict[str, torch.Tensor]:
    """The state dict in a file trained elsewhere, by path or URI (through pyarrow.fs):
    safetensors, or a torch file read with weights_only=True (no code in it runs); a mapping
    whose 'state_dict' is one gives that. ConfigError, in one sentence, if it holds none."""
    data = _read_bytes(location)
    try:
        return st_load(data)
    except Exception:  # not safetensors: a torch file, perhaps
        pass
    try:
        found = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{location} is neither safetensors nor a torch file of tensors "
                          f"({first[:200]})") from None
    if isinstance(found, dict) and isinstance(found.get("state_dict"), dict):
        found = found["state_dict"]
    if not (isinstance(found, dict) and found and
            all(isinstance(v, torch.Tensor) for v in found.values())):
        raise ConfigError(f"{location} holds no state dict (a mapping of names to tensors)")
    return found


def _read_bytes(location: str) -> bytes:
    if "://" not in location:
        path = Path(location).expanduser()
        if not path.is_file():
            raise ConfigError(f"there is no file {location}")
        return path.read_bytes()
    try:
        from pyarrow import fs

        filesystem, where = fs.FileSystem.from_uri(location)
        with filesystem.open_input_stream(where) as src:
            return src.read()
    except ImportError:
        raise ConfigError(f"reading {location} needs pyarrow: pip install -e '.[uri]'") from None
    except Exception as err:  # pyarrow raises several types for a URI it cannot read
        raise ConfigError(f"cannot read {location}: {str(err).splitlines()[0]}") from None
