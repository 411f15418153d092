"""`ensemble run` end to end on a local Ray (started once per test session)."""
import json
import re

import pytest

from ensemble import checkpoint
from ensemble.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = """
name: tiny
data: {val_size: 100, download: false}
generalists:
  count: 2
  model: {hidden: [32, 32], dropout_in: 0.1, dropout_hidden: 0.2, max_norm: 3.0}
  train: {epochs: 3, batch_size: 50, lr: 0.3, augment: []}
students:
  hard:
    model: {hidden: [16]}
    train: {epochs: 2, batch_size: 50, lr: 0.3}
    alpha: 0.0
  distilled:
    model: {hidden: [16]}
    train: {epochs: 2, batch_size: 50, lr: 0.3}
    temperature: 4.0
"""


@pytest.fixture(scope="module")
def finished_run(ray_session, data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    config = tmp / "tiny.yaml"
    config.write_text(CONFIG)
    run = tmp / "run"
    assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir", str(run)]) == 0
    return config, run


def test_run_writes_every_artefact(finished_run):
    _, run = finished_run
    metrics = json.loads((run / "metrics.json").read_text())["models"]
    assert set(metrics) == {"generalist-0", "generalist-1", "student-hard", "student-distilled"}
    for name, m in metrics.items():
        assert m["status"] == "finished" and m["error"] is None
        assert m["summary"]["test_errors"] < 100  # of 200 test images; chance is ~180
    assert [len(metrics[n]["history"]) for n in metrics] == [3, 3, 2, 2]
    assert sorted(p.name for p in (run / "checkpoints" / "generalist-0").iterdir()) == \
        ["epoch-0002.safetensors", "epoch-0003.safetensors"]  # the last two
    assert list((run / "tb" / "student-distilled").glob("events.out.tfevents.*"))
    summary = (run / "summary.md").read_text()
    assert summary.count("| finished |") == 4
    # the time breakdown: the phases add up to no more than the total, and TensorBoard has it
    section = summary.split("## Where the time went")[1]
    seconds = {m[0]: float(m[1]) for m in re.findall(r"\| ([a-z ]+) \| ([\d.]+) \|", section)}
    assert {"ray start", "data placement", "generalists", "students", "total"} <= set(seconds)
    # phases overlap (a student starts when a CPU frees), but none outlasts the run
    assert all(0 <= v <= seconds["total"] + 0.1 for v in seconds.values())
    assert seconds["generalists"] > 0 and seconds["students"] > 0
    assert list((run / "tb" / "run").glob("events.out.tfevents.*"))
    assert "name: tiny" in (run / "config.yaml").read_text()
    # the two generalists had different seeds, so they are different models
    assert metrics["generalist-0"]["history"] != metrics["generalist-1"]["history"]


def test_resume_skips_finished_and_extends(finished_run, data_root, capsys):
    config, run = finished_run
    gen = run / "checkpoints" / "generalist-0" / "epoch-0003.safetensors"
    before = gen.stat().st_mtime_ns
    assert main(["run", "--resume", str(run), "--data-dir", str(data_root),
                 "--set", "students.distilled.train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "generalist-0     finished earlier" in out
    assert "student-distilled epoch   3/3" in out and "epoch   1/" not in out
    assert gen.stat().st_mtime_ns == before
    metrics = json.loads((run / "metrics.json").read_text())["models"]
    assert len(metrics["student-distilled"]["history"]) == 3


def test_resume_refuses_changed_config(finished_run, data_root, capsys):
    config, run = finished_run
    before = (run / "metrics.json").read_bytes()
    assert main(["run", str(config), "--resume", str(run), "--data-dir", str(data_root),
                 "--set", "students.distilled.temperature=2"]) == 2
    assert "students.distilled.temperature" in capsys.readouterr().err
    assert (run / "metrics.json").read_bytes() == before


def test_existing_run_dir_needs_resume(finished_run, data_root, capsys):
    config, run = finished_run
    assert main(["run", str(config), "--run-dir", str(run), "--data-dir", str(data_root)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_eval_reevaluates_checkpoints(finished_run, data_root, capsys):
    _, run = finished_run
    assert main(["eval", str(run), "--data-dir", str(data_root)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())["models"]
    row = next(line for line in out.splitlines() if line.startswith("| generalist-1 |"))
    assert f"| {metrics['generalist-1']['summary']['test_errors']} |" in row


def test_students_from_another_runs_generalists(finished_run, data_root, tmp_path, capsys):
    """generalists.from_run: the finished run's generalists are copied, not trained again, and
    the students distil from them; the new run resumes with its own config file."""
    _, source = finished_run
    config = tmp_path / "students.yaml"
    config.write_text(CONFIG.split("generalists:")[0] + f"generalists: {{from_run: {source}}}\n"
                      "students:" + CONFIG.split("students:")[1])
    run = tmp_path / "run"
    argv = [str(config), "--data-dir", str(data_root), "--run-dir", str(run)]
    assert main(["run", *argv]) == 0
    out = capsys.readouterr().out
    assert "generalist-1     taken over from" in out and "generalist-0     epoch" not in out
    for name in ("generalist-0", "generalist-1"):
        mine = sorted((run / "checkpoints" / name).iterdir())
        theirs = sorted((source / "checkpoints" / name).iterdir())
        assert [p.name for p in mine] == [theirs[-1].name]
        assert mine[0].read_bytes() == theirs[-1].read_bytes()
    saved = (run / "config.yaml").read_text()
    assert "hidden:\n    - 32\n    - 32" in saved and f"from_run: {source}" in saved
    metrics = json.loads((run / "metrics.json").read_text())["models"]
    source_metrics = json.loads((source / "metrics.json").read_text())["models"]
    assert metrics["generalist-0"]["summary"]["test_errors"] == \
        source_metrics["generalist-0"]["summary"]["test_errors"]
    assert len(metrics["student-distilled"]["history"]) == 2
    assert metrics["student-distilled"]["summary"]["test_errors"] < 100
    assert main(["run", *argv[:3], "--resume", str(run),
                 "--set", "students.hard.train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "generalist-0     finished earlier" in out and "student-hard     epoch   3/3" in out


def test_specialists_from_another_run(finished_run, data_root, tmp_path, capsys):
    """specialists.from_run: a run taking its generalists and its specialists from earlier runs
    trains its students only; the subsets and specialists are the source's, byte for byte, eq. 5
    gives the same errors again, and resuming keeps them. Specialists from generalists other
    than this run's are refused."""
    _, gens = finished_run
    head = CONFIG.split("generalists:")[0] + f"generalists: {{from_run: {gens}}}\n"
    source_cfg = tmp_path / "source.yaml"
    source_cfg.write_text(head + "specialists:\n  k: 3\n"
                          "  train: {epochs: 1, batch_size: 50, lr: 0.1, augment: []}\n")
    source = tmp_path / "source"
    flags = ["--data-dir", str(data_root)]
    assert main(["run", str(source_cfg), *flags, "--run-dir", str(source)]) == 0
    config = tmp_path / "taker.yaml"
    config.write_text(head + f"specialists: {{from_run: {source}}}\nstudents:\n  all:\n"
                      "    model: {hidden: [16]}\n    train: {epochs: 1, batch_size: 50, lr: 0.3}\n"
                      "    soft_targets: ensemble\n")
    run = tmp_path / "taker"
    capsys.readouterr()
    assert main(["run", str(config), *flags, "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "specialist-0     taken over from" in out and "specialist-0     epoch" not in out
    subsets = json.loads((source / "subsets.json").read_text())
    assert json.loads((run / "subsets.json").read_text()) == subsets
    for i in range(len(subsets["subsets"])):
        theirs = sorted((source / "checkpoints" / f"specialist-{i}").iterdir())[-1]
        mine = sorted((run / "checkpoints" / f"specialist-{i}").iterdir())
        assert [p.read_bytes() for p in mine] == [theirs.read_bytes()]
    ours, before = (json.loads((r / "ensemble.json").read_text()) for r in (run, source))
    assert ours["test"] == before["test"] and ours["val"] == before["val"]
    metrics = json.loads((run / "metrics.json").read_text())["models"]
    assert metrics["student-all"]["status"] == "finished"
    assert main(["run", "--resume", str(run), *flags]) == 0
    assert "specialist-0     finished earlier" in capsys.readouterr().out
    assert main(["run", str(config), *flags, "--run-dir", str(tmp_path / "other"), "--set",
                 f"generalists.from_run={source}"]) == 2
    assert "took its generalists from" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_unsatisfiable_request_fails_at_once(ray_session, data_root, tmp_path, capsys):
    config = tmp_path / "gpu.yaml"
    config.write_text(CONFIG + "\n")
    run = tmp_path / "run"
    assert main(["run", str(config), "--run-dir", str(run), "--data-dir", str(data_root),
                 "--set", "generalists.resources.num_gpus=1"]) == 2
    assert "asks for 1 GPU" in capsys.readouterr().err
    assert not run.exists()


def test_specialists_stage_end_to_end(specialists_run, data_root, capsys):
    run, out = specialists_run
    subsets = json.loads((run / "subsets.json").read_text())
    assert subsets["subsets"] and len(subsets["names"]) == len(subsets["subsets"])
    ensemble = json.loads((run / "ensemble.json").read_text())
    assert sum(r["examples"] for r in ensemble["table4"]) == 200
    metrics = json.loads((run / "metrics.json").read_text())["models"]
    specialists = [n for n in metrics if n.startswith("specialist-")]
    assert len(specialists) == len(subsets["subsets"])
    assert all(metrics[n]["status"] == "finished" for n in metrics)
    summary = (run / "summary.md").read_text()
    assert "## Specialists" in summary and "Table 4" in summary
    assert "specialist-0" in out and "with specialists" in out
    # resuming keeps the subsets and every finished model
    before = (run / "subsets.json").read_bytes()
    assert main(["run", "--resume", str(run), "--data-dir", str(data_root)]) == 0
    assert (run / "subsets.json").read_bytes() == before
    assert "specialist-0     finished earlier" in capsys.readouterr().out
    assert main(["eval", str(run), "--data-dir", str(data_root)]) == 0
    rows = capsys.readouterr().out
    assert f"| generalists + specialists | | {ensemble['val']['ensemble_errors']} | " \
           f"{ensemble['test']['ensemble_errors']} |" in rows
    spec = metrics["specialist-0"]["summary"]  # a specialist is judged on its own labels
    assert f"| specialist-0 | {spec['best_epoch']} | {spec['val_errors']} | " \
           f"{spec['test_errors']} |" in rows


def test_run_dir_uri_end_to_end(ray_session, data_root, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.replace("epochs: 3", "epochs: 1"))
    remote = tmp_path / "bucket" / "run"
    uri = f"file://{remote}"
    argv = ["--data-dir", str(data_root)]
    assert main(["run", str(config), "--run-dir", uri, *argv]) == 0
    assert {p.name for p in remote.iterdir()} == {"checkpoints", "config.yaml", "metrics.json",
                                                  "summary.md", "tb"}
    assert list((remote / "tb").rglob("events.out.tfevents.*"))
    assert not list(remote.rglob("*.tmp"))
    # resumed from the URI with a raised epoch count: only the generalists train on
    assert main(["run", "--resume", uri, "--set", "generalists.train.epochs=2", *argv]) == 0
    metrics = json.loads((remote / "metrics.json").read_text())["models"]
    assert len(metrics["generalist-0"]["history"]) == 2
    assert (remote / "checkpoints" / "generalist-0" / "epoch-0002.safetensors").exists()
    capsys.readouterr()
    assert main(["eval", uri, *argv]) == 0
    assert "| student-distilled |" in capsys.readouterr().out


STACKED = """
name: tiny-stacked
data: {val_size: 100, download: false}
stack_students: true
generalists:
  count: 1
  model: {hidden: [32, 32], dropout_in: 0.0, dropout_hidden: 0.1}
  train: {epochs: 2, batch_size: 50, lr: 0.3, augment: []}
x-sweep: &sweep
  model: {hidden: [16, 16], dropout_in: 0.0, dropout_hidden: 0.0}
  train: {epochs: 2, batch_size: 50, lr: 0.1}
students:
  t1: {<<: *sweep, temperature: 1.0}
  t4: {<<: *sweep, temperature: 4.0}
  hard: {<<: *sweep, alpha: 0.0}
  hard2: {<<: *sweep, alpha: 0.0}
  wide: {model: {hidden: [24]}, train: {epochs: 2, batch_size: 50, lr: 0.1}}
"""


def test_stacked_students_end_to_end(ray_session, data_root, tmp_path, capsys):
    config = tmp_path / "stacked.yaml"
    config.write_text(STACKED)
    runs = {}
    for stack in ("true", "false"):
        runs[stack] = tmp_path / f"run-{stack}"
        assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir",
                     str(runs[stack]), "--set", f"stack_students={stack}"]) == 0
        out = capsys.readouterr().out
        # one stack per teacher: hard-label students need none and start with the generalists
        assert ("stack-0          trains student-t1, student-t4 as one model"
                in out) == (stack == "true")
        assert ("stack-1          trains student-hard, student-hard2 as one model"
                in out) == (stack == "true")
    stacked, alone = (json.loads((runs[s] / "metrics.json").read_text())["models"]
                      for s in ("true", "false"))
    assert set(stacked) == set(alone)
    for name in ("student-t1", "student-t4", "student-hard", "student-hard2", "student-wide"):
        a, b = stacked[name], alone[name]
        assert a["status"] == "finished" and len(a["history"]) == 2
        for x, y in zip(a["history"], b["history"]):  # the same training, up to rounding
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-3)
            assert abs(x["val_errors"] - y["val_errors"]) <= 2
        assert sorted(p.name for p in (runs["true"] / "checkpoints" / name).iterdir()) == \
            ["epoch-0001.safetensors", "epoch-0002.safetensors"]
    assert main(["run", "--resume", str(runs["true"]), "--data-dir", str(data_root)]) == 0
    assert "student-t4       finished earlier" in capsys.readouterr().out


EARLY = """
name: early
data: {val_size: 100, download: false}
generalists:
  count: 1
  model: {hidden: [32], dropout_in: 0.0, dropout_hidden: 0.0}
  train: {epochs: 3, batch_size: 50, lr: 0.3, augment: []}
students:
  hard: {model: {hidden: [16]}, train: {epochs: 1, batch_size: 50}, alpha: 0.0}
  taught: {model: {hidden: [16]}, train: {epochs: 1, batch_size: 50}, temperature: 2.0}
"""


def test_students_start_when_their_teacher_exists(ray_session, data_root, tmp_path):
    # one 1-CPU generalist on the session's 2 CPUs: the hard-label student, which needs no
    # teacher, takes the other CPU in the same round, before any epoch has come back; the
    # distilled one starts only once the generalist's last epoch has (recorded times, no race)
    config = tmp_path / "early.yaml"
    config.write_text(EARLY)
    run = tmp_path / "run"
    assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir", str(run)]) == 0
    models = json.loads((run / "metrics.json").read_text())["models"]
    generalist, hard, taught = (models[n] for n in ("generalist-0", "student-hard",
                                                    "student-taught"))
    assert hard["started_at"] < generalist["history"][0]["finished_at"]
    assert taught["started_at"] >= generalist["history"][-1]["finished_at"]


def test_checkpoint_every_keeps_every_kth_epoch_and_the_last(ray_session, data_root, tmp_path):
    config = tmp_path / "every.yaml"
    config.write_text(CONFIG.replace("name: tiny", "name: every") + "checkpoint_every: 2\n")
    run = tmp_path / "run"
    assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir", str(run)]) == 0
    models = json.loads((run / "metrics.json").read_text())["models"]
    assert [r["epoch"] for r in models["generalist-0"]["history"]] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints" / "generalist-0").iterdir()) == \
        ["epoch-0002.safetensors", "epoch-0003.safetensors"]  # no epoch 1: it never came back
    assert sorted(p.name for p in (run / "checkpoints" / "student-hard").iterdir()) == \
        ["epoch-0002.safetensors"]  # its last epoch


SHARED = """
name: shared
data: {val_size: 100, download: false}
generalists:
  count: 2
  model: {hidden: [32], dropout_in: 0.0, dropout_hidden: 0.0}
  train: {epochs: 1, batch_size: 50, lr: 0.3, augment: []}
x-student: &student {model: {hidden: [16]}, train: {epochs: 1, batch_size: 50, lr: 0.3}}
students:
  t2: {<<: *student, temperature: 2.0}
  t8: {<<: *student, temperature: 8.0, drop_classes: [3]}
  jittered: {<<: *student, train: {epochs: 1, batch_size: 50, lr: 0.3, augment: [translate:1]}}
"""


def test_students_share_one_set_of_teacher_outputs(ray_session, data_root, tmp_path, capsys):
    config = tmp_path / "shared.yaml"
    config.write_text(SHARED)
    run = tmp_path / "run"
    assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    sources = {name: checkpoint.load_latest(run / "checkpoints" / name)[1]["targets_from"]
               for name in ("student-t2", "student-t8", "student-jittered")}
    # the two unaugmented students read the outputs one task computed; the jittered one asks
    # its teacher for every batch
    assert sources == {"student-t2": "shared", "student-t8": "shared",
                       "student-jittered": "per batch"}
    assert "soft targets" in metrics["timings"]
    assert all(m["status"] == "finished" for m in metrics["models"].values())


def test_early_stopping_ends_a_model_and_resume_leaves_it_finished(ray_session, data_root,
                                                                    tmp_path, capsys):
    config = tmp_path / "patience.yaml"
    config.write_text(CONFIG.split("students:")[0].replace("count: 2", "count: 1")
                      .replace("epochs: 3,", "epochs: 40, patience: 1,"))
    run = tmp_path / "run"
    assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir", str(run)]) == 0
    blob, meta = checkpoint.load_latest(run / "checkpoints" / "generalist-0")
    history = meta["history"]
    assert history[-1]["stopped"] and len(history) < 40
    assert not any(r["stopped"] for r in history[:-1])
    assert meta["epoch"] == len(history)  # its last epoch's checkpoint was kept
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "--data-dir", str(data_root)]) == 0
    assert "finished earlier" in capsys.readouterr().out
    assert checkpoint.load_latest(run / "checkpoints" / "generalist-0")[1]["history"] == history
    # a run taking over these generalists counts the stopped one as finished
    taker = tmp_path / "taker"
    assert main(["run", str(config), "--data-dir", str(data_root), "--run-dir", str(taker),
                 "--set", f"generalists.from_run={run}"]) == 0
