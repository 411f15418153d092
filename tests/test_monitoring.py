"""What a person watches: the terminal's live lines, TensorBoard, Ray metrics, the report (opened
in headless Chromium) and the exported student (run in onnxruntime)."""
import io
import json
import re
import shutil
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import torch

from ensemble.cli import main
from ensemble.tracking import Tracker, epoch_text


def record(epoch, seconds=2.0):
    return {"epoch": epoch, "loss": 0.5 / epoch, "lr": 0.1, "val_errors": 10 - epoch,
            "test_errors": 20 - epoch, "samples_per_s": 1234.0, "seconds": seconds}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def screen(output: str) -> list[str]:
    """The lines a terminal shows after `output` (text, newlines, ESC[nF and ESC[J only)."""
    lines, row = [""], 0
    for token in re.split(r"(\x1b\[\d+F|\x1b\[J|\n)", output):
        if token == "\n":
            row += 1
            if row == len(lines):
                lines.append("")
        elif token == "\x1b[J":
            del lines[row + 1:]
            lines[row] = ""
        elif token.startswith("\x1b["):
            row = max(0, row - int(token[2:-1]))
        elif token:
            assert "\x1b" not in token, f"unexpected escape sequence in {token!r}"
            lines[row] += token
    return lines[:-1] if lines[-1] == "" else lines


def test_live_progress_keeps_one_line_per_model(tmp_path):
    out = Terminal()
    tracker = Tracker(tmp_path / "tb", out=out)
    tracker.started("generalist-0", 0, 3)
    tracker.started("generalist-1", 0, 3)
    tracker.epoch("generalist-0", 3, record(1))
    tracker.epoch("generalist-1", 3, record(1))
    tracker.line("a message")
    for epoch in (2, 3):
        tracker.epoch("generalist-0", 3, record(epoch))
    tracker.done("generalist-0")
    tracker.epoch("generalist-1", 3, record(2))
    assert screen(out.getvalue()) == [
        "a message", epoch_text("generalist-0", 3, record(3)),
        epoch_text("generalist-1", 3, record(2))]  # one line each, however many epochs
    tracker.close()
    assert screen(out.getvalue())[-1] == epoch_text("generalist-1", 3, record(2))
    assert "\x1b[" in out.getvalue()


def test_plain_lines_when_not_a_terminal(tmp_path):
    out = io.StringIO()  # a pipe, a file, CI: isatty() is False
    tracker = Tracker(tmp_path / "tb", out=out)
    tracker.started("student-x", 0, 10)
    tracker.epoch("student-x", 10, record(3, seconds=2.0))
    tracker.epoch("student-x", 10, record(4, seconds=2.0))
    tracker.done("student-x")
    tracker.close()
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and len(lines) == 2
    assert lines[0].startswith("student-x        epoch   3/10  loss") and \
        lines[0].endswith("1,234 samples/s  ETA 0:14")  # 7 epochs left at 2 s each
    assert lines[1].endswith("ETA 0:12")


def test_figures_drawn_are_let_go_and_a_failed_one_raises_at_close(tmp_path):
    import PIL.Image

    def png():
        out = io.BytesIO()
        PIL.Image.new("RGB", (4, 4)).save(out, format="PNG")
        return out.getvalue()

    def broken():
        raise ValueError("no figure")

    tracker = Tracker(tmp_path / "tb", out=io.StringIO())
    tracker.image("run", "broken", broken)
    for step in range(20):  # a long run draws one per finished model: none may pile up
        tracker.image("run", "figure", png, step)
        tracker._pending[-1].join()
    assert len(tracker._pending) <= 2
    with pytest.raises(ValueError, match="no figure"):
        tracker.close()
    assert len(tb_events(tmp_path / "tb" / "run").Images("figure")) == 20


