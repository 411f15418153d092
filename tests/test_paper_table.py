"""benchmarks/paper_mnist.py's pooling of seeds: which students count as one recipe."""
import dataclasses
import importlib.util
from pathlib import Path

from ensemble.config import ResourcesConfig, StudentConfig, TrainConfig

spec = importlib.util.spec_from_file_location(
    "paper_mnist", Path(__file__).resolve().parents[1] / "benchmarks" / "paper_mnist.py")
paper_mnist = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paper_mnist)


def test_recipe_ignores_only_what_cannot_change_training():
    recipe = paper_mnist.recipe
    hard = StudentConfig(alpha=0.0, temperature=20.0)
    assert recipe(hard) == recipe(dataclasses.replace(hard, temperature=4.0,
                                                      soft_targets="ensemble"))
    assert recipe(hard) == recipe(dataclasses.replace(hard, resources=ResourcesConfig(num_cpus=2)))
    soft = StudentConfig(alpha=0.9, temperature=4.0)
    assert recipe(soft) != recipe(dataclasses.replace(soft, temperature=20.0))
    assert recipe(soft) != recipe(dataclasses.replace(soft, soft_targets="ensemble"))
    assert recipe(soft) != recipe(dataclasses.replace(soft, train=TrainConfig(elastic=34.0)))
    assert recipe(hard) != recipe(dataclasses.replace(hard, alpha=0.1))


def test_seeds_section_pools_runs_by_key():
    runs = [("a", {"student-x": "k1", "student-y": "k2"},
             {"student-x": (10, 20), "student-y": (5, 6)}),
            ("b", {"student-x-s1": "k1"}, {"student-x-s1": (12, 24)})]
    lines = paper_mnist.seeds_section(runs)
    rows = [line for line in lines if line.startswith("| x ")]
    assert len(rows) == 1 and "| 2 |" in rows[0] and "22.0 ± 2.8 (20–24)" in rows[0]
    assert "x (a) 20, x-s1 (b) 24" in rows[0]
    assert not any(line.startswith("| y ") for line in lines)  # one seed: no row
    assert paper_mnist.seeds_section([]) == []


def test_header_says_whether_the_call_trained():
    how = paper_mnist.how_run
    assert how(False, {}, {"generalist-0": 3}) == "then analysed"
    assert how(True, {"generalist-0": 3}, {"generalist-0": 3}).startswith("a finished run")
    assert how(True, {"generalist-0": 3}, {"generalist-0": 5}).startswith("an earlier run resumed")
