"""Data of one's own: image folders, .npz files and factories become the same uint8 splits as
the named sets (ensemble.sources); bad data is refused in one sentence (test_cli)."""
import numpy as np
import pytest
import torch
from PIL import Image

from ensemble.config import DataConfig
from ensemble.data import load_splits
from tests.conftest import synthetic_digits, write_mnist_like


def make_arrays(n: int = 60, channels: int = 3, with_val: bool = False):
    """A factory of arrays (named in configs as tests.test_sources:make_arrays)."""
    rng = np.random.default_rng(n)
    shape = (n, 8, 8, channels) if channels > 1 else (n, 8, 8)
    out = {"x_train": rng.integers(0, 256, shape, dtype=np.uint8),
           "y_train": rng.integers(0, 4, n), "x_test": rng.integers(0, 256, shape, dtype=np.uint8),
           "y_test": rng.integers(0, 4, n), "classes": np.array(["ant", "bee", "cat", "dog"])}
    if with_val:
        out |= {"x_val": out["x_test"][:10], "y_val": out["y_test"][:10]}
    return out


def write_folder(root, images, labels, part: str, names=None, suffix=".png"):
    """ROOT/<part>/<class>/<i>.png of uint8 images (N,H,W) or (N,H,W,3)."""
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / part / (names[label] if names else f"c{label}")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}{suffix}")


def test_npz_in_channels_last_becomes_channels_first_with_a_shuffled_validation(tmp_path):
    arrays = make_arrays()
    np.savez(tmp_path / "d.npz", **arrays)
    s = load_splits(DataConfig(npz=str(tmp_path / "d.npz"), val_size=10), None)
    assert s.name == f"npz {tmp_path / 'd.npz'}" and s.classes == ("ant", "bee", "cat", "dog")
    assert s.image_shape == (3, 8, 8) and len(s.train_y) == 50 and len(s.val_y) == 10
    everything = np.concatenate([s.train_x, s.val_x])  # the training images, shuffled once
    want = arrays["x_train"].transpose(0, 3, 1, 2)
    assert sorted(map(bytes, everything)) == sorted(map(bytes, want))
    assert not np.array_equal(everything, want)  # shuffled: class-ordered files would not do
    np.testing.assert_array_equal(s.test_x, arrays["x_test"].transpose(0, 3, 1, 2))
    again = load_splits(DataConfig(npz=str(tmp_path / "d.npz"), val_size=10), None)
    np.testing.assert_array_equal(again.val_x, s.val_x)  # the same split every time


def test_factory_with_its_own_validation(tmp_path):
    s = load_splits(DataConfig(factory="tests.test_sources:make_arrays",
                               kwargs={"n": 40, "channels": 1, "with_val": True}), None)
    assert s.image_shape == (1, 8, 8) and len(s.train_y) == 40 and len(s.val_y) == 10
    np.testing.assert_array_equal(s.val_x[:, 0], make_arrays(40, 1)["x_test"][:10])


def test_png_folders_load_to_the_idx_arrays_up_to_order(tmp_path):
    """Digits written as IDX files and as PNG folders: the same images with the same labels."""
    write_mnist_like(tmp_path / "idx", n_train=120, n_test=40)
    idx = load_splits(DataConfig(val_size=0, download=False), tmp_path / "idx")
    for part, x, y in (("train", idx.train_x, idx.train_y), ("test", idx.test_x, idx.test_y)):
        write_folder(tmp_path / "png", x[:, 0], y, part, names=[str(c) for c in range(10)])
    png = load_splits(DataConfig(folder=str(tmp_path / "png"), val_size=0), None)
    assert png.classes == tuple(str(c) for c in range(10)) and png.image_shape == (1, 8, 8)
    for a, b, la, lb in ((idx.train_x, png.train_x, idx.train_y, png.train_y),
                         (idx.test_x, png.test_x, idx.test_y, png.test_y)):
        pairs = lambda x, y: sorted(zip(map(bytes, x), y.tolist()))  # noqa: E731
        assert pairs(a, la) == pairs(b, lb)


