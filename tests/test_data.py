import gzip

import numpy as np
import pytest
import torch

from ensemble.config import DataConfig
from ensemble.augment import distort, shift
from ensemble.data import load_splits, read_idx, transfer_mask, write_idx
from ensemble.errors import DataError
from tests.conftest import synthetic_digits, write_mnist_like


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, name):
    images, _ = synthetic_digits(7, 0)
    write_idx(tmp_path / name, images)
    np.testing.assert_array_equal(read_idx(tmp_path / name), images)


def test_idx_wrong_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "bad")
    images, _ = synthetic_digits(3, 0)
    write_idx(tmp_path / "t.gz", images)
    raw = gzip.decompress((tmp_path / "t.gz").read_bytes())
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


def test_both_layouts_and_validation_split(tmp_path):
    write_mnist_like(tmp_path / "a", n_train=100, n_test=30)
    # torchvision's layout: ROOT/MNIST/raw with plain files
    write_mnist_like(tmp_path / "b" / "MNIST", name="raw", n_train=100, n_test=30, gz=False)
    cfg = DataConfig(val_size=20, download=False)
    a, b = load_splits(cfg, tmp_path / "a"), load_splits(cfg, tmp_path / "b")
    assert a.train_x.shape == (80, 1, 8, 8) and a.val_x.shape == (20, 1, 8, 8)
    np.testing.assert_array_equal(a.val_x, b.val_x)
    full, _ = synthetic_digits(100, 0)
    np.testing.assert_array_equal(a.val_x[:, 0], full[80:])  # the last val_size images
    assert len(load_splits(DataConfig(val_size=20, train_size=50, download=False),
                           tmp_path / "a").train_y) == 50


def test_missing_data_names_every_place(tmp_path):
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(name="fashion-mnist", download=False), tmp_path)
    assert str(tmp_path / "fashion-mnist") in str(err.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in str(err.value)


def test_labels_out_of_range(tmp_path):
    write_mnist_like(tmp_path, n_train=50, n_test=10)
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, np.uint8))
    with pytest.raises(DataError, match="labels"):
        load_splits(DataConfig(val_size=10, download=False), tmp_path)


def test_transfer_mask():
    y = np.array([0, 3, 7, 8, 3])
    assert transfer_mask(y, drop=(3,)).tolist() == [True, False, True, True, False]
    assert transfer_mask(y, keep=(7, 8)).tolist() == [False, False, True, True, False]
    many = np.arange(1000) % 10
    some = transfer_mask(many, drop=(3,), size=100)
    assert some.sum() == 100 and not some[many == 3].any()
    assert (some == transfer_mask(many, drop=(3,), size=100)).all()  # one fixed draw
    assert transfer_mask(many, size=5000).all()  # more than there are: all of them


def test_shift_range_and_independence():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(256, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0  # one lit pixel in the centre: its new place is the shift
    out = shift(x, 2, g)
    assert out.shape == x.shape and torch.all(out.sum((1, 2, 3)) == 1)
    where = out[:, 0].flatten(1).argmax(1)
    dy, dx = where // 9 - 4, where % 9 - 4
    assert dy.abs().max() == 2 and dx.abs().max() == 2  # the whole range is reached ...
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 25  # ... each sample on its own draw
    assert shift(x, 0, g) is x


def test_shift_fills_with_zeros_and_keeps_content():
    g = torch.Generator().manual_seed(1)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    out = shift(x, 1, g)
    for b in range(2):
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if torch.equal(out[b], _shift(x[b], dy, dx))]
        assert len(matches) == 1


def test_crop_pads_by_reflection_and_crops_back():
    g = torch.Generator().manual_seed(2)
    x = torch.arange(4 * 3 * 7 * 7, dtype=torch.float32).view(4, 3, 7, 7)
    out = shift(x, 2, g, padding="reflect")
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for b in range(4):  # each image is one window of its reflected padding, and no zeros appear
        windows = [(i, j) for i in range(5) for j in range(5)
                   if torch.equal(out[b], padded[b, :, i:i + 7, j:j + 7])]
        assert len(windows) == 1
    assert (out > 0).sum() >= out.numel() - 4  # only the pixel valued 0 may give a zero


