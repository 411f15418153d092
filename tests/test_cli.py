"""Bad input, table-driven: each case gives one sentence on stderr, a non-zero exit and no
traceback, creates no run directory, and leaves an existing one byte for byte unchanged."""
import gzip
import hashlib

import numpy as np
import pytest
import torch

from ensemble import checkpoint
from ensemble.cli import main
from ensemble.config import DataConfig, ModelConfig, RunConfig, TrainConfig, parse
from ensemble.data import load_splits
from ensemble.rundir import RunDir
from ensemble.train import Trainer
from tests.conftest import write_mnist_like

CONFIG = "name: t\ndata: {val_size: 100, download: false}\n" \
         "generalists: {model: {hidden: [16]}, train: {epochs: 2}}\n"


def break_file(name, how):
    """A data-set factory whose file `name` is damaged in the way `how` says."""
    def make(root):
        write_mnist_like(root, n_train=300, n_test=50)
        path = root / "mnist" / name
        raw = gzip.decompress(path.read_bytes())
        if how == "truncate":
            raw = raw[:-7]
        elif how == "magic":
            raw = b"\x12\x34" + raw[2:]
        elif how == "labels":
            raw = raw[:8] + bytes([42]) * (len(raw) - 8)
        path.write_bytes(gzip.compress(raw))
        return root
    return make


def saved_run(damage):
    """A run directory with one checkpoint of generalist-0, spoilt by `damage`."""
    def make(tmp):
        data = write_mnist_like(tmp / "good-data", n_train=300, n_test=50)
        cfg = parse(RunConfig, {"name": "t", "data": {"val_size": 100, "download": False},
                                "generalists": {"model": {"hidden": [16]},
                                                "train": {"epochs": 2}}})
        run = RunDir(tmp / "saved")
        run.create(cfg)
        model = ModelConfig(hidden=(24,)) if damage == "architecture" else cfg.generalists.model
        splits = load_splits(DataConfig(val_size=100, download=False), data)
        blob = Trainer("generalist-0", model, TrainConfig(epochs=2), splits, 0).checkpoint()
        if damage == "corrupt":
            blob = blob[:-50] + bytes(50)
        if damage == "pickle":  # a payload that would create a file if anything unpickled it
            blob = f"cos\nsystem\n(S'touch {tmp / 'pwned'}'\ntR.".encode()
        checkpoint.save_epoch(run.checkpoints("generalist-0"), 1, blob)
        if damage == "metrics":  # cut short by a full disk, say
            (run.path / "metrics.json").write_text('{"models": {"generalist-0": {"st')
        if damage == "metrics shape":
            (run.path / "metrics.json").write_text('{"models": 3}')
        if damage == "config bytes":
            (run.path / "config.yaml").write_bytes(bytes(range(128, 256)))
        if damage == "config empty":
            (run.path / "config.yaml").write_text("")
        return run.path
    return make


