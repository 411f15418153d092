import json
import re
from pathlib import Path

import pytest
import yaml

from ensemble.config import (GeneralistsConfig, RunConfig, TrainConfig, apply_overrides, load_config,
                             parse, resume_conflicts)
from ensemble.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers():
    cfg = parse(RunConfig, {"students": {"s": {}}})
    assert cfg.generalists.model.hidden == (1200, 1200)
    assert cfg.generalists.train.augment == ("translate:2",)  # §3: +-2 pixels
    assert cfg.students["s"].model.hidden == (800, 800)
    assert cfg.students["s"].temperature == 20.0


def test_nested_partial_sections_keep_their_defaults():
    cfg = parse(RunConfig, {"students": {"s": {"model": {"hidden": [30, 30]}}}})
    assert cfg.students["s"].model.dropout_in == 0.0  # the student's default, not the MLP's


def _as_overrides(raw: dict, prefix: str = "") -> str:
    """A bad config as `--set` would give it: key=value, comma-separated (a test's id)."""
    parts = []
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            parts.append(_as_overrides(value, f"{prefix}{key}."))
        else:
            parts.append(f"{prefix}{key}={json.dumps(value, separators=(',', ':'))}")
    return ", ".join(parts)


BAD = [  # (config, words of the refusal)
    ({"generalist": {}}, "did you mean 'generalists'"),
    ({"generalists": {"trian": {}}}, "did you mean 'generalists.train'"),
    ({"generalists": {"count": "two"}}, "generalists.count must be an integer"),
    ({"generalists": {"count": 1.5}}, "generalists.count must be an integer"),
    ({"generalists": {"count": 0}}, "generalists.count must be >= 1"),
    ({"students": {"s": {"temperature": 0}}}, "students.s.temperature must be >= 0.01"),
    ({"students": {"s": {"alpha": 1.5}}}, r"students.s.alpha must be in \[0, 1\]"),
    ({"students": {"s": {"drop_classes": [10]}}}, "students.s.drop_classes must hold"),
    ({"students": {"s": {"drop_classes": list(range(10))}}}, "at least one class"),
    ({"students": {"s": {"keep_classes": []}, "t": {"keep_classes": [1], "drop_classes": [2]}}},
     "cannot be combined"),
    ({"data": {"name": "imagenet"}}, "data.name must be one of"),
    ({"generalists": {"resources": {"num_gpus": 2}}}, "num_gpus must be at most 1"),
    ({"device": "cuda"}, "device 'cuda' needs a GPU for every model, but "
                         "generalists.resources.num_gpus is 0"),
    ({"device": "cuda", "generalists": {"resources": {"num_gpus": 1}}, "specialists": {"k": 2},
      "students": {"s": {"resources": {"num_gpus": 0.5}}}}, "specialists.resources.num_gpus is 0"),
    ({"device": "cuda", "generalists": {"resources": {"num_gpus": 1}}, "students": {"s": {}}},
     "students.s.resources.num_gpus is 0"),
    ({"generalists": {"train": {"augment": ["jitter:2"]}}},
     r"generalists.train.augment\[0\] must be one of flip, translate:P, crop:P"),
    ({"generalists": {"train": {"augment": ["flip", "translate:9"]}}},
     r"augment\[1\] must give pixels as a number from 1 to 8"),
    ({"generalists": {"train": {"augment": ["crop:1.5"]}}}, "must give pixels as a whole number"),
    ({"generalists": {"train": {"augment": ["flip:1"]}}}, "must be one of flip"),
    ({"students": {"s": {"train": {"augment": ["elastic:34:0"]}}}},
     "must give sigma as a number from 0.5 to 10"),
    ({"generalists": {"train": {"augment": [{"crop": 4}]}}}, "must be a string"),
    ({"generalists": {"resources": {"workers": 3}}},
     r"generalists.resources.workers must divide train.batch_size \(100\)"),
    ({"specialists": {"k": 2, "resources": {"workers": 2}}}, "a specialist trains in one process"),
    ({"students": {"s": {"resources": {"workers": 2}, "train": {"compile": True}}}},
     "students.s.train.compile cannot be combined with resources.workers > 1"),
    ({"data": {"stream": "parts/"}, "generalists": {"resources": {"workers": 2}}},
     "must be 1 with data.stream"),
    ({"generalists": {"resources": {"workers": 0}}}, "workers must be >= 1"),
    ({"generalists": {"train": {"augment": ["flip"], "jitter": 2}}},
     "train.augment replaces the keys flip, jitter and elastic"),
    ({"generalists": {"model": {"hidden": []}}}, "non-empty"),
    ({"generalists": {"model": {"dropout_in": 1.0}}}, r"in \[0, 1\)"),
    ({"data": 3}, "data must be a mapping"),
    ({"generalists": {"weights": ["a.pt", "b.pt"], "count": 3}},
     r"generalists.count must be the number of weights \(2\)"),
    ({"generalists": {"weights": ["a.pt"], "from_run": "runs/x"}},
     "cannot be combined with from_run"),
    ({"generalists": {"model": {"kwargs": {"num_classes": 10}}}}, "factory is needed for kwargs"),
    ({"generalists": {"model": {"factory": "resnet18"}}}, "must be 'package.module:callable'"),
    ({"generalists": {"train": {"schedule": "step"}}}, "milestones are needed by the step"),
    ({"generalists": {"train": {"epochs": 10, "schedule": "step", "milestones": [8, 4]}}},
     "must be increasing epochs between 1 and 9"),
    ({"generalists": {"train": {"epochs": 3, "warmup_epochs": 3}}}, "warmup_epochs must be"),
    ({"generalists": {"train": {"optimizer": "adamw", "nesterov": True}}},
     "nesterov needs optimizer sgd"),
    ({"students": {"s": {"train": {"label_smoothing": 1.0}}}}, "label_smoothing must be in"),
    ({"data": {"normalize": True, "mean": [0.5, 0.5], "std": [0.2]}},
     "data.std must have one value per mean"),
    ({"data": {"mean": [0.5], "std": [0.2]}}, "data.normalize must be true"),
    ({"data": {"normalize": True}, "stack_students": True},
     "stack_students cannot be combined with data.normalize"),
    ({"data": {"folder": "pets", "npz": "pets.npz"}}, "data.npz is one source too many"),
    ({"data": {"kwargs": {"n": 1}}}, "data.kwargs belong to a factory"),
    ({"data": {"npz": "a.npz", "stream": "parts/"}}, "data.stream streams only beside a named"),
    ({"students": {"s": {"paper": "no3"}}}, r"'no3' experiment, which needs drop_classes \[3\]"),
    ({"generalists": {"train": {"lr": float("inf")}}}, "lr must be a finite number"),
    ({"data": {"normalize": True, "mean": [float("nan")], "std": [1.0]}},
     r"data.mean\[0\] must be a finite number"),
    ({"students": {"s": {"temperature": 1e-45}}}, "temperature must be >= 0.01"),
    ({"seed": 10 ** 23}, "seed must lie within"),
    ({"generalists": {"resources": {"max_restarts": 10 ** 21}}}, "must be from 0 to 10000"),
    ({"data": {"image_size": 7}}, "data.image_size applies to data.folder alone"),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[_as_overrides(raw) for raw, _ in BAD])
