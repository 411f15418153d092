import dataclasses

import numpy as np
import pytest
import torch

from ensemble import checkpoint
from ensemble.config import DataConfig, ModelConfig, StudentConfig, TrainConfig
from ensemble.data import as_float, load_splits
from ensemble.distill import Student
from ensemble.errors import CheckpointError, TrainingError
from ensemble.models import load_model
from ensemble.train import Trainer, learning_rate, optimizer, pick_device, predict_logits

MODEL = ModelConfig(hidden=(32, 32), dropout_in=0.1, dropout_hidden=0.3, max_norm=2.0)
TRAIN = TrainConfig(epochs=3, batch_size=50, lr=0.3)
JITTER = TrainConfig(epochs=3, batch_size=50, lr=0.3, augment=("translate:1", "elastic:10"))  # every RNG stream


@pytest.fixture(scope="module")
def splits(data_root):
    return load_splits(DataConfig(val_size=100, download=False), data_root)


def weights(trainer):
    return trainer.model.state_dict()


def test_learns_and_tracks_best(splits):
    t = Trainer("g", MODEL, TRAIN, splits, seed=0)
    records = [t.train_epoch() for _ in range(3)]
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["val_errors"] < 50  # of 100; chance would be 90
    best = min(records, key=lambda r: r["val_errors"])
    assert t.best_epoch == best["epoch"]
    for module in t.model.modules():  # max-norm holds after every step
        if isinstance(module, torch.nn.Linear):
            assert module.weight.norm(dim=1).max() <= 2.0 + 1e-5


def trained(splits, epochs: int, seed: int = 3) -> Trainer:
    """A trainer of every RNG stream (JITTER) after `epochs` epochs."""
    t = Trainer("g", MODEL, JITTER, splits, seed=seed)
    for _ in range(epochs):
        t.train_epoch()
    return t


def test_resume_is_bit_identical(splits):
    straight = trained(splits, 3)
    first = trained(splits, 1)
    blob = first.checkpoint()
    del first
    resumed = Trainer("g", MODEL, JITTER, splits, seed=3)
    record, _ = resumed.run_epoch(2, blob)  # a fresh trainer at epoch 0 restores epoch 1 first
    resumed.train_epoch()
    assert resumed.epoch == 3 and record["epoch"] == 2
    for key, value in weights(straight).items():
        assert torch.equal(value, weights(resumed)[key]), key
    for key, value in straight.best_state.items():
        assert torch.equal(value, resumed.best_state[key])
    # and a different seed really differs: the comparison above can fail
    other = trained(splits, 3, seed=4)
    assert not torch.equal(weights(other)["output.weight"], weights(straight)["output.weight"])


