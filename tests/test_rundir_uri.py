"""A run directory named by a URI goes through pyarrow.fs with a local staging copy: every file
arrives at the URI, deletions follow, and a fresh RunDir reads everything back."""
import pytest
import torch

from ensemble import checkpoint
from ensemble.cli import main
from ensemble.config import RunConfig, parse
from ensemble.errors import ConfigError
from ensemble.rundir import RunDir

pytest.importorskip("pyarrow")


def test_uri_run_dir_mirrors_and_reads_back(tmp_path):
    remote = tmp_path / "bucket" / "run"
    uri = f"file://{remote}"
    run = RunDir(uri)
    assert not run.exists() and run.path != remote and run.name == "run"
    cfg = parse(RunConfig, {"name": "u"})
    run.create(cfg)
    blobs = {e: checkpoint.dumps({"w": torch.full((3,), float(e))}, {"epoch": e}) for e in (1, 2, 3)}
    for epoch, blob in blobs.items():
        checkpoint.save_epoch(run.checkpoints("generalist-0"), epoch, blob)
        run.write_metrics({"generalist-0": {"epoch": epoch}})
        run.sync()
    staging = run.path
    run.close()
    assert not staging.exists()
    names = sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file())
    assert names == ["checkpoints/generalist-0/epoch-0002.safetensors",
                     "checkpoints/generalist-0/epoch-0003.safetensors",
                     "config.yaml", "metrics.json"]  # epoch 1 was pruned here, then there
    again = RunDir(uri)
    assert again.exists() and again.load_config() == cfg
    assert again.latest("generalist-0")[0] == blobs[3]
    again.close()


def test_unusable_uri_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="cannot open the run directory nosuch://x"):
        RunDir("nosuch://x")
    config = tmp_path / "c.yaml"
    config.write_text("name: t\n")
    assert main(["run", str(config), "--run-dir", "nosuch://bucket/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ensemble: error: cannot open the run directory") and \
        err.count("\n") == 1


def test_refused_resume_of_a_uri_leaves_no_staging_copy(tmp_path, capsys, monkeypatch):
    import tempfile

    remote = tmp_path / "bucket" / "run"
    run = RunDir(f"file://{remote}")
    run.create(parse(RunConfig, {"name": "u"}))
    run.close()
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    before = (remote / "config.yaml").read_bytes()
    assert main(["run", "--resume", f"file://{remote}", "--set", "seed=3"]) == 2
    assert "changed config (seed differ)" in capsys.readouterr().err
    assert not list(staging.iterdir())  # the staging copy was removed
    assert (remote / "config.yaml").read_bytes() == before


def test_a_uri_run_dir_that_cannot_be_written_is_refused_before_anything(tmp_path, capsys,
                                                                          monkeypatch):
    """It used to train, then fail at the first sync with a traceback, leaving its staging
    copy behind; a writable one is left as it was (the probe removes what it made)."""
    import tempfile

    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    config = tmp_path / "c.yaml"
    config.write_text("name: t\n")
    assert main(["run", str(config), "--run-dir", "file:///proc/ensemble/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ensemble: error: cannot write the run directory file:///proc/") \
        and err.count("\n") == 1, err
    assert not list(staging.iterdir())
    fine = RunDir(f"file://{tmp_path / 'bucket' / 'new'}")
    fine.check_creatable()
    assert not (tmp_path / "bucket" / "new").exists()
    fine.close()
