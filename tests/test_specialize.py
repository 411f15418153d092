"""Section 5 without Ray: coordinator, specialist trainer, eq. 5 ensemble, and a student taught
by it (specialists.coordinator, specialists.trainer, specialists.ensemble, ensemble.teacher)."""
import dataclasses
import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from ensemble.config import DataConfig, ModelConfig, SpecialistsConfig, StudentConfig, TrainConfig
from ensemble.data import as_float, labels_to_device, load_splits, to_device
from ensemble.distill import Student
from ensemble.models import load_model
from ensemble.teacher import evaluate_ensemble, load_teacher, teacher_outputs
from ensemble.train import Trainer
from specialists.combine import active_specialists, combine, spread
from specialists.coordinator import coordinate
from specialists.specialist import collapsed_soft_targets
from specialists.trainer import SpecialistTrainer

CPU = torch.device("cpu")

MODEL = ModelConfig(hidden=(32, 32), dropout_in=0.0, dropout_hidden=0.1)
SPEC = SpecialistsConfig(k=3, train=TrainConfig(epochs=2, batch_size=50, lr=0.1,
                                                augment=("translate:1",)))


@pytest.fixture(scope="module")
def setup(data_root):
    splits = load_splits(DataConfig(val_size=100, download=False), data_root)
    gen = Trainer("generalist-0", MODEL, TrainConfig(epochs=2, batch_size=50, lr=0.3), splits, 0)
    for _ in range(2):
        gen.train_epoch()
    return splits, gen.checkpoint()


def test_specialist_starts_as_its_generalist(setup):
    splits, blob = setup
    members = [2, 5, 7]
    spec = SpecialistTrainer("specialist-0", members, blob, SPEC, splits, seed=1)
    gen, _ = load_model(blob, torch.device("cpu"))
    x = as_float(spec.x[:16])  # the trainer keeps uint8 pixels
    z, s = gen(x), spec.model.eval()(x)
    torch.testing.assert_close(s[:, :3], z[:, members])
    assert set(spec.y.tolist()) == {0, 1, 2, 3} and spec.classes == 4
    assert 0 < spec.natural < 1


def test_specialist_trains_measures_and_resumes(setup):
    splits, blob = setup
    members = [2, 5, 7]
    straight = SpecialistTrainer("specialist-0", members, blob, SPEC, splits, seed=1)
    drawn, batches = [], straight.epoch_batches
    def recorded():  # the batches the epoch really drew
        for idx in batches():
            drawn.append(idx.clone())
            yield idx
    straight.epoch_batches = recorded
    straight.train_epoch()
    # the subset's share of the drawn examples and of the training set, from the original labels
    labels = torch.as_tensor(splits.train_y, dtype=torch.long)
    is_member = torch.isin(labels, torch.tensor(members))
    share = float(is_member[torch.cat(drawn)].float().mean())
    natural = float(is_member.float().mean())
    assert straight.measured == pytest.approx(share) and straight.natural == pytest.approx(natural)
    assert abs(share - SPEC.fraction) < 0.02 and abs(natural - SPEC.fraction) > 0.1
    assert float(straight.head.dustbin_offset) == pytest.approx(
        math.log(share * (1 - natural) / (natural * (1 - share))))
    saved = straight.checkpoint()
    straight.train_epoch()
    resumed = SpecialistTrainer("specialist-0", members, blob, SPEC, splits, seed=1)
    resumed.run_epoch(2, saved)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    model, meta = load_model(resumed.checkpoint(), CPU)
    assert meta["members"] == members and meta["kind"] == "specialist"
    assert model(as_float(resumed.x[:2])).shape == (2, 4)