def test_class_names_outside_every_font_draw_without_warnings():
    """Han class names (the font set) brought one matplotlib warning per character DejaVu
    lacks, hundreds in a run's output. They are drawn from an installed CJK face when there is
    one; what no face has (U+E000, private use) becomes a box, without a warning."""
    import warnings

    from matplotlib import font_manager

    from ensemble import figures

    names, drawn = figures._fonts()
    if any("CJK" in f.name for f in font_manager.fontManager.ttflist):
        assert any("CJK" in n for n in names) and 0x4E03 in drawn
    assert 0xE000 not in drawn and ord(figures.BOX) in drawn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = figures.subsets([[0, 1], [1, 2]], ["\ue000", "\u4e03", "a"])
    assert png.startswith(b"\x89PNG")


def tb_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.mark.ray
@pytest.mark.slow
def test_tensorboard_holds_config_hparams_and_figures(specialists_run):
    run, _ = specialists_run
    tb = run / "tb"
    overview = tb_events(tb / "run")
    assert "config/text_summary" in overview.Tags()["tensors"]
    config_text = overview.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: tiny-specialists" in config_text
    assert {"specialists/covariance", "specialists/subsets",
            "students/temperature_x_width"} <= set(overview.Tags()["images"])
    for model in ("generalist-0", "specialist-0", "student-all", "ensemble"):
        events = tb_events(tb / model)
        assert "confusion/test" in events.Tags()["images"], model
        image = events.Images("confusion/test")[0]
        assert image.width > 100 and image.height > 100
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = tb_events(tb / "student-all").PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["temperature"].number_value == 2.0
    assert start.hparams["role"].string_value == "student"
    assert start.hparams["hidden"].string_value == "16"
    final = tb_events(tb / "student-all").Scalars("hparams/test_errors")[0].value
    summary = json.loads((run / "metrics.json").read_text())["models"]["student-all"]["summary"]
    assert final == summary["test_errors"]


@pytest.mark.ray
def test_ray_metrics_carry_each_models_epoch(ray_session, data_root):
    from ensemble.actors import start_actor
    from ensemble.config import DataConfig, ModelConfig, ResourcesConfig, TrainConfig
    from ensemble.data import load_splits

    splits = load_splits(DataConfig(val_size=100, download=False), data_root)
    actor = start_actor("generalist", "metered-0", "ensemble-tests", ResourcesConfig(),
                        "metered-0", ModelConfig(hidden=(8,)), TrainConfig(epochs=1), splits, 0)
    record, _ = ray_session.get(actor.run_epoch.options(num_returns=2).remote(1, None))
    port = ray_session.nodes()[0]["MetricsExportPort"]
    pattern = re.compile(r'^ray_ensemble_val_errors\{[^}]*model="metered-0"[^}]*'
                         r'role="generalist"[^}]*\} (\S+)$', re.M)
    found = None
    for _ in range(60):  # Ray exports what its workers recorded every few seconds
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        found = pattern.search(body.decode())
        if found:
            break
        time.sleep(1)
    ray_session.kill(actor)
    assert found, "ray_ensemble_val_errors of metered-0 never reached the metrics endpoint"
    assert float(found.group(1)) == record["val_errors"]


# ---------------------------------------------------------------- the report ---------------------
CHECKER = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const drawn = images.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  document.body.setAttribute('data-figures', images.length + '/' + drawn.length);
});
</script></body>"""


def rendered(html_file, tmp_path):
    """'figures/drawn' as headless Chromium counts them after loading `html_file`."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    page = tmp_path / "checked.html"
    page.write_text(html_file.read_text().replace("</body>", CHECKER))  # the page + a reader
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-figures="(\d+)/(\d+)"', dom)
    assert found, f"Chromium did not load the page: {dom[:300]!r}"
    return int(found.group(1)), int(found.group(2))


