"""The specialist stage without Ray: coordinator, specialist trainer, eq. 5 ensemble, student."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ensemble.config import DataConfig, ModelConfig, SpecialistsConfig, StudentConfig, TrainConfig
from ensemble.data import load_splits, to_device
from ensemble.distill import Student
from ensemble.specialize import Ensemble, SpecialistTrainer, coordinate, evaluate_ensemble
from ensemble.train import Trainer, model_from_checkpoint
from specialists.combine import active_specialists, combine, spread

MODEL = ModelConfig(hidden=(32, 32), dropout_in=0.0, dropout_hidden=0.1)
SPEC = SpecialistsConfig(k=3, train=TrainConfig(epochs=2, batch_size=50, lr=0.1, jitter=1))


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
    gen, _ = model_from_checkpoint(blob, torch.device("cpu"))
    x = spec.x[:16]
    z, s = gen(x), spec.model.eval()(x)
    torch.testing.assert_close(s[:, :3], z[:, members])
    assert set(spec.y.tolist()) == {0, 1, 2, 3} and spec.classes == 4
    assert 0 < spec.natural < 1


def test_specialist_trains_measures_and_resumes(setup):
    splits, blob = setup
    straight = SpecialistTrainer("specialist-0", [2, 5, 7], blob, SPEC, splits, seed=1)
    straight.train_epoch()
    assert straight.measured == pytest.approx(0.5)
    offset = float(straight.model.dustbin_offset)
    assert offset == pytest.approx(torch.tensor(0.5 * (1 - straight.natural) /
                                                (straight.natural * 0.5)).log().item())
    saved = straight.checkpoint()
    straight.train_epoch()
    resumed = SpecialistTrainer("specialist-0", [2, 5, 7], blob, SPEC, splits, seed=1)
    resumed.run_epoch(2, saved)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    model, meta = model_from_checkpoint(resumed.checkpoint(), torch.device("cpu"))
    assert meta["members"] == [2, 5, 7] and model(resumed.x[:2]).shape == (2, 4)


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
    assert sum(r["examples"] for r in result["table4"]) == len(splits.test_y)
    gen_right = sum(r["generalist_correct"] for r in result["table4"])
    assert len(splits.test_y) - gen_right == result["test"]["generalist_errors"]
    # with no specialists the ensemble is the generalist
    alone = evaluate_ensemble([blob], [], SPEC, splits)
    assert alone["test"]["ensemble_errors"] == alone["test"]["generalist_errors"]
    # a student can learn from the combined q
    cfg = StudentConfig(model=ModelConfig(hidden=(16,), dropout_in=0, dropout_hidden=0),
                        train=TrainConfig(epochs=1, batch_size=50), temperature=2.0,
                        soft_targets="ensemble")
    student = Student("student", cfg, splits, [blob], seed=3, specialists=specs,
                      specialists_cfg=SPEC)
    ens = Ensemble.from_checkpoints([blob], specs, SPEC, torch.device("cpu"))
    torch.testing.assert_close(student.targets, ens.probs(student.x, 2.0))
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
        ens = Ensemble.from_checkpoints([blob], specs, cfg, torch.device("cpu"))
        pg, q, active = ens.predict(x)
        members = [torch.tensor(m) for m in ens.members]
        P, d, S = spread([F.softmax(m(x), 1) for m in ens.specialists], members, ens.classes)
        assert torch.equal(active, active_specialists(pg, S, top_n))
        assert active.any() and not active.all()
        if top_n == 1:  # inputs whose top class is 1 or 2 call on no specialist
            assert not active.any(1).all()
        torch.testing.assert_close(q, combine(pg, P, d, S, active, cfg.combine_tol,
                                              cfg.combine_steps))
