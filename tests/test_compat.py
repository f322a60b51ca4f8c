import subprocess
import sys


def test_torchvision_and_its_dependents_import_in_a_fresh_interpreter():
    # The .pth hook written by `make install` must make these imports work on the CPU torch wheel.
    code = ("import torchvision, torchmetrics, lightning, lpips, open_clip; "
            "import torchvision.models as m; m.alexnet()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