CASES = {  # name: (argv, exit code, words the message must hold, optional data or run factory)
    "missing config": (["run", "missing.yaml"], 2, "does not exist", None),
    "config that is a folder": (["run", "{tmp}"], 2, "is a folder", None),
    "config that is a YAML list": (["run", "{tmp}/list.yaml"], 2,
                                   "mapping of keys to values at its top level, not a list", None),
    "run directory that cannot be made": (["run", "{config}", "--run-dir", "/proc/ensemble/run"],
                                          2, "cannot create the run directory", None),
    "one specialist for every class": (["run", "{config}", "--set", "specialists.k=1"], 2,
                                       "specialists.k must be 0 (no specialists) or at least 2",
                                       None),
    "subsets overlapping into every class": (["run", "{config}", "--set", "specialists.k=3",
                                              "--set", "specialists.overlap=2"], 2,
                                             "specialists.overlap must be below k - 1", None),
    "subsets bounded below classes / k": (["run", "{config}", "--set", "specialists.k=3",
                                           "--set", "specialists.max_size=0.5"], 2,
                                          "specialists.max_size must be 0 (no bound) or >= 1",
                                          None),
    "overlap mass past all of it": (["run", "{config}", "--set", "specialists.k=3", "--set",
                                     "specialists.overlap_mass=1.5"], 2,
                                    "specialists.overlap_mass must be in [0, 1)", None),
    "overlap mass without overlap": (["run", "{config}", "--set", "specialists.k=3", "--set",
                                      "specialists.overlap_mass=0.1"], 2,
                                     "specialists.overlap_mass needs specialists.overlap >= 1",
                                     None),
    "specialists' soft targets past all of the loss": (
        ["run", "{config}", "--set", "specialists.k=3", "--set", "specialists.soft_weight=1.5"],
        2, "specialists.soft_weight must be in [0, 1]", None),
    "specialists' soft targets frozen solid": (
        ["run", "{config}", "--set", "specialists.k=3", "--set",
         "specialists.soft_temperature=0"], 2, "specialists.soft_temperature must be >= 0.01",
        None),
    "specialists taken over without their generalists": (
        ["run", "{config}", "--set", "specialists.from_run={tmp}/nowhere"], 2,
        "specialists.from_run needs generalists.from_run too", None),
    "no config": (["run"], 2, "needs a CONFIG", None),
    "unknown flag": (["run", "{config}", "--bogus"], 2, "unrecognized arguments", None),
    "misspelt key": (["run", "{config}", "--set", "generalists.train.epocs=2"], 2,
                     "did you mean 'generalists.train.epochs'", None),
    "negative transfer size": (["run", "{config}", "--set", "students.s.transfer_size=-1"], 2,
                               "transfer_size must be >= 0", None),
    "k > classes": (["run", "{config}", "--set", "specialists.k=11"], 2,
                    "number of classes", None),
    "more subsets than the classes can fill": (["run", "{config}", "--set", "specialists.k=6"],
                                               2, "specialists.k must be at most 5", None),
    "ensemble without specialists": (["run", "{config}", "--set",
                                      "students.s.soft_targets=ensemble"], 2, "specialists",
                                     None),
    "negative scale-up bound": (["run", "{config}", "--set", "autoscaler.scale_up_s=-1"], 2,
                                "autoscaler.scale_up_s must be >= 0", None),
    "node type with negative GPUs": (["run", "{config}", "--set",
                                      "autoscaler.node_types=[{{num_gpus: -1}}]"], 2,
                                     "autoscaler.node_types[0].num_gpus", None),
    "bad override": (["run", "{config}", "--set", "noequals"], 2, "key=value", None),
    "missing data": (["run", "{config}", "--data-dir", "{tmp}/nowhere"], 3,
                     "not found; looked in", None),
    "val split too large": (["run", "{config}", "--set", "data.val_size=5000"], 3,
                            "leaves no training data", None),
    "truncated IDX": (["run", "{config}"], 3, "truncated",
                      break_file("train-images-idx3-ubyte.gz", "truncate")),
    "wrong magic": (["run", "{config}"], 3, "magic",
                    break_file("t10k-labels-idx1-ubyte.gz", "magic")),
    "labels out of range": (["run", "{config}"], 3, "labels must lie",
                            break_file("train-labels-idx1-ubyte.gz", "labels")),
    "resume of no run": (["run", "--resume", "{tmp}/nowhere"], 2, "not a run directory", None),
    "eval of no run": (["eval", "{tmp}/nowhere"], 2, "not a run directory", None),
    "report of no run": (["report", "{tmp}/nowhere"], 2, "not a run directory", None),
    "report before the first epoch": (["report", "{saved}"], 2, "no results yet",
                                      saved_run(None)),
    "report of a damaged metrics.json": (["report", "{saved}"], 2, "metrics.json is damaged",
                                         saved_run("metrics")),
    "model factory that does not import": (["run", "{config}", "--set",
                                            "generalists.model.factory=nowhere.nets:big"], 2,
                                           "generalists.model.factory: cannot import", None),
    "model for colour images given grey ones": (
        ["run", "{config}", "--set", "generalists.model={{factory: 'torchvision.models:resnet18',"
         " kwargs: {{num_classes: 10}}}}"], 2, "fails on one 1x8x8 image", None),
    "student whose head has the wrong width": (
        ["run", "{config}", "--set", "students.s.model={{factory: 'torchvision.models:resnet18',"
         " kwargs: {{num_classes: 7}}}}"], 2,
        "students.s.model: the model's head has 7 outputs but the data have 10 classes", None),
    "model larger than this machine's memory": (  # 90 billion weights, counted, not made
        ["run", "{config}", "--set", "students.s.model.hidden=[300000, 300000]"], 2,
        "students.s.model: the model has 90,022,800,010 parameters", None),
    "CNN too deep for the images": (["run", "{config}", "--set",
                                     "generalists.model={{kind: cnn, hidden: [4, 4, 4, 4, 4]}}"],
                                    2, "fails on one 1x8x8 image", None),
    "predict with a run that is none": (["predict", "{tmp}/nowhere", "{tmp}"], 2,
                                        "not a run directory", None),
    "predict of an image that is not there": (["predict", "{saved}", "{tmp}/cat.png",
                                               "--model", "generalist"], 2,
                                              "there is no image or folder", saved_run(None)),
    "predict of no classes": (["predict", "{saved}", "{tmp}", "--top", "0"], 2,
                              "--top must be at least 1", saved_run(None)),
    "table of no run": (["table", "{tmp}/nowhere"], 2, "not a run directory", None),
    "table to a place that cannot be written": (["table", "{saved}", "--out", "/proc/x/t.md"],
                                                2, "cannot write the table", saved_run(None)),
    "table of a damaged checkpoint": (["table", "{saved}"], 4, "damaged", saved_run("corrupt")),
    "export of no run": (["export", "{tmp}/nowhere"], 2, "not a run directory", None),
    "export of an unknown model": (["export", "{saved}", "--model", "teacher"], 2,
                                   "no model 'teacher'", saved_run(None)),
    "export of a role the run lacks": (["export", "{saved}"], 2, "no student checkpoint",
                                       saved_run(None)),
    "export of a damaged checkpoint": (["export", "{saved}", "--model", "generalist"], 4,
                                       "damaged", saved_run("corrupt")),
    "existing run dir": (["run", "{config}", "--run-dir", "{saved}"], 2, "already exists",
                         saved_run(None)),
    "changed config on resume": (["run", "--resume", "{saved}", "--set",
                                  "generalists.train.lr=0.5"], 2, "generalists.train.lr",
                                 saved_run(None)),
    "checkpoint of another architecture": (["run", "--resume", "{saved}"], 4,
                                           "another architecture", saved_run("architecture")),
    "corrupted checkpoint": (["run", "--resume", "{saved}"], 4, "damaged", saved_run("corrupt")),
    "teacher run that does not exist": (["run", "{config}", "--set",
                                        "generalists.from_run={tmp}/nowhere"], 2,
                                       "there is no run at", None),
    "teacher run not finished": (["run", "{config}", "--set", "generalists.from_run={saved}"], 2,
                                 "has trained 0 of its 2 epochs", saved_run(None)),
    "teacher run with another data split": (["run", "{config}", "--set",
                                             "generalists.from_run={saved}", "--set",
                                             "data.val_size=50"], 2,
                                            "split its data differently", saved_run(None)),
    "generalists section beside from_run": (["run", "{config}", "--set",
                                             "generalists.from_run={saved}", "--set",
                                             "generalists.count=2"], 2,
                                            "leave out the rest", saved_run(None)),
    "pickle planted as a checkpoint": (["run", "--resume", "{saved}"], 4, "not a checkpoint",
                                       saved_run("pickle")),
    "config file with a key given twice": (["run", "{tmp}/twice.yaml"], 2,
                                           "key 'name' is given twice in one mapping (line 2)",
                                           None),
    "override nested too deeply": (["run", "{config}", "--set", "x-a=" + "[" * 3000 + "]" * 3000],
                                   2, "nested too deeply", None),
    "specialists clustering an empty validation split": (
        ["run", "{config}", "--set", "data.val_size=0", "--set", "specialists.k=2"], 2,
        "leaves no validation images to cluster on", None),
    "Ray address where nothing listens": (["run", "{config}", "--address", "127.0.0.1:1"], 2,
                                          "nothing answers at --address 127.0.0.1:1", None),
    "run whose config.yaml is not text": (["eval", "{saved}"], 2, "is not valid YAML",
                                          saved_run("config bytes")),
    "run whose config.yaml is empty": (["run", "--resume", "{saved}"], 2, "holds no config",
                                       saved_run("config empty")),
    "report of metrics.json of another shape": (["report", "{saved}"], 2,
                                                "metrics.json is damaged (its models",
                                                saved_run("metrics shape")),
    "model asking for more CPUs than any node has": (  # a local Ray: asked before it starts
        ["run", "{config}", "--set", "generalists.resources.num_cpus=4096"], 2,
        "generalist-0 asks for 4096 CPU but no live node", None),
    "table written onto a folder": (["table", "{saved}", "--out", "{tmp}"], 2,
                                    "it is a folder", saved_run(None)),
}