@pytest.mark.ray
@pytest.mark.slow
def test_report_renders_every_figure(specialists_run, tmp_path, capsys):
    run, _ = specialists_run
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    md = (run / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\((report/[^)]+\.png)\)", md)
    assert {"report/curves.png", "report/covariance.png", "report/subsets.png",
            "report/confusion-generalist-0.png", "report/confusion-student-all.png",
            "report/confusion-generalists-specialists.png",
            "report/temperature-width.png"} <= set(figures)
    for figure in figures:
        assert (run / figure).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    for section in ("## Models", "## Specialists", "## Confusion matrices",
                    "## Students: temperature x width", "## Where the time went", "## Config"):
        assert section in md
    page = run / "report.html"
    html = page.read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", html)  # nothing to fetch: opens offline
    assert rendered(page, tmp_path) == (len(figures), len(figures))
    # the check can fail: one damaged figure is seen as not drawn
    broken = tmp_path / "broken.html"
    broken.write_text(html.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    assert rendered(broken, tmp_path) == (len(figures), len(figures) - 1)


def test_report_of_a_coordinator_that_found_no_subset(specialists_run, tmp_path, capsys):
    """Subsets can all fall below specialists.min_size (or be left by specialists.min_tie):
    the run goes on without specialists, and the report says so without a subsets figure."""
    run = tmp_path / "run"
    shutil.copytree(specialists_run[0], run)
    subsets = json.loads((run / "subsets.json").read_text())
    subsets.update(subsets=[], names=[])
    (run / "subsets.json").write_text(json.dumps(subsets))
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    md = (run / "report.md").read_text()
    assert "## Specialists (0)" in md and "report/covariance.png" in md
    assert "report/subsets.png" not in md


# ---------------------------------------------------------------- the export ---------------------
@pytest.mark.ray
@pytest.mark.slow
def test_export_runs_in_onnxruntime_like_the_trained_model(specialists_run, data_root, capsys):
    ort = pytest.importorskip("onnxruntime")
    from ensemble.config import DataConfig
    from ensemble.data import load_splits, to_device
    from ensemble.rundir import RunDir
    from ensemble.models import load_model

    run, _ = specialists_run
    assert main(["export", str(run), "--model", "student"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())["models"]
    chosen = min(("student-all", "student-all-T4"),
                 key=lambda n: (metrics[n]["summary"]["val_errors"], n))
    assert f"export/{chosen}.onnx" in capsys.readouterr().out
    about = json.loads((run / "export" / f"{chosen}.json").read_text())
    assert about["input_shape"] == ["batch", 1, 8, 8] and about["output_shape"] == ["batch", 10]
    assert about["mode"] == "L" and len(about["class_names"]) == 10  # what using it needs
    images = to_device(load_splits(DataConfig(val_size=100, download=False), data_root).test_x,
                       torch.device("cpu"))
    model, _ = load_model(RunDir(run).latest(chosen)[0], torch.device("cpu"))
    with torch.no_grad():
        expected = model(images).numpy()
    session = ort.InferenceSession(str(run / "export" / f"{chosen}.onnx"),
                                   providers=["CPUExecutionProvider"])
    for batch in (images[:1], images[:37], images):  # the batch dimension is free
        got = session.run(["logits"], {"images": batch.numpy()})[0]
        np.testing.assert_allclose(got, expected[:len(batch)], rtol=1e-4, atol=1e-5)
    program = torch.export.load(run / "export" / f"{chosen}.pt2").module()
    with torch.no_grad():
        np.testing.assert_allclose(program(images).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (session.run(["logits"], {"images": images.numpy()})[0].argmax(1) ==
            expected.argmax(1)).all()


@pytest.mark.ray
@pytest.mark.slow
def test_export_refuses_an_unknown_model(specialists_run, capsys):
    run, _ = specialists_run
    assert main(["export", str(run), "--model", "teacher"]) == 2
    err = capsys.readouterr().err
    assert "no model 'teacher'" in err and "Traceback" not in err
    assert not (run / "export" / "teacher.onnx").exists()


def test_errors_vs_time_starts_a_student_where_its_teacher_ends():
    import io

    from PIL import Image

    from ensemble import figures

    teacher = [{"seconds": 1800.0, "test_errors": e} for e in (300, 200, 150)]
    student = [{"seconds": 600.0, "test_errors": e} for e in (400, 160)]
    assert figures.errors_by_hour(teacher) == ([0.5, 1.0, 1.5], [300, 200, 150])
    assert figures.errors_by_hour(student, 5400.0) == ([5 / 3, 11 / 6], [400, 160])
    png = figures.errors_vs_time({"teacher": teacher, "student": student},
                                 {"student": 5400.0})
    assert Image.open(io.BytesIO(png)).size == (600, 380)