def test_device_follows_rays_assignment_not_torchs_view(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node, as torch sees it
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert pick_device("auto", gpu_ids=[]) == cpu  # Ray assigned none: never the GPU torch sees
    assert pick_device("auto", gpu_ids=["3"]) == gpu  # physical GPU 3 is torch's index 0 there
    assert pick_device("cpu", gpu_ids=["3"]) == cpu
    assert pick_device("cuda", gpu_ids=["1"]) == gpu
    assert pick_device("auto") == gpu  # the driver (eval, export, report): torch's view
    assert pick_device(cpu, gpu_ids=["0"]) is cpu  # a device already chosen stays
    with pytest.raises(TrainingError, match="Ray assigned no GPU"):
        pick_device("cuda", gpu_ids=[])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", gpu_ids=["0"]) == cpu  # a GPU in Ray's books only (fake GPUs)
    assert pick_device("auto") == cpu
    with pytest.raises(TrainingError, match="Ray assigned GPU 0 but torch sees no GPU"):
        pick_device("cuda", gpu_ids=["0"])


def test_checkpoint_keeps_rng_states_per_device_type(splits):
    straight, first = trained(splits, 2), trained(splits, 1)
    tensors, meta = checkpoint.loads(first.checkpoint())
    assert "rng.batches.cpu" in tensors and "rng.cuda" not in tensors
    # as if epoch 1 had then gone on CUDA and come back: that device's states beside the CPU's
    cuda_states = {"rng.batches.cuda": torch.arange(16, dtype=torch.uint8),
                   "rng.cuda": torch.arange(16, 32, dtype=torch.uint8)}
    resumed = Trainer("g", MODEL, JITTER, splits, seed=3)
    resumed.run_epoch(2, checkpoint.dumps({**tensors, **cuda_states}, meta))
    for key, value in weights(straight).items():  # the CPU stream went on exactly
        assert torch.equal(value, weights(resumed)[key]), key
    kept, _ = checkpoint.loads(resumed.checkpoint())
    assert all(torch.equal(kept[k], v) for k, v in cuda_states.items())  # carried, untouched
    # written before states were kept per device type: "rng.batches" is a CPU generator's
    legacy = {("rng.batches" if k == "rng.batches.cpu" else k): v for k, v in tensors.items()}
    again = Trainer("g", MODEL, JITTER, splits, seed=3)
    again.run_epoch(2, checkpoint.dumps(legacy, meta))
    assert torch.equal(weights(again)["output.weight"], weights(straight)["output.weight"])
    # a checkpoint with no state for this device type: batch order starts from this seed's
    only_cuda = {k: v for k, v in tensors.items() if k != "rng.batches.cpu"} | cuda_states
    fresh = Trainer("g", MODEL, JITTER, splits, seed=3)
    fresh.run_epoch(2, checkpoint.dumps(only_cuda, meta))
    assert fresh.epoch == 2
    assert not torch.equal(weights(fresh)["output.weight"], weights(straight)["output.weight"])


def test_an_epoch_sends_its_checkpoint_only_when_asked_and_needs_one_only_after_a_restart(splits):
    t = Trainer("g", MODEL, TRAIN, splits, seed=0)
    record, blob = t.run_epoch(1, None, keep=False)  # it keeps its own state: nothing travels
    assert record["epoch"] == 1 and blob is None
    record, blob = t.run_epoch(2)
    assert checkpoint.read_meta(blob)["epoch"] == 2
    restarted = Trainer("g", MODEL, TRAIN, splits, seed=0)  # what Ray's restart leaves
    assert restarted.run_epoch(3, None) == (None, None) and restarted.epoch == 0  # untrained
    record, _ = restarted.run_epoch(3, blob)  # once the driver sends the checkpoint
    assert record["epoch"] == 3


def test_checkpoint_refuses_other_architecture_and_damage(splits):
    blob = Trainer("g", MODEL, TRAIN, splits, seed=0).checkpoint()
    wider = Trainer("g", ModelConfig(hidden=(64, 32)), TRAIN, splits, seed=0)
    with pytest.raises(CheckpointError, match="another architecture"):
        wider.load(blob)
    damaged = bytearray(blob)
    damaged[-10] ^= 0xFF
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.loads(bytes(damaged))
    with pytest.raises(CheckpointError):
        checkpoint.loads(b"\x80\x04K\x01.")  # a pickle is not a checkpoint


def test_latest_falls_back_to_previous(tmp_path, splits):
    t = Trainer("g", MODEL, TRAIN, splits, seed=0)
    for epoch in (1, 2, 3):
        t.train_epoch()
        checkpoint.save_epoch(tmp_path, epoch, t.checkpoint())
    assert [e for e, _ in checkpoint.epochs_in(tmp_path)] == [3, 2]  # the last two kept
    newest = tmp_path / "epoch-0003.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    blob, meta = checkpoint.load_latest(tmp_path)
    assert meta["epoch"] == 2
    model, meta = load_model(blob, torch.device("cpu"))
    assert meta["name"] == "g" and not model.training


def test_schedules():
    cfg = TrainConfig(epochs=4, lr=0.2, schedule="cosine")
    assert learning_rate(cfg, 0) == 0.2 and learning_rate(cfg, 2) == pytest.approx(0.1)
    exp = TrainConfig(lr=1.0, schedule="exponential", lr_decay=0.5)
    assert learning_rate(exp, 3) == 0.125
    crd = TrainConfig(epochs=240, lr=0.05, schedule="step", lr_decay=0.1,
                      milestones=(150, 180, 210))  # CRD's CIFAR-100 recipe
    assert [learning_rate(crd, e) for e in (0, 149, 150, 179, 180, 210, 239)] == \
        pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.00005, 0.00005])
    warm = TrainConfig(epochs=10, lr=0.4, schedule="constant", warmup_epochs=3)
    assert [learning_rate(warm, e) for e in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4])