def tree_digest(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, capsys):
    argv, code, message, factory = CASES[case]
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    (tmp_path / "list.yaml").write_text("- generalists\n- students\n")
    (tmp_path / "twice.yaml").write_text("name: a\nname: b\n")
    data = tmp_path / "data"
    saved = None
    if factory is not None and "saved" in " ".join(argv):
        saved = factory(tmp_path)
        data = tmp_path / "good-data"
    elif factory is not None:
        factory(data)
    else:
        write_mnist_like(data, n_train=300, n_test=50)
    before = tree_digest(saved) if saved else None
    run_dir = tmp_path / "run"
    argv = [a.format(config=config, tmp=tmp_path, saved=saved) for a in argv]
    if argv[0] == "run" and "--run-dir" not in argv and "--resume" not in argv:
        argv += ["--run-dir", str(run_dir)]
    if argv[0] == "run" and "--data-dir" not in argv:
        argv += ["--data-dir", str(data)]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert err.startswith("ensemble: error:") and err.count("\n") == 1
    assert not run_dir.exists()
    if saved:
        assert tree_digest(saved) == before
    assert not (tmp_path / "pwned").exists()


def test_bad_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("students: {s: [\n")
    assert main(["run", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


WEIGHTS = {  # generalists.weights given: what the file holds, and the words of the refusal
    "no file": (None, "generalists.weights[0]: there is no file"),
    "not weights": (b"epoch,loss\n1,0.5\n", "is neither safetensors nor a torch file"),
    "not a state dict": ([1, 2, 3], "holds no state dict"),
    "another model's": ({"w": torch.zeros(3)}, "does not fit generalists.model"),
}


@pytest.mark.parametrize("case", list(WEIGHTS))
def test_bad_weights_of_a_teacher_trained_elsewhere(case, tmp_path, capsys):
    content, message = WEIGHTS[case]
    path = tmp_path / "teacher.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    write_mnist_like(tmp_path / "data", n_train=300, n_test=50)
    run_dir = tmp_path / "run"
    assert main(["run", str(config), "--set", f"generalists.weights=[{path}]", "--data-dir",
                 str(tmp_path / "data"), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("ensemble: error:") and err.count("\n") == 1, err
    assert not run_dir.exists()


def _folder(damage):
    """An ImageFolder tree of 2 classes, spoilt by `damage`; its config's data section."""
    def make(tmp):
        from PIL import Image

        rng = np.random.default_rng(0)
        for part in ("train", "test"):
            for c in ("a", "b"):
                (tmp / "f" / part / c).mkdir(parents=True)
                for i in range(4):
                    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
                        tmp / "f" / part / c / f"{i}.png")
        spot = tmp / "f" / "train" / "a" / "0.png"
        if damage == "garbage":
            spot.write_bytes(b"this is not a picture")
        elif damage == "truncated":
            spot.write_bytes(spot.read_bytes()[:60])
        elif damage == "empty class":
            for p in (tmp / "f" / "test" / "b").iterdir():
                p.unlink()
        elif damage == "sizes":
            Image.fromarray(np.zeros((9, 8), np.uint8)).save(spot)
        elif damage == "classes":
            (tmp / "f" / "test" / "b").rename(tmp / "f" / "test" / "c")
        return f"{{folder: {tmp / 'f'}, val_size: 2}}"
    return make


def _npz(change):
    def make(tmp):
        arrays = {"x_train": np.zeros((10, 8, 8), np.uint8), "y_train": np.arange(10) % 2,
                  "x_test": np.zeros((4, 8, 8), np.uint8), "y_test": np.arange(4) % 2}
        change(arrays)
        np.savez(tmp / "d.npz", **arrays)
        return f"{{npz: {tmp / 'd.npz'}, val_size: 2}}"
    return make


def _bare_parquet(tmp):
    """Parquet files of images and labels, but not as write_parquet writes them (no shape)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for part in ("train", "test"):
        (tmp / "pq" / part).mkdir(parents=True)
        pq.write_table(pa.table({"image": [bytes(64)] * 4, "label": [0, 1, 0, 1]}),
                       tmp / "pq" / part / "a.parquet")
    return f"{{parquet: {tmp / 'pq'}, val_size: 1}}"


def broken(**kwargs):
    """A data factory that fails as its kwargs say (named in test configs)."""
    if kwargs.get("raise_"):
        raise ValueError("the bucket is empty")
    return [1, 2, 3]


DATA = {  # data of one's own spoilt: (data section factory, words of the one sentence)
    "unreadable image": (_folder("garbage"), "cannot read image"),
    "truncated image": (_folder("truncated"), "cannot read image"),
    "empty class folder": (_folder("empty class"), "holds no images"),
    "mixed image sizes": (_folder("sizes"), "set data.image_size"),
    "splits with other classes": (_folder("classes"), "has classes ['a', 'c']"),
    "npz without a key": (_npz(lambda a: a.pop("y_test")), "lacks y_test"),
    "npz labels out of range": (_npz(lambda a: a.update(classes=np.array(["x"]))),
                                "y_train must lie in [0, 1)"),
    "npz of float images": (_npz(lambda a: a.update(x_train=np.zeros((10, 8, 8)))),
                            "must be uint8 images"),
    "parquet without its image shape": (lambda tmp: _bare_parquet(tmp), "has no image_shape"),
    "parquet without a test split": (lambda tmp: f"{{parquet: {tmp / 'nothing'}}}",
                                     "data.parquet: cannot read"),
    "factory that raises": (lambda tmp: "{factory: 'tests.test_cli:broken', "
                                        "kwargs: {raise_: true}}",
                            "raised ValueError: the bucket is empty"),
    "factory of the wrong type": (lambda tmp: "{factory: 'tests.test_cli:broken'}",
                                  "gave a list, not a mapping"),
}


@pytest.mark.parametrize("case", list(DATA))
def test_bad_data_of_ones_own(case, tmp_path, capsys):
    make, message = DATA[case]
    config = tmp_path / "c.yaml"
    config.write_text(f"name: t\ndata: {make(tmp_path)}\n"
                      "generalists: {model: {hidden: [16]}, train: {epochs: 2}}\n")
    run_dir = tmp_path / "run"
    assert main(["run", str(config), "--run-dir", str(run_dir)]) == 3
    err = capsys.readouterr().err
    assert message in err and err.startswith("ensemble: error:") and err.count("\n") == 1, err
    assert not run_dir.exists()


def test_bad_student_whose_filter_leaves_no_training_image(tmp_path, capsys):
    """Classes the data name but never show in training: a student keeping only those would
    have nothing to learn from, found before anything starts."""
    arrays = {"x_train": np.zeros((10, 8, 8), np.uint8), "y_train": np.arange(10) % 2,
              "x_test": np.zeros((4, 8, 8), np.uint8), "y_test": np.arange(4) % 3,
              "classes": np.array(["a", "b", "c"])}
    np.savez(tmp_path / "d.npz", **arrays)
    config = tmp_path / "c.yaml"
    config.write_text(f"name: t\ndata: {{npz: {tmp_path / 'd.npz'}, val_size: 2}}\n"
                      "generalists: {model: {hidden: [16]}, train: {epochs: 2}}\n"
                      "students: {s: {model: {hidden: [8]}, keep_classes: [2]}}\n")
    assert main(["run", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "students.s: its transfer set is empty" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
