"""tbkd_lib.widgets: the explorer computes what it shows and redraws on every control change,
without an Output widget (capturing into one made headless nbclient runs hang)."""
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("widgets") / "run"
    proc = subprocess.run([sys.executable, "-m", "tbkd_lib", "run", "--out", str(run), "--preset", "smoke",
                           "--n-train", "30", "--n-val", "20", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return run


def test_explorer_panel_redraws_on_every_control(smoke_run):
    W = pytest.importorskip("ipywidgets")
    from tbkd_lib.widgets import Explorer, explorer

    ex = Explorer(smoke_run, smoke_run / "data", max_images=4, device="cpu")
    assert ex.cfg.methods == ("gradcam",) and ex.cfg.max_images == 8  # the smoke run's own scoring config
    panel = explorer(ex)
    image, controls = panel.image, panel.controls
    assert image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(isinstance(w, W.Output) for w in [panel, *panel.children, *panel.children[0].children])
    seen = {bytes(image.value)}
    for name, value in (("tau", 0.9), ("alpha", 0.0), ("model", "teacher"), ("method", "gradcam")):
        if controls[name].value == value:
            continue
        controls[name].value = value
        assert bytes(image.value) not in seen, f"changing {name} did not redraw the overlay"
        seen.add(bytes(image.value))
    view = ex.view(controls["index"].value, controls["method"].value, controls["model"].value, 0.9)
    assert view.tau == 0.9 and 0.0 <= view.iou <= 1.0