@pytest.mark.parametrize("recipe", [
    dict(optimizer="adamw", lr=0.003, weight_decay=0.05, decay="weights"),
    dict(nesterov=True, weight_decay=1e-3, label_smoothing=0.1, warmup_epochs=1),
])
def test_other_recipes_resume_bit_exactly(splits, recipe):
    """AdamW's two moments and step count, Nesterov SGD's momentum: all in the checkpoint."""
    cfg = dataclasses.replace(JITTER, **recipe)
    straight = Trainer("g", MODEL, cfg, splits, seed=3)
    first = Trainer("g", MODEL, cfg, splits, seed=3)
    for _ in range(2):
        straight.train_epoch()
    first.train_epoch()
    resumed = Trainer("g", MODEL, cfg, splits, seed=3)
    resumed.load(first.checkpoint())
    resumed.train_epoch()
    for key, value in weights(straight).items():
        assert torch.equal(value, weights(resumed)[key]), key
    plain = Trainer("g", MODEL, dataclasses.replace(JITTER, epochs=3), splits, seed=3)
    for _ in range(2):
        plain.train_epoch()
    assert not torch.equal(weights(plain)["output.weight"], weights(straight)["output.weight"])


def test_images_stay_uint8_on_the_device(splits):
    """A quarter of float32's memory per trainer: the splits are held as uint8 pixels."""
    t = Trainer("g", MODEL, TRAIN, splits, seed=0)
    assert t.x.dtype == t.val[0].dtype == t.test[0].dtype == torch.uint8
    assert t.x.untyped_storage().nbytes() == splits.train_x.nbytes


def test_decay_on_weights_spares_biases():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = optimizer(net.parameters(), TrainConfig(weight_decay=0.1, decay="weights"))
    decayed, spared = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [(3, 4)]
    assert spared["weight_decay"] == 0.0 and len(spared["params"]) == 3  # bias, BN scale, shift
    assert len(optimizer(net.parameters(), TrainConfig(weight_decay=0.1)).param_groups) == 1


def test_student_distils_and_filters_transfer_set(splits):
    teacher = Trainer("g", MODEL, TRAIN, splits, seed=0)
    for _ in range(3):
        teacher.train_epoch()
    cfg = StudentConfig(model=ModelConfig(hidden=(16,), dropout_in=0, dropout_hidden=0),
                        train=TrainConfig(epochs=2, batch_size=50), temperature=4.0,
                        drop_classes=(3,))
    student = Student("s", cfg, splits, [teacher.checkpoint()], seed=1)
    assert not (student.y == 3).any() and len(student.y) > 0
    # soft targets computed once on the fixed transfer set match the teacher's own outputs
    expected = torch.softmax(teacher.best_model()(as_float(student.x)) / 4.0, 1)
    torch.testing.assert_close(student.targets, expected)
    first = student.train_epoch()
    assert student.train_epoch()["loss"] < first["loss"]
    hard = Student("h", StudentConfig(alpha=0.0, model=cfg.model, train=cfg.train), splits, [],
                   seed=1)
    assert hard.teacher is None and hard.train_epoch()["loss"] > 0


def test_small_cnn_trains_on_colour_images(tmp_path):
    from tests.test_data import write_cifar10_bin

    write_cifar10_bin(tmp_path)
    data = load_splits(DataConfig(name="cifar10", val_size=10, download=False), tmp_path)
    cnn = ModelConfig(kind="cnn", hidden=(8, 16), dropout_in=0.0, dropout_hidden=0.2,
                      max_norm=3.0)
    t = Trainer("c", cnn, TrainConfig(epochs=1, batch_size=30, augment=("translate:2",)), data,
                seed=0)
    record = t.train_epoch()
    assert record["epoch"] == 1 and record["loss"] > 0
    model, _ = load_model(t.checkpoint(), torch.device("cpu"))
    assert model(as_float(t.x[:4])).shape == (4, 10)