def test_folder_resizes_crops_and_picks_the_majority_mode(tmp_path):
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for i in range(6):  # RGB images of two sizes, one grey one: RGB wins
            size = (12, 16) if i % 2 else (16, 12)
            image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
            folder = tmp_path / part / ("a" if i < 3 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(
            tmp_path / part / "a" / "grey.png")
    s = load_splits(DataConfig(folder=str(tmp_path), image_size=8, val_size=2), None)
    assert s.image_shape == (3, 8, 8) and s.classes == ("a", "b")
    assert len(s.train_y) + len(s.val_y) == 7 and len(s.test_y) == 7
    grey = load_splits(DataConfig(folder=str(tmp_path), image_size=8, val_size=2, mode="L"),
                       None)
    assert grey.image_shape == (1, 8, 8)


@pytest.mark.ray
def test_a_run_on_an_image_folder(ray_session, tmp_path, capsys):
    from ensemble.cli import main

    x, y = synthetic_digits(200, seed=0)
    write_folder(tmp_path / "pets", x, y, "train")
    x, y = synthetic_digits(60, seed=1)
    write_folder(tmp_path / "pets", x, y, "test")
    config = tmp_path / "c.yaml"
    config.write_text(f"""
name: pets
data: {{folder: {tmp_path / 'pets'}, val_size: 40, normalize: true}}
generalists: {{model: {{hidden: [32]}}, train: {{epochs: 2, batch_size: 40, lr: 0.3}}}}
specialists: {{k: 2, train: {{epochs: 1, batch_size: 40}}}}
students: {{s: {{model: {{hidden: [16]}}, train: {{epochs: 1, batch_size: 40}}}}}}
""")
    run = tmp_path / "run"
    assert main(["run", str(config), "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"test images of folder {tmp_path / 'pets'}" in out
    assert "student-s" in (run / "summary.md").read_text()

    # `ensemble predict`: the student's top classes for pictures, read as its data were
    folder = tmp_path / "pets" / "test" / "c3"
    assert main(["predict", str(run), str(folder), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    files = sorted(folder.iterdir())
    assert lines[0].startswith("# student-s") and len(lines) == 1 + len(files)
    from ensemble.data import as_float, to_pixels
    from ensemble.models import load_model
    from ensemble.rundir import RunDir

    model, _ = load_model(RunDir(run).latest("student-s")[0], torch.device("cpu"))
    data = load_splits(DataConfig(folder=str(tmp_path / "pets"), val_size=40), None)
    mine = data.test_y == 3
    with torch.no_grad():
        expected = model(as_float(to_pixels(data.test_x[mine], torch.device("cpu")))).argmax(1)
    said = [line.split(": ", 1)[1].split()[0] for line in lines[1:]]
    assert said == [f"c{c}" for c in expected.tolist()]  # the class names of the folders


def test_parquet_train_validation_and_test_alike(tmp_path):
    pytest.importorskip("pyarrow")
    from ensemble.errors import DataError
    from ensemble.streaming import write_parquet

    arrays = make_arrays(60)
    root = tmp_path / "pq"
    x = {p: arrays[f"x_{p}"].transpose(0, 3, 1, 2) for p in ("train", "test")}
    write_parquet(root / "train", x["train"], arrays["y_train"], rows_per_file=25,
                  classes=arrays["classes"])
    write_parquet(root / "test", x["test"], arrays["y_test"])
    s = load_splits(DataConfig(parquet=str(root), val_size=10), None)
    assert s.classes == ("ant", "bee", "cat", "dog") and s.image_shape == (3, 8, 8)
    assert sorted(map(bytes, np.concatenate([s.train_x, s.val_x]))) == \
        sorted(map(bytes, x["train"]))
    np.testing.assert_array_equal(s.test_x, x["test"])
    with pytest.raises(DataError, match="needs a val/ split when its training split streams"):
        load_splits(DataConfig(parquet=str(root), stream=str(root / "train")), None)
    write_parquet(root / "val", x["test"][:10], arrays["y_test"][:10])
    streamed = load_splits(DataConfig(parquet=str(root), stream=str(root / "train")), None)
    assert len(streamed.train_y) == 0 and len(streamed.val_y) == 10  # train comes as a stream
