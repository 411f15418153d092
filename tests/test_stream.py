"""Generalists and students trained on a Ray Data stream of Parquet files (data.stream) against
the same training examples held in memory: the same weights when both keep the data's order."""
import numpy as np
import pytest
import torch

from ensemble import checkpoint
from ensemble.cli import main
from ensemble.config import DataConfig
from ensemble.data import load_splits
from tests.conftest import write_mnist_like

pytest.importorskip("ray.data")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = """
name: stream
data: {val_size: 200, download: false}
generalists:
  model: {hidden: [64], dropout_in: 0.1, dropout_hidden: 0.2, max_norm: 3.0}
  train: {epochs: 2, batch_size: 64, lr: 0.2, augment: [translate:1], shuffle: false}
"""


def weights(run):
    blob, _ = checkpoint.load_latest(run / "checkpoints" / "generalist-0")
    return {k: v for k, v in checkpoint.loads(blob)[0].items() if k.startswith("model.")}


def test_streamed_training_matches_in_memory(ray_session, tmp_path, capsys):
    from ensemble.streaming import write_parquet

    data = write_mnist_like(tmp_path / "data", n_train=1500, n_test=200)
    splits = load_splits(DataConfig(val_size=200, download=False), data)
    parquet = tmp_path / "parquet"
    write_parquet(parquet, splits.train_x, splits.train_y, rows_per_file=500)  # 3 files
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    argv = ["run", str(config), "--data-dir", str(data)]
    assert main(argv + ["--run-dir", str(tmp_path / "memory")]) == 0
    assert main(argv + ["--run-dir", str(tmp_path / "streamed"),
                        "--set", f"data.stream={parquet}"]) == 0
    assert f"training streamed from {parquet}" in capsys.readouterr().out
    memory, streamed = weights(tmp_path / "memory"), weights(tmp_path / "streamed")
    assert memory.keys() == streamed.keys()
    for key in memory:
        assert torch.equal(memory[key], streamed[key]), key

    # shuffled, the stream still trains (well below the 90 % errors of chance)
    assert main(argv + ["--run-dir", str(tmp_path / "shuffled"), "--set",
                        f"data.stream={parquet}", "--set", "generalists.train.shuffle=true",
                        "--set", "generalists.train.epochs=3"]) == 0
    meta = checkpoint.load_latest(tmp_path / "shuffled" / "checkpoints" / "generalist-0")[1]
    assert meta["summary"]["test_errors"] < 0.5 * 200


STUDENT = """
name: stream-student
data: {parquet: PARQUET, val_size: 0}
generalists:
  model: {hidden: [64], dropout_in: 0.0, dropout_hidden: 0.0}
  train: {epochs: 2, batch_size: 64, lr: 0.2, shuffle: false}
students:
  s:
    model: {hidden: [32]}
    train: {epochs: 2, batch_size: 64, lr: 0.1, shuffle: false}
    temperature: 4.0
"""


