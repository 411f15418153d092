"""Your own models: any nn.Module from a factory, the CIFAR nets of the distillation literature,
and models that do not fit the data refused (in one sentence, before Ray starts: test_cli)."""
import numpy as np
import pytest
import torch

from ensemble.config import DataConfig, ModelConfig, SpecialistsConfig, StudentConfig, TrainConfig
from ensemble.data import as_float, labels_to_device, load_splits, to_device
from ensemble.distill import Student
from ensemble.errors import ConfigError
from ensemble.models import check_model, head_of, load_model
from ensemble.train import Trainer, predict_logits
from ensemble.zoo import ZOO
from specialists.specialist import DustbinHead
from specialists.trainer import SpecialistTrainer
from tests.test_data import write_cifar10_bin

RESNET18 = ModelConfig(factory="torchvision.models:resnet18", kwargs={"num_classes": 10})
TRAIN = TrainConfig(epochs=2, batch_size=16, lr=0.02, augment=("translate:2",))  # every RNG


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_bin(root, n_per_batch=12)
    return load_splits(DataConfig(name="cifar10", val_size=12, download=False), root)


def test_zoo_has_the_published_sizes():
    """Parameters for 100 classes as the CRD paper (Tian et al. 2020) lists its CIFAR-100 nets,
    in millions; a wrong block or width would move them."""
    published = {"resnet8x4": 1.23, "resnet32x4": 7.43, "resnet20": 0.28, "resnet56": 0.86,
                 "wrn_16_2": 0.70, "wrn_40_2": 2.26}
    for name, build in ZOO.items():
        model = build(3, 100)
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(count - published[name]) < 0.006, (name, count)
        assert head_of(model)[0] == "fc"
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_factory_model_resumes_bit_exactly_with_its_batch_norm_buffers(cifar):
    straight = Trainer("g", RESNET18, TRAIN, cifar, seed=3)
    for _ in range(2):
        straight.train_epoch()
    first = Trainer("g", RESNET18, TRAIN, cifar, seed=3)
    first.train_epoch()
    blob = first.checkpoint()
    resumed = Trainer("g", RESNET18, TRAIN, cifar, seed=3)
    resumed.load(blob)
    resumed.train_epoch()
    mine = weights(resumed)
    assert any("running_mean" in k for k in mine)
    for key, value in weights(straight).items():
        assert torch.equal(value, mine[key]), key
    assert not torch.equal(weights(first)["fc.weight"], mine["fc.weight"])  # it did move


def test_channels_last_changes_the_layout_not_the_model(cifar):
    """With train.channels_last the same weights give the same logits (float rounding aside)
    from inputs and weights laid out channels-last, and the model trains."""
    model = ModelConfig(kind="resnet20")
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.02)
    plain = Trainer("g", model, cfg, cifar, seed=0)
    last = Trainer("g", model, TrainConfig(epochs=1, batch_size=16, lr=0.02, channels_last=True),
                   cifar, seed=0)
    assert last.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = plain.x[:16]
    for mode in (True, False):
        plain.model.train(mode)
        last.model.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(last.forward(as_float(x)), plain.forward(as_float(x)),
                                       rtol=1e-4, atol=1e-4)
    assert np.isfinite(last.train_epoch()["loss"])


def test_factory_model_as_generalist_specialist_and_student(cifar):
    generalist = Trainer("g", RESNET18, TRAIN, cifar, seed=0)
    generalist.train_epoch()
    blob = generalist.checkpoint()
    spec = SpecialistTrainer("s", [1, 2], blob, SpecialistsConfig(train=TRAIN), cifar, seed=1)
    fc = spec.model.fc
    assert isinstance(fc, DustbinHead) and fc.out_features == 3  # its head swapped, nothing else
    _, output = head_of(load_model(blob, torch.device("cpu"))[0])
    torch.testing.assert_close(fc.weight[:2].detach(), output.weight[[1, 2]].detach())
    record = spec.train_epoch()
    assert np.isfinite(record["loss"])
    reloaded, meta = load_model(spec.checkpoint(), torch.device("cpu"), which="model")
    x = torch.rand(4, 3, 32, 32)
    spec.model.eval()
    torch.testing.assert_close(predict_logits(reloaded, x), predict_logits(spec.model, x))
    assert meta["dustbin_offset"] == pytest.approx(float(reloaded.fc.dustbin_offset))

    student = Student("st", StudentConfig(model=RESNET18, train=TRAIN, temperature=4.0), cifar,
                      [blob], seed=2)
    assert student.targets_from == "per batch" and student.teacher is not None
    assert np.isfinite(student.train_epoch()["loss"])


