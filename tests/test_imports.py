import subprocess
import sys


def test_core_imports_no_ray():
    code = ("import sys, ensemble.config, ensemble.data, ensemble.models, ensemble.train, "
            "ensemble.distill, ensemble.checkpoint, ensemble.rundir, ensemble.tracking, "
            "ensemble.cli, specialists; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ray_layer_does_import_ray():  # the check above can fail: this shows what it looks for
    code = "import sys, ensemble.actors; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