def test_augment_runs_train_augment_steps_in_order_from_one_generator():
    from ensemble.augment import augment, flip
    from ensemble.config import TrainConfig

    x = torch.rand(16, 1, 8, 8)
    cfg = TrainConfig(augment=("flip", "translate:1", "elastic:10:2"))
    out = augment(x, cfg, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(out, distort(shift(flip(x, g), 1, g), 10.0, 2.0, g))
    swapped = TrainConfig(augment=("translate:1", "flip", "elastic:10:2"))
    assert not torch.equal(out, augment(x, swapped, torch.Generator().manual_seed(5)))
    assert augment(x, TrainConfig(), torch.Generator()) is x


def test_a_part_of_a_batch_is_augmented_as_in_the_whole_batch():
    """A data-parallel rank augments only its share: the same images as the whole batch gives
    those rows, and its generator ends where one process's would."""
    from ensemble.augment import augment
    from ensemble.config import TrainConfig

    x = torch.rand(11, 3, 9, 9)
    for steps in (("flip",), ("translate:2",), ("crop:2",), ("elastic:10:2",),
                  ("flip", "crop:1", "elastic:8:3")):
        cfg = TrainConfig(augment=steps)
        whole_g, part_g = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        whole = augment(x, cfg, whole_g)
        rows = slice(4, 9)
        part = augment(x[rows], cfg, part_g, (len(x), rows))
        torch.testing.assert_close(part, whole[rows], rtol=0, atol=1e-6)
        assert torch.equal(part_g.get_state(), whole_g.get_state())
        assert not torch.equal(part, x[rows])  # each step changed something
    with pytest.raises(ValueError, match="hold 5 images, not x's 3"):  # rows and x disagree
        augment(x[:3], cfg, torch.Generator(), (len(x), slice(4, 9)))


def test_distort_is_a_gaussian_smoothed_random_warp():
    x = torch.rand(5, 1, 12, 10)
    out = distort(x, 8.0, 2.0, torch.Generator().manual_seed(4))
    # the same draw, smoothed the textbook way: a 2-D Gaussian convolution, zeros past the edges
    field = torch.rand((5, 2, 12, 10), generator=torch.Generator().manual_seed(4)) * 2 - 1
    t = torch.arange(-12, 13, dtype=torch.float32)
    k = torch.exp(-t ** 2 / 8)
    kernel = (k[:, None] * k[None, :] / k.sum() ** 2).view(1, 1, 25, 25)
    field = torch.nn.functional.conv2d(field.view(10, 1, 12, 10), kernel, padding=12)
    field = field.view(5, 2, 12, 10) * 8.0
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(10.0), indexing="ij")
    grid = torch.stack(((xs + field[:, 0] + 0.5) / 5 - 1, (ys + field[:, 1] + 0.5) / 6 - 1), -1)
    expected = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    assert torch.allclose(out, expected, atol=1e-5)
    assert field.abs().max() > 0.5  # a warp that moves pixels, not a near-identity