@pytest.mark.parametrize("model, words", [
    (ModelConfig(factory="torchvision.models:resnet18", kwargs={"num_classes": 7}),
     "head has 7 outputs but the data have 10 classes"),
    (ModelConfig(factory="torchvision.models:resnet_nineteen"), "cannot import"),
    (ModelConfig(factory="no_such_package.models:net"), "cannot import"),
    (ModelConfig(factory="torchvision.models:resnet18", kwargs={"num_classes": 10},
                 head="classifier"), "no nn.Linear named 'classifier'"),
    (ModelConfig(factory="torch.nn:Identity"), "no nn.Linear"),
    (ModelConfig(factory="torchvision.models:resnet18", kwargs={"layers": 3}),
     "building the model failed"),
    (ModelConfig(factory="math:pi"), "is not callable"),
    (ModelConfig(kind="cnn", hidden=(8, 8, 8, 8, 8, 8)), "fails on one 3x32x32 image"),
    (ModelConfig(factory="collections:OrderedDict"), "not an nn.Module"),
])
def test_models_that_do_not_fit_are_refused_naming_the_key(model, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")) as err:
        check_model(model, "students.s.model", (3, 32, 32), 10)
    assert str(err.value).startswith("students.s.model") and "\n" not in str(err.value)


def test_a_model_for_other_images_is_refused():
    """A model made for 3 colour channels, given grey images."""
    with pytest.raises(ConfigError, match=r"fails on one 1x28x28 image"):
        check_model(RESNET18, "generalists.model", (1, 28, 28), 10)
    check_model(RESNET18, "generalists.model", (3, 32, 32), 10)  # and fits what it was made for


FACTORY_RUN = """
name: factory
data: {name: cifar10, val_size: 12, download: false, normalize: true}
generalists:
  model: {factory: "torchvision.models:resnet18", kwargs: {num_classes: 10}}
  train: {epochs: 1, batch_size: 16, lr: 0.02, augment: [flip, translate:4]}
specialists: {k: 2, train: {epochs: 1, batch_size: 16, lr: 0.02}}
students:
  small:
    model: {factory: "torchvision.models:resnet18", kwargs: {num_classes: 10}}
    train: {epochs: 1, batch_size: 16, lr: 0.02}
    temperature: 4.0
"""


@pytest.mark.ray
def test_factory_models_run_on_ray_and_export_like_the_trained_model(ray_session, tmp_path,
                                                                      capsys):
    """`ensemble run` with torchvision's resnet18 for every role on normalised data, then
    `ensemble export` of the student: ONNX in onnxruntime and the torch.export program give
    the model's logits from pixels / 255 (the normalisation is inside the model)."""
    ort = pytest.importorskip("onnxruntime")
    from ensemble.cli import main
    from ensemble.rundir import RunDir

    write_cifar10_bin(tmp_path / "data", n_per_batch=12)
    config = tmp_path / "factory.yaml"
    config.write_text(FACTORY_RUN)
    run = tmp_path / "run"
    assert main(["run", str(config), "--data-dir", str(tmp_path / "data"),
                 "--run-dir", str(run)]) == 0
    models = RunDir(run).models()
    assert "generalist-0" in models and "student-small" in models
    specialists = [m for m in models if m.startswith("specialist-")]
    assert specialists
    spec, meta = load_model(RunDir(run).latest(specialists[0])[0], torch.device("cpu"))
    assert isinstance(spec.net.fc, DustbinHead)
    assert spec.net.fc.out_features == len(meta["members"]) + 1
    assert meta["normalize"]["mean"] == pytest.approx(
        [float(c.mean()) / 255 for c in np.moveaxis(load_splits(
            DataConfig(name="cifar10", val_size=12, download=False),
            tmp_path / "data").train_x, 1, 0)])

    assert main(["export", str(run), "--model", "student-small"]) == 0
    capsys.readouterr()
    model, _ = load_model(RunDir(run).latest("student-small")[0], torch.device("cpu"))
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(images).numpy()
    session = ort.InferenceSession(str(run / "export" / "student-small.onnx"),
                                   providers=["CPUExecutionProvider"])
    for batch in (images[:1], images):  # the batch dimension is free
        got = session.run(["logits"], {"images": batch.numpy()})[0]
        np.testing.assert_allclose(got, expected[:len(batch)], rtol=1e-3, atol=1e-4)
    program = torch.export.load(run / "export" / "student-small.pt2").module()
    with torch.no_grad():
        np.testing.assert_allclose(program(images).numpy(), expected, rtol=1e-4, atol=1e-5)


SAVE_ELSEWHERE = """
import sys, torch, torchvision
from safetensors.torch import save_file
torch.manual_seed(int(sys.argv[2]))
model = torchvision.models.resnet18(num_classes=10)
if sys.argv[1].endswith(".safetensors"):
    save_file(model.state_dict(), sys.argv[1])
else:
    torch.save({"state_dict": model.state_dict(), "epoch": 90}, sys.argv[1])
"""

WEIGHTS_RUN = """
name: weights
data: {name: cifar10, val_size: 12, download: false}
generalists:
  model: {factory: "torchvision.models:resnet18", kwargs: {num_classes: 10}}
  weights: [WEIGHTS]
students:
  distilled:
    model: {hidden: [32]}
    train: {epochs: 2, batch_size: 16, lr: 0.05}
    temperature: 4.0
"""


@pytest.mark.ray
def test_a_teacher_trained_elsewhere_is_evaluated_and_distilled(ray_session, tmp_path):
    """Two state dicts written by a plain PyTorch script (a torch file and safetensors) become
    the run's finished generalists, as they are: evaluated, not trained; a student learns
    from them."""
    import json
    import subprocess
    import sys

    from ensemble.checkpoint import loads_state, read_state_dict
    from ensemble.cli import main
    from ensemble.rundir import RunDir
    from ensemble.train import count_errors

    files = [tmp_path / "teacher.pt", tmp_path / "teacher.safetensors"]
    for seed, path in enumerate(files):
        subprocess.run([sys.executable, "-c", SAVE_ELSEWHERE, str(path), str(seed)], check=True)
    write_cifar10_bin(tmp_path / "data", n_per_batch=12)
    config = tmp_path / "weights.yaml"
    config.write_text(WEIGHTS_RUN.replace("WEIGHTS", ", ".join(map(str, files))))
    run = tmp_path / "run"
    assert main(["run", str(config), "--data-dir", str(tmp_path / "data"),
                 "--run-dir", str(run)]) == 0
    saved = RunDir(run)
    assert saved.load_config().generalists.count == 2
    splits = load_splits(DataConfig(name="cifar10", val_size=12, download=False),
                         tmp_path / "data")
    metrics = json.loads((run / "metrics.json").read_text())["models"]
    for i, path in enumerate(files):
        state = loads_state(saved.latest(f"generalist-{i}")[0])
        theirs = read_state_dict(str(path))
        assert all(torch.equal(state.best[k], v) for k, v in theirs.items())
        [record] = metrics[f"generalist-{i}"]["history"]
        assert record["weights"] == str(path) and record["epoch"] == 1
        model, _ = load_model(saved.latest(f"generalist-{i}")[0], torch.device("cpu"))
        cpu = torch.device("cpu")
        x, y = to_device(splits.test_x, cpu), labels_to_device(splits.test_y, cpu)
        assert record["test_errors"] == count_errors(model, x, y)
    student = metrics["student-distilled"]
    assert student["status"] == "finished" and len(student["history"]) == 2


def test_normalisation_is_part_of_the_model(cifar, tmp_path):
    """data.normalize: the mean and std of the training split, per channel, inside every model
    (so its checkpoint and export carry them); a specialist inherits its generalist's."""
    import dataclasses

    from ensemble.data import channel_stats

    mean, std = channel_stats(cifar.train_x)
    pixels = cifar.train_x.astype(np.float64) / 255
    assert mean == pytest.approx(pixels.mean(axis=(0, 2, 3)).tolist())
    assert std == pytest.approx(pixels.std(axis=(0, 2, 3)).tolist())
    data = dataclasses.replace(cifar, mean=mean, std=std)
    model = ModelConfig(kind="resnet8x4")
    t = Trainer("g", model, TrainConfig(epochs=1, batch_size=16, augment=("flip",)), data, seed=0)
    t.train_epoch()
    loaded, meta = load_model(t.checkpoint(), torch.device("cpu"))
    assert meta["normalize"] == {"mean": list(mean), "std": list(std)}
    x = as_float(t.x[:8])
    t.model.eval()
    torch.testing.assert_close(predict_logits(loaded, x), predict_logits(t.model, x))
    with torch.no_grad():  # the same as normalising outside a bare net
        bare = loaded.net
        z = bare((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(loaded(x), z, rtol=1e-5, atol=1e-5)
    spec = SpecialistTrainer("s", [1, 2], t.checkpoint(), SpecialistsConfig(train=TRAIN), data,
                             seed=1)
    assert isinstance(spec.model.net.fc, DustbinHead)
    assert torch.equal(spec.model.mean, loaded.mean)