def test_bad_configs(raw, message, tmp_path, capsys):
    """Each refused by the parser and, as a config file, by `ensemble run`: one sentence on
    stderr, exit 2, no run directory (the bad-input table counts these once, here)."""
    from ensemble.cli import main

    with pytest.raises(ConfigError, match=message):
        parse(RunConfig, raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.startswith("ensemble: error:"), err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_old_augmentation_keys_read_as_steps_of_train_augment():
    """Runs written before train.augment (their config.yaml) load, resume and tabulate: flip,
    jitter and elastic become the steps they were, in their old order, over the defaults."""
    old = parse(TrainConfig, {"flip": True, "jitter": 4, "elastic": 34.0, "elastic_sigma": 4.0})
    assert old.augment == ("flip", "translate:4", "elastic:34:4")
    assert parse(GeneralistsConfig, {"train": {"flip": True}}).train.augment == \
        ("flip", "translate:2")  # the generalists' default translation stays
    assert parse(GeneralistsConfig, {"train": {"jitter": 0}}).train.augment == ()
    assert parse(TrainConfig, {"flip": False, "jitter": 0, "elastic": 0.0,
                               "elastic_sigma": 4.0}).augment == ()


def test_cuda_for_models_that_each_ask_for_a_gpu():
    cfg = parse(RunConfig, {"device": "cuda", "generalists": {"resources": {"num_gpus": 1}},
                     "students": {"s": {"resources": {"num_gpus": 0.25}}}})
    assert [key for key, _ in cfg.model_resources()] == ["generalists.resources",
                                                         "students.s.resources"]


def test_overrides_and_yaml_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generalists:\n  train: {lr: 1e-3}\n")
    cfg = load_config(path, ["students.s.temperature=8", "generalists.count=3"])
    assert cfg.generalists.train.lr == 0.001
    assert cfg.students["s"].temperature == 8.0 and cfg.generalists.count == 3
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["students.s.temperature"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.y=1"])
    path.write_text("generalists: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_resume_conflicts_allow_only_more_epochs():
    old = parse(RunConfig, {"students": {"s": {}}})
    more = parse(RunConfig, {"students": {"s": {"train": {"epochs": 50}}}})
    assert resume_conflicts(old, more) == []
    assert resume_conflicts(more, old) == ["students.s.train.epochs"]
    other = parse(RunConfig, {"students": {"s": {"temperature": 3}}, "seed": 2})
    assert resume_conflicts(old, other) == ["seed", "students.s.temperature"]


def test_x_keys_hold_yaml_anchors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("x-s: &s {temperature: 3.0, model: {hidden: [30]}}\n"
                    "students:\n  a: *s\n  b: {<<: *s, temperature: 4.0}\n")
    cfg = load_config(path)
    assert cfg.students["a"].temperature == 3.0 and cfg.students["b"].temperature == 4.0
    assert cfg.students["b"].model.hidden == (30,)


@pytest.mark.parametrize("path", sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(ROOT / path)  # ConfigError, with the key, if one went stale
    assert cfg.name and (cfg.students or cfg.specialists.k or cfg.generalists.count)


def test_data_of_ones_own_has_its_classes_checked_once_read():
    cfg = parse(RunConfig, {"data": {"npz": "a.npz"}, "specialists": {"k": 15},
                            "students": {"s": {"drop_classes": [12]}}})
    cfg.check_classes(40)  # fine for 40 classes
    cfg.check_classes(28)
    with pytest.raises(ConfigError, match=r"specialists.k must be at most 14: 28 classes"):
        cfg.check_subsets(28)  # 15 subsets of 2 classes need 30 places (a new run's check)
    with pytest.raises(ConfigError, match=r"specialists.k must be at most the number of classes"):
        cfg.check_classes(10)
    with pytest.raises(ConfigError, match="specialists.k"):
        parse(RunConfig, {"specialists": {"k": 30}})  # a named set: at once


def test_merged_anchors_are_not_keys_given_twice():
    """A mapping merged into another that is merged again (a recipe's variant of a variant):
    keys overridden through `<<` are not duplicates; a key written twice is."""
    from ensemble.config import read_yaml

    text = "base: &base {a: 1, b: 2}\nx: {y: &mid {<<: *base, a: 3}}\nz: {<<: *mid, c: 1}\n"
    assert read_yaml(text) == yaml.safe_load(text)
    with pytest.raises(ConfigError, match="key 'k' is given twice in one mapping \\(line 2\\)"):
        read_yaml("x:\n  - {k: 1, k: 2}\n")
