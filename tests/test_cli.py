"""Bad input: one sentence on stderr, a non-zero exit, no traceback, no run directory."""
import pytest

from ensemble.cli import main


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: t\ndata: {val_size: 100, download: false}\n")
    return path


CASES = [
    (["run", "missing.yaml"], 2, "does not exist"),
    (["run"], 2, "needs a CONFIG"),
    (["run", "{config}", "--bogus"], 2, "unrecognized arguments"),
    (["run", "{config}", "--set", "generalists.count=-1"], 2, "generalists.count must be >= 1"),
    (["run", "{config}", "--set", "students.s.alpha=2"], 2, "students.s.alpha"),
    (["run", "{config}", "--set", "generalists.train.epocs=2"], 2, "did you mean"),
    (["run", "{config}", "--set", "noequals"], 2, "key=value"),
    (["run", "{config}", "--data-dir", "{tmp}/nowhere"], 3, "not found; looked in"),
    (["run", "--resume", "{tmp}/nowhere"], 2, "not a run directory"),
    (["eval", "{tmp}/nowhere"], 2, "not a run directory"),
]


@pytest.mark.parametrize("argv, code, message", CASES)
def test_bad_input(argv, code, message, config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [a.format(config=config, tmp=tmp_path) for a in argv]
    if argv[0] == "run" and "--resume" not in argv:
        argv += ["--run-dir", str(run_dir)]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("ensemble: error:") and err.count("\n") == 1
    assert not run_dir.exists()


def test_bad_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("students: {s: [\n")
    assert main(["run", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