def test_coordinator_ensemble_and_table4(setup):
    splits, blob = setup
    report = coordinate(SPEC, [blob], splits)
    subsets = report["subsets"]
    assert subsets and all(len(s) >= 2 for s in subsets)
    specs = []
    for i, members in enumerate(subsets):
        t = SpecialistTrainer(f"specialist-{i}", members, blob, SPEC, splits, seed=i)
        t.train_epoch()
        specs.append(t.checkpoint())
    result = evaluate_ensemble([blob], specs, SPEC, splits)
    # against what is computed here without the ensemble's code
    gen, _ = load_model(blob, CPU)
    x, y = to_device(splits.test_x, CPU), labels_to_device(splits.test_y, CPU)
    assert result["test"]["generalist_errors"] == int((gen(x).argmax(1) != y).sum())
    cover = [sum(int(label) in s for s in subsets) for label in splits.test_y]
    assert [(r["specialists"], r["examples"]) for r in result["table4"]] == \
        [(n, cover.count(n)) for n in sorted(set(cover))]
    # with no specialists the ensemble is the generalist
    alone = evaluate_ensemble([blob], [], SPEC, splits)
    assert alone["test"]["ensemble_errors"] == alone["test"]["generalist_errors"]
    # a student learns from softmax(log q / T), q solved here by eq. 5 on every input
    cfg = StudentConfig(model=ModelConfig(hidden=(16,), dropout_in=0, dropout_hidden=0),
                        train=TrainConfig(epochs=1, batch_size=50), temperature=2.0,
                        soft_targets="ensemble")
    student = Student("student", cfg, splits, [blob], seed=3, specialists=specs,
                      specialists_cfg=SPEC)
    with torch.no_grad():
        xs = as_float(student.x)
        pg = F.softmax(gen(xs), 1)
        P, d, S = spread([F.softmax(load_model(b, CPU)[0](xs), 1) for b in specs],
                         [torch.tensor(m) for m in subsets], splits.num_classes)
        q = combine(pg, P, d, S, active_specialists(pg, S, SPEC.top_n), SPEC.combine_tol,
                    SPEC.combine_steps)
    torch.testing.assert_close(student.targets, F.softmax(q.clamp_min(1e-30).log() / 2.0, 1))
    assert student.train_epoch()["loss"] > 0


def test_ensemble_runs_each_specialist_on_its_callers_only(setup):
    """predict gives each specialist only the inputs that call on it; q must equal eq. 5 solved
    with every specialist's output on every input."""
    splits, blob = setup
    specs = []
    for i, members in enumerate([[0, 6], [3, 5, 8], [4, 7, 9]]):  # 1 and 2 have none
        t = SpecialistTrainer(f"specialist-{i}", members, blob, SPEC, splits, seed=i)
        t.train_epoch()
        specs.append(t.checkpoint())
    x = to_device(splits.test_x[:300], torch.device("cpu"))
    for top_n in (1, 2):
        cfg = dataclasses.replace(SPEC, top_n=top_n)
        ens = load_teacher([blob], CPU, specialists=specs, specialists_cfg=cfg)
        pg, q, active = ens.predict(x)
        members = [torch.tensor(m) for m in ens.members]
        P, d, S = spread([F.softmax(m(x), 1) for m in ens.specialists], members, ens.classes)
        assert torch.equal(active, active_specialists(pg, S, top_n))
        assert active.any() and not active.all()
        if top_n == 1:  # inputs whose top class is 1 or 2 call on no specialist
            assert not active.any(1).all()
        torch.testing.assert_close(q, combine(pg, P, d, S, active, cfg.combine_tol,
                                              cfg.combine_steps))


@pytest.mark.parametrize("teacher", ["generalists", "generalists, mean logits", "ensemble"])
def test_shared_teacher_outputs_give_each_student_its_own_soft_targets(setup, teacher):
    splits, blob = setup
    specs = []
    if teacher == "ensemble":
        for i, members in enumerate([[0, 6], [3, 5, 8]]):
            t = SpecialistTrainer(f"specialist-{i}", members, blob, SPEC, splits, seed=i)
            t.train_epoch()
            specs.append(t.checkpoint())
    outputs = teacher_outputs([blob], splits, specialists=specs or None, specialists_cfg=SPEC,
                              device="cpu")
    assert outputs.shape == ((len(splits.train_y), 10) if specs else (1, len(splits.train_y), 10))
    for temperature, drop in ((2.0, ()), (5.0, (3, 4))):  # students differ in T and transfer set
        cfg = StudentConfig(model=ModelConfig(hidden=(16,), dropout_in=0, dropout_hidden=0),
                            train=TrainConfig(epochs=1, batch_size=50), temperature=temperature,
                            drop_classes=drop, soft_targets="ensemble" if specs else "generalists",
                            teacher_mean="logits" if "logits" in teacher else "probs")
        kwargs = {"specialists": specs, "specialists_cfg": SPEC}
        own = Student("own", cfg, splits, [blob], seed=3, **kwargs)
        shared = Student("shared", cfg, splits, [blob], seed=3, outputs=outputs, **kwargs)
        assert (own.targets_from, shared.targets_from) == ("computed once", "shared")
        assert shared.teacher is None  # it loaded no teacher model
        torch.testing.assert_close(shared.targets, own.targets, rtol=0, atol=1e-6)


