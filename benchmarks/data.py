"""Reading one's own images and augmenting them, against torchvision's per-sample pipeline.

    python benchmarks/data.py [--data-dir ../shared/data] [--work /tmp/ensemble-data-bench]
                              [--out results/data.md]

1. Decoding: MNIST's 60,000 training images written out by this script as PNGs in an
   ImageFolder tree (and 10 test images per class, which both sides read), then read into one
   uint8 array by ensemble.sources.read_folder (Pillow in forked worker processes) against
   torchvision.datasets.ImageFolder + DataLoader(num_workers=2, batch_size=256) collecting the
   same uint8 tensors. Target: >= 2x. (torchvision.io's own decoders would be faster still,
   but torchvision 0.29 deprecates them for TorchCodec, so ours stay with Pillow.)
2. One augmented epoch of 50,000 CIFAR-shaped images (random crop with 4 pixels of padding by
   reflection, horizontal flip, per-channel normalisation), batches of 256: ours batched on the
   device (train.augment [crop:4, flip], then the normalisation a Normalized model applies)
   against torchvision.transforms.v2 per sample in a DataLoader(num_workers=2). Target: >= 5x.

Both sides in one run, on the same cores; `name: value` lines end the results file.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ensemble.augment import augment
from ensemble.config import TrainConfig
from ensemble.data import as_float, load_arrays
from ensemble.sources import read_folder

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CROP_FLIP = TrainConfig(augment=("crop:4", "flip"))  # padding by reflection, as below


def write_pngs(root: Path, images: np.ndarray, labels: np.ndarray, part: str) -> None:
    for c in range(10):
        (root / part / str(c)).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(root / part / str(label) / f"{i:05d}.png")


def ours_decode(root: Path) -> tuple[float, int]:
    start = time.perf_counter()
    arrays = read_folder(root, "L", 0)
    return time.perf_counter() - start, len(arrays.train_y) + len(arrays.test_y)


def torchvision_decode(root: Path) -> tuple[float, int]:
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    start = time.perf_counter()
    count = 0
    for part in ("train", "test"):
        folder = datasets.ImageFolder(str(root / part), transform=v2.Compose(
            [v2.Grayscale(), v2.PILToTensor()]))
        batches = [x for x, _ in DataLoader(folder, batch_size=256, num_workers=2)]
        count += len(torch.cat(batches))
    return time.perf_counter() - start, count


class Pictures(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(torch.from_numpy(self.images[i]))


def ours_augment(images: np.ndarray, batch: int = 256) -> float:
    x = torch.from_numpy(images)  # uint8 on the device (here the CPU), as a trainer holds it
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    start = time.perf_counter()
    for lo in range(0, len(x), batch):
        xb = augment(as_float(x[lo:lo + batch]), CROP_FLIP, gen)
        out = (xb - mean) / std
    assert out.dtype == torch.float32
    return time.perf_counter() - start


def torchvision_augment(images: np.ndarray, batch: int = 256) -> float:
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    start = time.perf_counter()
    for xb in DataLoader(Pictures(images, transform), batch_size=batch, num_workers=2):
        assert xb.dtype == torch.float32
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--work", default="/tmp/ensemble-data-bench")
    parser.add_argument("--out", default=str(ROOT / "results" / "data.md"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    train_x, train_y, test_x, test_y, _ = load_arrays("mnist", args.data_dir, download=False)
    few = np.concatenate([np.flatnonzero(test_y == c)[:10] for c in range(10)])
    write_pngs(work, train_x[:, 0], train_y, "train")
    write_pngs(work, test_x[few, 0], test_y[few], "test")
    images = np.random.default_rng(0).integers(0, 256, (50_000, 3, 32, 32), dtype=np.uint8)
    times = {key: [] for key in ("decode ours", "decode torchvision", "augment ours",
                                 "augment torchvision")}
    for _ in range(args.repeats):  # the two sides take turns: a slow moment hits both
        (seconds, n), (theirs, n_theirs) = ours_decode(work), torchvision_decode(work)
        assert n == n_theirs
        times["decode ours"].append(seconds)
        times["decode torchvision"].append(theirs)
        times["augment ours"].append(ours_augment(images))
        times["augment torchvision"].append(torchvision_augment(images))
    shutil.rmtree(work, ignore_errors=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    decode = {"ours": (median["decode ours"], n), "torchvision": (median["decode torchvision"], n)}
    augment = {"ours": median["augment ours"], "torchvision": median["augment torchvision"]}

    flags = sorted(set(re.findall(r"avx512[a-z_0-9]*", Path("/proc/cpuinfo").read_text())))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    decode_ratio = decode["torchvision"][0] / decode["ours"][0]
    augment_ratio = augment["torchvision"] / augment["ours"]
    n = decode["ours"][1]
    lines = ["# Reading and augmenting one's own images", "",
             f"`python benchmarks/data.py`; {platform.machine()}, {os.cpu_count()} cores "
             f"({'AVX-512 BF16' if 'avx512_bf16' in flags else 'no AVX-512 BF16'}), torch "
             f"{torch.__version__}, git commit {commit}. Both sides in this one run, taking "
             f"turns; the median of {args.repeats} runs of each.", "",
             "| task | ours | torchvision | ratio | target |", "|---|---:|---:|---:|---:|",
             f"| decode {n:,} MNIST PNGs into uint8 arrays | {decode['ours'][0]:.1f} s | "
             f"{decode['torchvision'][0]:.1f} s | {decode_ratio:.1f}x | >= 2x |",
             f"| one augmented epoch, 50,000 x 3x32x32 (crop 4, flip, normalise), batch 256 | "
             f"{augment['ours']:.1f} s | {augment['torchvision']:.1f} s | {augment_ratio:.1f}x "
             "| >= 5x |", "",
             "Ours: Pillow in a forked worker process per core, 1,024 files at a time; the "
             "augmentation batched on the device from one generator. torchvision: ImageFolder "
             "and transforms.v2 per sample in a DataLoader with 2 worker processes.", "",
             f"decode_ratio: {decode_ratio:.2f}", f"augment_ratio: {augment_ratio:.2f}", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