@pytest.mark.parametrize("augmentation", ["translate:1", "elastic:10", "crop:2", "flip"])
def test_student_on_augmented_transfer_set_asks_teacher_each_batch(splits, augmentation):
    teacher = Trainer("g", MODEL, TRAIN, splits, seed=0)
    teacher.train_epoch()
    cfg = StudentConfig(model=ModelConfig(hidden=(16,), dropout_in=0, dropout_hidden=0),
                        train=TrainConfig(epochs=1, batch_size=50, augment=(augmentation,)),
                        temperature=2.0)
    student = Student("s", cfg, splits, [teacher.checkpoint()], seed=1)
    assert student.targets is None  # augmented inputs: soft targets come on the fly
    calls = []
    original = student.teacher.probs
    student.teacher.probs = lambda x, T: calls.append(len(x)) or original(x, T)
    student.train_epoch()
    assert sum(calls) == len(student.y)


def test_bf16_autocast_keeps_fp32_weights_and_learns(splits):
    import dataclasses

    t = Trainer("g", MODEL, dataclasses.replace(TRAIN, precision="bf16"), splits, seed=0)
    first = t.train_epoch()
    assert t.train_epoch()["loss"] < first["loss"]
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    seen = []
    hook = t.model.output.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    t.batch_loss(torch.arange(4))  # outside autocast: fp32
    with t.autocast():
        t.batch_loss(torch.arange(4))
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]


def _tiny(data_root, compile_):
    splits = load_splits(DataConfig(val_size=100, download=False), data_root)
    cfg = TrainConfig(epochs=2, batch_size=50, lr=0.1, compile=compile_)
    return Trainer("tiny", ModelConfig(hidden=(16,)), cfg, splits, 3)


def test_compiled_training_matches_eager(data_root):
    eager, compiled = _tiny(data_root, False), _tiny(data_root, True)
    for _ in range(2):
        a, b = eager.train_epoch(), compiled.train_epoch()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert compiled.compiled is not None  # it did compile, and kept compiling
    for p, q in zip(eager.model.parameters(), compiled.model.parameters()):
        assert (p - q).abs().max() < 1e-4


def test_failed_compile_falls_back_to_eager(data_root):
    eager, broken = _tiny(data_root, False), _tiny(data_root, True)

    def no_compiler(x):
        raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")
    broken.compiled = no_compiler
    with pytest.warns(UserWarning, match="torch.compile failed, training eagerly"):
        record = broken.train_epoch()
    assert broken.compiled is None
    assert record["loss"] == eager.train_epoch()["loss"]  # eager from the first batch on


def test_early_stopping_ends_once_validation_stalls_and_keeps_the_best(splits):
    """train.patience: the epoch `patience` after the best one says stopped (and sends its
    checkpoint even when not asked); the model is the best epoch's. Many classes: top-5 too."""
    cfg = TrainConfig(epochs=40, batch_size=50, lr=0.3, patience=2)
    t = Trainer("g", MODEL, cfg, splits, seed=3)
    records = []
    while not (records and records[-1]["stopped"]):
        record, blob = t.run_epoch(t.epoch + 1, keep=False)
        records.append(record)
        assert (blob is not None) == record["stopped"]
    last = records[-1]
    assert last["epoch"] < 40 and last["epoch"] - last["best_epoch"] == 2
    assert all(r["epoch"] - r["best_epoch"] < 2 for r in records[:-1])
    assert t.summary()["best_epoch"] == last["best_epoch"]
    assert "test_errors_top5" not in last  # 10 classes: top-1 only
    assert not Trainer("g", MODEL, TrainConfig(epochs=3), splits, seed=3).train_epoch()["stopped"]


def test_many_classes_record_top5_errors_and_no_confusion_matrix():
    from ensemble.data import Splits
    from tests.conftest import synthetic_digits

    def part(n, seed):
        x, y = synthetic_digits(n, seed, size=12, classes=120)
        return x[:, None], y.astype(np.int64)

    splits = Splits("glyphs", tuple(f"c{i}" for i in range(120)), *part(600, 0), *part(240, 1),
                    *part(240, 2))
    t = Trainer("g", ModelConfig(hidden=(64,), dropout_in=0, dropout_hidden=0),
                TrainConfig(epochs=1, batch_size=60, lr=0.3), splits, seed=0)
    record = t.train_epoch()
    logits = predict_logits(t.model, t.test[0])
    top5 = int((~(logits.topk(5, 1).indices == t.test[1][:, None]).any(1)).sum())
    assert record["test_errors_top5"] == top5 < record["test_errors"]
    assert t.summary()["test_errors_top5"] == top5 and t.best_confusion is None
