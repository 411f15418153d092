"""Shared fixtures: tiny synthetic data written as IDX files, and one local Ray per session."""
import shutil
import tempfile

import numpy as np
import pytest

from ensemble.data import write_idx


def synthetic_digits(n: int, seed: int, size: int = 8, classes: int = 10):
    """Learnable images: class c lights up its own block of pixels, plus noise. uint8 (n,size,size)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = rng.integers(0, 50, (n, size * size)).astype(np.uint8)
    block = size * size // classes
    for c in range(classes):
        images[labels == c, c * block:(c + 1) * block] += 200
    images = images.reshape(n, size, size)
    return images, labels


def write_mnist_like(root, name: str = "mnist", n_train: int = 600, n_test: int = 200,
                     gz: bool = True):
    """ROOT/<name>/{train,t10k}-{images,labels}-idx?-ubyte[.gz] of synthetic digits."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for part, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(folder / f"{part}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{part}-labels-idx1-ubyte{suffix}", labels)
    return root


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return write_mnist_like(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting one costs ~8 s and ~2.5 GB)."""
    import ray

    temp = tempfile.mkdtemp(prefix="ray-t")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, namespace="ensemble-tests",
             logging_level="ERROR")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