def test_a_specialists_epoch_can_be_sized_by_its_subset(setup):
    splits, blob = setup
    whole = SpecialistTrainer("s", [3, 5], blob, SPEC, splits, seed=1)
    subset = SpecialistTrainer("s", [3, 5], blob, dataclasses.replace(SPEC, epoch="subset"),
                               splits, seed=1)
    inside = int(np.isin(splits.train_y, [3, 5]).sum())
    assert len(list(whole.epoch_batches())) == -(-len(splits.train_y) // SPEC.train.batch_size)
    assert len(list(subset.epoch_batches())) == -(-int(inside / 0.5) // SPEC.train.batch_size)
    assert len(list(subset.epoch_batches())) < len(list(whole.epoch_batches()))


def _divergence(spec: SpecialistTrainer, blob: bytes, members: list[int]) -> float:
    """Mean KL(generalist's probabilities collapsed to the subset and a dustbin || specialist's,
    its dustbin corrected to the data's prior) on validation."""
    gen, _ = load_model(blob, CPU)
    x = as_float(spec.val[0])
    with torch.no_grad():
        target = collapsed_soft_targets(gen(x), torch.tensor(members), spec.rest.cpu(), 1.0, 0.0)
        log_q = F.log_softmax(spec.model.eval()(x), 1)
    return float(F.kl_div(log_q, target, reduction="batchmean"))


def test_soft_target_loss_is_on_the_collapsed_generalist(setup):
    """specialists.soft_weight 1: the loss is T^2 KL(the generalist's soft targets, collapsed to
    the subset and a dustbin at the batches' prior || the specialist's at T); 0 keeps the
    paper's hard labels and loads no generalist."""
    splits, blob = setup
    members, t = [2, 5, 7], 2.0
    cfg = dataclasses.replace(SPEC, soft_weight=1.0, soft_temperature=t)
    spec = SpecialistTrainer("specialist-0", members, blob, cfg, splits, seed=1)
    assert float(spec.head.dustbin_offset) > 0  # the prior shift is in the targets
    torch.manual_seed(0)
    with torch.no_grad():
        spec.head.weight.add_(0.1 * torch.randn_like(spec.head.weight))  # not the generalist's
    for module in spec.model.modules():  # training mode (no eval-time dustbin shift) without
        if isinstance(module, torch.nn.Dropout):  # dropout: the same logits in both
            module.p = 0.0
    gen, _ = load_model(blob, CPU)
    idx = torch.arange(32)
    x = as_float(spec.x[idx])
    with torch.no_grad():
        loss = spec.loss_on(x, idx)
        rest = torch.ones(splits.num_classes, dtype=torch.bool)
        rest[members] = False
        target = collapsed_soft_targets(gen(x), torch.tensor(members), rest,
                                        t, spec.head.dustbin_offset)
        log_q = F.log_softmax(spec.model.train()(x) / t, 1)
    torch.testing.assert_close(loss, t * t * F.kl_div(log_q, target, reduction="batchmean"))
    hard = SpecialistTrainer("specialist-0", members, blob, SPEC, splits, seed=1)
    assert hard.generalist is None


def test_soft_targets_keep_a_specialist_near_its_generalist(setup):
    """Trained alike for 2 epochs, the specialist that also learns the generalist's soft targets
    (half weight, T = 2) stays nearer the generalist's predictions than the hard-label one."""
    splits, blob = setup
    members = [2, 5, 7]
    drift = {}
    for weight in (0.0, 0.5):
        cfg = dataclasses.replace(SPEC, soft_weight=weight, soft_temperature=2.0)
        spec = SpecialistTrainer("specialist-0", members, blob, cfg, splits, seed=1)
        for _ in range(2):
            spec.train_epoch()
        drift[weight] = _divergence(spec, blob, members)
    assert drift[0.5] < 0.7 * drift[0.0], drift