def test_a_student_distils_from_a_stream_with_validation_and_test_from_parquet(
        ray_session, tmp_path, capsys):
    """data.parquet gives train, validation and test alike; with data.stream naming its train/
    the generalist and the student both stream, the student asking its teacher for each
    batch's soft targets, and they end where the same run in memory ends (the generalist to
    the bit; the student within the rounding of soft targets computed per batch rather than
    for the whole set at once)."""
    from ensemble.streaming import write_parquet

    data = write_mnist_like(tmp_path / "data", n_train=1500, n_test=200)
    splits = load_splits(DataConfig(val_size=200, download=False), data)
    root = tmp_path / "parquet"
    for part, x, y in (("train", splits.train_x, splits.train_y),
                       ("val", splits.val_x, splits.val_y), ("test", splits.test_x, splits.test_y)):
        write_parquet(root / part, x, y, rows_per_file=500, classes=splits.classes)
    config = tmp_path / "c.yaml"
    config.write_text(STUDENT.replace("PARQUET", str(root)))
    assert main(["run", str(config), "--run-dir", str(tmp_path / "memory")]) == 0
    assert main(["run", str(config), "--run-dir", str(tmp_path / "streamed"),
                 "--set", f"data.stream={root / 'train'}"]) == 0
    out = capsys.readouterr().out
    assert f"training streamed from {root / 'train'}" in out and "200 test images" in out

    def state(run, name):
        blob, meta = checkpoint.load_latest(run / "checkpoints" / name)
        return {k: v for k, v in checkpoint.loads(blob)[0].items() if k.startswith("model.")}, meta
    for key, value in state(tmp_path / "memory", "generalist-0")[0].items():
        assert torch.equal(value, state(tmp_path / "streamed", "generalist-0")[0][key]), key
    memory, _ = state(tmp_path / "memory", "student-s")
    streamed, meta = state(tmp_path / "streamed", "student-s")
    assert meta["targets_from"] == "per batch" and meta["summary"]["test_errors"] < 0.5 * 200
    for key, value in memory.items():
        torch.testing.assert_close(streamed[key], value, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("extra, message", [
    ("specialists: {k: 2}\n", "data.stream gives specialists no in-memory training set"),
    ("students: {s: {model: {hidden: [8]}, drop_classes: [3]}}\n",
     "students.s cannot filter or subsample a streamed transfer set"),
])
def test_stream_refuses_what_needs_the_training_set_in_memory(extra, message, data_root,
                                                              tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG + extra)
    assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir",
                 str(tmp_path / "r"), "--set", f"data.stream={tmp_path}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def bad_source(kind, folder):
    """A data.stream source that is not Parquet files of images and labels; what the run must
    then say (None: only that it cannot read them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "nothing":
        return folder / "nowhere", "no such file or folder"
    folder.mkdir()
    if kind == "not-parquet":
        (folder / "part-00000.parquet").write_text("image,label\n")  # a CSV by another name
        return folder, None
    if kind == "other-columns":
        pq.write_table(pa.table({"pixels": [b"\0"], "label": [1]}), folder / "part.parquet")
        return folder, "have no column image (they have pixels, label)"
    (folder / "notes.txt").write_text("no Parquet here\n")  # kind == "no-parquet-files"
    return folder, None


@pytest.mark.parametrize("kind", ["nothing", "not-parquet", "other-columns", "no-parquet-files"])
def test_stream_refuses_bad_sources(kind, ray_session, data_root, tmp_path, capsys):
    source, says = bad_source(kind, tmp_path / "source")
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    run = tmp_path / "r"
    assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir", str(run),
                 "--set", f"data.stream={source}"]) == 3  # a DataError, before anything trains
    err = capsys.readouterr().err
    # one sentence on one line, naming the source; no traceback, and no run directory left
    assert err.count("\n") == 1 and err.startswith("ensemble: error: "), err
    assert f"data.stream={source}" in err and ". " not in err, err
    assert (says or "cannot read the Parquet files") in err, err
    assert not run.exists()


def test_write_parquet_round_trip(tmp_path):
    import pyarrow.parquet as pq

    images = np.arange(2 * 1 * 3 * 3, dtype=np.uint8).reshape(2, 1, 3, 3)
    from ensemble.streaming import write_parquet

    write_parquet(tmp_path / "p", images, np.array([4, 7]))
    table = pq.read_table(tmp_path / "p")
    assert table.column("label").to_pylist() == [4, 7]
    assert table.column("image").to_pylist()[1] == images[1].tobytes()


def test_a_shuffled_stream_resumed_mid_run_sees_the_batches_it_lost(ray_session, tmp_path):
    """--resume's promise for a shuffled stream: a trainer restored from epoch 1's checkpoint
    (a new process would hold nothing else) draws epoch 2's order from the same seeded buffer
    as one that never stopped, so both end with the same weights, bit for bit."""
    from ensemble.config import ModelConfig, TrainConfig
    from ensemble.streaming import StreamTrainer, open_stream, write_parquet

    data = write_mnist_like(tmp_path / "data", n_train=1200, n_test=100)
    splits = load_splits(DataConfig(val_size=200, download=False), data)
    write_parquet(tmp_path / "parquet", splits.train_x, splits.train_y, rows_per_file=300)
    stream = open_stream(str(tmp_path / "parquet"))
    model = ModelConfig(hidden=(32,), dropout_in=0.1, dropout_hidden=0.2)  # dropout: RNG used
    train = TrainConfig(epochs=2, batch_size=64, lr=0.2, augment=("flip", "translate:1"))

    def trainer():
        return StreamTrainer("g", model, train, splits, seed=3, stream=stream)

    whole = trainer()
    _, after_first = whole.run_epoch(1)
    whole.run_epoch(2)
    resumed = trainer()
    resumed.run_epoch(2, last=after_first)
    state = resumed.model.state_dict()
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # and the stream was shuffled: epochs draw different orders, neither the files' own
    orders = []
    for epoch in (1, 2):
        t = trainer()
        t.epoch = epoch
        orders.append([int(y.sum()) for _, y in t.epoch_batches()])
    kept = [int(y.sum()) for y in torch.as_tensor(splits.train_y).split(64)]
    assert orders[0] != orders[1] and kept not in orders