def test_distort_off_seeded_and_per_image():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 6:22, 12:16] = 1.0  # a bar, as in a 1
    assert distort(x, 0.0, 4.0, torch.Generator()) is x
    a = distort(x, 34.0, 4.0, torch.Generator().manual_seed(0))
    b = distort(x, 34.0, 4.0, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 training: the warp stays fp32
        assert torch.equal(a, distort(x, 34.0, 4.0, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, distort(x, 34.0, 4.0, torch.Generator().manual_seed(1)))
    assert a.min() >= 0 and a.max() <= 1
    assert len({tuple(img.flatten().round(decimals=3).tolist()) for img in a}) == 64  # own warps
    ink = a.sum((1, 2, 3)) / x[0].sum()
    assert (ink.mean() - 1).abs() < 0.15 and ink.min() > 0.4  # warped, not erased or lost
    assert (a - x).abs().sum((1, 2, 3)).min() > 1  # every image moved


def _shift(img, dy, dx):
    out = torch.zeros_like(img)
    h, w = img.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def write_cifar10_bin(root, n_per_batch: int = 20, seed: int = 0):
    """ROOT/cifar-10-batches-bin/ in the binary release's format: label byte + 3072 pixels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, (n_per_batch, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.hstack([labels, pixels]).tobytes())
    return folder


def write_cifar100_bin(root, n_train: int = 60, n_test: int = 20, seed: int = 0):
    """ROOT/cifar-100-binary/ in the binary release's format: coarse label byte, fine label
    byte, 3072 pixels; and its fine_label_names.txt."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    for name, n in (("train.bin", n_train), ("test.bin", n_test)):
        fine = rng.integers(0, 100, (n, 1), dtype=np.uint8)
        coarse = (fine // 5).astype(np.uint8)  # not the release's mapping: only its place
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.hstack([coarse, fine, pixels]).tobytes())
    (folder / "fine_label_names.txt").write_text("".join(f"class{i}\n" for i in range(100)))
    return folder


def test_cifar100_binary_release_reads_fine_labels(tmp_path):
    folder = write_cifar100_bin(tmp_path)
    s = load_splits(DataConfig(name="cifar100", val_size=10, download=False), tmp_path)
    assert s.image_shape == (3, 32, 32) and len(s.train_y) == 50 and len(s.test_y) == 20
    assert s.num_classes == 100 and s.classes[42] == "class42"
    rows = np.frombuffer((folder / "train.bin").read_bytes(), np.uint8).reshape(-1, 3074)
    assert (rows[:, 0] != rows[:, 1]).any()  # coarse and fine differ: the check can fail
    np.testing.assert_array_equal(s.train_y, rows[:50, 1])  # the fine labels
    np.testing.assert_array_equal(s.train_x[0].reshape(-1), rows[0, 2:])


def test_cifar10_binary_release(tmp_path):
    folder = write_cifar10_bin(tmp_path)
    s = load_splits(DataConfig(name="cifar10", val_size=10, download=False), tmp_path)
    assert s.image_shape == (3, 32, 32) and len(s.train_y) == 90 and len(s.test_y) == 20
    assert s.classes[3] == "cat"
    first = np.frombuffer((folder / "data_batch_1.bin").read_bytes()[:3073], np.uint8)
    assert s.train_y[0] == first[0]
    np.testing.assert_array_equal(s.train_x[0].reshape(-1), first[1:])
    (folder / "test_batch.bin").write_bytes(b"\x01" * 100)
    with pytest.raises(DataError, match="truncated"):
        load_splits(DataConfig(name="cifar10", val_size=10, download=False), tmp_path)


def test_flip_mirrors_about_half_and_follows_its_generator():
    from ensemble.augment import flip

    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3).repeat(500, 1, 1, 1)
    out = flip(x, torch.Generator().manual_seed(0))
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert ((out == x).flatten(1).all(1) | mirrored).all()  # each image as it was, or mirrored
    assert 400 < int(mirrored.sum()) < 600
    assert torch.equal(out, flip(x, torch.Generator().manual_seed(0)))


def test_normalize_uses_given_or_training_statistics(tmp_path):
    write_cifar10_bin(tmp_path)
    given = load_splits(DataConfig(name="cifar10", val_size=10, download=False, normalize=True,
                                   mean=(0.5,), std=(0.25,)), tmp_path)
    assert given.mean == (0.5, 0.5, 0.5) and given.std == (0.25, 0.25, 0.25)
    own = load_splits(DataConfig(name="cifar10", val_size=10, download=False, normalize=True),
                      tmp_path)
    assert own.mean == pytest.approx((own.train_x / 255).mean(axis=(0, 2, 3)).tolist())
    with pytest.raises(DataError, match="have 2 values"):
        load_splits(DataConfig(name="cifar10", val_size=10, download=False, normalize=True,
                               mean=(0.5, 0.5), std=(0.2, 0.2)), tmp_path)
